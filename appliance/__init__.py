"""pqhsm: an HSM-style keystore appliance migrating signing keys to ML-DSA-87."""

__version__ = "0.1.0"

__all__ = ["__version__"]

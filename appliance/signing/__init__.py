"""Signature production and verification (classical, ML-DSA-87; dual and composite follow)."""

from appliance.signing.verify import load_public_key, verify_signature

__all__ = ["load_public_key", "verify_signature"]

"""Signature production and verification: classical, ML-DSA-87, dual (OR-mode), composite.

Verification works from public keys alone (:func:`appliance.signing.policy.verify`).
"""

from appliance.signing.verify import load_public_key, verify_signature

__all__ = ["load_public_key", "verify_signature"]

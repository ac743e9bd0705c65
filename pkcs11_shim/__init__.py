"""PKCS#11 front end (object/session model and p11-kit RPC server): see issues 6 and 7."""

__all__: list[str] = []

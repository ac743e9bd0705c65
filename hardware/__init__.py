"""Serial admin console, power-cut relay harness and token lab matrix: see issue 9."""

__all__: list[str] = []

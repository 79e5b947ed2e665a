"""e2vd: a systemd socket-activated daemon serving Emotion2Vec+ Large.

`from e2vd import Client` gives the Python client; the engine lives in `e2vd.engine`.
Importing this package is cheap: nothing heavy (torch, funasr) is imported here.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Client", "__version__"]


def __getattr__(name: str):
    if name == "Client":
        from e2vd.client import Client

        return Client
    raise AttributeError(f"module 'e2vd' has no attribute {name!r}")

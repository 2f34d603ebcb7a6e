"""paser: parsimonious segmentation (PaSeR, AAAI 2024).

A tiny model looks at the whole image with Monte Carlo dropout, a policy routes
each patch to the cheapest model of a pool that will segment it well, and only
the chosen models run.
"""

from paser.errors import CheckpointError, ConfigError, DataError, PaserError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DataError", "PaSeR", "PaserError", "__version__"]


def __getattr__(name: str):
    # Lazy: `import paser` stays light for the CLI's error paths.
    if name == "PaSeR":
        from paser.api import PaSeR

        return PaSeR
    raise AttributeError(f"module 'paser' has no attribute {name!r}")

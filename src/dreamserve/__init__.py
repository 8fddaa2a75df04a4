"""dreamserve: a self-hosted, Wiro-compatible Seedream 4.0 image service on open-weight models."""

__version__ = "0.1.0"

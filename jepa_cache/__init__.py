"""jepa-cache: encode once, train retrieval heads on cached vectors, evaluate as BEIR/MTEB do."""

__version__ = "0.1.0"

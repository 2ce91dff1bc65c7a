"""jepa-cache: encode once, train retrieval heads on cached vectors, evaluate as BEIR/MTEB do."""

__version__ = "0.1.0"

# Public names resolved on first use, so `import jepa_cache` (and `jepa-cache --help`) never pays
# for torch.
_LAZY = {
    "open_store": "store", "train_heads": "api", "evaluate_datasets": "api", "Corrections": "corrections",
    "JEPASIGRegLoss": "losses",
    "Heads": "heads",
    "HeadsConfig": "heads",
    "load_heads": "heads",
    "JEPAEncoder": "jepa_encoder", "GaussianEmbeddingGemma": "jepa_encoder",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

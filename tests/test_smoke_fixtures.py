import numpy as np

from jepa_cache.build import build
from jepa_cache.config import BuildConfig
from jepa_cache.encoder import encode, load_encoder


def test_tiny_build_equals_direct_encode(tiny_model, tiny_beir, tmp_path):
    """A built store holds what SentenceTransformer.encode gives for the same texts (float32 store)."""
    from jepa_cache.datasets import BeirDataset, read_corpus

    store = build(BuildConfig(dataset=str(tiny_beir), model=str(tiny_model), out=str(tmp_path / "s"), dtype="float32",
                              shard_rows=16, chunk_rows=8, batch_size=4), log=lambda s: None)
    _, texts = read_corpus(BeirDataset("tiny", tiny_beir).corpus_path)
    model = load_encoder(tiny_model)
    ref = model.encode(texts, batch_size=4, normalize_embeddings=True, convert_to_numpy=True)
    got = store.corpus.vectors()
    assert np.abs(got - ref).max() < 1e-5
    assert np.abs(encode(model, texts, 7) - ref).max() < 1e-5

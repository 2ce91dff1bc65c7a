"""Where a training batch's encoder vectors come from: the cache, the frozen encoder run live, or a training encoder.

The loop (loop.py) sees only `queries(rows)` / `documents(rows)`; swapping the source is all that
separates cached training from the live reference, which is what shows the cache changes speed,
not results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from .datasets import recorded_dataset, read_corpus, read_queries
from .encoder import encode, load_encoder
from .errors import UserError
from .models import resolve_model, weights_sha256
from .store import Store, check_dataset

NO_PROMPTS = {"query": "", "document": ""}


class EmbeddingSource(Protocol):
    """Where a batch's encoder vectors come from; rows are local indices (see `PairIndex`)."""

    def queries(self, rows: Tensor) -> Tensor: ...

    def documents(self, rows: Tensor) -> Tensor: ...


class CachedSource:
    """The cached vectors, on the device once; a batch is an index gather.

    Shape:
        queries: [Q, D], documents: [N, D] float32; rows [B] int64 -> [B, D]
    """

    def __init__(self, queries: Tensor, documents: Tensor):
        self._queries = queries
        self._documents = documents

    def queries(self, rows: Tensor) -> Tensor:
        return self._queries[rows]

    def documents(self, rows: Tensor) -> Tensor:
        return self._documents[rows]


class FrozenLiveSource:
    """Encoder vectors computed from text at every call; rows index `query_texts` / `doc_texts`.

    Encodes with the very code that built the store (`encoder.encode`: eval mode, no autograd, each
    side after its prompt), so trained with the same seed it gives the cached loop's trajectory at
    the speed of the encoder.

    Shape:
        rows [B] int64 -> [B, dim] float32 on the rows' device
    """

    def __init__(self, model, query_texts: Sequence[str], doc_texts: Sequence[str], batch_size: int = 32,
                 prompts: dict[str, str] | None = None):
        self.model = model.eval()
        self.query_texts = list(query_texts)
        self.doc_texts = list(doc_texts)
        self.batch_size = batch_size
        self.prompts = prompts or NO_PROMPTS

    def _encode(self, texts: list[str], rows: Tensor, prompt: str) -> Tensor:
        vectors = encode(self.model, [texts[i] for i in rows.tolist()], self.batch_size, prompt=prompt)
        return torch.from_numpy(vectors).to(rows.device)

    def queries(self, rows: Tensor) -> Tensor:
        return self._encode(self.query_texts, rows, self.prompts["query"])

    def documents(self, rows: Tensor) -> Tensor:
        return self._encode(self.doc_texts, rows, self.prompts["document"])


class EncoderSource:
    """An embedding source for `loop.fit` that runs a `JEPAEncoder`'s base on the batch's texts.

    With a trainable base the vectors carry autograd, so `fit`'s optimizer updates the encoder too.
    Each side is encoded after its prompt, as the store was.

    Shape:
        rows [B] int64 -> [B, dim] float32 on the model's device
    """

    def __init__(self, model, query_texts: Sequence[str], doc_texts: Sequence[str],
                 prompts: dict[str, str] | None = None):
        self.model = model
        self.query_texts = list(query_texts)
        self.doc_texts = list(doc_texts)
        self.prompts = prompts or NO_PROMPTS

    def queries(self, rows: Tensor) -> Tensor:
        return self.model.embed([self.query_texts[i] for i in rows.tolist()], prompt=self.prompts["query"])

    def documents(self, rows: Tensor) -> Tensor:
        return self.model.embed([self.doc_texts[i] for i in rows.tolist()], prompt=self.prompts["document"])


def store_prompts(store: Store) -> dict[str, str]:
    """The prompts the store's vectors were encoded after, per side ("" for none), as build recorded them."""
    return NO_PROMPTS | (store.provenance["encoder"].get("prompts") or {})


def live_encoder_folder(model: str | None, store: Store) -> Path:
    """The encoder folder for live training: `model`, else the one the store records; it must be the store's."""
    recorded = store.provenance["encoder"]
    local = recorded.get("path") if recorded.get("path") and Path(recorded["path"]).exists() else None
    name = model or local or recorded["name"]
    folder = resolve_model(name)
    want = recorded.get("weights_sha256")
    if want and weights_sha256(folder) != want:
        raise UserError(
            f"--model {name}: its weights differ from the encoder that made {store.path} ({recorded['name']}); "
            "live and cached training must use the same encoder"
        )
    return folder


def store_texts(
    store: Store, dataset_name: str | None, data_dir: str | None, query_rows: Sequence[int], doc_rows: Sequence[int]
) -> tuple[list[str], list[str]]:
    """The texts of the given store rows, read from the dataset the store was built from."""
    dataset = recorded_dataset(store.provenance["dataset"], dataset_name, data_dir)
    check_dataset(store, dataset)
    texts = []
    for section, reader, path, rows in (
        ("queries", read_queries, dataset.queries_path, query_rows),
        ("corpus", read_corpus, dataset.corpus_path, doc_rows),
    ):
        ids, body = reader(path)
        text_of = dict(zip(ids, body))
        wanted = [store.section(section).ids[r] for r in rows]
        missing = [i for i in wanted if i not in text_of]
        if missing:
            raise UserError(
                f"{path}: {len(missing)} id(s) of the store's {section} are not in it (first {missing[0]!r})"
            )
        texts.append([text_of[i] for i in wanted])
    return texts[0], texts[1]


def frozen_live_source(
    model: str | None,
    store: Store,
    dataset: str | None,
    data_dir: str | None,
    query_rows: Sequence[int],
    doc_rows: Sequence[int],
    device: torch.device,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
) -> FrozenLiveSource:
    """Load the store's encoder (or `model`, which must be it), the texts of the given store rows and its prompts."""
    folder = live_encoder_folder(model, store)
    query_texts, doc_texts = store_texts(store, dataset, data_dir, query_rows, doc_rows)
    prompts = store_prompts(store)
    log(f"live: encoder {folder} on {device}, {len(query_texts):,} query and {len(doc_texts):,} document texts"
        + (f", prompts {prompts}" if any(prompts.values()) else ""))
    return FrozenLiveSource(load_encoder(folder, device), query_texts, doc_texts, batch_size, prompts)

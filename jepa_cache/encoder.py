"""Frozen encoding: what `SentenceTransformer.encode` computes (exactly, in fp32), with less padding.

Texts are tokenized once (after their prompt, as `encode(prompt=...)` prepends it), sorted by their
true token counts (within the window the caller hands us, e.g. one shard, so a build can stream),
padded per batch, run under `inference_mode` in the runtime's precision (default: bf16/fp16
autocast on CUDA, fp32 on CPU) by PyTorch or a converted runtime (backends.py), and put back in
input order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .backends import FEATURES, TORCH, Runtime
from .errors import UserError


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def load_encoder(folder: str | Path, device: torch.device | str = "cpu"):
    """Load a sentence-transformers folder (never the network), in eval mode."""
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a local load is quick; its bar would clutter the build's output
    try:
        model = SentenceTransformer(str(folder), device=str(device), local_files_only=True)
    except Exception as e:  # ST/transformers raise many types for a broken folder
        raise UserError(f"{folder}: cannot load as a sentence-transformers model ({type(e).__name__}: {e})") from None
    return model.eval()


def encoder_info(model, folder: str | Path, name: str, weights_sha256: str, prompts: dict[str, str]) -> dict:
    """The provenance of an encoder: everything that decides the vectors it makes (prompts included)."""
    # By class name: the module paths moved between sentence-transformers 3 and 6.
    kinds = {type(m).__name__: m for m in model}
    pooling = kinds["Pooling"].get_config_dict().get("pooling_mode", "unknown") if "Pooling" in kinds else "unknown"
    return {
        "name": name,
        "path": str(folder),
        "weights_sha256": weights_sha256,
        "max_seq_length": int(model.max_seq_length),
        "pooling": pooling,
        "normalize": True,  # always L2-normalised here (a no-op for models that end in Normalize)
        "model_normalizes": "Normalize" in kinds,
        "dim": embedding_dim(model),
    } | (
        {"prompts": dict(prompts)} if any(prompts.values()) else {}
    )  # absent when none: older stores keep their identity


def embedding_dim(model) -> int:
    # sentence-transformers 6 renamed the method; accept both.
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


def tokenize(model, texts: Sequence[str], prompt: str = "") -> dict[str, list[list[int]]]:
    """Token ids of every text (after `prompt`), unpadded, truncated to the model's max_seq_length as ST does."""
    enc = model.tokenizer(
        [prompt + t for t in texts], truncation="longest_first", max_length=model.max_seq_length, padding=False
    )
    return {k: v for k, v in enc.items() if k in FEATURES}


def prompt_length(model, prompt: str) -> int:
    """Tokens of `prompt` at the start of every text, as ST counts them for pooling that excludes the prompt."""
    ids = model.tokenizer([prompt], truncation="longest_first", max_length=model.max_seq_length)["input_ids"][0]
    return len(ids) - (1 if ids and ids[-1] in model.tokenizer.all_special_ids else 0)


@torch.inference_mode()
def encode(
    model,
    texts: Sequence[str],
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
    prompt: str = "",
    runtime: Runtime = TORCH,
) -> np.ndarray:
    """Encode `texts` to L2-normalised float32 vectors, rows in input order.

    Tokenizes once (ST tokenizes per batch after sorting by character count), sorts by the true
    token count so that each batch pads to almost nothing, and pads each batch from those ids.
    `prompt` is what `SentenceTransformer.encode(prompt=...)` prepends (e.g. the model's query
    prompt); `runtime` runs the transformer (backends.load_runtime; default PyTorch).

    Shape:
        returns [len(texts), dim]
    """
    if batch_size <= 0:
        raise UserError(f"--batch-size {batch_size}: must be a positive integer")
    device = model.device
    out = np.empty((len(texts), embedding_dim(model)), dtype=np.float32)
    enc = tokenize(model, texts, prompt)
    extra = {"prompt_length": prompt_length(model, prompt)} if prompt else {}
    lengths = np.fromiter(map(len, enc["input_ids"]), dtype=np.int64, count=len(texts))
    order = np.argsort(-lengths, kind="stable")  # longest first, like ST: a too-large batch fails at once
    with runtime.autocast(device):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = model.tokenizer.pad({k: [v[i] for i in idx] for k, v in enc.items()}, return_tensors="pt")
            features = {k: t.to(device) for k, t in batch.items()} | extra
            emb = runtime(model, features)
            out[idx] = F.normalize(emb, dim=-1).cpu().numpy()
            if on_batch:
                on_batch(len(idx))
    return out

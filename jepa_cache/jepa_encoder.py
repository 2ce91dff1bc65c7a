"""The study's Python API: a sentence encoder with JEPA retrieval heads (`JEPAEncoder`, alias `GaussianEmbeddingGemma`).

Used by train-live to train through the encoder, and by anyone who wants `model(texts)` →
projected embeddings. Its base vectors are normalised exactly as the stores hold them, so heads
trained here and heads trained on a store are interchangeable.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .encoder import embedding_dim, encode, load_encoder, pick_device, prompt_length, tokenize
from .errors import UserError
from .heads import Heads, HeadsConfig
from .models import DEFAULT_MODEL, resolve_model

EARLY_LAYERS = 4  # what the study's `freeze_early_layers` froze


def training_autocast(device: torch.device):
    """bf16 autocast on CUDA where supported, else float32: fp16 would need a loss scaler, which `fit` does not run."""
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def transformer_layers(base) -> nn.ModuleList:
    """The transformer's stack of layers (BERT, MPNet and most encoders keep one ModuleList of them)."""
    count = base[0].auto_model.config.num_hidden_layers
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise UserError(f"cannot find the {count} transformer layers of {type(base[0].auto_model).__name__}")


def _checkpointed(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def enable_gradient_checkpointing(base) -> None:
    """Recompute each layer's activations in backward instead of keeping them.

    Done per layer here rather than through transformers' switch, which MPNet (the default
    encoder) does not support. RNG state is replayed, so dropout masks match the forward.
    """
    for layer in transformer_layers(base):
        layer.forward = _checkpointed(layer.forward)


class JEPAEncoder(nn.Module):
    """A sentence encoder with JEPA retrieval heads: `model(texts)` → projected embeddings.

    The surface of the study's `GaussianEmbeddingGemma` (also exported under that name):
    `base` (the SentenceTransformer), `projection`, `predictor`, `model(list_of_texts)`,
    `model.predictor(query_emb)`, `encode(...)` and `get_trainable_parameters()`. Base vectors
    are L2-normalised exactly as the stores hold them, so heads trained here and heads trained
    on a store are interchangeable.

    The encoder's mode: frozen (`freeze_base=True`) it stays in eval mode and runs without
    autograd whatever `model.train()` says (the study's frozen encoder followed `train()` and
    ran with dropout, so each text's vector changed every step; a cache cannot hold that, and
    a deterministic encoder is what the frozen strategies compare). Trainable, it follows
    `train()`/`eval()` (dropout on in training) unless `base_dropout=False`.

    Args:
        base_model: hub id or local folder (resolved by `models.resolve_model`: a local folder,
            data/models/, then a fetch), or an already loaded SentenceTransformer.
        heads: heads to wrap (e.g. from `resolve.build_heads` or `heads.load_heads`); default the
            study's: MLP projection dim→2·dim→output_dim and MLP predictor output_dim→2·output_dim→
            output_dim, random init, dropout 0.1, compared by L2.
        freeze_early_layers: freeze the first 4 transformer layers (the study's option).
        device: where the whole model lives; "auto" picks CUDA when present.
    """

    def __init__(self, base_model=DEFAULT_MODEL, output_dim: int = 512, freeze_base: bool = True,
                 use_predictor: bool = True, *, heads: Heads | None = None, freeze_early_layers: bool = False,
                 base_dropout: bool = True, gradient_checkpointing: bool = False, device: str | torch.device = "auto"):
        super().__init__()
        device = pick_device(device) if isinstance(device, str) else device
        named = isinstance(base_model, (str, os.PathLike))
        self.base = load_encoder(resolve_model(base_model), device) if named else base_model
        dim = embedding_dim(self.base)
        if heads is None:
            heads = Heads(HeadsConfig(input_dim=dim, output_dim=output_dim, projection="mlp", projection_hidden=2 * dim,
                                      predictor="mlp" if use_predictor else "none", predictor_hidden=2 * output_dim,
                                      init="random", similarity="l2"))
        elif heads.config.input_dim != dim:
            raise UserError(f"heads take {heads.config.input_dim}-d vectors but the encoder makes {dim}-d ones")
        self.heads = heads
        self.freeze_base = freeze_base
        self.base_dropout = base_dropout
        self.base.requires_grad_(not freeze_base)
        if freeze_early_layers and not freeze_base:
            for layer in list(transformer_layers(self.base))[:EARLY_LAYERS]:
                layer.requires_grad_(False)
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.base)
        self.to(device)
        self.train(self.training)

    @property
    def projection(self) -> nn.Module:
        return self.heads.projection

    @property
    def predictor(self) -> nn.Module | None:
        return self.heads.predictor

    @property
    def device(self) -> torch.device:
        return self.base.device

    def train(self, mode: bool = True) -> "JEPAEncoder":
        super().train(mode)
        if self.freeze_base or not self.base_dropout:
            self.base.eval()
        return self

    def embed(self, texts: str | Sequence[str], prompt: str = "") -> Tensor:
        """The encoder's L2-normalised vectors (what a store holds); with autograd unless the base is frozen.

        Tokenized as `encoder.encode` tokenizes (after `prompt`, truncated to max_seq_length), padded
        to the longest text of the call, run under bf16 autocast on CUDA where supported.

        Shape:
            returns [len(texts), dim] float32
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        batch = self.base.tokenizer.pad(tokenize(self.base, texts, prompt), return_tensors="pt")
        features = {k: v.to(self.device) for k, v in batch.items()}
        if prompt:  # pooling that excludes the prompt needs its length, as encoder.encode gives it
            features["prompt_length"] = prompt_length(self.base, prompt)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_base), training_autocast(self.device):
            emb = self.base(features)["sentence_embedding"]
        return F.normalize(emb.float(), dim=-1)

    def forward(self, texts: str | Sequence[str]) -> Tensor:
        """Projected embeddings of `texts`. Shape: returns [len(texts), output_dim] float32."""
        return self.heads(self.embed(texts))

    def encode(self, texts: str | Sequence[str], batch_size: int = 32, show_progress: bool = False,
               convert_to_numpy: bool = False) -> Tensor | np.ndarray:
        """Projected embeddings for retrieval: eval mode, no autograd, the store's encoding code.

        Shape:
            returns [len(texts), output_dim] float32 on the model's device (or as numpy)
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        was_training = self.base.training
        self.base.eval()
        try:
            with tqdm(total=len(texts), unit="texts", disable=not show_progress) as bar:
                base = torch.from_numpy(encode(self.base, texts, batch_size, on_batch=bar.update))
        finally:
            self.base.train(was_training)
        out = self.heads.encode_documents(base)
        return out.cpu().numpy() if convert_to_numpy else out

    def get_trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part (`base`, `projection`, `predictor`), for AdamW groups."""
        parts = {"base": self.base, "projection": self.projection, "predictor": self.predictor}
        return {k: [p for p in m.parameters() if p.requires_grad] if m is not None else [] for k, m in parts.items()}

    def param_groups(self, encoder_lr: float, head_lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups as the study built them: the encoder at its rate, projection and predictor at theirs."""
        # heads first: fit logs the first group's lr
        lrs = {"projection": head_lr, "predictor": head_lr, "base": encoder_lr}
        parts = self.get_trainable_parameters()
        return [{"params": parts[name], "lr": lr, "weight_decay": weight_decay, "name": name}
                for name, lr in lrs.items() if parts[name]]


GaussianEmbeddingGemma = JEPAEncoder

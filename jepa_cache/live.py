"""Training through the encoder: frozen-live, full fine-tune and the two-phase hybrid.

Every strategy here reuses stage 2: the same heads (`train.build_heads`), loss
(`train.build_criterion`), batches and loop (`train.fit`); only the embedding source and the
optimizer's parameter groups change. What the encoder does in each:

- `frozen-live`: frozen, eval mode, no autograd, run every step (`FrozenLiveSource`): the loop
  the user ran before the cache. `train.train(live=True)` runs it.
- `full`: trainable from step 0, in train mode (its dropout on, as in the study) unless
  `encoder_dropout` is off (eval mode: deterministic, so with encoder lr 0 it equals frozen-live).
  AdamW groups: encoder at `encoder_lr`, projection and predictor at `head_lr`; gradient
  clipping covers all of them, as the study clipped `model.parameters()`. While the encoder
  trains, negatives are the batch's (corpus or mined negatives would re-encode the corpus every
  step); `sampling` and `schedule` are the preset's.
- `hybrid`: phase 1 is `train.train` on the cache, unchanged; phase 1 is then scored on a
  validation split (dev, else a seeded slice of the training queries held out of phase 1) and
  phase 2 (encoder unfrozen at `phase2_encoder_lr`, heads going on at `head_lr`) runs only when
  that NDCG@10 reaches `threshold`, or by default beats the vanilla encoder's on the same queries.

A changed encoder is saved as a plain sentence-transformers folder (`out/encoder`), and the heads
record its weights' sha256 as their encoder fingerprint: `jepa-cache build --model out/encoder`
makes stores that eval accepts with these heads, and no others.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LiveConfig, TrainConfig
from .datasets import read_corpus, read_qrels, read_queries, recorded_dataset
from .encoder import embedding_dim, encode, load_encoder, pick_device, tokenize
from .errors import UserError
from .files import atomic_write_bytes, atomic_write_json, exclusive_lock
from .heads import Heads, HeadsConfig, describe, save_heads
from .models import DEFAULT_MODEL, resolve_model, weights_sha256
from .store import Store, now_iso, open_store
from .train import (DevSet, PairIndex, same_id_rows, build_criterion, build_heads, fit, load_pairs, mean_parts, resolve_config,
                    store_record, train, with_width)

STRATEGIES = ("full", "hybrid", "frozen-live")
DEFAULT_LIVE_DIR = Path("runs/live")
ENCODER_DIR = "encoder"
SUMMARY_FILE = "live.json"
STUDY_HEAD_LR = 1e-3  # the study's projection and predictor rate in its full fine-tune
EARLY_LAYERS = 4  # what the study's `freeze_early_layers` froze


# ---------------------------------------------------------------------------------------------
# Frozen encoder, every step


class FrozenLiveSource:
    """Encoder vectors computed from text at every call; rows index `query_texts` / `doc_texts`.

    Encodes with the very code that built the store (`encoder.encode`: eval mode, no autograd), so
    trained with the same seed it gives the cached loop's trajectory at the speed of the encoder.

    Shape:
        rows [B] int64 -> [B, dim] float32 on the rows' device
    """

    def __init__(self, model, query_texts: Sequence[str], doc_texts: Sequence[str], batch_size: int = 32):
        self.model = model.eval()
        self.query_texts = list(query_texts)
        self.doc_texts = list(doc_texts)
        self.batch_size = batch_size

    def _encode(self, texts: list[str], rows: Tensor) -> Tensor:
        vectors = encode(self.model, [texts[i] for i in rows.tolist()], self.batch_size)
        return torch.from_numpy(vectors).to(rows.device)

    def queries(self, rows: Tensor) -> Tensor:
        return self._encode(self.query_texts, rows)

    def documents(self, rows: Tensor) -> Tensor:
        return self._encode(self.doc_texts, rows)


def live_encoder_folder(model: str | None, store: Store) -> Path:
    """The encoder folder for live training: `model`, else the one the store records; it must be the store's."""
    recorded = store.provenance["encoder"]
    name = model or (recorded.get("path") if recorded.get("path") and Path(recorded["path"]).exists() else recorded["name"])
    folder = resolve_model(name)
    want = recorded.get("weights_sha256")
    if want and weights_sha256(folder) != want:
        raise UserError(
            f"--model {name}: its weights differ from the encoder that made {store.path} ({recorded['name']}); "
            "live and cached training must use the same encoder"
        )
    return folder


def store_texts(store: Store, dataset_name: str | None, data_dir: str | None,
                query_rows: Sequence[int], doc_rows: Sequence[int]) -> tuple[list[str], list[str]]:
    """The texts of the given store rows, read from the dataset the store was built from."""
    dataset = recorded_dataset(store.provenance["dataset"], dataset_name, data_dir)
    recorded = store.provenance["dataset"].get("files") or {}
    current = dataset.file_hashes()
    changed = [f for f in recorded if not f.startswith("qrels") and f in current and current[f] != recorded[f]]
    if changed:
        raise UserError(f"{dataset.root}: {', '.join(changed)} changed since {store.path} was built; rebuild the store")
    texts = []
    for section, reader, path, rows in (("queries", read_queries, dataset.queries_path, query_rows),
                                        ("corpus", read_corpus, dataset.corpus_path, doc_rows)):
        ids, body = reader(path)
        text_of = dict(zip(ids, body))
        wanted = [store.section(section).ids[r] for r in rows]
        missing = [i for i in wanted if i not in text_of]
        if missing:
            raise UserError(f"{path}: {len(missing)} id(s) of the store's {section} are not in it (first {missing[0]!r})")
        texts.append([text_of[i] for i in wanted])
    return texts[0], texts[1]


def frozen_live_source(cfg: TrainConfig, store: Store, index, device: torch.device,
                       log: Callable[[str], None] = print) -> FrozenLiveSource:
    """Load the store's encoder and the texts of the rows `index` touches (a `train.PairIndex`)."""
    folder = live_encoder_folder(cfg.model, store)
    query_texts, doc_texts = store_texts(store, cfg.dataset, cfg.data_dir, index.query_rows, index.doc_rows)
    log(f"live: encoder {folder} on {device}, {len(query_texts):,} query and {len(doc_texts):,} document texts")
    return FrozenLiveSource(load_encoder(folder, device), query_texts, doc_texts, cfg.encode_batch_size)


# ---------------------------------------------------------------------------------------------
# The encoder + heads module (the study's Python API)


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
        heads: heads to wrap (e.g. from `train.build_heads` or `heads.load_heads`); default the
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
        self.base = load_encoder(resolve_model(base_model), device) if isinstance(base_model, (str, os.PathLike)) else base_model
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

    def embed(self, texts: str | Sequence[str]) -> Tensor:
        """The encoder's L2-normalised vectors (what a store holds); with autograd unless the base is frozen.

        Tokenized as `encoder.encode` tokenizes (truncated to max_seq_length), padded to the
        longest text of the call, run under bf16 autocast on CUDA where supported.

        Shape:
            returns [len(texts), dim] float32
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        batch = self.base.tokenizer.pad(tokenize(self.base, texts), return_tensors="pt")
        features = {k: v.to(self.device) for k, v in batch.items()}
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
        from tqdm.auto import tqdm

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
        lrs = {"projection": head_lr, "predictor": head_lr, "base": encoder_lr}  # heads first: fit logs the first group's lr
        parts = self.get_trainable_parameters()
        return [{"params": parts[name], "lr": lr, "weight_decay": weight_decay, "name": name} for name, lr in lrs.items() if parts[name]]


GaussianEmbeddingGemma = JEPAEncoder


class EncoderSource:
    """An embedding source for `train.fit` that runs a `JEPAEncoder`'s base on the batch's texts.

    With a trainable base the vectors carry autograd, so `fit`'s optimizer updates the encoder too.

    Shape:
        rows [B] int64 -> [B, dim] float32 on the model's device
    """

    def __init__(self, model: JEPAEncoder, query_texts: Sequence[str], doc_texts: Sequence[str]):
        self.model = model
        self.query_texts = list(query_texts)
        self.doc_texts = list(doc_texts)

    def queries(self, rows: Tensor) -> Tensor:
        return self.model.embed([self.query_texts[i] for i in rows.tolist()])

    def documents(self, rows: Tensor) -> Tensor:
        return self.model.embed([self.doc_texts[i] for i in rows.tolist()])


# ---------------------------------------------------------------------------------------------
# Validation (hybrid): is phase 1 good enough to unfreeze the encoder?


@dataclasses.dataclass
class Validation:
    """What phase 1 is judged on (a `train.DevSet`), and phase 1's own config (its pairs exclude held-out queries)."""

    dev: DevSet  # held-out queries scored as eval scores them: NDCG@10 over the whole corpus
    origin: str
    train: TrainConfig


def validation_split(cfg: LiveConfig, store: Store, out: Path, device: torch.device) -> Validation:
    """The dataset's `val_split` qrels when it has them; else a seeded slice of the training queries held out.

    Held-out queries are written out of phase 1's pairs (`out/phase1-pairs.jsonl`, recorded in
    phase 1's config.json), so `train-heads --pairs` on that file repeats phase 1 exactly; they
    are judged by their training pairs (relevance 1). The slice depends on `val_seed` only, so
    every training seed is validated on the same queries.
    """
    tcfg = cfg.train
    dataset = recorded_dataset(store.provenance["dataset"], tcfg.dataset, tcfg.data_dir)
    corpus = torch.from_numpy(store.corpus.vectors(np.float32)).to(device)
    if cfg.val_split in dataset.splits():
        if cfg.val_split == tcfg.train_split and not tcfg.pairs:
            raise UserError(f"--val-split {cfg.val_split}: the training split itself; validate on another split")
        qrels = read_qrels(dataset.qrels_path(cfg.val_split))
        qids = [q for q in qrels if q in store.queries.row_of]
        queries = store.queries.vectors(np.float32, np.array([store.queries.row_of[q] for q in qids], dtype=np.int64))
        dev = DevSet(torch.from_numpy(queries).to(device), qids, corpus, store.corpus.ids, {q: qrels[q] for q in qids})
        return Validation(dev, f"{dataset.name}/{cfg.val_split} ({len(qids):,} queries)", tcfg)
    fit_pairs, held = load_pairs(dataclasses.replace(tcfg, max_pairs=None), store).hold_out(cfg.val_fraction, cfg.val_seed)
    query_ids, doc_ids = store.queries.ids, store.corpus.ids
    lines = []
    for i in range(len(fit_pairs)):
        line = {"query_id": query_ids[fit_pairs.query_rows[i]], "doc_id": doc_ids[fit_pairs.doc_rows[i]]}
        if fit_pairs.neg_rows is not None:
            line["negative_id"] = doc_ids[fit_pairs.neg_rows[i]]
        lines.append(json.dumps(line) + "\n")
    path = out / "phase1-pairs.jsonl"
    atomic_write_bytes(path, "".join(lines).encode())
    origin = (f"{held.origin} held out ({dataset.name} has no {cfg.val_split!r} split); "
              f"phase 1 trains on the other {len(fit_pairs):,} pairs ({path})")
    return Validation(DevSet.from_pairs(held, store, corpus, device), origin, dataclasses.replace(tcfg, pairs=str(path)))


# ---------------------------------------------------------------------------------------------
# train-live


@dataclasses.dataclass
class LiveResult:
    out: Path
    heads: Heads
    encoder: Path  # the encoder these heads go with: out/encoder when it changed, else the base
    encoder_changed: bool
    config: LiveConfig  # resolved
    history: list[dict]  # every step, phase 1 then phase 2 for hybrid
    seconds: float
    validation: dict | None  # hybrid: what phase 1 scored and whether phase 2 ran


def resolve_live(cfg: LiveConfig) -> LiveConfig:
    """Resolve the heads' config from its preset and the live defaults that depend on the strategy."""
    if cfg.strategy not in STRATEGIES:
        raise UserError(f"--strategy {cfg.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    tcfg = resolve_config(cfg.train)
    head_lr = cfg.head_lr if cfg.head_lr is not None else (STUDY_HEAD_LR if cfg.strategy == "full" else tcfg.lr)
    resolved = dataclasses.replace(cfg, train=tcfg, head_lr=head_lr,
                                   phase2_epochs=tcfg.epochs if cfg.phase2_epochs is None else cfg.phase2_epochs)
    if min(resolved.encoder_lr, resolved.phase2_encoder_lr) < 0 or resolved.head_lr <= 0:
        raise UserError("--encoder-lr and --phase2-encoder-lr must be >= 0, --head-lr positive")
    if resolved.phase2_epochs <= 0 or not 0 < resolved.val_fraction < 1:
        raise UserError("--phase2-epochs must be positive and --val-fraction in (0, 1)")
    if cfg.strategy == "full" and (tcfg.negatives != "batch" or tcfg.dev_fraction > 0 or tcfg.interpolate != 1.0):
        # Corpus or mined negatives would re-encode the corpus through the changing encoder every
        # step; a dev slice (and WiSE-FT's choice of weight) scores heads on cached vectors of an
        # encoder that no longer exists.
        raise UserError(f"--strategy full trains the encoder: it takes in-batch negatives, no dev slice and no interpolation "
                        f"(preset {tcfg.preset!r} has negatives={tcfg.negatives}, dev_fraction={tcfg.dev_fraction}, "
                        f"interpolate={tcfg.interpolate}); use preset jepa or study, or hybrid, whose phase 1 takes them")
    return resolved


def default_out(cfg: LiveConfig, dataset: str) -> Path:
    return DEFAULT_LIVE_DIR / dataset / f"{cfg.strategy}-{cfg.train.preset}-s{cfg.train.seed}"


def _train_through_encoder(cfg: LiveConfig, store: Store, pairs, folder: Path, device: torch.device, heads: Heads | None,
                           encoder_lr: float, epochs: int, log: Callable[[str], None]):
    """`train.fit` with the encoder trainable: fresh heads (full) or phase 1's (hybrid)."""
    from tqdm.auto import tqdm

    tcfg = cfg.train
    index = PairIndex.build(pairs, device, same_id=same_id_rows(store))
    query_texts, doc_texts = store_texts(store, tcfg.dataset, tcfg.data_dir, index.query_rows, index.doc_rows)
    base = load_encoder(folder, device)  # loaded before seeding, as train.train loads its live encoder
    torch.manual_seed(tcfg.seed)  # heads init, dropout masks
    if heads is None:
        heads = build_heads(tcfg, store.dim, torch.from_numpy(store.corpus.vectors(np.float32, index.doc_rows))).to(device)
    model = JEPAEncoder(base, freeze_base=False, heads=heads, base_dropout=cfg.encoder_dropout,
                        gradient_checkpointing=cfg.gradient_checkpointing, device=device)
    optimizer = torch.optim.AdamW(model.param_groups(encoder_lr, cfg.head_lr, tcfg.weight_decay))
    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    steps = epochs * math.ceil(index.items(tcfg.sampling) / tcfg.batch_size)
    log(f"{describe(heads)}\nencoder {folder}: trainable at lr {encoder_lr:g} ({'train mode, dropout on' if cfg.encoder_dropout else 'eval mode, no dropout'}"
        f"{', gradient checkpointing' if cfg.gradient_checkpointing else ''}); heads at lr {cfg.head_lr:g}; "
        f"{trainable:,} trainable parameters; {len(pairs):,} pairs, {epochs} {tcfg.sampling} epoch(s) × {steps // epochs} steps of "
        f"{tcfg.batch_size}, in-batch negatives, {tcfg.schedule} lr, on {device}")
    model.train()
    with tqdm(total=steps, unit="step", desc="train-live", dynamic_ncols=True, mininterval=5) as bar:
        def on_step(record: dict) -> None:
            bar.update(1)
            bar.set_postfix_str(f"loss {record['loss']:.4f}", refresh=False)

        result = fit(model.heads, build_criterion(tcfg), EncoderSource(model, query_texts, doc_texts), index, optimizer,
                     epochs=epochs, batch_size=tcfg.batch_size, seed=tcfg.seed, warmup=tcfg.warmup,
                     grad_clip=tcfg.grad_clip, on_step=on_step, log=log, sampling=tcfg.sampling, schedule=tcfg.schedule)
    return model.eval(), result, trainable


def _save_encoder(model: JEPAEncoder, out: Path) -> tuple[Path, str]:
    """Save the base as a sentence-transformers folder, whole or not at all; returns it and its weights' sha256."""
    final, partial = out / ENCODER_DIR, out / f".{ENCODER_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.base.save(str(partial), create_model_card=False)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    return final, weights_sha256(final)


def _write_steps(path: Path, history: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in history).encode())


@dataclasses.dataclass
class _Trained:
    """What a strategy leaves to be saved."""

    heads: Heads
    history: list[dict]
    epoch_seconds: list[float]
    trainable: int
    train_cfg: TrainConfig  # of the heads: the pairs they saw
    model: JEPAEncoder | None = None  # set when the encoder changed
    validation: dict | None = None


def _full(cfg: LiveConfig, store: Store, folder: Path, device: torch.device, out: Path, log: Callable[[str], None]) -> _Trained:
    model, fitted, trainable = _train_through_encoder(cfg, store, load_pairs(cfg.train, store), folder, device, None,
                                                      cfg.encoder_lr, cfg.train.epochs, log)
    return _Trained(model.heads, fitted.history, fitted.epoch_seconds, trainable, cfg.train, model)


def _hybrid(cfg: LiveConfig, store: Store, folder: Path, device: torch.device, out: Path, log: Callable[[str], None]) -> _Trained:
    split = validation_split(cfg, store, out, device)
    log(f"hybrid phase 1: train-heads on the cache; validation: {split.origin}")
    phase1 = train(dataclasses.replace(split.train, out=str(out / "phase1"), overwrite=True), log=log)
    vanilla, achieved = split.dev.score(None), split.dev.score(phase1.heads)
    # The study's rule, unfreeze only if phase 1 works: reach --threshold, or by default beat vanilla.
    passed = achieved > vanilla if cfg.threshold is None else achieved >= cfg.threshold
    validation = {"from": split.origin, "queries": len(split.dev), "vanilla_ndcg@10": vanilla, "phase1_ndcg@10": achieved,
                  "threshold": cfg.threshold, "rule": "> vanilla" if cfg.threshold is None else ">= --threshold",
                  "phase2": passed, "phase1_seconds": phase1.seconds}
    log(f"phase 1 validation NDCG@10 {achieved:.4f} (vanilla {vanilla:.4f}; phase 2 needs {validation['rule']}"
        f"{f' {cfg.threshold:.4f}' if cfg.threshold is not None else ''}): "
        + ("phase 2 unfreezes the encoder" if validation["phase2"] else "phase 2 skipped; phase 1's heads are the result"))
    counts = phase1.heads.parameter_counts()["total"]
    if not validation["phase2"]:
        return _Trained(phase1.heads, phase1.history, phase1.epoch_seconds, counts, phase1.config, validation=validation)
    model, fitted, trainable = _train_through_encoder(cfg, store, load_pairs(phase1.config, store), folder, device, phase1.heads,
                                                      cfg.phase2_encoder_lr, cfg.phase2_epochs, log)
    steps, epochs = len(phase1.history), max(r["epoch"] for r in phase1.history) + 1  # phase 2 numbered on
    history = phase1.history + [{**r, "step": r["step"] + steps, "epoch": r["epoch"] + epochs} for r in fitted.history]
    return _Trained(model.heads, history, phase1.epoch_seconds + fitted.epoch_seconds, trainable, phase1.config, model, validation)


def train_live(cfg: LiveConfig, log: Callable[[str], None] = print) -> LiveResult:
    """Run one live strategy and save its heads (and the changed encoder) under `cfg.train.out`.

    Output folder: heads.safetensors + heads.json (their encoder fingerprint is the encoder they
    go with), config.json (the heads' resolved TrainConfig), steps.jsonl, live.json (this config
    resolved, the encoder, validation, timings), `encoder/` when the encoder changed, and for
    hybrid `phase1/` (a train-heads folder) and, without a dev split, phase1-pairs.jsonl.
    """
    cfg = resolve_live(cfg)
    store = open_store(cfg.train.store)
    cfg = dataclasses.replace(cfg, train=with_width(cfg.train, store.dim))
    tcfg = cfg.train
    out = Path(tcfg.out) if tcfg.out else default_out(cfg, store.dataset_name)
    if (out / SUMMARY_FILE).exists() and not tcfg.overwrite:
        raise UserError(f"{out}: already holds a train-live result; choose another --out or pass --overwrite")
    t0 = time.perf_counter()
    folder = live_encoder_folder(tcfg.model, store)
    if cfg.strategy == "frozen-live":  # exactly train-heads --live
        result = train(dataclasses.replace(tcfg, live=True, out=str(out)), log=log)
        done = _Trained(result.heads, result.history, result.epoch_seconds, result.heads.parameter_counts()["total"], result.config)
    else:
        with exclusive_lock(out, "train-live"):
            out.mkdir(parents=True, exist_ok=True)
            device = pick_device(tcfg.device)
            done = (_full if cfg.strategy == "full" else _hybrid)(cfg, store, folder, device, out, log)
            store_meta = store_record(store)
            if done.model is not None:
                encoder, sha = _save_encoder(done.model, out)
                store_meta = {"path": None, "fingerprint": None, "encoder_fingerprint": sha, "encoder": str(encoder),
                              "dataset": store.dataset_name, "imported": False, "trained_from": store_meta}
            last_epoch = [r for r in done.history if r["epoch"] == done.history[-1]["epoch"]]
            save_heads(done.heads, out, {"store": store_meta, "training": {
                "strategy": cfg.strategy, "preset": tcfg.preset, "pairs_from": done.train_cfg.pairs or f"{tcfg.train_split} qrels",
                "steps": len(done.history), "seconds": round(time.perf_counter() - t0, 3),
                "epoch_seconds": [round(t, 3) for t in done.epoch_seconds], "live": True, "encoder_changed": done.model is not None,
                "encoder_dropout": cfg.encoder_dropout, "trainable_parameters": done.trainable, "device": str(device),
                "final_epoch_mean": mean_parts(last_epoch), "finished": now_iso()}})
            atomic_write_json(out / "config.json", done.train_cfg)
            _write_steps(out / "steps.jsonl", done.history)
    encoder = out / ENCODER_DIR if done.model is not None else folder
    seconds = time.perf_counter() - t0
    atomic_write_json(out / SUMMARY_FILE, {
        "strategy": cfg.strategy, "config": cfg, "validation": done.validation, "seconds": round(seconds, 3),
        "trainable_parameters": done.trainable, "steps": len(done.history), "finished": now_iso(),
        "encoder": {"path": str(encoder), "changed": done.model is not None, "base": str(folder), "weights_sha256": weights_sha256(encoder)},
    })
    log(f"train-live {cfg.strategy}: {seconds:.1f} s; heads: {out}" + (f"; fine-tuned encoder: {encoder}" if done.model is not None else ""))
    return LiveResult(out, done.heads.eval(), encoder, done.model is not None, cfg, done.history, seconds, done.validation)

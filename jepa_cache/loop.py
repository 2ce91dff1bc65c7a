"""The training loop shared by every strategy: batches, candidates, loss, AdamW steps, and the epoch kept on dev.

`fit` is the one loop: cached, frozen-live and encoder-training runs differ only in their embedding
source (sources.py) and in what the optimizer holds. Batches come from a seeded CPU generator, so a
run is the same on any device and for any source.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .config import DataConfig, OptimConfig
from .distributed import World, average_gradients, broadcast, sharded_forward
from .errors import UserError
from .heads import Heads
from .losses import PART_NAMES, JEPASIGRegLoss, first_nonfinite
from .metrics import run_of_hits, score
from .pairs import PairIndex, Pairs, repeated
from .search import tie_order, top_k
from .sources import EmbeddingSource
from .store import Store


def lr_lambda(total_steps: int, warmup: float, schedule: str = "cosine") -> Callable[[int], float]:
    """Linear warm-up over `warmup` of the steps, then cosine decay to zero (or constant); stepped every batch."""
    warm = int(round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        progress = (step - warm) / max(total_steps - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


@dataclass
class FitResult:
    history: list[dict]  # one record per step: step, epoch, loss, each weighted part, grad_norm, lr
    epoch_seconds: list[float]
    dev: list[float] = field(default_factory=list)  # dev NDCG@10 after epoch e (dev[0]: before training)
    best_epoch: int | None = None  # the epoch kept (select="dev"); None: the last


class NonFiniteLoss(UserError):
    """Training produced NaN/inf; nothing was written."""


class DevSet:
    """Held-out training queries scored as eval scores them: exact search over the whole corpus, NDCG@10.

    A hit whose id is the query's is dropped, as BEIR does; judgements are the held-out pairs
    (relevance 1). Queries go through the heads' own query tower.
    """

    def __init__(self, queries: Tensor, query_ids: list[str], corpus: Tensor, corpus_ids: list[str],
                 qrels: dict[str, dict[str, int]]):
        self.queries, self.query_ids, self.qrels = queries, query_ids, qrels
        self.corpus, self.corpus_ids = corpus, corpus_ids

    @classmethod
    def from_pairs(cls, dev: Pairs, store: Store, corpus: Tensor, device: torch.device) -> "DevSet":
        q_ids, d_ids = store.queries.ids, store.corpus.ids
        qrels: dict[str, dict[str, int]] = {}
        for qr, dr in zip(dev.query_rows, dev.doc_rows):
            qrels.setdefault(q_ids[qr], {})[d_ids[dr]] = 1
        rows = np.array([store.queries.row_of[q] for q in qrels], dtype=np.int64)
        queries = torch.from_numpy(store.queries.vectors(np.float32, rows)).to(device)
        return cls(queries, list(qrels), corpus, d_ids, qrels)

    def __len__(self) -> int:
        return len(self.query_ids)

    def score(self, heads: Heads | None) -> float:
        """NDCG@10 of the dev queries through `heads` (None: vanilla)."""
        if heads is None:
            queries, docs, similarity = self.queries, self.corpus, "cos"
        else:
            queries, docs = heads.encode_queries(self.queries), heads.encode_documents(self.corpus)
            similarity = heads.similarity
        hits = top_k(docs.float().cpu().numpy(), queries.float().cpu().numpy(), 11, similarity, "torch",
                     ties=tie_order(self.corpus_ids))
        run = {q: dict(docs) for q, docs in run_of_hits(hits, self.query_ids, self.corpus_ids, 11).items()}
        return score(self.qrels, run, recall_at=10)[0]["ndcg@10"]


def interpolate_heads(heads: Heads, initial: dict[str, Tensor], weight: float) -> Heads:
    """Weight-space ensembling with the initial heads (WiSE-FT): θ ← θ₀ + weight · (θ − θ₀), in place.

    For heads that start at vanilla (the identity adapter), weight < 1 moves them part of the way
    back: in-domain gains shrink a little, zero-shot losses shrink more (see README).
    """
    if weight != 1.0:
        with torch.no_grad():
            for name, value in heads.state_dict().items():
                if value.is_floating_point():
                    value.copy_(initial[name].to(value.device) + weight * (value - initial[name].to(value.device)))
    return heads


class _DevSelection:
    """Dev NDCG@10 after every epoch (epoch 0: before training) and, with `select` dev, the best epoch's weights."""

    def __init__(self, heads: Heads, dev: Callable[[Heads], float] | None, select: str, world: World):
        if select == "dev" and dev is None:
            raise ValueError("select='dev' needs a dev scorer")
        self.heads, self.dev, self.select, self.world = heads, dev, select, world
        self.scores: list[float] = []
        self.best_state: dict[str, Tensor] | None = None
        self.best_epoch: int | None = None

    def after(self, epoch: int) -> None:
        if self.dev is None:
            return
        # rank 0 scores and every rank follows: the epoch kept (and so a refit's length) must agree
        self.scores.append(broadcast(self.world, float(self.dev(self.heads)) if self.world.main else None))
        if self.select == "dev" and (self.best_epoch is None or self.scores[-1] > self.scores[self.best_epoch]):
            self.best_state = {k: v.detach().clone() for k, v in self.heads.state_dict().items()}
            self.best_epoch = epoch

    def restore(self, log: Callable[[str], None]) -> None:
        if self.best_state is not None:
            self.heads.load_state_dict(self.best_state)
            log(f"dev NDCG@10 by epoch {' '.join(f'{v:.4f}' for v in self.scores)}: keeping epoch {self.best_epoch}"
                f"{' (the initial heads)' if self.best_epoch == 0 else ''}")


def _candidates(index: PairIndex, data: DataConfig, batch: Tensor, mined: Tensor | None,
                gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """The batch's candidate documents (positives, triples' negatives, a mined one per query) and corpus negatives.

    Returns (cand [C], extra [E] or None) as local document indices; draws from `gen` in a fixed order.
    """
    device = index.q.device
    bq, bd = index.q[batch], index.d[batch]
    cand = bd if index.n is None else torch.cat([bd, index.n[batch]])
    if data.negatives == "mined":
        pick = torch.randint(mined.shape[1], (len(bq),), generator=gen).to(device)
        cand = torch.cat([cand, mined[bq, pick]])
    extra = None
    if data.negatives == "corpus":
        n_docs = len(index.doc_rows)
        if 0 < data.corpus_negatives < n_docs:
            extra = torch.randperm(n_docs, generator=gen)[: data.corpus_negatives].to(device)
        else:
            extra = torch.arange(n_docs, device=device)
    return cand, extra


def _loss(heads: Heads, criterion: JEPASIGRegLoss, source: EmbeddingSource, index: PairIndex, bq: Tensor, cand: Tensor,
          extra: Tensor | None, step: int, world: World) -> tuple[Tensor, dict[str, Tensor]]:
    """One batch through the heads (sharded across ranks) and the loss."""
    e_q, e_c = source.queries(bq), source.documents(cand)
    parts_in = [e_q, e_c] if extra is None else [e_q, e_c, source.documents(extra)]
    z = sharded_forward(heads, torch.cat(parts_in), world)
    b = len(bq)
    z_q, z_d = z[:b], z[b : 2 * b]
    z_n = z[2 * b : b + len(cand)] if len(cand) > b else None
    z_x = z[b + len(cand):] if extra is not None else None
    predicted = heads.predictor(z_q) if heads.predictor is not None else None
    contrast_with_predictor = heads.predictor is not None and heads.config.query_tower == "predictor"
    if extra is None:
        mask = index.positive_mask(bq, cand)
    else:  # a full softmax over the corpus: each document once, however often the batch holds it
        every = torch.cat([cand, extra])
        mask = index.positive_mask(bq, every) | repeated(every)[None, :]
    return criterion(z_q, z_d, z_n, predicted, positive_mask=mask, step=step, negatives=z_x,
                     contrast_query=predicted if contrast_with_predictor else None)


def _record(loss: Tensor, parts: dict[str, Tensor], grad_norm: Tensor, step: int, epoch: int, lr: float) -> dict:
    """The step's line of steps.jsonl; a NaN/inf anywhere stops training, naming the term."""
    values = torch.stack([loss.detach(), grad_norm.to(loss.device), *parts.values()]).tolist()
    record = {"step": step, "epoch": epoch, "loss": values[0], **dict(zip(parts, values[2:])),
              "grad_norm": values[1], "lr": lr}
    if not all(math.isfinite(v) for v in values):
        bad = first_nonfinite(parts) or ("loss" if not math.isfinite(values[0]) else "grad_norm")
        raise NonFiniteLoss(
            f"step {step} (epoch {epoch}): {bad} became {record[bad]}; training stopped and no heads were written "
            "(try a lower --lr, or check the store with `jepa-cache verify`)"
        )
    return record


def fit(heads: Heads, criterion: JEPASIGRegLoss, source: EmbeddingSource, index: PairIndex,
        optimizer: torch.optim.Optimizer, optim: OptimConfig, data: DataConfig, *, seed: int,
        mined: Tensor | None = None, dev: Callable[[Heads], float] | None = None, select: str = "last",
        stop_after: int | None = None, on_step: Callable[[dict], None] | None = None,
        log: Callable[[str], None] = print, world: World = World()) -> FitResult:
    """Train `heads` (and whatever else `optimizer` holds) on `index`'s pairs.

    Batches come from a CPU generator seeded with `seed` (the same on any device and for any
    source); SIGReg's directions are seeded by the global step. A NaN/inf loss or gradient raises
    `NonFiniteLoss` naming the step and the term. `data.negatives`: `batch`; `corpus` (`index` built
    with the whole corpus): also every document, or `corpus_negatives` drawn per step; `mined`: also
    one of each query's `mined` documents ([Q, k] local indices). `dev` scores the heads before
    training and after every epoch; `select` dev restores the best epoch (ties: the earlier);
    `stop_after` runs only that many epochs of the schedule (a refit). Under torchrun every rank
    draws the same batch, runs the heads on its share and all-gathers the outputs (distributed.py),
    so the loss is the single-process loss; rank 0 scores dev and every rank follows its choice.
    """
    if data.negatives == "mined" and mined is None:
        raise ValueError("negatives='mined' needs the mined documents (see pairs.mine_negatives)")
    device = index.q.device
    steps_per_epoch = math.ceil(index.items(data.sampling) / optim.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(optim.epochs * steps_per_epoch, optim.warmup, optim.schedule))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    history: list[dict] = []
    epoch_seconds: list[float] = []
    selection = _DevSelection(heads, dev, select, world)
    selection.after(0)
    step = 0
    heads.train()
    for epoch in range(optim.epochs if stop_after is None else min(stop_after, optim.epochs)):
        t0 = time.perf_counter()
        order = index.epoch_order(gen, data.sampling).to(device)
        for start in range(0, len(order), optim.batch_size):
            batch = order[start : start + optim.batch_size]
            cand, extra = _candidates(index, data, batch, mined, gen)
            loss, parts = _loss(heads, criterion, source, index, index.q[batch], cand, extra, step, world)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params, world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, optim.grad_clip if optim.grad_clip > 0 else math.inf)
            record = _record(loss, parts, grad_norm, step, epoch, scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
            history.append(record)
            if on_step:
                on_step(record)
            step += 1
        epoch_seconds.append(time.perf_counter() - t0)
        selection.after(epoch + 1)
        heads.train()
        dev_note = f"; dev NDCG@10 {selection.scores[-1]:.4f}" if dev is not None else ""
        log(f"epoch {epoch + 1}/{optim.epochs}: {steps_per_epoch} steps, {epoch_seconds[-1]:.2f} s "
            f"({index.items(data.sampling) / max(epoch_seconds[-1], 1e-9):,.0f} {data.sampling}/s); "
            f"{format_parts(mean_parts(history[-steps_per_epoch:]))}{dev_note}")
    selection.restore(log)
    return FitResult(history, epoch_seconds, selection.scores, selection.best_epoch)


def mean_parts(records: list[dict]) -> dict[str, float]:
    keys = ("loss", *PART_NAMES)
    return {k: float(np.mean([r[k] for r in records])) for k in keys} if records else {}


def format_parts(parts: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in parts.items())

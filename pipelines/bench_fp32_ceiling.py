"""Measure what an exact CPU build could still gain: the fp32 matrix-product peak, and OpenVINO settings.

Prints the CPU's fp32 (and bf16) GEMM rate through PyTorch, then runs the build's cached OpenVINO
conversion of all-mpnet-base-v2 over the same length-sorted batches of SciFact documents,
interleaved batch by batch, in four settings: dynamic shapes at f32 (what `build` does), static
shapes compiled per (batch, length rounded up to --round), and the f16 and bf16 precision hints;
each with its time ratio to the first, real tokens/s, model GFLOP/s on the real tokens, and the
minimum cosine of its mean-pooled vectors to the first's.
The README's "Encoder backends" paragraph quotes it.

    python pipelines/bench_fp32_ceiling.py --docs 96 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from bench_build import subset  # sibling scripts: run as `python pipelines/bench_fp32_ceiling.py`
from interleave import interleaved


def gemm_rate(dtype, threads: int, m: int = 4096, k: int = 768, n: int = 3072, repeats: int = 10) -> float:
    """GFLOP/s of an m×k by k×n product in `dtype` (a transformer FFN's shape)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - t0) / 1e9


def token_flops(model, tokens: int, batches: list[dict[str, np.ndarray]]) -> float:
    """Model FLOPs on the real tokens: 2 x the layers' matrix parameters per token, plus attention's two products
    (4 x length x hidden per token and layer; padding is not counted)."""
    config = model[0].auto_model.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    per_layer = 4 * hidden * hidden + 2 * hidden * config.intermediate_size
    attention = sum(4 * float((b["attention_mask"].sum(1) ** 2).sum()) * hidden for b in batches) * layers
    return 2 * per_layer * layers * tokens + attention


def pooled(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    e = (tokens * m).sum(1) / m.sum(1)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--round", type=int, default=32, help="static shapes: lengths rounded up to a multiple of this")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    import openvino as ov
    import torch

    from jepa_cache.backends import cached_conversion, input_names, openvino_infer
    from jepa_cache.encoder import load_encoder, tokenize
    from jepa_cache.models import DEFAULT_MODEL, resolve_model, weights_sha256

    for dtype in (torch.float32, torch.bfloat16):
        print(f"GEMM 4096x768x3072 {dtype}, {args.threads} thread(s): {gemm_rate(dtype, args.threads):.0f} GFLOP/s")
    folder = resolve_model(DEFAULT_MODEL)
    model = load_encoder(folder)
    xml = str(cached_conversion(model, folder, "openvino", weights_sha256(folder)))
    names = input_names(model)
    texts = subset("scifact", args.data_dir, args.docs)
    lengths = [len(ids) for ids in tokenize(model, texts)["input_ids"]]
    texts = [texts[i] for i in np.argsort(lengths)[::-1]]  # length-sorted, as the build
    batches = []
    for start in range(0, len(texts), args.batch_size):
        features = model.tokenizer(texts[start : start + args.batch_size], padding=True, truncation="longest_first",
                                   max_length=model.max_seq_length, return_tensors="np")
        batches.append({name: features[name].astype(np.int64) for name in names})

    def compiled(hint: str, shape: tuple[int, int] | None = None):
        """What build runs (backends.openvino_infer), or that with every input of one static shape."""
        if shape is None:
            return openvino_infer(xml, hint, args.threads)
        graph = ov.Core().read_model(xml)
        graph.reshape({name: list(shape) for name in names})
        return openvino_infer(graph, hint, args.threads)

    static: dict[tuple[int, int], object] = {}

    def run_static(batch: dict[str, np.ndarray]) -> np.ndarray:
        b, length = batch[names[0]].shape
        padded = min(model.max_seq_length, -(-length // args.round) * args.round)
        if (b, padded) not in static:
            static[(b, padded)] = compiled("f32", (b, padded))
        wide = {name: np.pad(x, ((0, 0), (0, padded - length))) for name, x in batch.items()}
        return static[(b, padded)](wide)[:, :length]

    dynamic = {hint: compiled(hint) for hint in ("f32", "f16", "bf16")}
    sides = {"dynamic f32": dynamic["f32"], f"static f32 (round {args.round})": run_static,
             "dynamic f16": dynamic["f16"], "dynamic bf16": dynamic["bf16"]}
    for side in sides.values():  # warm-up, and every static shape compiled before timing
        for batch in batches:
            side(batch)
    order = list(sides)
    timings = interleaved({name: lambda batch, side=side: np.array(side(batch)) for name, side in sides.items()}, batches)
    seconds = timings.wall
    vectors = {name: [pooled(out, batch["attention_mask"]) for out, batch in zip(outs, batches)]
               for name, outs in timings.outputs.items()}
    reference = np.concatenate(vectors["dynamic f32"])
    tokens = sum(lengths)
    flops = token_flops(model, tokens, batches)
    print(f"{len(texts)} SciFact documents, {tokens:,} real tokens, batch {args.batch_size}, {args.threads} thread(s); "
          f"{flops / tokens / 1e6:.0f} MFLOP per real token (matrix products of the layers and attention over the real tokens)")
    for name in order:
        cos = (np.concatenate(vectors[name]) * reference).sum(1).min()
        print(f"  {name:22s} {seconds[name]:7.2f} s  {seconds['dynamic f32'] / seconds[name]:5.2f}x  {tokens / seconds[name]:6.0f} "
              f"real tokens/s  {flops / seconds[name] / 1e9:4.0f} GFLOP/s  min cosine {cos:.7f}")


if __name__ == "__main__":
    main()

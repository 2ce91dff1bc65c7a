"""Measure: int8 encoders on the build's path against OpenVINO fp32 and bf16 (is an int8 build worth offering?).

The sides encode the same evenly spaced documents as `pipelines/bench_build.py` through
`jepa_cache.encoder.encode` (length-sorted batches of 32, the model's own pooling), interleaved block
by block in one run (the order rotates every block; each side's time is the sum over blocks):

    ov-fp32              the OpenVINO conversion `build --backend openvino` caches, hint f32 (the exact default)
    ov-bf16              the same, hint bf16 (`--precision bf16`)
    nncf-VARIANT-HINT    that conversion quantised by NNCF post-training (int8 weights and activations),
                         calibrated on other documents of the same corpus; the ops left unquantised in HINT
                         (VARIANTS below: NNCF's defaults, the FFN output projections kept, SmoothQuant alpha)
    ort-int8             ONNX Runtime dynamic int8 of the `--backend onnx` conversion (per-channel; no
                         reduce_range: this CPU has VNNI)

It prints each side's wall seconds, its speed against ov-fp32 and ov-bf16, and the minimum / median
cosine of its sentence vectors to ov-fp32's. NNCF is not a dependency of jepa-cache (`pip install nncf`);
the quantised models go to `--keep` (reused when there) or a temporary folder.

    python pipelines/bench_int8.py --docs 16 --calibration 16 --threads 1   # a quick check
    python pipelines/bench_int8.py --threads 2 --keep data/int8              # 500 documents
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_build import subset_rows  # sibling scripts: run as `python pipelines/bench_int8.py`
from interleave import interleaved

from jepa_cache.errors import UserError

# NNCF variants: name -> (FFN output projections left unquantised, SmoothQuant alpha for MatMuls or None for
# NNCF's default, 0.95 for a TRANSFORMER). The FFN output projection takes GELU's outputs, the activations with
# outliers; a lower alpha moves less of their range into the weights.
# On 16 documents (16 calibration documents): every MatMul quantised with alpha 0.5, min cosine 0.76; the FFN
# output kept and no SmoothQuant, 0.993.
VARIANTS = {"default": (False, None), "ffn-fp": (True, None), "ffn-fp-sq05": (True, 0.5)}


def variant_kwargs(name: str) -> dict:
    """Keyword arguments for nncf.quantize beyond the model, the data and model_type=TRANSFORMER."""
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    ffn_fp, alpha = VARIANTS[name]
    kwargs = {}
    if ffn_fp:
        kwargs["ignored_scope"] = nncf.IgnoredScope(patterns=[r".*\.output\.dense/.*"])
    if alpha is not None:
        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha))
    return kwargs


def calibration_items(model, texts: list[str], measured: set[int], n: int) -> list[dict[str, np.ndarray]]:
    """`n` corpus documents not among the measured ones (evenly spaced over the rest), one per item, unpadded."""
    from jepa_cache.encoder import tokenize

    rest = [i for i in range(len(texts)) if i not in measured]
    picks = [rest[i] for i in subset_rows(len(rest), n)]
    tokens = tokenize(model, [texts[i] for i in picks])
    return [{k: np.asarray([v[j]], dtype=np.int64) for k, v in tokens.items()} for j in range(len(picks))]


def quantised(source: Path, variant: str, items: list[dict[str, np.ndarray]], dest: Path) -> Path:
    """NNCF's int8 copy of the OpenVINO model `source`, written to `dest` once (reused when already there)."""
    file = dest / "model.xml"
    if file.is_file():
        print(f"reusing {file}", flush=True)
        return file
    try:
        import nncf
    except ImportError:
        raise SystemExit("the nncf sides need NNCF: pip install nncf (or --variants '' to leave them out)") from None
    import openvino as ov

    t0 = time.perf_counter()
    model = nncf.quantize(ov.Core().read_model(str(source)), nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(items), **variant_kwargs(variant))
    file.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(file), compress_to_fp16=False)
    print(f"quantised {variant} (NNCF {nncf.__version__}, {len(items)} calibration documents) in "
          f"{time.perf_counter() - t0:.0f} s: {file}", flush=True)
    return file


def ort_int8_file(onnx_file: Path, dest: Path) -> Path:
    """ONNX Runtime's dynamic int8 copy of `onnx_file` in `dest` (made once, reused when already there)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    file = dest / "ort-dynamic-int8.onnx"
    if not file.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(str(onnx_file), str(file), weight_type=QuantType.QInt8, per_channel=True, reduce_range=False)
    return file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sentence-transformers/all-mpnet-base-v2")
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--docs", type=int, default=500, help="measured documents, evenly spaced (as bench_build.py)")
    parser.add_argument("--calibration", type=int, default=300, help="NNCF calibration documents, none of them measured")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"NNCF variants: {', '.join(VARIANTS)}")
    parser.add_argument("--hints", default="bf16,f32", help="precision hints for the ops NNCF leaves unquantised")
    parser.add_argument("--no-ort", action="store_true", help="leave out the ONNX Runtime dynamic int8 side")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block", type=int, default=100, help="texts per interleaved block")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", default=None, help="folder for the quantised models, reused when there (default: temporary)")
    args = parser.parse_args()

    import openvino as ov
    import torch

    from jepa_cache.backends import Runtime, cached_conversion, input_names, onnx_infer, openvino_infer, runtime_version
    from jepa_cache.datasets import find_dataset, read_corpus
    from jepa_cache.encoder import encode, load_encoder, tokenize
    from jepa_cache.models import resolve_model, weights_sha256

    torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    sha = weights_sha256(folder)
    model = load_encoder(folder)
    names = input_names(model)
    _, corpus = read_corpus(find_dataset(args.dataset, args.data_dir).corpus_path)
    picks = subset_rows(len(corpus), args.docs)
    texts = [corpus[i] for i in picks]
    tokens = sum(len(ids) for ids in tokenize(model, texts)["input_ids"])
    ov_file = cached_conversion(model, folder, "openvino", sha)
    tmp = tempfile.TemporaryDirectory()
    # reused only for the same weights and runtimes
    keyed = f"{sha[:12]}-openvino-{runtime_version('openvino')}-onnxruntime-{runtime_version('onnx')}"
    keep = Path(args.keep) / keyed if args.keep else Path(tmp.name)

    def openvino(file: Path, hint: str) -> Runtime:
        return Runtime("openvino", openvino_infer(file, hint, args.threads), names)

    sides = {"ov-fp32": openvino(ov_file, "f32"), "ov-bf16": openvino(ov_file, "bf16")}
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        raise SystemExit(f"--variants: choose from {', '.join(VARIANTS)}")
    if variants:
        items = calibration_items(model, corpus, set(picks.tolist()), args.calibration)
        for variant in variants:
            file = quantised(ov_file, variant, items, keep / f"{args.dataset}-{variant}-calibration{len(items)}")
            for hint in args.hints.split(","):
                sides[f"nncf-{variant}-{hint}"] = openvino(file, hint)
    if not args.no_ort:
        int8 = ort_int8_file(cached_conversion(model, folder, "onnx", sha), keep)
        sides["ort-int8"] = Runtime("onnx", onnx_infer(int8, args.threads), names)

    print(f"{len(texts)} {args.dataset} documents ({tokens:,} real tokens), batch {args.batch_size}, blocks of {args.block}, "
          f"{args.threads} thread(s), {os.cpu_count()} cores; OpenVINO {ov.__version__.split('-')[0]}", flush=True)
    for runtime in sides.values():  # warm-up: first-call allocations and kernel choices are not what we measure
        encode(model, texts[:4], args.batch_size, runtime=runtime)
    order = list(sides)
    load_before = os.getloadavg()
    blocks = [texts[start : start + args.block] for start in range(0, len(texts), args.block)]
    timings = interleaved({name: lambda block, runtime=runtime: encode(model, block, args.batch_size, runtime=runtime)
                           for name, runtime in sides.items()}, blocks,
                          progress=lambda b, so_far: print(f"  block {b}: " + ", ".join(
                              f"{n} {so_far.wall[n]:.1f} s" for n in order), flush=True))
    wall, outputs = timings.wall, timings.outputs
    load_after = os.getloadavg()
    print(f"\n1-min load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    reference = np.concatenate(outputs["ov-fp32"])
    print(f"  {'side':20s} {'wall s':>8s} {'docs/s':>7s} {'vs fp32':>8s} {'vs bf16':>8s} {'min cos':>9s} {'median cos':>10s}")
    for name in order:
        cos = (np.concatenate(outputs[name]) * reference).sum(axis=1)
        print(f"  {name:20s} {wall[name]:8.1f} {len(texts) / wall[name]:7.2f} {wall['ov-fp32'] / wall[name]:7.2f}x "
              f"{wall['ov-bf16'] / wall[name]:7.2f}x {cos.min():9.5f} {np.median(cos):10.6f}", flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None

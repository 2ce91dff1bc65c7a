"""Measure: ONNX Runtime dynamic int8 (per-channel, reduce_range) of the build's ONNX graph against fp32.

Why no int8 backend is offered: on SciFact documents this int8 graph's vectors are far from the fp32
ones (minimum cosine printed), however fast it is. Uses the ONNX conversion `build --backend onnx`
caches beside the model (made here when absent); the int8 copy goes to a temporary folder.

    python pipelines/bench_int8.py --docs 16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sentence-transformers/all-mpnet-base-v2")
    parser.add_argument("--dataset", default="scifact")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--docs", type=int, default=16)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from jepa_cache.backends import Runtime, converted_path, load_runtime
    from jepa_cache.datasets import find_dataset, read_corpus
    from jepa_cache.encoder import encode, load_encoder
    from jepa_cache.models import resolve_model, weights_sha256

    folder = resolve_model(args.model)
    sha = weights_sha256(folder)
    model = load_encoder(folder)
    _, texts = read_corpus(find_dataset(args.dataset, args.data_dir).corpus_path)
    texts = [texts[i] for i in np.linspace(0, len(texts) - 1, args.docs).astype(int)]
    fp32 = load_runtime(model, folder, "onnx", sha)
    with tempfile.TemporaryDirectory() as tmp:
        int8_file = Path(tmp) / "model-int8.onnx"
        quantize_dynamic(str(converted_path(folder, "onnx", sha) / "model.onnx"), str(int8_file),
                         weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(int8_file), options, providers=["CPUExecutionProvider"])
        int8 = Runtime("onnx-int8", lambda arrays: session.run(None, arrays)[0], fp32.inputs)
        seconds = {"fp32": 0.0, "int8": 0.0}
        out = {}
        for name, runtime in (("fp32", fp32), ("int8", int8), ("int8", int8), ("fp32", fp32)):  # A B B A
            t0 = time.perf_counter()
            out[name] = encode(model, texts, 32, runtime=runtime)
            seconds[name] += time.perf_counter() - t0
    cos = (out["int8"] * out["fp32"]).sum(axis=1)
    print(f"{len(texts)} {args.dataset} documents, {torch.get_num_threads()} thread(s): int8 {seconds['fp32'] / seconds['int8']:.2f}x "
          f"the fp32 ONNX graph's speed; cosine to fp32: min {cos.min():.5f}, mean {cos.mean():.5f}")


if __name__ == "__main__":
    main()

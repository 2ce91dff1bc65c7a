"""Encoder runtimes for build: PyTorch, or OpenVINO / ONNX Runtime running a converted transformer.

Only the transformer (model[0]) changes runtime; its token embeddings then go through the model's
own sentence-transformers modules (Pooling, Dense, Normalize), so the vectors are what
`SentenceTransformer.encode` computes. A conversion is cached beside the model folder, in
`<folder>.converted/<backend>-<runtime version>-<weights sha256>/` (under data/models/ for a model in the
Hugging Face cache), and reused by later builds.
"""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import UserError
from .models import converted_dir

BACKENDS = ("auto", "torch", "openvino", "onnx")
PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # --precision -> what the store records
_AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# What a tokenizer returns that a transformer takes (some tokenizers add offsets or lengths).
FEATURES = ("input_ids", "attention_mask", "token_type_ids")
# backend -> (module to import, distribution whose version is recorded, pyproject extra)
_RUNTIMES = {"openvino": ("openvino", "openvino", "openvino"), "onnx": ("onnxruntime", "onnxruntime", "onnx")}
_FILES = {"openvino": "model.xml", "onnx": "model.onnx"}


def _runtime(backend: str):
    """Import the runtime of `backend`, or say in one line which extra installs it."""
    module, _, extra = _RUNTIMES[backend]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--backend {backend}: {module} is not installed; pip install 'jepa-cache[{extra}]'") from None


def runtime_version(backend: str) -> str:
    from importlib.metadata import version

    return version("torch" if backend == "torch" else _RUNTIMES[backend][1])


def resolve_backend(backend: str, device: torch.device, model=None) -> str:
    """`auto`: PyTorch on CUDA; on CPU OpenVINO when installed (the fastest exact one here) and `model` converts,
    else PyTorch."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type != "cpu" or importlib.util.find_spec("openvino") is None:
            return "torch"
        return "openvino" if model is None or convertible(model) else "torch"
    if backend != "torch":
        if device.type != "cpu":
            raise UserError(
                f"--backend {backend}: runs on the CPU only; use --device cpu, or --backend torch on {device}"
            )
        _runtime(backend)
    return backend


def resolve_precision(requested: str, backend: str, device: torch.device) -> str:
    """What the vectors are computed in: float32, bfloat16 or float16.

    auto: PyTorch autocasts on CUDA (bf16, else fp16), everything else is fp32; bf16 is refused where
    the hardware would emulate it (slower than fp32): on the CPU it needs OpenVINO and bf16 instructions.
    """
    if requested not in PRECISIONS:
        raise UserError(f"--precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        if backend == "torch" and device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision bf16: {device} has no bf16; use --precision auto (fp16) or fp32")
    if requested == "bf16" and device.type != "cuda" and (backend != "openvino" or not _ov_bf16()):
        raise UserError("--precision bf16 on the CPU needs --backend openvino and a CPU with bf16 instructions "
                        "(AMX or AVX-512 BF16); use --precision fp32")
    return PRECISION_DTYPES[requested]


def _ov_bf16() -> bool:
    return "BF16" in _runtime("openvino").Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def runtime_info(backend: str, precision: str) -> dict:
    """What the store's provenance records of the runtime (not part of its identity: fp32 runtimes agree)."""
    return {"backend": backend, "version": runtime_version(backend), "precision": precision}


@dataclass
class Runtime:
    """Sentence embeddings of a padded batch: `runtime(model, features) -> [batch, dim]` float32."""

    backend: str
    infer: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None  # converted: token embeddings
    inputs: tuple[str, ...] = ()
    precision: str | None = None  # resolve_precision's answer; None: auto on the model's device

    def autocast(self, device: torch.device):
        """PyTorch's autocast for this precision (a converted runtime casts inside itself)."""
        dtype = _AUTOCAST.get(self.precision or resolve_precision("auto", self.backend, device))
        return torch.autocast(device.type, dtype=dtype, enabled=self.backend == "torch" and dtype is not None)

    def __call__(self, model, features: dict[str, Any]) -> torch.Tensor:
        if self.infer is None:
            return model(features)["sentence_embedding"].float()
        arrays = {name: features[name].numpy().astype(np.int64, copy=False) for name in self.inputs}
        tokens = np.require(self.infer(arrays), np.float32, "W")  # a runtime may hand out a read-only buffer
        out = {**features, "token_embeddings": torch.from_numpy(tokens)}
        for module in list(model)[1:]:  # the model's own pooling / Dense / Normalize
            out = module(out)
        return out["sentence_embedding"].float()


TORCH = Runtime("torch")


def _transformer(model):
    """The Hugging Face model inside model[0], refused when the first module is not a plain text transformer."""
    first = model[0]
    hf = getattr(first, "auto_model", None)
    text = (getattr(first, "modality_config", None) or {}).get(
        "text", {"method": "forward", "method_output_name": "last_hidden_state"}
    )
    if (
        hf is None
        or text.get("method") != "forward"
        or text.get("method_output_name") not in ("last_hidden_state", ["last_hidden_state"], ("last_hidden_state",))
    ):
        raise UserError(
            f"{type(first).__name__}: only a Transformer module returning last_hidden_state can be converted; "
            "use --backend torch"
        )
    return hf


def convertible(model) -> bool:
    try:
        _transformer(model)
    except UserError:
        return False
    return True


def input_names(model) -> tuple[str, ...]:
    """The tokenizer features the transformer's forward takes (MPNet takes no token_type_ids)."""
    params = inspect.signature(_transformer(model).forward).parameters
    return tuple(name for name in FEATURES if name in params)


class _LastHiddenState(torch.nn.Module):
    def __init__(self, hf: torch.nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.hf, self.names = hf, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.hf(**dict(zip(self.names, tensors)), return_dict=True).last_hidden_state


def convert(model, backend: str, names: tuple[str, ...], dest: Path) -> None:
    """Write `model`'s transformer, traced at fp32, as `dest/<model file>` for `backend`."""
    wrapped = _LastHiddenState(_transformer(model), names).eval().float()
    example = tuple(torch.ones(2, 16, dtype=torch.long) for _ in names)
    dest.mkdir(parents=True)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter warnings about shapes that the dynamic axes cover
        if backend == "openvino":
            ov = _runtime("openvino")
            converted = ov.convert_model(wrapped, example_input=example)
            for port, name in zip(converted.inputs, names):
                port.get_tensor().set_names({name})
            ov.save_model(
                converted, str(dest / _FILES[backend]), compress_to_fp16=False
            )  # the default would halve the weights
        else:
            dynamic = {name: {0: "batch", 1: "tokens"} for name in names}
            torch.onnx.export(
                wrapped,
                example,
                str(dest / _FILES[backend]),
                input_names=list(names),
                output_names=["last_hidden_state"],
                dynamic_axes={**dynamic, "last_hidden_state": {0: "batch", 1: "tokens"}},
                opset_version=17,
                dynamo=False,
            )


def converted_path(folder: Path, backend: str, weights_sha256: str) -> Path:
    """Where `backend`'s conversion of the model in `folder` is cached: beside it, keyed by its weights."""
    return converted_dir(folder) / f"{backend}-{runtime_version(backend)}-{weights_sha256}"


def cached_conversion(
    model, folder: Path, backend: str, weights_sha256: str, log: Callable[[str], None] = print
) -> Path:
    """The converted model file, converting (atomically: into a temporary sibling, then renamed) only when absent."""
    path = converted_path(folder, backend, weights_sha256)
    if not (path / _FILES[backend]).is_file():
        log(f"converting {folder.name} for {backend} (once; cached in {path})")
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert(model, backend, input_names(model), tmp)
            try:
                os.replace(tmp, path)
            except OSError:  # another process finished the same conversion first
                if not (path / _FILES[backend]).is_file():
                    raise
        except OSError as e:
            raise UserError(
                f"{path.parent}: cannot write the converted model ({e.strerror}); make the model's folder writable"
            ) from None
        except UserError:
            raise
        except Exception as e:  # the converters raise many types for a graph they cannot trace
            raise UserError(
                f"{folder}: cannot convert for {backend} ({type(e).__name__}: {e}); use --backend torch"
            ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path / _FILES[backend]


def openvino_infer(source: Any, hint: str, threads: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """OpenVINO on the CPU running `source` (a model file, or an openvino.Model) in precision `hint` (f32, bf16, f16):
    arrays in, its first output out. The hint is always explicit: on CPUs with AMX/AVX512-BF16 OpenVINO would
    otherwise run in bf16."""
    config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    model = str(source) if isinstance(source, (str, Path)) else source
    request = _runtime("openvino").Core().compile_model(model, "CPU", config).create_infer_request()
    return lambda arrays: request.infer(arrays)[0]


def onnx_infer(file: Path, threads: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """ONNX Runtime on the CPU running the model in `file` with `threads` threads: arrays in, its first output out."""
    module = _runtime("onnx")
    options = module.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = module.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    return lambda arrays: session.run(None, arrays)[0]


def load_runtime(model, folder: Path, backend: str, weights_sha256: str, log: Callable[[str], None] = print,
                 precision: str | None = None) -> Runtime:
    """The runtime that encodes with `model` on `backend` and `precision` (both resolved; None: auto), with torch's
    thread count."""
    if backend == "torch":
        return Runtime("torch", precision=precision)
    file = cached_conversion(model, folder, backend, weights_sha256, log)
    threads = torch.get_num_threads()
    if backend == "openvino":
        infer = openvino_infer(file, "bf16" if precision == "bfloat16" else "f32", threads)
    else:
        infer = onnx_infer(file, threads)
    return Runtime(backend, infer, input_names(model), precision)

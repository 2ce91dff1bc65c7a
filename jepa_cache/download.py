"""BEIR dataset zips over plain HTTP(S) (models come through huggingface_hub: see hub.py).

A download streams to a temporary file beside its destination, is checked (byte count against
Content-Length, BEIR's published md5 where known) and only then renamed into place, so an
interrupted or corrupt download never leaves anything that looks usable.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError
from .files import check_name, safe_extract

BEIR_URL_ENV = "JEPA_CACHE_BEIR_URL"
BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets"
# md5 of each zip as published in BEIR's README (github.com/beir-cellar/beir, "Available Datasets").
# Only values that stayed the same across the README's revisions: fever and webis-touche2020 were
# re-packed (their published md5 changed), so they are downloaded unchecked rather than refused.
BEIR_MD5 = {
    "msmarco": "444067daf65d982533ea17ebd59501e4",
    "trec-covid": "ce62140cb23feb9becf6270d0d1fe6d1",
    "nfcorpus": "a89dba18a62ef92f7d323ec890a0d38d",
    "nq": "d4d3d2e48787a744b6f6e691ff534307",
    "hotpotqa": "f412724f78b0d91183a0e86805e16114",
    "fiqa": "17918ed23cd04fb15047f73e6c3bd9d9",
    "arguana": "8ad3e3c2a5867cdced806d6503f29b99",
    "cqadupstack": "4e41456d7df8ee7760a7f866133bda78",
    "quora": "18fb154900ba42a600f84b839c173167",
    "dbpedia-entity": "c2a39eb420a3164af735795df012ac2c",
    "scidocs": "38121350fc3a4d2f48850f6aff52e4a9",
    "climate-fever": "8b66f0a9126c521bae2bde127b4dc99d",
    "scifact": "5f7d1de60b170fc8027bb7898e2efca1",
}
TIMEOUT_S = 30  # per socket operation: a stalled server fails instead of hanging the build
_BLOCK = 1 << 20


class NotFound(UserError):
    """The server answered 404: the thing asked for does not exist there."""


def _open(url: str):
    request = urllib.request.Request(url, headers={"User-Agent": "jepa-cache"})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise NotFound(f"{url}: not found (HTTP 404)") from None
        raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"{url}: unreachable ({reason})") from None


def _blocks(resp, url: str) -> Iterator[bytes]:
    """The body in blocks; a connection that closes early ends it (the caller compares the byte count)."""
    while True:
        try:
            block = resp.read(_BLOCK)
        except http.client.IncompleteRead as e:
            yield e.partial
            return
        except (TimeoutError, OSError) as e:
            raise UserError(f"{url}: download interrupted ({e}); run again") from None
        if not block:
            return
        yield block


def fetch_url(url: str, dest: Path, *, md5: str | None = None) -> Path:
    """Download `url` to `dest` (atomically); refuse a short body or an md5 that does not match."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    # open(): the umask's mode, not mkstemp's 0600
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
    digest = hashlib.md5()
    try:
        with _open(url) as resp, open(tmp, "xb") as out:
            length = resp.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            got = 0
            with tqdm(total=expected, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
                for block in _blocks(resp, url):
                    out.write(block)  # a full disk surfaces here as the OSError it is
                    digest.update(block)
                    got += len(block)
                    bar.update(len(block))
        if expected is not None and got != expected:
            raise UserError(f"{url}: truncated download ({got} of {expected} bytes); run again")
        if md5 and digest.hexdigest() != md5:
            raise UserError(f"{url}: md5 {digest.hexdigest()} does not match the published {md5}; refusing it")
        os.replace(tmp, dest)
        return dest
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def beir_url(name: str) -> str:
    base = os.environ.get(BEIR_URL_ENV) or BEIR_URL
    return f"{base.rstrip('/')}/{urllib.parse.quote(name)}.zip"


def _dataset_folder(unpacked: Path) -> Path:
    """The folder in a BEIR zip that holds corpus.jsonl (the zips carry one top folder, `<name>/`)."""
    hits = sorted({p.parent for pattern in ("corpus.jsonl", "corpus.jsonl.gz") for p in unpacked.rglob(pattern)})
    if len(hits) != 1:
        raise UserError(f"expected one BEIR dataset folder (with corpus.jsonl) in the archive, found {len(hits)}")
    return hits[0]


def download_beir(name: str, root: str | os.PathLike, log: Callable[[str], None] = print) -> Path:
    """Fetch BEIR's public zip of dataset `name`, check it, and unpack it to `root/name`.

    Lock-free: each process unpacks into its own temporary folder and renames it into place; a
    process that loses the race uses the winner's folder. A failed download leaves nothing behind.
    """
    check_name(name)
    root = Path(root)
    url = beir_url(name)
    dest = root / name
    manual = f"download it yourself from {url} and unpack it under {root} (or pass --data-dir)"
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.download-"))
    except OSError as e:
        raise UserError(f"dataset {name!r} is not under {root}, which is not writable ({e.strerror}); "
                        f"{manual}") from None
    try:
        md5 = BEIR_MD5.get(name)
        log(f"dataset {name!r} is not under {root}; downloading {url}" + ("" if md5 else " (no published md5 to "
                                                                                         "check it against)"))
        try:
            archive = fetch_url(url, tmp / f"{name}.zip", md5=md5)
        except NotFound:
            raise UserError(f"dataset {name!r} is not under {root}, and BEIR has no {name}.zip ({url}: HTTP 404); "
                            "check the name") from None
        except UserError as e:
            raise UserError(f"dataset {name!r} is not under {root} and its download failed: {e}; {manual}") from None
        try:
            with zipfile.ZipFile(archive) as z:
                safe_extract(z, tmp / "unpacked")
        except zipfile.BadZipFile as e:
            raise UserError(f"{url}: the download is not a valid zip ({e}); {manual}") from None
        try:
            os.rename(_dataset_folder(tmp / "unpacked"), dest)
        except OSError:
            if not dest.is_dir():  # not a lost race: a real failure
                raise
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                root.rmdir()  # only succeeds when we made it and nothing landed in it

"""Models from the Hugging Face hub, kept in its cache (HF_HOME / HF_HUB_CACHE), through huggingface_hub.

A model already in the cache is found without any network call, wherever it came from (sentence-transformers,
transformers, `hf download`). A download fetches only what a sentence-transformers folder loads (configs,
tokenizer, one weight format per folder: safetensors where the repo has them), with huggingface_hub's resume,
tokens (HF_TOKEN), proxies and HF_ENDPOINT; each file the hub names by its sha256 is then checked against it.
Every failure a user can fix is one line.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
from pathlib import Path, PurePosixPath

from .errors import UserError
from .files import sha256_file

# What a sentence-transformers folder loads (fnmatch patterns, where `*` also crosses `/`): its module
# configs and module folders (1_Pooling/, 2_Dense/ ...), the transformer's config, tokenizer and vocabulary,
# and its weights. Not the ONNX / OpenVINO / TF / Flax copies, README, training scripts or remote code.
ST_FILES = (
    "modules.json", "config_sentence_transformers.json", "sentence_*_config.json", "[0-9]*_*/*",
    "config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "spiece.model", "sentencepiece*.model", "spm.model", "*.spm",
    "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json",
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LOCAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}
_TODO = "; check the network (or HF_ENDPOINT), or pass a local model folder"


def endpoint() -> str | None:
    """$HF_ENDPOINT, read at each call (huggingface_hub reads it once, at import); None: the library's default."""
    return os.environ.get("HF_ENDPOINT") or None


def cached(repo: str) -> Path | None:
    """The cached snapshot of `repo` (its default branch) when it holds a whole sentence-transformers folder
    (modules.json and every module folder it names), found without network; None otherwise (then `download`
    fetches what is missing)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(repo, "modules.json")
    except HFValidationError as e:
        raise UserError(f"model {repo!r}: not a hub id ({_first_line(e)})") from None
    if not isinstance(found, str):
        return None
    folder = Path(found).parent
    try:
        modules = json.loads(Path(found).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    complete = all((folder / m.get("path", "")).exists() for m in modules if isinstance(m, dict))
    return folder if complete and (folder / "config.json").is_file() else None


def duplicate_weights(files: list[str]) -> list[str]:
    """Patterns for the pickled weights of each folder that also holds safetensors: the same weights twice."""
    folders = {str(PurePosixPath(f).parent) for f in files if f.endswith(".safetensors")}
    return sorted(("" if d == "." else glob.escape(d) + "/") + "pytorch_model*.bin" for d in folders)


def download(repo: str) -> Path:
    """Fetch what a sentence-transformers folder of `repo` needs into the cache; returns the snapshot folder."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    where = endpoint()
    try:
        files = [s.rfilename for s in HfApi(endpoint=where).model_info(repo).siblings or []]
        folder = Path(snapshot_download(repo, endpoint=where, allow_patterns=list(ST_FILES),
                                        ignore_patterns=duplicate_weights(files)))
    except HFValidationError as e:
        raise UserError(f"model {repo!r}: not a hub id ({_first_line(e)})") from None
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:
        raise _one_line(repo, where, e) from None
    except OSError as e:
        if e.errno in _LOCAL_ERRNOS:  # the cache's disk, not the network: the CLI names the file
            raise
        raise UserError(f"{_name(where)}: unreachable ({type(e).__name__}: {_first_line(e)}){_TODO}") from None
    except Exception as e:  # noqa: BLE001 - the transport's own error (its class depends on the version)
        raise UserError(f"{_name(where)}: unreachable ({type(e).__name__}: {_first_line(e)}){_TODO}") from None
    check_blobs(folder)
    return folder


def check_blobs(folder: Path) -> None:
    """Each file of a snapshot whose blob is named by its sha256 (LFS files) against that sha256.

    huggingface_hub checks sizes only. A file that does not match is removed from the cache, so that the
    next run downloads it again.
    """
    for path in sorted(folder.rglob("*")):
        blob = path.resolve()
        if path.is_file() and _SHA256.fullmatch(blob.name) and (got := sha256_file(blob)) != blob.name:
            path.unlink()
            blob.unlink()
            raise UserError(f"{path}: sha256 {got} does not match the hub's {blob.name}; removed it from the cache, "
                            "run again")


def _name(where: str | None) -> str:
    return where or "the Hugging Face hub"


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def _one_line(repo: str, where: str | None, e: Exception) -> UserError:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    hub = _name(where)
    if isinstance(e, GatedRepoError):
        return UserError(f"{repo}: gated on {hub}; accept its terms on the model's page and set HF_TOKEN")
    if isinstance(e, RepositoryNotFoundError):
        return UserError(f"{repo}: no such model on {hub} (or a private one: set HF_TOKEN); check the name")
    if isinstance(e, LocalEntryNotFoundError):  # no answer, or HF_HUB_OFFLINE=1, and not in the cache
        cause = e.__cause__ or e.__context__
        return UserError(f"{hub}: unreachable ({_first_line(cause) if cause else 'offline'}){_TODO}")
    return UserError(f"{repo}: {hub} answered {_first_line(e)}")

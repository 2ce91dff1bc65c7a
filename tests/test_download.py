"""BEIR zip downloads against a local HTTP server: good, truncated, wrong checksum, not a zip, zip-slip."""

from __future__ import annotations

import hashlib
import io
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import write_beir
from jepa_cache import download
from jepa_cache.datasets import find_dataset, read_corpus
from jepa_cache.errors import UserError


class Server:
    """Serves `routes[path] = bytes`; a path in `truncate` advertises more bytes than it sends."""

    def __init__(self):
        self.routes: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                path = self.path.split("?")[0]
                server.requests.append(path)
                body = server.routes.get(path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body) + (1000 if path in server.truncate else 0)))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def zip_folder(folder: Path, arcname: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, f"{arcname}/{p.relative_to(folder)}")
    return buf.getvalue()


@pytest.fixture
def beir_zip(tmp_path) -> bytes:
    return zip_folder(write_beir(tmp_path / "src" / "tiny", n_docs=10, n_queries=4), "tiny")


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) if root.exists() else []


# --- BEIR ---------------------------------------------------------------------------------------


def test_beir_download_unpacks_and_find_dataset_uses_it(server, beir_zip, tmp_path, monkeypatch):
    server.routes["/beir/tiny.zip"] = beir_zip
    monkeypatch.setenv(download.BEIR_URL_ENV, f"{server.url}/beir/")
    monkeypatch.setitem(download.BEIR_MD5, "tiny", hashlib.md5(beir_zip).hexdigest())
    root = tmp_path / "data"
    dataset = find_dataset("tiny", root)
    assert dataset.root == root / "tiny"
    ids, _ = read_corpus(dataset.corpus_path)
    assert len(ids) == 10 and dataset.splits() == ["test", "train"]
    assert leftovers(root) == ["tiny"]
    assert find_dataset("tiny", root).root == root / "tiny" and server.requests == ["/beir/tiny.zip"]  # no second download


def test_beir_wrong_checksum_is_refused_and_leaves_nothing(server, beir_zip, tmp_path, monkeypatch):
    server.routes["/scifact.zip"] = beir_zip  # not the published scifact.zip: its md5 differs
    monkeypatch.setenv(download.BEIR_URL_ENV, server.url)
    with pytest.raises(UserError, match=r"md5 [0-9a-f]{32} does not match the published 5f7d1de60b170fc8027bb7898e2efca1"):
        download.download_beir("scifact", tmp_path / "data", log=lambda s: None)
    assert leftovers(tmp_path / "data") == []


def test_beir_truncated_download_is_refused(server, beir_zip, tmp_path, monkeypatch):
    server.routes["/tiny.zip"] = beir_zip
    server.truncate.add("/tiny.zip")
    monkeypatch.setenv(download.BEIR_URL_ENV, server.url)
    with pytest.raises(UserError, match=rf"truncated download \({len(beir_zip)} of {len(beir_zip) + 1000} bytes\)"):
        download.download_beir("tiny", tmp_path / "data", log=lambda s: None)
    assert leftovers(tmp_path / "data") == []


def test_beir_not_a_zip_and_zip_slip_are_refused(server, tmp_path, monkeypatch):
    monkeypatch.setenv(download.BEIR_URL_ENV, server.url)
    server.routes["/junk.zip"] = b"this is not a zip archive"
    with pytest.raises(UserError, match="not a valid zip.*download it yourself"):
        download.download_beir("junk", tmp_path / "data", log=lambda s: None)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("evil/corpus.jsonl", '{"_id": "d1", "text": "x"}\n')
        z.writestr("../escaped.txt", "gotcha")
    server.routes["/evil.zip"] = buf.getvalue()
    with pytest.raises(UserError, match="escapes the target folder"):
        download.download_beir("evil", tmp_path / "data", log=lambda s: None)
    assert not (tmp_path / "escaped.txt").exists() and leftovers(tmp_path / "data") == []


def test_beir_unknown_name_and_unreachable_server_say_what_to_do(server, tmp_path, monkeypatch):
    monkeypatch.setenv(download.BEIR_URL_ENV, server.url)
    with pytest.raises(UserError, match=r"BEIR has no nosuchset\.zip .*HTTP 404"):
        find_dataset("nosuchset", tmp_path / "data")
    monkeypatch.setenv(download.BEIR_URL_ENV, "http://127.0.0.1:9/beir")  # closed port
    with pytest.raises(UserError, match=r"unreachable.*download it yourself from http://127\.0\.0\.1:9/beir/fiqa\.zip and unpack it under"):
        find_dataset("fiqa", tmp_path / "data")
    for bad in ("..", ".hidden", "two words"):
        with pytest.raises(UserError, match="not allowed"):
            download.download_beir(bad, tmp_path / "data")
    assert leftovers(tmp_path / "data") == []


def test_published_md5s_include_the_confirmed_ones():
    assert download.BEIR_MD5["nfcorpus"] == "a89dba18a62ef92f7d323ec890a0d38d"
    assert download.BEIR_MD5["arguana"] == "8ad3e3c2a5867cdced806d6503f29b99"

"""Model lookup: folders, hub ids and aliases resolve locally without network; broken folders are clear errors."""

from __future__ import annotations

import shutil

import pytest

from jepa_cache import models
from jepa_cache.errors import UserError
from jepa_cache.files import sha256_file


def test_names_resolve_to_local_folders_without_network(tmp_path, monkeypatch, tiny_model):
    monkeypatch.setenv(models.MODELS_ENV, str(tmp_path))
    shutil.copytree(tiny_model, tmp_path / "all-mpnet-base-v2")
    for name in ("sentence-transformers/all-mpnet-base-v2", "all-mpnet-base-v2", "mpnet"):
        assert models.resolve_model(name) == tmp_path / "all-mpnet-base-v2"
    assert models.canonical_name("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    shutil.copytree(tiny_model, tmp_path / "org__mine")
    assert models.resolve_model("org/mine") == tmp_path / "org__mine"
    assert models.resolve_model(str(tiny_model)) == tiny_model
    assert models.weights_sha256(tiny_model) == sha256_file(tiny_model / "model.safetensors")
    absent = r"model 'org/absent' is not in .* nor in the Hugging Face cache; run `jepa-cache fetch-model org/absent`"
    with pytest.raises(UserError, match=absent):
        models.resolve_model("org/absent", fetch=False)


def test_a_known_model_with_other_weights_is_refused(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv(models.MODELS_ENV, str(tmp_path))
    shutil.copytree(tiny_model, tmp_path / "pinned")
    monkeypatch.setitem(models.KNOWN, "org/pinned", models.KnownModel(folder="pinned", sha256="0" * 64))
    with pytest.raises(UserError, match="does not match the expected 0000"):
        models.fetch_model("org/pinned")


def test_broken_model_folders(tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a sentence-transformers model folder"):
        models.resolve_model(str(tmp_path / "empty"))
    no_weights = shutil.copytree(tiny_model, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model weights"):
        models.resolve_model(str(no_weights))
    garbage = shutil.copytree(tiny_model, tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"not safetensors")
    from jepa_cache.encoder import load_encoder

    with pytest.raises(UserError, match=r"garbage: cannot load as a sentence-transformers model"):
        load_encoder(models.resolve_model(str(garbage)))


def test_names_cannot_escape_the_models_folder():
    for bad in ("..", "../x", "org/..", "a/b/c", "/abs/path", "org/na me"):
        with pytest.raises(UserError, match="not a hub id"):
            models.local_folder_name(bad)
    assert models.local_folder_name("org/name-1.5_x") == "org__name-1.5_x"

"""Usage errors through the real entry point `jepa_cache.cli.main`: one line on stderr, exit 2, no traceback."""

from __future__ import annotations

import sys

import pytest

from jepa_cache.cli import main


def run_main(monkeypatch, capsys, argv: list[str]) -> tuple[int, str, str]:
    """`jepa-cache ARGV` in-process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["jepa-cache", *argv])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, expected", [
    (["evl"], "error: No such command 'evl'. Did you mean 'eval'? Try 'jepa-cache --help'."),
    (["train-heads", "--epoch", "2"], "error: No such option: --epoch (Possible options: --epochs). Try 'jepa-cache train-heads --help'."),
    (["train-heads", "--store", "S", "--lr", "abc"], "error: Invalid value for '--lr': "),
    (["train-heads", "--lr", "0.1"], "error: Missing option '--store'. Try 'jepa-cache train-heads --help'."),
    (["verify"], "error: Missing argument 'store'. Try 'jepa-cache verify --help'."),
    (["fetch-model", "a", "b"], "error: Got unexpected extra argument(s) (b). Try 'jepa-cache fetch-model --help'."),
    (["--bogus"], "error: No such option: --bogus. Try 'jepa-cache --help'."),
])
def test_usage_errors_are_one_line(monkeypatch, capsys, argv, expected):
    code, out, err = run_main(monkeypatch, capsys, argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err  # one line, no traceback
    assert err.startswith(expected), err
    assert "Traceback" not in err


def test_no_arguments_prints_the_help(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, [])
    assert code == 2  # click's convention: no command is a usage error, answered with the help
    assert "Traceback" not in out + err
    for command in ("build", "train-heads", "eval", "export", "prepare-data"):
        assert command in out + err


def test_help_exits_zero(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, ["--help"])
    assert code == 0 and "train-heads" in out and err == ""


def test_user_error_is_one_line(monkeypatch, capsys, tmp_path):
    code, out, err = run_main(monkeypatch, capsys, ["train-heads", "--store", str(tmp_path / "absent")])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and str(tmp_path / "absent") in err


def test_a_missing_heads_folder_is_named(monkeypatch, capsys, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, ["export", "--heads", str(tmp_path / "nope"), "--out", str(tmp_path / "m")])
    assert code == 2 and err.startswith(f"error: {tmp_path / 'nope'}: no such heads folder") and err.count("\n") == 1, err


def test_ctrl_c_says_so(monkeypatch, capsys):
    import jepa_cache.models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jepa_cache.models, "fetch_model", interrupted)
    code, _, err = run_main(monkeypatch, capsys, ["fetch-model", "minilm"])
    assert code == 130 and err.startswith("interrupted; nothing half-written was kept") and "Traceback" not in err, err

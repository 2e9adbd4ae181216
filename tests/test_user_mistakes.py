"""Mistakes a user makes on the command line or in a manifest: each exits 2 with one `error:` line that names the
flag, file or field at fault, never with a traceback, and before anything slow (models, shards, Ray) is touched."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from tests.conftest import DEMO_EXPERIMENT, DEMO_TEACHERS

UNBALANCED = ["shard-{00000..00003.tar", "shard-00000..00003}.tar"]


def error_line(capsys, argv: list[str]) -> str:
    """Run `pipeline ARGV`; assert exit code 2, one `error:` line and no traceback; return that line.

    argparse's own refusals print their usage block above the line; everything else prints the line alone."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert len(lines) == 1 or lines[0].startswith("usage:"), err
    return errors[0]


def test_a_set_value_that_is_not_yaml_names_the_set_item(capsys):
    line = error_line(capsys, ["train", "--config", DEMO_EXPERIMENT, "--set", "train.max_steps=["])
    assert "--set train.max_steps=[" in line and "not valid YAML" in line


@pytest.mark.parametrize("command", [["train", "--config"], ["teachers", "show"]], ids=["experiment", "teachers"])
def test_a_manifest_that_is_not_utf8_is_named(capsys, tmp_path, command):
    manifest = tmp_path / "manifest.yaml"
    manifest.write_bytes(b"\xff\xfen\x00a\x00m\x00e\x00:\x00 \x00x\x00\n\x00")
    line = error_line(capsys, [*command, manifest])
    assert str(manifest) in line and "not UTF-8" in line


@pytest.mark.parametrize("nesting", ["[" * 5000 + "]" * 5000, "a: " + "{a: " * 5000 + "1" + "}" * 5000],
                         ids=["lists", "mappings"])
def test_a_manifest_nested_thousands_deep_is_refused_by_name(capsys, tmp_path, nesting):
    manifest = tmp_path / "deep.yaml"
    manifest.write_text(nesting)
    line = error_line(capsys, ["train", "--config", manifest])
    assert str(manifest) in line and "nested too deeply" in line
    line = error_line(capsys, ["train", "--config", DEMO_EXPERIMENT, "--set", f"train.lr={nesting}"])
    assert "--set train.lr=" in line and "nested too deeply" in line


@pytest.mark.parametrize(("under", "says"), [("", "is a file"), ("run", "cannot be created")], ids=["file", "inside"])
def test_an_output_dir_that_is_or_is_inside_a_file_is_refused_before_anything_loads(capsys, tmp_path, monkeypatch,
                                                                                    under, says):
    # Nothing the experiment names exists: had anything loaded first, the error would be about that.
    monkeypatch.setenv("DEMO_DIR", str(tmp_path / "absent"))
    taken = tmp_path / "notes.txt"
    taken.write_text("not a run")
    output_dir = taken / under if under else taken
    line = error_line(capsys, ["train", "--config", DEMO_EXPERIMENT, "--set", f"output_dir={output_dir}"])
    assert f"output_dir={output_dir} {says}" in line
    assert taken.read_text() == "not a run"


@pytest.mark.parametrize("layers", ["a", "1,,2"])
def test_probe_layers_that_are_not_numbers_name_the_flag(capsys, tmp_path, layers):
    line = error_line(capsys, ["probe", "--checkpoint", tmp_path, "--store", tmp_path, "--out", tmp_path / "out",
                               "--layers", layers])
    assert "--layers" in line and repr(layers) in line


@pytest.mark.parametrize("tokens", ["-1", "0"])
def test_generate_needs_at_least_one_new_token(capsys, tmp_path, tokens):
    line = error_line(capsys, ["generate", "--checkpoint", tmp_path, "--image", tmp_path / "x.png", "--prompt", "hi",
                               "--max-new-tokens", tokens])
    assert "--max-new-tokens" in line


def test_index_out_that_is_a_directory_is_refused_before_reading_the_shards(capsys, tmp_path, demo_dir):
    line = error_line(capsys, ["index", demo_dir / "shards", "--out", tmp_path, "--quiet"])
    assert f"--out {tmp_path} is a directory" in line and "index.parquet" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("pattern", UNBALANCED)
def test_unbalanced_braces_in_shards_name_the_pattern(capsys, tmp_path, demo_dir, pattern):
    shards = f"{demo_dir}/shards/{pattern}"
    for argv in (["index", shards, "--out", tmp_path / "index.parquet", "--quiet"],
                 ["precompute", "--shards", shards, "--teachers", DEMO_TEACHERS, "--store", tmp_path / "store",
                  "--quiet"],
                 ["train", "--config", DEMO_EXPERIMENT, "--set", f"data.shards={shards}", "--set",
                  f"output_dir={tmp_path / 'run'}"]):
        line = error_line(capsys, argv)
        assert f"shards {shards}: unbalanced braces" in line, argv
    assert not (tmp_path / "run").exists(), "train checks the pattern with the config, before it starts"

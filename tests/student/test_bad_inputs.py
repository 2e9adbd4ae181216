"""Bad inputs to `pipeline train`, `probe` and `generate` exit 2 with one line naming the field and the fix.

Issue 11 item 11: the student's parts and checkpoints load from safetensors only; a directory holding a pickled
`pytorch_model.bin` is refused without ever unpickling it (the pickles here would create a sentinel file).
Issue 11 item 10: a task layer beyond the LLM's depth is refused from the configs, before any weights load.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import DEMO_EXPERIMENT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Keep the runs small and out of the shared demo directory.
QUICK = ["--set", "data.num_workers=0", "--set", "train.max_steps=1", "--set", "train.trackers=[]", "--quiet"]


class _Sentinel:
    """Unpickling this creates `path`: proof that a loader ran a pickle."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _swap_in_pickled_weights(folder: Path, sentinel: Path) -> None:
    """Replace every safetensors file in `folder` with a malicious `pytorch_model.bin`."""
    removed = [p for p in folder.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json"))]
    assert removed, f"expected safetensors weights in {folder}"
    for p in removed:
        p.unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Sentinel(sentinel)))


def _train(tmp_path: Path, *sets: str) -> int:
    argv = ["train", "--config", str(DEMO_EXPERIMENT), "--set", f"output_dir={tmp_path / 'out'}", *QUICK]
    for item in sets:
        argv += ["--set", item]
    return main(argv)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def saved_student(demo_checkpoint, tmp_path) -> Path:
    """A copy of the demo-trained student (its output_dir, without resumable checkpoints or logs)."""
    copy = tmp_path / "student"
    shutil.copytree(demo_checkpoint, copy, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    return copy


def test_student_parts_with_pickled_weights_are_refused(demo_dir, demo_store, saved_student, tmp_path,
                                                              capsys):
    sentinel = tmp_path / "PICKLE_RAN"

    # model.llm (the vision encoder, model.vision, goes through the same loader).
    for part in ("llm", "vision"):
        folder = tmp_path / part
        shutil.copytree(demo_dir / "assets" / "student" / part, folder)
        _swap_in_pickled_weights(folder, sentinel)
        assert _train(tmp_path, f"model.{part}={folder}") == 2
        line = _one_line_error(capsys)
        assert f"model.{part}={folder}" in line and "pytorch_model.bin" in line and "safetensors" in line, line
        assert not sentinel.exists()
        assert not (tmp_path / "out").exists()

    # model.init_from: a saved student whose safetensors were replaced by a pickle.
    _swap_in_pickled_weights(saved_student, sentinel)
    assert _train(tmp_path, f"model.init_from={saved_student}", "model.vision=null", "model.llm=null",
                  "model.tokenizer=null") == 2
    line = _one_line_error(capsys)
    assert f"model.init_from={saved_student}" in line and "safetensors" in line, line
    assert not sentinel.exists()

    # The probe/generate checkpoint loader (`student.checkpoint.load_student`), through both commands.
    from PIL import Image

    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32), "gray").save(image)
    assert main(["generate", "--checkpoint", str(saved_student), "--image", str(image), "--prompt", "hi"]) == 2
    line = _one_line_error(capsys)
    assert f"checkpoint={saved_student}" in line and "safetensors" in line, line
    assert main(["probe", "--checkpoint", str(saved_student), "--store", str(demo_store), "--shards",
                 str(demo_dir / "shards"), "--out", str(tmp_path / "probe"), "--quiet"]) == 2
    line = _one_line_error(capsys)
    assert f"checkpoint={saved_student}" in line and "safetensors" in line, line
    assert not sentinel.exists()
    assert not (tmp_path / "probe").exists()


def test_task_layer_beyond_llm_depth_is_exit_2(demo_dir, demo_store, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    # Observe every model-weight load: the refusal must come from the configs alone.
    loaded: list[str] = []
    original = PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        loaded.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    assert _train(tmp_path, "model.tasks.depth.layers=[99]") == 2
    line = _one_line_error(capsys)
    assert "model.tasks.depth.layers" in line and "[99]" in line and "has 4 layers" in line, line
    assert loaded == [], f"weights were loaded before the task layers were checked: {loaded}"
    assert not (tmp_path / "out").exists()

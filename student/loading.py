"""Loading student weights: safetensors only, as the teachers load theirs.

A pickled checkpoint (`pytorch_model.bin`, `*.pt`) can run arbitrary code when it is unpickled, so every
`from_pretrained` of model weights in `student/` goes through `from_pretrained_safetensors`: it passes
`use_safetensors=True` (transformers then never opens a pickle), and a local directory without safetensors
weights is refused up front with a `UsageError` that names the config field or argument it came from.

`student.checkpoint.load_student` opens a whole student written by `pipeline train` through it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.errors import UsageError

# Weight files transformers or torch would unpickle; listed in the error so the user sees what was found.
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _refuse_without_safetensors(path: str, field: str) -> None:
    root = Path(path)
    if not root.is_dir() or any(root.glob("*.safetensors")):
        return  # a hub id, or a directory with safetensors weights: transformers takes it from here
    pickled = sorted(p.name for p in root.iterdir() if p.name.endswith(PICKLED_SUFFIXES))
    found = f"only pickled weights ({', '.join(pickled)})" if pickled else "no .safetensors weights"
    raise UsageError(f"{field}={path} holds {found}; only safetensors are loaded (a pickle can run code): convert "
                     "the weights to safetensors (save_pretrained(..., safe_serialization=True) where the source is "
                     f"trusted) and point {field} at that directory")


def from_pretrained_safetensors(model_class, path: str, *, field: str, **kwargs):
    """`model_class.from_pretrained(path, use_safetensors=True, **kwargs)`, never reading a pickle.

    `field` names where `path` came from (`model.llm`, `checkpoint`, ...) in the error raised when `path` has no
    safetensors weights: a `UsageError` for a local directory or a hub repository without them.
    """
    _refuse_without_safetensors(path, field)
    try:
        return model_class.from_pretrained(path, use_safetensors=True, **kwargs)
    except OSError as exc:
        # A hub repository (or a folder whose .safetensors files are not the model's) without safetensors weights:
        # transformers names the safetensors file it did not find.
        if "safetensors" in str(exc):
            raise UsageError(f"{field}={path} has no safetensors weights ({exc}); convert the weights to "
                             f"safetensors and point {field} at them") from None
        raise


def load_image_processor(path: str):
    """The student's image processor from `path`, on the numpy/PIL backend: the one the reference (LLaVA) used.
    transformers 5 picks the torchvision backend by default, whose resize differs by up to 0.03 in pixel values."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(path, backend="pil")

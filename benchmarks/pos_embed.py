"""Depth teacher: how much the reference's resize of DINOv2's position embeddings changes the targets (issue 13).

    python benchmarks/pos_embed.py [--images 4] [--work DIR]

Depth-Anything-V2-Large at real size (DINOv2-L/14, 37 x 37 position grid) with random float32 weights from the
model's own initialisation (tests/teachers/full_size.py), written to a temporary checkpoint that is deleted
afterwards, runs as the olavlm.yaml depth teacher (336 px, 24 x 24 patches) once per `pos_embed_interpolation`:
`transformers` (bicubic to size 24 x 24) and `reference` (bicubic by the scale factor (24 + 0.1) / 37). Printed:
relative L2 ||reference - transformers|| / ||transformers|| of the targets, per photo and over all photos, and of the
resized position grids themselves.

Random weights make the figure an estimate of the effect on the real model. Their position grid is white noise
(std 0.02), which a 0.15-cell shift of the sampling grid changes far more than a smooth grid such as a trained one,
so the run is repeated with the grid replaced by a smooth 2-D sine-cosine grid of the same RMS. The trained grid's
size next to the patch embeddings is not known here and would scale both figures.

Photos: the demo's skimage sources (pipeline/demo/photos.py). About 190 CPU seconds and 4 GB peak RSS; 7.5 minutes
of wall time on 2 cores shared with other jobs.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "stereo_motorcycle", "immunohistochemistry")
POSITION_KEY = "backbone.embeddings.position_embeddings"


def photos(count: int):
    from PIL import Image

    from pipeline.demo.photos import load_source

    if count > len(PHOTOS):
        raise SystemExit(f"--images: at most {len(PHOTOS)} colour photos are bundled")
    return [Image.fromarray(load_source(name)).convert("RGB") for name in PHOTOS[:count]]


def sincos_grid(native: int, dim: int):
    """[native * native, dim] float32 2-D sine-cosine position grid (rows in the first half of the channels)."""
    import torch

    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(native, dtype=torch.float64)[:, None] * omega[None, :]
    axis = torch.cat([coords.sin(), coords.cos()], dim=1)  # [native, dim / 2]
    rows = axis[:, None, :].expand(native, native, -1)
    cols = axis[None, :, :].expand(native, native, -1)
    return torch.cat([rows, cols], dim=-1).reshape(native * native, dim).float()


def make_grid_smooth(checkpoint: Path) -> None:
    """Replace the checkpoint's patch position grid by a sine-cosine grid with the same RMS ([CLS] kept)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(checkpoint / "model.safetensors")
    position = tensors[POSITION_KEY]
    patch = position[0, 1:]
    native = round(patch.shape[0] ** 0.5)
    smooth = sincos_grid(native, patch.shape[1])
    smooth = smooth * (patch.float().square().mean().sqrt() / smooth.square().mean().sqrt())
    position[0, 1:] = smooth.to(position.dtype)
    tensors[POSITION_KEY] = position
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})


def compare(checkpoint: Path, images) -> dict:
    import torch

    import teachers
    from tests.teachers.full_size import olavlm_spec
    from tests.teachers.legacy_preprocess import relative_l2

    targets, grids = {}, {}
    for mode in ("transformers", "reference"):
        teacher = teachers.create(olavlm_spec("depth", checkpoint, pos_embed_interpolation=mode))
        targets[mode] = teacher(teacher.preprocess(images))
        embeddings = teacher.backbone.embeddings
        # The grid each mode adds for 24 x 24 patches (transformers resizes on every call; `reference` did at load).
        dummy = torch.zeros(1, 1 + teacher.num_patches, embeddings.position_embeddings.shape[-1])
        with torch.no_grad():
            grids[mode] = embeddings.interpolate_pos_encoding(dummy, 336, 336)[:, 1:].clone()
        del teacher
        gc.collect()
    ref, plain = targets["reference"], targets["transformers"]
    return {"per_image": [relative_l2(ref[i], plain[i]) for i in range(len(images))],
            "all": relative_l2(ref, plain), "grid": relative_l2(grids["reference"], grids["transformers"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help=f"photos (at most {len(PHOTOS)})")
    parser.add_argument("--work", type=Path, default=None, help="folder for the temporary checkpoint")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import torch
    from transformers.utils import logging as hf_logging

    from tests.teachers.full_size import write_depth_anything_v2_large

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    images = photos(args.images)
    sizes = ", ".join(f"{im.width}x{im.height}" for im in images)
    print(f"{len(images)} photos ({sizes}); torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    work = Path(tempfile.mkdtemp(prefix="pos-embed-", dir=args.work))
    rows = {}
    try:
        checkpoint = work / "depth"
        start = time.perf_counter()
        write_depth_anything_v2_large(checkpoint, dtype=torch.float32, own_init=True)
        print(f"  checkpoint written in {time.perf_counter() - start:.0f} s", flush=True)
        start = time.perf_counter()
        rows["random (own init)"] = compare(checkpoint, images)
        print(f"  random grid compared in {time.perf_counter() - start:.0f} s", flush=True)
        make_grid_smooth(checkpoint)
        rows["smooth sin-cos, same RMS"] = compare(checkpoint, images)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(table(rows))
    return 0


def table(rows: dict[str, dict]) -> str:
    lines = ["", "relative L2 ||reference - transformers|| / ||transformers||, Depth-Anything-V2-Large at 336 px, "
             "random float32 weights"]
    width = max(len(" ".join(f"{x:.2e}" for x in row["per_image"])) for row in rows.values())
    lines.append(f"{'position grid':26} {'targets, all':>13}  {'per photo':<{width}} {'grid alone':>11}")
    for name, row in rows.items():
        per_image = " ".join(f"{x:.2e}" for x in row["per_image"])
        lines.append(f"{name:26} {row['all']:13.2e}  {per_image:<{width}} {row['grid']:11.2e}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

"""Compute precision and preprocessing cost of the paper's three teachers, measured (issue 12, items 2-4).

    python benchmarks/precision.py [--images 4] [--repeats 7] [--work DIR]

One teacher at a time (depth, seg, gen), at real size: the hub architecture with random float32 weights from the
model's own initialisation (unit norm scales, zero biases; tests/teachers/full_size.py), written to a temporary
checkpoint that is deleted afterwards. Then, on skimage photos (300-640 px, as the demo shards):

precision   relative L2 ||x - x32|| / ||x32|| of the targets against float32 compute, for
            - bfloat16: the teacher built with `compute_dtype: bfloat16` (weights and activations in bf16), and
            - TF32, emulated: this machine has no TF32, so the float32 teacher runs with the inputs and weights of
              every Linear and Conv rounded to TF32's 10-bit mantissa (round to nearest, ties away from zero, like
              `cvt.rna.tf32.f32`) by forward pre-hooks, products and sums staying float32. An estimate: the
              attention matmuls (QK^T, PV) are not rounded here, and GPU kernels may split or accumulate otherwise.
            For scale, the float16 rounding every stored target gets anyway is printed beside them.
preprocess  CPU milliseconds per image, one thread, median of --repeats: the old path (float32 pixel_values
            made on the CPU, tests/teachers/legacy_preprocess.py) and the new CPU half (`build_preprocessor`,
            uint8 out); the new path's linear steps run on the device, timed here on the CPU for information.

Only one real-size teacher is in memory at a time. On 2 CPU cores the whole run takes about 6 minutes.
"""

from __future__ import annotations

import argparse
import os
import gc
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def round_to_tf32(x):
    """float32 tensor -> the nearest value with TF32's 10-bit mantissa (ties away from zero), still float32."""
    import torch

    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def emulate_tf32(model) -> list:
    """Round every Linear/Conv weight of `model` to TF32 in place and its inputs on every call; returns the hook
    handles (remove them to stop rounding inputs; the weights stay rounded)."""
    import torch
    from torch import nn

    def round_inputs(module, args):
        return tuple(round_to_tf32(a) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a
                     for a in args)

    handles = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                module.weight.copy_(round_to_tf32(module.weight))
                handles.append(module.register_forward_pre_hook(round_inputs))
    return handles


def relative_l2(a, b) -> float:
    import torch

    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def photos(count: int):
    import numpy as np
    from PIL import Image
    from skimage import data

    arrays = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry(),
              data.hubble_deep_field()[:480, :640]]
    if count > len(arrays):
        raise SystemExit(f"--images: at most {len(arrays)} photos are bundled")
    return [Image.fromarray(np.ascontiguousarray(a)).convert("RGB") for a in arrays[:count]]


def median_ms_per_image(fn, images, repeats: int) -> float:
    fn(images)  # warm-up: imports, first allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(images)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / len(images)


def measure_teacher(name: str, work: Path, images, repeats: int) -> dict:
    import torch

    import teachers
    from tests.teachers.full_size import WRITERS, olavlm_spec
    from tests.teachers.legacy_preprocess import LegacyPreprocess

    checkpoint = work / name
    result = {"teacher": name}
    try:
        start = time.perf_counter()
        WRITERS[name](checkpoint, dtype=torch.float32, own_init=True)
        result["build_s"] = time.perf_counter() - start

        # Preprocessing first, while nothing big is in memory; one thread, as one CPU worker runs it.
        spec = olavlm_spec(name, checkpoint)
        cls = teachers.get_teacher_class(spec.kind)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            legacy = LegacyPreprocess(spec, cls.locate(spec).root)
            preprocessor = cls.build_preprocessor(spec)
            result["old_ms"] = median_ms_per_image(legacy, images, repeats)
            result["new_ms"] = median_ms_per_image(preprocessor, images, repeats)
            batch = preprocessor(images)
            result["normalize_ms"] = median_ms_per_image(lambda _: preprocessor.normalize(batch), images, repeats)
            result["pixels_exact"] = torch.equal(preprocessor.normalize(batch), legacy(images))
            result["bytes_old"] = legacy(images[:1]).numel() * 4
            result["bytes_new"] = preprocessor(images[:1]).numel() * batch.element_size()
        finally:
            torch.set_num_threads(threads)

        teacher = teachers.create(spec)
        start = time.perf_counter()
        full = teacher(batch)
        result["fp32_forward_s"] = time.perf_counter() - start
        result["float16_storage"] = relative_l2(full.half().float(), full)
        handles = emulate_tf32(teacher)
        result["tf32_emulated"] = relative_l2(teacher(batch), full)
        for handle in handles:
            handle.remove()
        del teacher
        gc.collect()

        half = teachers.create(olavlm_spec(name, checkpoint, compute_dtype="bfloat16"))
        start = time.perf_counter()
        result["bfloat16"] = relative_l2(half(batch), full)
        result["bf16_forward_s"] = time.perf_counter() - start
        del half
        gc.collect()
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="photos per teacher (at most 6)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of each preprocessing path")
    parser.add_argument("--work", type=Path, default=None, help="folder for the temporary checkpoints")
    parser.add_argument("--teachers", nargs="+", default=["depth", "seg", "gen"], choices=["depth", "seg", "gen"])
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)

    images = photos(args.images)
    sizes = ", ".join(f"{im.width}x{im.height}" for im in images)
    print(f"{len(images)} photos ({sizes}); torch {torch.__version__}, {torch.get_num_threads()} threads for "
          f"forwards, 1 for preprocessing", flush=True)
    work = Path(tempfile.mkdtemp(prefix="precision-", dir=args.work))
    rows = []
    try:
        for name in args.teachers:
            row = measure_teacher(name, work, images, args.repeats)
            rows.append(row)
            print(f"  {name}: checkpoint {row['build_s']:.0f} s, fp32 forward {row['fp32_forward_s']:.1f} s, "
                  f"bf16 forward {row['bf16_forward_s']:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\nrelative L2 of the targets against float32 compute (real-size random-init teachers)")
    print(f"{'teacher':8} {'bfloat16':>10} {'TF32 (emulated)':>16} {'float16 storage':>16}")
    for r in rows:
        print(f"{r['teacher']:8} {r['bfloat16']:10.2e} {r['tf32_emulated']:16.2e} {r['float16_storage']:16.2e}")
    print(f"\nCPU preprocessing, ms per image (one thread, median of {args.repeats})")
    print(f"{'teacher':8} {'old':>8} {'new CPU':>8} {'speed-up':>9} {'device half*':>13} {'bytes/img old->new':>20} "
          f"{'exact':>6}")
    for r in rows:
        print(f"{r['teacher']:8} {r['old_ms']:8.1f} {r['new_ms']:8.1f} {r['old_ms'] / r['new_ms']:8.1f}x "
              f"{r['normalize_ms']:13.1f} {r['bytes_old']:>10,} -> {r['bytes_new']:<8,} {str(r['pixels_exact']):>6}")
    print("* the linear steps (table lookup) that now run on the accelerator, timed here on the CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

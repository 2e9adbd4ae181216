"""The device check (`make bench-gpu`): the paper's three teachers at real size on this machine's GPUs.

On a machine with CUDA GPUs it writes the three paper teacher checkpoints at full size with random weights (no
download: tests/teachers/full_size.py), LLaVA-like shards of a few thousand rows (benchmarks/feed.py), then

1. the bare forward loop: every teacher's forward over the same images, inputs already on the GPU, in
   `--dtype` (the paper manifest's compute setting by default) -> teacher-rows/s and rows/s (all three);
2. `pipeline precompute` on those shards with the default feed for GPUs (prepare and write as CPU tasks on every
   core, each GPU's worker computing) -> rows/s per GPU, from the job's compute time;
3. GPU utilisation sampled with `nvidia-smi` every half second during the pipeline run (mean, per GPU).

It prints one markdown table to record in benchmarks/RESULTS.md. Tests never run it. `--tiny` runs the same
steps with the tiny demo teachers (a smoke test, also on a CPU-only machine).

    python benchmarks/gpu.py [--rows 4096] [--dtype bfloat16] [--out runs/bench-gpu] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.feed import write_llava_like_shards  # noqa: E402

BATCH_SIZES = {"depth": 64, "seg": 16, "gen": 128}
GPU_SHARES = {"depth": 0.25, "seg": 0.5, "gen": 0.25}  # one worker holds all three teachers on each GPU


def write_teachers(root: Path, tiny: bool) -> dict[str, Path]:
    if tiny:
        from pipeline.demo.teachers import build_tiny_depth_anything, build_tiny_oneformer, build_tiny_unclip_image_encoder

        return {"depth": build_tiny_depth_anything(root / "depth"), "seg": build_tiny_oneformer(root / "seg"),
                "gen": build_tiny_unclip_image_encoder(root / "gen")}
    from tests.teachers.full_size import WRITERS

    return {name: write(root / name) for name, write in WRITERS.items()}


def write_manifest(path: Path, models: dict[str, Path], dtype: str, tiny: bool) -> Path:
    import yaml

    base = yaml.safe_load((REPO / "manifests" / "teachers" / ("demo.yaml" if tiny else "olavlm.yaml")).read_text())
    for name, spec in base["teachers"].items():
        spec.update(model=str(models[name]), batch_size=BATCH_SIZES[name], num_gpus=GPU_SHARES[name])
        spec.update({} if dtype == "manifest" else {"compute_dtype": dtype})
        spec.pop("revision", None)
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def bare_forward(manifest: Path, shards: Path, seconds: float) -> dict[str, float]:
    """Teacher-rows/s of each teacher's forward alone, its preprocessed inputs already on the device."""
    import torch

    import teachers
    from pipeline.data.images import decode_rgb
    from pipeline.data.index import build_index
    from pipeline.data.shards import read_member_bytes

    index = build_index(str(shards), progress=False).table.to_pylist()[:256]
    images = []
    for row in index:
        with open(shards / row["shard"], "rb") as f:
            images.append(decode_rgb(read_member_bytes(f, row["image_offset"], row["image_size"])))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rates = {}
    for name, spec in teachers.load_manifest(manifest).teachers.items():
        teacher = teachers.create(spec, device=device)
        batch = teacher._move(teacher.preprocess(images[: spec.batch_size]))
        teacher(batch)  # warm-up: kernels, allocator
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            teacher(batch)
            done += spec.batch_size
        if device == "cuda":
            torch.cuda.synchronize()
        rates[name] = done / (time.perf_counter() - started)
        del teacher, batch
        if device == "cuda":
            torch.cuda.empty_cache()
    return rates


class GpuSampler:
    """Mean GPU utilisation (%) per GPU from `nvidia-smi`, sampled every half second while running."""

    def __init__(self):
        self.samples: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            self.samples.append([float(x) for x in out.split()])

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def means(self) -> list[float]:
        return [sum(col) / len(col) for col in zip(*self.samples)] if self.samples else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--rows-per-block", type=int, default=64)
    parser.add_argument("--dtype", default="manifest", choices=("manifest", "float32", "bfloat16", "float16"),
                        help="compute dtype of every teacher (default: the manifest's)")
    parser.add_argument("--forward-seconds", type=float, default=20.0, help="per teacher, for the bare loop")
    parser.add_argument("--out", default="runs/bench-gpu")
    parser.add_argument("--tiny", action="store_true", help="tiny demo teachers: a smoke test, CPU allowed")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import torch

    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("no CUDA GPU here: run this on a GPU machine (or pass --tiny for a smoke test)")
    from pipeline.precompute import PrecomputeConfig, run_precompute

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    shards = write_llava_like_shards(out / "shards", args.rows)
    manifest = write_manifest(out / "teachers.yaml", write_teachers(out / "teachers", args.tiny), args.dtype,
                              args.tiny)
    print(f"assets written in {time.perf_counter() - started:.0f}s")
    bare = bare_forward(manifest, shards, args.forward_seconds)
    gpus = torch.cuda.device_count()
    with GpuSampler() as sampler:
        summary = run_precompute(str(shards), str(manifest), str(out / "store"),
                                 PrecomputeConfig(rows_per_block=args.rows_per_block), progress=True)
    pipeline_rate = summary.num_rows / summary.compute_seconds
    # Rows/s of the three teachers run one after the other on one device: 1 / sum of per-teacher seconds per row.
    bare_rate = 1.0 / sum(1.0 / r for r in bare.values())
    name = torch.cuda.get_device_name() if gpus else "CPU (smoke test)"
    print(f"\n{name} x {gpus}, {os.cpu_count()} CPU cores, torch {torch.__version__}, dtype {args.dtype}, "
          f"{summary.num_rows} rows, feed {summary.feed}, {summary.workers} worker(s)")
    print("| measure | value |\n|---|---|")
    for teacher, rate in bare.items():
        print(f"| bare forward, {teacher} | {rate:.1f} teacher-rows/s per GPU |")
    print(f"| bare forward, three teachers | {bare_rate:.1f} rows/s per GPU |")
    print(f"| pipeline | {pipeline_rate / max(gpus, 1):.1f} rows/s per GPU ({pipeline_rate:.1f} in all) |")
    print(f"| pipeline / bare forward | {pipeline_rate / max(gpus, 1) / bare_rate:.3f} |")
    utilisation = sampler.means()
    print(f"| GPU utilisation during the pipeline | {', '.join(f'{u:.0f}%' for u in utilisation) or 'n/a'} |")


if __name__ == "__main__":
    main()

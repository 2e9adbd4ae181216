"""The device check (`make bench-gpu`): the paper's three teachers at real size on this machine's GPUs, in both
compute precisions docs/precompute-at-scale.md discusses, bfloat16 and float32 with TF32 (the paper manifest's setting).

On a machine with CUDA GPUs it writes the three paper teacher checkpoints at full size with random weights (no
download: tests/teachers/full_size.py) and LLaVA-like shards of a few thousand rows (benchmarks/feed.py), then for
each precision (`--dtype`: both by default, or one of them) measures

1. the bare forward loop: every teacher's forward over the same images, inputs already on the GPU, one after the
   other on one GPU -> teacher-rows/s of each and rows/s per GPU of the three;
2. `pipeline precompute` on those shards with the default feed for GPUs (prepare and write as CPU tasks on every
   core Ray is given, each GPU's worker computing) -> rows/s per GPU, from the job's compute time;
3. GPU utilisation sampled with `nvidia-smi` every half second during the pipeline run (mean, per GPU);
4. the run's cores per GPU (the CPU cores Ray was given / GPUs) and, from them, an estimate of the cores per GPU
   that would keep a GPU busy at the bare forward's rate: bare rows/s per GPU x host ms per row / 1000, where host
   ms per row = the run's compute seconds x Ray's cores / rows. That assumes every core was busy for the whole
   compute time, which holds when the CPU feed sets the pace (GPU utilisation well below 100%); when the GPU sets
   it, the cores idled part of the time and the estimate is an upper bound. It leaves out the host work of the
   GPU workers' own processes (they take no Ray core).

It prints one markdown table to record in benchmarks/RESULTS.md. Tests never run it. `--tiny` runs the same
steps with the tiny demo teachers (a smoke test, also on a CPU-only machine, where TF32 changes nothing).

    python benchmarks/gpu.py [--rows 4096] [--dtype both|bfloat16|float32+tf32|float32|float16] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.precompute import PrecomputeSummary

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.feed import write_llava_like_shards  # noqa: E402

BATCH_SIZES = {"depth": 64, "seg": 16, "gen": 128}
GPU_SHARES = {"depth": 0.25, "seg": 0.5, "gen": 0.25}  # one worker holds all three teachers on each GPU
# --dtype -> every teacher's (compute_dtype, tf32); the spec refuses tf32 with any other compute dtype.
PRECISIONS = {"bfloat16": ("bfloat16", False), "float32+tf32": ("float32", True), "float32": ("float32", False),
              "float16": ("float16", False)}
BOTH = ("bfloat16", "float32+tf32")


def write_teachers(root: Path, tiny: bool) -> dict[str, Path]:
    if tiny:
        from pipeline.demo.teachers import build_tiny_depth_anything, build_tiny_oneformer, build_tiny_unclip_image_encoder

        return {"depth": build_tiny_depth_anything(root / "depth"), "seg": build_tiny_oneformer(root / "seg"),
                "gen": build_tiny_unclip_image_encoder(root / "gen")}
    from tests.teachers.full_size import WRITERS

    return {name: write(root / name) for name, write in WRITERS.items()}


def write_manifest(path: Path, models: dict[str, Path], precision: str, tiny: bool) -> Path:
    import yaml

    base = yaml.safe_load((REPO / "manifests" / "teachers" / ("demo.yaml" if tiny else "olavlm.yaml")).read_text())
    compute_dtype, tf32 = PRECISIONS[precision]
    for name, spec in base["teachers"].items():
        spec.update(model=str(models[name]), batch_size=BATCH_SIZES[name], num_gpus=GPU_SHARES[name],
                    compute_dtype=compute_dtype, tf32=tf32)
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


@dataclass
class Result:
    """One precision's measures: `bare` teacher-rows/s of each forward on one device, the pipeline run's summary
    and mean GPU utilisation (%) per GPU during it."""

    precision: str
    bare: dict[str, float]
    summary: PrecomputeSummary
    utilisation: list[float]


def measure(precision: str, out: Path, models: dict[str, Path], shards: Path, args) -> Result:
    from pipeline.precompute import PrecomputeConfig, run_precompute

    slug = precision.replace("+", "-")
    manifest = write_manifest(out / f"teachers-{slug}.yaml", models, precision, args.tiny)
    bare = bare_forward(manifest, shards, args.forward_seconds)
    with GpuSampler() as sampler:
        summary = run_precompute(str(shards), str(manifest), str(out / f"store-{slug}"),
                                 PrecomputeConfig(rows_per_block=args.rows_per_block), progress=True)
    return Result(precision, bare, summary, sampler.means())


def print_table(results: list[Result], gpus: int, cores: int) -> None:
    per_gpu = max(gpus, 1)  # on a CPU-only machine (--tiny) the CPU counts as the one device
    print("| precision | bare forward, rows/s per GPU (depth, seg, gen teacher-rows/s) | pipeline, rows/s per GPU "
          "| pipeline / bare | GPU utilisation, pipeline | cores per GPU | host ms per row (estimate) "
          "| cores per GPU to keep up with the bare forward (estimate) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        # The three teachers one after the other on one device: 1 / the sum of their seconds per row.
        bare = 1.0 / sum(1.0 / rate for rate in r.bare.values())
        pipeline = r.summary.num_rows / r.summary.compute_seconds / per_gpu
        host_ms = r.summary.compute_seconds * cores / r.summary.num_rows * 1000
        teachers = ", ".join(f"{rate:.0f}" for rate in r.bare.values())
        utilisation = ", ".join(f"{u:.0f}%" for u in r.utilisation) or "n/a"
        print(f"| {r.precision} | {bare:.1f} ({teachers}) | {pipeline:.1f} | {pipeline / bare:.2f} | {utilisation} "
              f"| {cores / per_gpu:.1f} | {host_ms:.1f} | {bare * host_ms / 1000:.1f} |")
    print("\nhost ms per row = the run's compute seconds x Ray's CPU cores / rows: exact when the CPU feed sets the "
          "pace, an upper bound when the GPU does (high utilisation).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--rows-per-block", type=int, default=64)
    parser.add_argument("--dtype", default="both", choices=("both", *PRECISIONS),
                        help="compute precision of every teacher (default: both of bfloat16 and float32+tf32)")
    parser.add_argument("--forward-seconds", type=float, help="per teacher, for the bare loop (default 20, 2 tiny)")
    parser.add_argument("--out", default="runs/bench-gpu")
    parser.add_argument("--tiny", action="store_true", help="tiny demo teachers: a smoke test, CPU allowed")
    args = parser.parse_args()
    args.forward_seconds = args.forward_seconds or (2.0 if args.tiny else 20.0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import torch

    if not torch.cuda.is_available() and not args.tiny:
        sys.exit("no CUDA GPU here: run this on a GPU machine (or pass --tiny for a smoke test)")
    from pipeline.local_ray import ray_session

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    shards = write_llava_like_shards(out / "shards", args.rows)
    models = write_teachers(out / "teachers", args.tiny)
    print(f"assets written in {time.perf_counter() - started:.0f}s")
    # One Ray for every run, started here so that its cores can be read: run_precompute joins it.
    with ray_session(None, include_dashboard=False, logging_level="ERROR", log_to_driver=False) as ray:
        cores = int(ray.cluster_resources()["CPU"])
        results = [measure(p, out, models, shards, args) for p in (BOTH if args.dtype == "both" else (args.dtype,))]
    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name() if gpus else "CPU (smoke test)"
    last = results[-1].summary
    print(f"\n{name} x {gpus}, {cores} CPU cores given to Ray ({os.cpu_count()} on the host), torch "
          f"{torch.__version__}, {last.num_rows} rows, feed {last.feed}, {last.workers} worker(s)\n")
    print_table(results, gpus, cores)


if __name__ == "__main__":
    main()

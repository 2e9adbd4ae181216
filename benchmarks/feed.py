"""P9, accelerator feed: how fully `pipeline precompute` keeps a device busy, measured on a machine without one.

The three paper teachers are replaced by simulated accelerator teachers (benchmarks/simulated_teacher.py): the
real CPU preprocessing at the paper's sizes (Depth-Anything at 336 px, OneFormer 768 -> its processor's 800 px,
the unCLIP CLIP processor at 224 px), then a forward that waits without holding the GIL and returns targets of
the real shapes ([576, 1024], [576, 1536], [1, 1024] float16, written and compressed as real ones are). Ray is
told the machine has one GPU, so the job is planned exactly as on a one-GPU node; the simulated device takes
`ms` milliseconds per image for the three teachers together. Shards hold LLaVA-like JPEGs of 300-640 px.

    P9 = pipeline rows/s / min(device rows/s, CPU feed capacity of all cores)

The device's rows/s is 1000 / ms. The CPU capacity is measured in the same run: the rows/s of one worker per
core, each preparing, computing and writing its blocks with a near-instant device (0.01 ms, asking for no GPU),
i.e. every core doing the CPU work of the whole job outside the forward (read, sha1, decode, resizes, encode,
compress, write) with nothing else to wait for.
Pipeline rows/s is the job's rows over its compute time (workers up to the last block's record). Two designs:
`tasks` (CPU tasks on every core prepare and write while the device's worker computes) and `inline` (the earlier
design: one worker per device does everything in turn). Every figure is the median of interleaved rounds with
the min-max over rounds.

    python benchmarks/feed.py [--rows 384] [--repeats 5] [--ms 5 20] [--out runs/bench-feed]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks.simulated_teacher` must import here and in Ray's workers

from benchmarks.measure import Spread, interleave  # noqa: E402

# Share of the simulated device time per teacher, roughly as their forward FLOPs (DINOv2-L at 336, Swin-L at 800,
# ViT-H/14 at 224); only the sum matters to the feed.
SHARES = {"depth": 0.2, "seg": 0.6, "gen": 0.2}
SHAPES = {"depth": [576, 1024], "seg": [576, 1536], "gen": [1, 1024]}
GPU_SHARES = {"depth": 0.25, "seg": 0.5, "gen": 0.25}  # one worker holds all three on the one (simulated) GPU
CPU_ONLY_MS = 0.01


def write_llava_like_shards(out: Path, rows: int, per_shard: int = 64, seed: int = 0) -> Path:
    """JPEGs (quality 90) of 300-640 px on the long side, cut from the photos bundled with scikit-image."""
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = [getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                                                  "immunohistochemistry", "retina", "cat", "motorcycle_left")
              if hasattr(data, name)]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for shard in range(0, rows, per_shard):
        with tarfile.open(out / f"llava-{shard // per_shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for row in range(shard, min(shard + per_shard, rows)):
                photo = photos[row % len(photos)]
                h, w = photo.shape[:2]
                ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
                top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                image = Image.fromarray(photo[top : top + ch, left : left + cw]).convert("RGB")
                scale = rng.uniform(300, 640) / max(image.size)
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                     Image.Resampling.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                for name, payload in ((f"{row:08d}.jpg", buffer.getvalue()), (f"{row:08d}.txt", b"a photo")):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
    return out


def build_assets(root: Path) -> dict[str, dict]:
    """Tiny checkpoints whose processors have the paper's sizes; returns the imitated specs."""
    from pipeline.demo.teachers import build_tiny_depth_anything, build_tiny_oneformer, build_tiny_unclip_image_encoder

    depth = build_tiny_depth_anything(root / "depth")
    seg = build_tiny_oneformer(root / "seg", image_size=800)  # the COCO processor's shortest edge
    gen = build_tiny_unclip_image_encoder(root / "gen")
    return {
        "depth": {"kind": "depth_anything_v2", "model": str(depth), "image_size": 336, "layers": [0, 1, 2, 3]},
        "seg": {"kind": "oneformer", "model": str(seg), "image_size": 768, "grid": 24},
        "gen": {"kind": "unclip_image_encoder", "model": str(gen)},
    }


def write_manifest(path: Path, imitated: dict[str, dict], ms: float, *, gpu: bool = True) -> Path:
    import yaml

    manifest = {"plugins": ["benchmarks.simulated_teacher"], "teachers": {
        name: {"kind": "simulated_accelerator", "model": spec["model"], "imitates": spec,
               "ms_per_image": ms * SHARES[name], "target_shape": SHAPES[name], "batch_size": 16,
               "num_gpus": GPU_SHARES[name] if gpu else 0}
        for name, spec in imitated.items()}}
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--rows-per-block", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ms", type=float, nargs="+", default=[5.0, 20.0], help="simulated ms per image")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores Ray may use")
    parser.add_argument("--out", default="runs/bench-feed")
    args = parser.parse_args()

    from pipeline.local_ray import ray_session

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    shards = write_llava_like_shards(out / "shards", args.rows)
    imitated = build_assets(out / "assets")
    manifests = {ms: write_manifest(out / f"sim-{ms:g}ms.yaml", imitated, ms) for ms in args.ms}
    manifests[CPU_ONLY_MS] = write_manifest(out / "cpu-only.yaml", imitated, CPU_ONLY_MS, gpu=False)

    # Ray's workers inherit the environment of the process that starts Ray: they must import the plugin too.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # A fresh local Ray that dies with this process, never a cluster someone else started on the machine.
    with ray_session(None, num_cpus=args.cores, num_gpus=1, include_dashboard=False, logging_level="ERROR",
                     log_to_driver=False):
        measure_feeds(args, shards, manifests)


def measure_feeds(args, shards: Path, manifests: dict[float, Path]) -> None:
    from pipeline.precompute import PrecomputeConfig, run_precompute

    print(f"P9: {args.rows} rows of 300-640 px JPEGs, blocks of {args.rows_per_block}, {args.cores} cores, one "
          f"simulated GPU, {args.repeats} interleaved rounds")
    runs = 0

    def run(variant: str) -> float:
        nonlocal runs
        feed, ms = variant.split("@")
        runs += 1
        store = Path(args.out) / f"store-{runs}"
        summary = run_precompute(str(shards), str(manifests[float(ms)]), str(store),
                                 PrecomputeConfig(feed=feed, rows_per_block=args.rows_per_block), progress=False)
        shutil.rmtree(store)
        return summary.num_rows / summary.compute_seconds

    variants = [f"inline@{CPU_ONLY_MS}"] + [f"{feed}@{ms}" for ms in args.ms for feed in ("tasks", "inline")]
    rates = interleave(variants, run, args.repeats)
    capacity = rates[f"inline@{CPU_ONLY_MS}"]
    print(f"\nCPU feed capacity (one inline worker on each of {args.cores} cores): {Spread.of(capacity):.1f} rows/s")
    print("| device ms/image | device rows/s | design | pipeline rows/s | P9 |")
    print("|---|---|---|---|---|")
    for ms in args.ms:
        for feed in ("tasks", "inline"):
            got = rates[f"{feed}@{ms}"]
            p9 = Spread.of([g / min(1000.0 / ms, c) for g, c in zip(got, capacity)])
            print(f"| {ms:g} | {1000.0 / ms:.0f} | {feed} | {Spread.of(got):.1f} | {p9:.3f} |")


if __name__ == "__main__":
    main()

"""Rows by image content against the per-sample design, side by side in one run (`make bench`, issue 23).

A fixture shaped like LLaVA-1.5's `llava_v1_5_mix665k.json`, scaled down to `--records` records with the mix's
shares (665,298 records): COCO 54.7% (364,100 records on 118,287 images: 3.08 records per image), GQA 10.8%,
OCR-VQA 12.0%, TextVQA 3.3%, Visual Genome 13.0%, text only 6.1%. Half of the GQA records name a byte-identical
copy of a Visual Genome image under a GQA path (GQA's photos are VG photos; how many of them are byte-identical
in the real data is not known here). So 45% of the image samples repeat an earlier image: the COCO repeats by
path, the GQA copies by content. The images are demo photographs (`write_demo_llava`: crops of the photos bundled
with scikit-image, 160-480 px); the records are shuffled, as the mix is, and cut with `write_llava_shards`.

The per-sample stand-in is the same records where every repeat of an image is a file of its own: the image's
bytes with the sample's number appended after the JPEG's end, which decoders ignore (same pixels, checked), so
its sha1 differs and each image sample gets a target row, as in the format before version 2.

Both run `run_precompute` with the tiny demo teachers (manifests/teachers/demo.yaml, default settings, Ray
started once), interleaved over `--repeats` rounds (benchmarks/measure.py). Measured per run:
- forwards: the images each teacher's forward actually received, counted inside the Ray workers (a setup hook
  wraps `Teacher.device_forward` in every worker process and logs each batch's size), and the run summary's
  `rows_computed` (teacher-rows computed); each divided by the distinct images;
- wall time of `run_precompute` (indexing, workers starting and loading teachers, computing, finishing) and its
  `compute_seconds` (from every worker holding its teachers to the last block written);
- store bytes: every file of the store on disk, and the teachers' arrays alone.

    python benchmarks/dedup.py [--records 1500] [--repeats 3] [--out runs/bench-dedup]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.measure import Spread, interleave, ratio  # noqa: E402

MANIFEST = REPO / "manifests" / "teachers" / "demo.yaml"
TEACHERS = 3  # the demo manifest's depth, seg and gen
VARIANTS = ("by content", "per sample")
# (source, share of the mix's records, records per distinct image); gqa's own images are half of its records.
MIX = (("coco", 364_100 / 665_298, 364_100 / 118_287), ("gqa", 72_140 / 665_298, 1.0),
       ("ocr_vqa", 80_000 / 665_298, 1.0), ("textvqa", 21_953 / 665_298, 1.0), ("vg", 86_417 / 665_298, 1.0))
TEXT_ONLY_SHARE = 40_688 / 665_298
GQA_COPIES = 0.5  # of the GQA records, those whose image is a byte-identical copy of a VG image
FORWARD_LOG = "DEDUP_BENCH_FORWARD_LOG"


def mix_records(records: int, seed: int) -> list[tuple[str, int | None]]:
    """(the record's image path, the distinct image it shows, numbered from 0) per record, None for text only;
    in a seeded shuffled order. Paths repeat for COCO; a GQA copy has its own path and a VG image's content."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, int | None]] = []
    distinct = 0
    vg_images: list[int] = []
    counts = {source: round(records * share) for source, share, _ in MIX}
    for source, _, per_image in MIX:
        if source == "gqa":
            continue  # after vg, whose images its copies show
        images = max(1, round(counts[source] / per_image))
        picks = list(range(images)) + list(rng.integers(0, images, counts[source] - images))
        out += [(f"{source}/{distinct + i:06d}.jpg", distinct + i) for i in picks]
        if source == "vg":
            vg_images = list(range(distinct, distinct + images))
        distinct += images
    copies = round(counts["gqa"] * GQA_COPIES)
    for i, image in enumerate(rng.choice(vg_images, copies, replace=False)):
        out.append((f"gqa/copy-{i:06d}.jpg", int(image)))
    out += [(f"gqa/{distinct + i:06d}.jpg", distinct + i) for i in range(counts["gqa"] - copies)]
    out += [("", None)] * round(records * TEXT_ONLY_SHARE)
    return [out[i] for i in rng.permutation(len(out))]


def write_fixture(out: Path, records: int, seed: int) -> dict:
    """Both datasets' shards (by content: `out/content`, per sample: `out/per-sample`) and their counts."""
    from pipeline.demo.llava import write_demo_llava
    from pipeline.llava_shards import write_llava_shards

    plan = mix_records(records, seed)
    distinct = 1 + max(image for _, image in plan if image is not None)
    photos = write_demo_llava(out / "photos", num_samples=distinct, seed=seed, progress=False)
    files = [photos.images / r["image"] for r in json.loads(photos.json_path.read_text())]
    payloads = [path.read_bytes() for path in files]
    assert len({hashlib.sha1(p).digest() for p in payloads}) == distinct, "two demo photos came out the same"
    for number, payload in enumerate(payloads):  # the stand-in's repeats: other bytes, the same pixels
        tagged = payload + number.to_bytes(4, "big")
        assert np.array_equal(_decoded(payload), _decoded(tagged)), f"a trailing tag changed photo {number}'s pixels"

    shards = {}
    for variant, folder in (("by content", "content"), ("per sample", "per-sample")):
        images, seen, json_records = out / folder / "images", set(), []
        for number, (relative, image) in enumerate(plan):
            turns = [{"from": "human", "value": "<image>\nDescribe the image briefly." if image is not None else
                      "Write a haiku about shards."}, {"from": "gpt", "value": f"Record {number}."}]
            record = {"id": f"{number:06d}", "conversations": turns}
            if image is not None:
                payload = payloads[image]
                if variant == "per sample" and image in seen:
                    relative, payload = f"repeat/{number:06d}.jpg", payload + number.to_bytes(4, "big")
                seen.add(image)
                path = images / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(payload)
                record["image"] = relative
            json_records.append(record)
        json_path = out / folder / "mix.json"
        json_path.write_text(json.dumps(json_records))
        write_llava_shards(json_path, images, out / folder / "shards", num_shards=4, workers=1, progress=False)
        shards[variant] = str(out / folder / "shards")
    image_samples = sum(image is not None for _, image in plan)
    by_path = image_samples - len({relative for relative, image in plan if image is not None})
    return {"shards": shards, "records": len(plan), "image_samples": image_samples, "distinct": distinct,
            "repeats": image_samples - distinct, "by_path": by_path, "text_only": len(plan) - image_samples}


def _decoded(payload: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(payload)) as image:
        return np.asarray(image.convert("RGB"))


def count_forwards() -> None:
    """Ray's worker_process_setup_hook: every worker process logs the images each teacher forward receives, in
    the folder $FORWARD_LOG (Ray's processes inherit the driver's environment)."""
    from teachers.base import Teacher

    forward, log_dir = Teacher.device_forward, os.environ[FORWARD_LOG]

    def counted(self, batch):
        out = forward(self, batch)
        with open(os.path.join(log_dir, f"{os.getpid()}.log"), "a") as log:
            log.write(f"{self.spec.kind} {out.shape[0]}\n")
        return out

    Teacher.device_forward = counted


def forwards_logged(log_dir: Path) -> Counter:
    """{teacher kind: images forwarded} from the workers' logs, which are then emptied for the next run."""
    counts: Counter = Counter()
    for log in log_dir.glob("*.log"):
        for line in log.read_text().splitlines():
            kind, images = line.split()
            counts[kind] += int(images)
        log.unlink()
    return counts


def store_bytes(store: Path) -> tuple[int, int]:
    """(every file of the store, the teachers' arrays alone), bytes on disk as file sizes."""
    from pipeline.data.store import TargetStore

    files = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    target = TargetStore(str(store))
    return files, sum(target.nbytes(name) for name in target.teacher_names())


def run_variant(shards: str, store: Path, log_dir: Path) -> dict:
    from pipeline.precompute import run_precompute

    shutil.rmtree(store, ignore_errors=True)
    forwards_logged(log_dir)  # nothing from an earlier run counts
    started = time.perf_counter()
    summary = run_precompute(shards, str(MANIFEST), str(store), progress=False)
    seconds = time.perf_counter() - started
    forwards = forwards_logged(log_dir)
    files, arrays = store_bytes(store)
    return {"seconds": seconds, "compute": summary.compute_seconds, "rows_computed": summary.rows_computed,
            "ms_per_image": 1000 * summary.compute_seconds * TEACHERS / summary.rows_computed,
            "forwards": dict(forwards), "bytes": files, "array_bytes": arrays}


def measure(fixture: dict, out: Path, log_dir: Path, repeats: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}

    def run(variant: str) -> float:
        result = run_variant(fixture["shards"][variant], out / "stores" / variant.replace(" ", "-"), log_dir)
        runs[variant].append(result)
        return result["seconds"]

    interleave(VARIANTS, run, repeats, report=lambda line: print(f"{line} s", flush=True))
    return runs


def machine() -> str:
    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def report(fixture: dict, runs: dict[str, list[dict]], load: tuple[float, float], seconds: float) -> str:
    distinct = fixture["distinct"]
    content, sample = runs["by content"], runs["per sample"]

    def spread(variant_runs: list[dict], key: str, scale: float = 1.0) -> Spread:
        return Spread.of([r[key] * scale for r in variant_runs])

    def forwards(variant_runs: list[dict]) -> Spread:
        return Spread.of([sum(r["forwards"].values()) / (TEACHERS * distinct) for r in variant_runs])

    def ratios(key: str) -> Spread:
        return ratio([r[key] for r in content], [r[key] for r in sample])

    mib, per_image = 1 / 2**20, 1 / (TEACHERS * distinct)
    rows = [
        ("teacher forwards per distinct image, counted in the workers", f"{forwards(content):.3f}",
         f"{forwards(sample):.3f}", f"{forwards(content).median / forwards(sample).median:.3f}"),
        ("rows_computed / (3 teachers x distinct images)", f"{spread(content, 'rows_computed', per_image):.3f}",
         f"{spread(sample, 'rows_computed', per_image):.3f}", f"{ratios('rows_computed'):.3f}"),
        ("wall time of run_precompute, s", f"{spread(content, 'seconds'):.2f}", f"{spread(sample, 'seconds'):.2f}",
         f"{ratios('seconds'):.3f}"),
        ("compute_seconds, s", f"{spread(content, 'compute'):.2f}", f"{spread(sample, 'compute'):.2f}",
         f"{ratios('compute'):.3f}"),
        ("compute_seconds per image computed, ms", f"{spread(content, 'ms_per_image'):.1f}",
         f"{spread(sample, 'ms_per_image'):.1f}", f"{ratios('ms_per_image'):.3f}"),
        ("store bytes, every file, MiB", f"{content[-1]['bytes'] * mib:.2f}", f"{sample[-1]['bytes'] * mib:.2f}",
         f"{content[-1]['bytes'] / sample[-1]['bytes']:.3f}"),
        ("store bytes, teachers' arrays, MiB", f"{content[-1]['array_bytes'] * mib:.2f}",
         f"{sample[-1]['array_bytes'] * mib:.2f}", f"{content[-1]['array_bytes'] / sample[-1]['array_bytes']:.3f}"),
    ]
    kinds = sorted({k for r in content + sample for k in r["forwards"]})
    per_teacher = ", ".join(f"{k} {content[-1]['forwards'].get(k, 0)} / {sample[-1]['forwards'].get(k, 0)}"
                            for k in kinds)
    f = fixture
    lines = [f"machine: {machine()}",
             f"load average (1 min) at start {load[0]:.2f}, at end {load[1]:.2f}; whole benchmark {seconds:.0f} s",
             "",
             f"fixture: {f['records']} records, {f['image_samples']} image samples on {f['distinct']} distinct "
             f"images: {f['repeats']} repeats ({f['repeats'] / f['image_samples']:.1%} of the image samples), "
             f"{f['by_path']} by path and {f['repeats'] - f['by_path']} byte-identical copies under other names; "
             f"{f['text_only']} text-only records. {len(content)} interleaved rounds, median [min-max].",
             "",
             "| measure | by content (format 2) | per sample (stand-in) | by content / per sample |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {a} | {b} | {c} |" for name, a, b, c in rows]
    exact = sum(all(n == distinct for n in r["forwards"].values()) and len(r["forwards"]) == TEACHERS
                for r in content)
    lines += ["", f"goal: by content, every teacher forwards each distinct image exactly once: {exact}/{len(content)} "
              "rounds", f"images forwarded per teacher in the last round (by content / per sample): {per_teacher}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1500, help="records of the mix-shaped fixture (default 1500)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-dedup", help="scratch directory")
    args = parser.parse_args()
    if args.records < 40:
        parser.error("--records must be at least 40 (every source of the mix needs a record)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from pipeline.demo import build_demo_assets
    from pipeline.local_ray import ray_session

    started, load_start = time.perf_counter(), os.getloadavg()[0]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    demo = build_demo_assets(out / "demo", num_samples=8, num_shards=1, progress=False)
    os.environ["DEMO_DIR"] = str(demo.root)  # the demo manifest's ${DEMO_DIR}
    fixture = write_fixture(out / "fixture", args.records, args.seed)
    log_dir = out / "forwards"
    log_dir.mkdir()
    os.environ[FORWARD_LOG] = str(log_dir.resolve())
    # A fresh local Ray that dies with this process; every worker it starts counts its teachers' forwards.
    with ray_session(None, num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
                     log_to_driver=False, runtime_env={"worker_process_setup_hook": count_forwards}):
        runs = measure(fixture, out, log_dir, args.repeats)
    print()
    print(report(fixture, runs, (load_start, os.getloadavg()[0]), time.perf_counter() - started))


if __name__ == "__main__":
    main()

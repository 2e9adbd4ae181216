"""Training benchmark: ratios measured side by side in one run on the demo (`make bench`).

P3        = step time with targets read from the store / step time of the same model and loss fed the same
            targets from memory (the store's overhead; goal <= 1.05)
P3 online = step time with online teachers (`data.online_teachers`) / step time with the store (what
            precomputing saves at every step of every run)
P4        = loader samples/s (the DataLoader alone) / trainer samples/s (goal >= 3: the GPU, here the CPU, never
            waits for data)
P6        = peak RSS of a short training run, cached vs online teachers, each in its own process

A "step" is everything one optimizer step costs the training loop: waiting for the batch, then forward, backward
and the optimizer. All three modes run the same loader (same worker count, decoding, image processing,
tokenizing); they differ only in where the targets come from. Modes take turns (A B C C B A) so that a change of
load on a shared machine shifts all of them alike; medians are reported. Everything is built offline into --out.

    python benchmarks/train.py [--rows 200] [--steps 4] [--out runs/bench-train]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = REPO / "manifests" / "experiments" / "demo.yaml"
TEACHERS = REPO / "manifests" / "teachers" / "demo.yaml"
MODES = ("store", "memory", "online")


def settings(out: Path, steps: int, batch_size: int, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"train.max_steps={steps}", f"data.batch_size={batch_size}", "data.num_workers=1",
            "train.trackers=[]", "train.resume=none", "train.warmup_ratio=0", *extra]


def build_demo(out: Path, rows: int) -> tuple[Path, float]:
    """Demo assets and their store under `out`; returns the demo root and the precompute seconds."""
    from pipeline.demo_assets import build_demo_assets
    from pipeline.precompute import run_precompute

    demo = build_demo_assets(out / "demo", num_samples=rows, num_shards=4, progress=False)
    os.environ["DEMO_DIR"] = str(demo.root)
    started = time.perf_counter()
    run_precompute(str(demo.shards_dir), str(TEACHERS), str(demo.root / "store"), rows_per_block=32,
                   rows_per_chunk=8, progress=False)
    return demo.root, time.perf_counter() - started


class InMemoryTargets:
    """Every target of the store, decoded into RAM once: the 'no store' baseline of P3."""

    def __init__(self, store_path: str, names: list[str]):
        import torch

        from pipeline.store import TargetStore

        store = TargetStore(store_path)
        self.targets, self.valid = {}, {}
        for name in names:
            target, valid = store.read_rows(name, 0, store.num_rows)
            self.targets[name] = torch.from_numpy(target)
            self.valid[name] = torch.from_numpy(valid.astype(bool))

    def fill(self, batch: dict) -> dict:
        rows = batch["rows"]
        batch["targets"] = {n: t[rows] for n, t in self.targets.items()}
        batch["valid"] = {n: v[rows] for n, v in self.valid.items()}
        return batch


def build_modes(out: Path, steps: int, batch_size: int) -> dict:
    """{mode: (training parts, batch iterator, per-batch preparation)} for the three target sources."""
    from student.config import load_experiment
    from student.trainer import build_training

    modes = {}
    for mode in MODES:
        extra = ["data.online_teachers=true"] if mode == "online" else []
        cfg = load_experiment(str(EXPERIMENT), settings(out / mode, steps, batch_size, *extra))
        parts = build_training(cfg)
        prepare = lambda batch: batch  # noqa: E731
        if mode == "memory":
            # Same loader, minus the store reads: the targets come from RAM, indexed by the batch's rows.
            memory = InMemoryTargets(cfg.data.store, list(cfg.model.tasks))
            parts.dataset.teachers = []
            parts.loader.collate_fn.teachers = []
            prepare = memory.fill
        modes[mode] = (parts, iter(parts.loader), prepare)
    return modes


def timed_steps(parts, data, prepare, count: int) -> list[float]:
    from student.trainer import train_step

    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        train_step(parts, prepare(next(data)))
        seconds.append(time.perf_counter() - started)
    return seconds


def loader_rate(parts, batches: int) -> float:
    """Samples/s of a fresh DataLoader like the trainer's, iterated alone (its first batch, the start-up, not
    counted)."""
    from torch.utils.data import DataLoader

    cfg = parts.cfg
    loader = DataLoader(parts.dataset, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                        collate_fn=parts.loader.collate_fn)
    data = iter(loader)
    next(data)
    started = time.perf_counter()
    for _ in range(batches):
        next(data)
    seconds = time.perf_counter() - started
    del data
    return batches * cfg.data.batch_size / seconds


def peak_rss(mode: str, out: Path, batch_size: int) -> dict:
    """Peak RSS (MiB) of 3 training steps in a process of its own: the trainer, and its loader worker."""
    result = subprocess.run([sys.executable, __file__, "--child", mode, "--out", str(out), "--batch-size",
                             str(batch_size)], capture_output=True, text=True, cwd=REPO, env=dict(os.environ))
    if result.returncode:
        raise RuntimeError(f"{mode} child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def own_peak_kib() -> int:
    """This process's peak RSS since it started (VmHWM). Not ru_maxrss: Linux carries that over `exec` from the
    process that spawned us, so every child would report at least the benchmark's own peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def child(mode: str, out: Path, batch_size: int) -> None:
    import gc

    from student.config import load_experiment
    from student.trainer import build_training, train_step

    extra = ["data.online_teachers=true"] if mode == "online" else []
    cfg = load_experiment(str(EXPERIMENT), settings(out / f"rss-{mode}", 3, batch_size, *extra))
    # The steps only: the final save_pretrained is the same in both modes and could hide the difference.
    parts = build_training(cfg)
    data = iter(parts.loader)
    for _ in range(cfg.train.max_steps):
        train_step(parts, next(data))
    del data, parts
    gc.collect()  # shuts the loader's worker down and reaps it, so its peak shows in RUSAGE_CHILDREN
    print(json.dumps({"main_mib": own_peak_kib() / 1024,
                      "workers_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "teacher_modules": sorted(m for m in sys.modules if m.split(".")[0] == "teachers")}))


def teacher_weights_mib(store_path: Path) -> float:
    """Size of the safetensors files of the teachers the store recorded: what online mode holds in memory."""
    from pipeline.store import TargetStore

    store = TargetStore(str(store_path))
    total = 0
    for name in store.teacher_names():
        root = Path(store.teacher_attrs(name)["spec"]["model"])
        total += sum(p.stat().st_size for p in root.rglob("*.safetensors"))
    return total / 2**20


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {device}, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads)")


def report(r: dict) -> str:
    med = {m: statistics.median(r["steps"][m]) for m in MODES}
    trainer_rate = r["batch_size"] / med["store"]
    p3, p3_online, p4 = med["store"] / med["memory"], med["online"] / med["store"], r["loader_rate"] / trainer_rate
    rss = r["rss"]
    lines = [
        f"machine: {r['machine']}",
        f"load average (1 min) at start {r['load'][0]:.2f}, at end {r['load'][1]:.2f}",
        f"demo: {r['rows']} samples, store precomputed in {r['precompute_s']:.1f}s; batch {r['batch_size']}, one "
        f"loader worker; {r['steps_per_phase']} steps per mode, twice (A B C C B A)",
        "",
        "| step time (median) | seconds | all steps |",
        "|---|---|---|",
    ]
    labels = {"store": "targets read from the store", "memory": "targets from memory",
              "online": "online teachers"}
    lines += [f"| {labels[m]} | {med[m]:.3f} | {' '.join(f'{s:.2f}' for s in r['steps'][m])} |" for m in MODES]
    lines += [
        "",
        f"P3        = {p3:.3f}   store / memory step time (goal <= 1.05: {'met' if p3 <= 1.05 else 'NOT met'})",
        f"P3 online = {p3_online:.3f}   online-teacher / store step time (what precomputing saves)",
        f"P4        = {p4:.2f}    loader {r['loader_rate']:.1f} samples/s alone / trainer {trainer_rate:.1f} samples/s "
        f"(goal >= 3: {'met' if p4 >= 3 else 'NOT met'})",
        f"P6        = peak RSS, trainer process: cached {rss['store']['main_mib']:.0f} MiB, online "
        f"{rss['online']['main_mib']:.0f} MiB ({rss['online']['main_mib'] / rss['store']['main_mib']:.2f}x); loader "
        f"worker: cached {rss['store']['workers_mib']:.0f} MiB, online {rss['online']['workers_mib']:.0f} MiB",
        f"            (the demo teachers' weights are {r['teacher_mib']:.1f} MiB; the paper's three teachers "
        "(DA-V2-L, OneFormer Swin-L, unCLIP ViT-H) hold ~1.2 B parameters, ~4.4 GiB in float32, on every rank)",
        f"            teacher modules imported: cached {rss['store']['teacher_modules'] or 'none'}, online "
        f"{len(rss['online']['teacher_modules'])}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200, help="demo samples (default 200, as `make demo`)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode and phase (default 4)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--loader-batches", type=int, default=16, help="batches timed for the loader alone")
    parser.add_argument("--out", default="runs/bench-train", help="scratch directory (emptied first)")
    parser.add_argument("--child", choices=("store", "online"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    out = Path(args.out).resolve()
    if args.child:
        return child(args.child, out, args.batch_size)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    load_start = os.getloadavg()[0]
    shutil.rmtree(out, ignore_errors=True)
    demo_root, precompute_s = build_demo(out, args.rows)
    # Enough steps for every phase plus a warm-up, so no loader wraps into a second epoch on a small demo.
    total = 2 * args.steps + 2
    modes = build_modes(out, total, args.batch_size)
    steps = {m: [] for m in MODES}
    for mode, (parts, data, prepare) in modes.items():
        timed_steps(parts, data, prepare, 2)  # warm-up: the loader worker starting, first allocations
    for mode in (*MODES, *reversed(MODES)):
        steps[mode] += timed_steps(*modes[mode], args.steps)
    rate = loader_rate(modes["store"][0], args.loader_batches)
    del modes
    rss = {mode: peak_rss(mode, out, args.batch_size) for mode in ("store", "online")}
    print(report({"machine": machine(), "load": (load_start, os.getloadavg()[0]), "rows": args.rows,
                  "precompute_s": precompute_s, "batch_size": args.batch_size, "steps_per_phase": args.steps,
                  "steps": steps, "loader_rate": rate, "rss": rss,
                  "teacher_mib": teacher_weights_mib(demo_root / "store")}))


if __name__ == "__main__":
    main()

"""Training benchmark: ratios measured side by side in one run on the demo (`make bench`).

P3        = step time with targets read from the store / step time of the same model and loss fed the same
            targets from memory (the store's overhead; goal <= 1.05)
P3 online = step time with online teachers (`data.online_teachers`) / step time with the store (what
            precomputing saves at every step of every run)
P4 demo   = loader samples/s (the DataLoader alone) / trainer samples/s on the demo (goal >= 3: the trainer never
            waits for data); P4 at the paper's target sizes against a GPU's pace is benchmarks/loader.py
P6        = peak RSS of a short training run, cached vs online teachers, each in its own process

A "step" is everything one optimizer step costs the training loop: waiting for the batch, then forward, backward
and the optimizer. All three modes run the same loader (same worker count, decoding, image processing,
tokenizing); they differ only in where the targets come from. Everything is built offline into --out.

P3, P3 online and P4 demo are medians of `--repeats` interleaved rounds (benchmarks/measure.py) with the min-max over
rounds. The three modes are built once, each with its own loader worker, and warmed up; a round then runs, in
turn (forwards in even rounds, backwards in odd ones):

    store, memory, online   `--steps` steps of that mode after 2 untimed ones: its mean seconds per step
    loader                  a fresh DataLoader like the trainer's (store mode), alone: mean seconds per batch over
                            `--loader-batches` batches (its first batch, the worker starting, not counted)

so each round gives one P3 (store / memory), one P3 online (online / store) and one P4 demo (store step / loader
batch, i.e. loader samples/s / trainer samples/s). P6 is measured once per mode, in a process of its own.
Defaults take about 6 minutes on 2 CPU cores (see benchmarks/RESULTS.md):

    python benchmarks/train.py [--steps 16] [--repeats 7] [--rows BATCH x (2 + REPEATS x (2 + STEPS))]
                               [--out runs/bench-train]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.measure import Spread, interleave, ratio  # noqa: E402

EXPERIMENT = REPO / "manifests" / "experiments" / "demo.yaml"
TEACHERS = REPO / "manifests" / "teachers" / "demo.yaml"
MODES = ("store", "memory", "online")
VARIANTS = (*MODES, "loader")
WARMUP_STEPS = 2
# Untimed steps at the start of every run: they use up the batches the mode's loader worker prefetched while the
# other modes ran, and cover the refill of the previous mode's worker, so that a run times its own loader only.
SETTLE_STEPS = 2
PEAK_RSS_STEPS = 3
P3_GOAL, P4_GOAL = 1.05, 3.0


def settings(out: Path, steps: int, batch_size: int, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"train.max_steps={steps}", f"data.batch_size={batch_size}", "data.num_workers=1",
            "train.trackers=[]", "train.resume=none", "train.warmup_ratio=0", *extra]


def build_demo(out: Path, rows: int) -> tuple[Path, float]:
    """Demo assets and their store under `out`; returns the demo root and the precompute seconds."""
    from pipeline.demo import build_demo_assets
    from pipeline.precompute import PrecomputeConfig, run_precompute

    demo = build_demo_assets(out / "demo", num_samples=rows, num_shards=4, progress=False)
    os.environ["DEMO_DIR"] = str(demo.root)
    started = time.perf_counter()
    run_precompute(str(demo.shards_dir), str(TEACHERS), str(demo.root / "store"), PrecomputeConfig(rows_per_block=32),
                   progress=False)
    return demo.root, time.perf_counter() - started


class InMemoryTargets:
    """Every target of the store, decoded into RAM once: the 'no store' baseline of P3."""

    def __init__(self, store_path: str, names: list[str]):
        import torch

        from pipeline.data.store import TargetStore

        store = TargetStore(store_path)
        self.targets, self.valid = {}, {}
        for name in names:
            target, valid = store.read_rows(name, 0, store.num_rows)
            self.targets[name] = torch.from_numpy(target)
            self.valid[name] = torch.from_numpy(valid.astype(bool))

    def fill(self, batch):
        """`batch` (a `student.data.Batch`) with its targets taken from memory."""
        return dataclasses.replace(batch, targets={n: t[batch.rows] for n, t in self.targets.items()},
                                   valid={n: v[batch.rows] for n, v in self.valid.items()})


def build_modes(out: Path, steps: int, batch_size: int) -> dict:
    """{mode: (training parts, batch iterator, per-batch preparation)} for the three target sources."""
    from pipeline.online_targets import online_targets_factory
    from student.config import load_experiment
    from student.trainer import build_training

    modes = {}
    for mode in MODES:
        extra = ["data.online_teachers=true"] if mode == "online" else []
        cfg = load_experiment(str(EXPERIMENT), settings(out / mode, steps, batch_size, *extra))
        parts = build_training(cfg, online_targets=online_targets_factory(cfg))
        prepare = lambda batch: batch  # noqa: E731
        if mode == "memory":
            # Same loader, minus the store reads: the targets come from RAM, indexed by the batch's rows.
            memory = InMemoryTargets(cfg.data.store, list(cfg.model.tasks))
            parts.dataset.teachers = []
            parts.loader.collate_fn.teachers = []
            prepare = memory.fill
        modes[mode] = (parts, iter(parts.loader), prepare)
    return modes


def timed_steps(parts, data, prepare, count: int, settle: int = 0) -> float:
    """Mean seconds per step over `count` steps (waiting for each batch included), after `settle` untimed ones."""
    from student.trainer import train_step

    for _ in range(settle):
        train_step(parts, prepare(next(data)))
    started = time.perf_counter()
    for _ in range(count):
        train_step(parts, prepare(next(data)))
    return (time.perf_counter() - started) / count


def loader_seconds(parts, batches: int) -> float:
    """Mean seconds per batch of a fresh DataLoader like the trainer's, iterated alone (its first batch, the
    start-up, not counted)."""
    from torch.utils.data import DataLoader

    from pipeline.data.loader import EpochOrder

    cfg = parts.cfg
    loader = DataLoader(parts.dataset, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                        sampler=EpochOrder(parts.dataset.rows, seed=cfg.seed), collate_fn=parts.loader.collate_fn)
    data = iter(loader)
    next(data)
    started = time.perf_counter()
    for _ in range(batches):
        next(data)
    seconds = time.perf_counter() - started
    del data
    return seconds / batches


def peak_rss(mode: str, out: Path, batch_size: int) -> dict:
    """Peak RSS (MiB) of PEAK_RSS_STEPS training steps in a process of its own: the trainer, and its loader worker."""
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

    from pipeline.online_targets import online_targets_factory
    from student.config import load_experiment
    from student.trainer import build_training, train_step

    extra = ["data.online_teachers=true"] if mode == "online" else []
    cfg = load_experiment(str(EXPERIMENT), settings(out / f"rss-{mode}", PEAK_RSS_STEPS, batch_size, *extra))
    # The steps only: the final save_pretrained is the same in both modes and could hide the difference.
    parts = build_training(cfg, online_targets=online_targets_factory(cfg))
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
    from pipeline.data.store import TargetStore

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
    rounds, batch, repeats = r["rounds"], r["batch_size"], r["repeats"]
    p3 = [s / m for s, m in zip(rounds["store"], rounds["memory"])]
    p4 = [s / b for s, b in zip(rounds["store"], rounds["loader"])]
    rss = r["rss"]
    labels = {"store": "step, targets read from the store", "memory": "step, targets from memory",
              "online": "step, online teachers", "loader": "loader alone, one batch"}
    lines = [
        f"machine: {r['machine']}",
        f"load average (1 min) at start {r['load'][0]:.2f}, at end {r['load'][1]:.2f}; whole benchmark "
        f"{r['seconds']:.0f} s",
        f"demo: {r['rows']} samples, store precomputed in {r['precompute_s']:.1f}s; batch {batch}, one loader "
        f"worker; {repeats} interleaved rounds of {' '.join(VARIANTS)}: {r['steps']} timed steps per mode (after "
        f"{SETTLE_STEPS} untimed), "
        f"{r['loader_batches']} loader batches. Median [min-max] over the rounds.",
        "",
        "| per round | seconds | samples/s |",
        "|---|---|---|",
    ]
    lines += [f"| {labels[v]} | {Spread.of(rounds[v]):.3f} | {Spread.of([batch / s for s in rounds[v]]):.1f} |"
              for v in VARIANTS]
    lines += [
        "",
        "| ratio | median [min-max] | goal | rounds meeting it |",
        "|---|---|---|---|",
        f"| P3 = store / memory step time | {ratio(rounds['store'], rounds['memory']):.3f} | <= {P3_GOAL:.2f} | "
        f"{sum(x <= P3_GOAL for x in p3)}/{repeats} |",
        f"| P3 online = online-teacher / store step time | {ratio(rounds['online'], rounds['store']):.3f} | "
        "(what precomputing saves) | |",
        f"| P4 demo = loader samples/s alone / trainer samples/s (store) | {ratio(rounds['store'], rounds['loader']):.2f} "
        f"| >= {P4_GOAL:g} | {sum(x >= P4_GOAL for x in p4)}/{repeats} |",
        "",
        f"P6 = peak RSS of {PEAK_RSS_STEPS} steps, once per mode, each in a process of its own:",
        "",
        "| process | cached (store) | online teachers | online / cached |",
        "|---|---|---|---|",
        f"| trainer | {rss['store']['main_mib']:.0f} MiB | {rss['online']['main_mib']:.0f} MiB | "
        f"{rss['online']['main_mib'] / rss['store']['main_mib']:.2f} |",
        f"| loader worker | {rss['store']['workers_mib']:.0f} MiB | {rss['online']['workers_mib']:.0f} MiB | "
        f"{rss['online']['workers_mib'] / rss['store']['workers_mib']:.2f} |",
        "",
        f"The demo teachers' weights are {r['teacher_mib']:.1f} MiB; the paper's three teachers (DA-V2-L, OneFormer "
        "Swin-L, unCLIP ViT-H) hold ~1.2 B parameters, ~4.4 GiB in float32, on every rank. Teacher modules "
        f"imported: cached {rss['store']['teacher_modules'] or 'none'}, online "
        f"{len(rss['online']['teacher_modules'])}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per mode and round (default 16)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--rows", type=int, default=None,
                        help="demo samples (default: enough that no mode's loader starts a second epoch)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--loader-batches", type=int, default=24, help="batches timed for the loader alone")
    parser.add_argument("--out", default="runs/bench-train", help="scratch directory (emptied first)")
    parser.add_argument("--child", choices=("store", "online"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    out = Path(args.out).resolve()
    if args.child:
        return child(args.child, out, args.batch_size)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    # Every mode's loader draws one epoch at most, so every round reads samples no earlier round left in a cache;
    # a fresh loader for the loader-alone measurement starts the epoch again.
    total = WARMUP_STEPS + args.repeats * (SETTLE_STEPS + args.steps)
    rows = args.rows or args.batch_size * max(total, args.loader_batches + 1)

    import torch
    from transformers.utils import logging as hf_logging

    # The step gets the cores the loader worker does not use, as on a GPU node, where the step runs on the
    # accelerator and the loader workers own CPU cores; otherwise the store mode's reads compete with the step's
    # matrix products for the same two cores, and P3 measures that contention rather than the reads.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    hf_logging.set_verbosity_error()
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    shutil.rmtree(out, ignore_errors=True)
    demo_root, precompute_s = build_demo(out, rows)
    modes = build_modes(out, total, args.batch_size)
    for mode, (parts, data, prepare) in modes.items():
        timed_steps(parts, data, prepare, WARMUP_STEPS)  # the loader worker starting, first allocations

    def run(variant: str) -> float:
        if variant == "loader":
            return loader_seconds(modes["store"][0], args.loader_batches)
        return timed_steps(*modes[variant], args.steps, settle=SETTLE_STEPS)

    print(f"{rows} samples, batch {args.batch_size}; {args.repeats} interleaved rounds of {' '.join(VARIANTS)} "
          "(seconds per step or batch)", flush=True)
    rounds = interleave(VARIANTS, run, args.repeats, report=lambda line: print(line, flush=True))
    del modes
    rss = {mode: peak_rss(mode, out, args.batch_size) for mode in ("store", "online")}
    print()
    print(report({"machine": machine(), "load": (load_start, os.getloadavg()[0]), "rows": rows,
                  "precompute_s": precompute_s, "batch_size": args.batch_size, "steps": args.steps,
                  "repeats": args.repeats, "loader_batches": args.loader_batches, "rounds": rounds, "rss": rss,
                  "teacher_mib": teacher_weights_mib(demo_root / "store"),
                  "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()

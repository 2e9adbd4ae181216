"""P4, the training loader at real size: can one rank's DataLoader keep a GPU trainer fed in random order?

The store holds rows of the paper's target shapes (depth [576, 1024], seg [576, 1536], gen [1, 1024], float16,
zstd, written through `TargetStore` exactly as precompute writes them; the values are random, which compress
worse than real targets, so decoding is if anything costlier here) for LLaVA-like JPEGs of 300-640 px
(benchmarks/feed.py). The loader is the trainer's own: `TrainingSamples` + `SampleEncoder` (the numpy/PIL CLIP
processor at 336 px, a chat template, `pad` off) + `EpochOrder` (seeded random order) + a torch DataLoader with
W worker processes, batch 16. A round times `--batches` batches after 2 + 2W untimed ones (worker start-up and
the batches prefetched meanwhile), per variant:

    chunk1-wW   store with one row per chunk (the default), W workers
    chunk8-w1   store with 8 rows per chunk (the old default), 1 worker: a random row decodes its whole chunk

Reported: samples/s (median and min-max of interleaved rounds) and bytes decoded per sample delivered (image
span read + target bytes decoded). The consumer: LLaVA-1.5-7B pretraining took about 3.5 h for 558K samples on
8 A100s, about 5.5 samples/s per GPU; an H100 is taken as 2x that, 11 samples/s. So

    P4 = loader samples/s of one rank / 11          (goal >= 3, i.e. >= 33 samples/s)

and the cores one rank needs for 33 samples/s follow from the one-worker rate (each worker is one busy core;
an estimate that assumes workers scale, which the 2-worker variant checks as far as 2 cores allow).

    python benchmarks/loader.py [--rows 384] [--batches 12] [--repeats 5] [--out runs/bench-loader]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.feed import write_llava_like_shards  # noqa: E402
from benchmarks.measure import Spread, interleave  # noqa: E402

SHAPES = {"depth": (576, 1024), "seg": (576, 1536), "gen": (1, 1024)}
BATCH = 16
GPU_SAMPLES_PER_S = 11.0
P4_GOAL = 3.0


def build_store(shards: Path, path: Path, rows_per_chunk: int) -> None:
    import numpy as np

    from pipeline.data.index import build_index
    from pipeline.data.store import Storage, TargetStore

    index = build_index(str(shards), progress=False)
    store = TargetStore(str(path))
    store.create(index.table, index.fingerprint, rows_per_block=64, shards=index.shards)
    rng = np.random.default_rng(0)
    for name, shape in SHAPES.items():
        store.add_teacher(name, spec={"kind": "random"}, fingerprint="0" * 64, target_shape=shape,
                          storage=Storage(dtype="float16"), rows_per_chunk=rows_per_chunk)
        for block in store.blocks():
            target = rng.standard_normal((block.rows, *shape), dtype=np.float32)
            store.write_block(name, block, target, np.ones(block.rows, dtype=np.uint8))
        store.mark_complete(name)


def build_encoder(root: Path):
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    from pipeline.demo.tokenizer import train_demo_tokenizer
    from student.data import SampleEncoder

    tokenizer = AutoTokenizer.from_pretrained(train_demo_tokenizer(["a photo of a thing"] * 50, root / "tokenizer"))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return SampleEncoder(processor, tokenizer, 96), tokenizer


def make_loader(shards: Path, store: Path, workers: int, encoder, tokenizer, seed: int):
    from torch.utils.data import DataLoader

    from pipeline.data.loader import EpochOrder, TrainingSamples
    from student.data import BatchCollator

    dataset = TrainingSamples(str(shards), str(store), list(SHAPES), encoder)
    order = EpochOrder(dataset.rows, seed=seed)
    return DataLoader(dataset, batch_size=BATCH, sampler=order, num_workers=workers,
                      collate_fn=BatchCollator(tokenizer.pad_token_id, list(SHAPES)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="runs/bench-loader")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # the workers do the work; the main process only hands batches over
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    shards = write_llava_like_shards(out / "shards", args.rows)
    for chunk in (1, 8):
        build_store(shards, out / f"store-chunk{chunk}", chunk)
    encoder, tokenizer = build_encoder(out)
    cores = len(os.sched_getaffinity(0))
    variants = [f"chunk1-w{w}" for w in sorted({1, min(2, cores)})] + ["chunk8-w1"]
    decoded: dict[str, float] = {}
    rounds = {v: 0 for v in variants}

    def run(variant: str) -> float:
        chunk, workers = (int(part[5:] if part.startswith("chunk") else part[1:]) for part in variant.split("-"))
        rounds[variant] += 1
        loader = make_loader(shards, out / f"store-chunk{chunk}", workers, encoder, tokenizer, seed=rounds[variant])
        batches = iter(loader)
        # Untimed: the workers starting, then the batches they prefetched meanwhile (2 per worker), so that the
        # timed ones come at the rate the workers make them.
        for _ in range(2 + 2 * workers):
            next(batches)
        started, samples, bytes_ = time.perf_counter(), 0, 0
        for _ in range(args.batches):
            batch = next(batches)
            samples += batch.size
            bytes_ += batch.decoded_bytes
        seconds = time.perf_counter() - started
        del batches
        decoded[variant] = bytes_ / samples
        return samples / seconds

    print(f"P4 loader benchmark: {args.rows} rows, batch {BATCH}, {args.batches} timed batches, {args.repeats} rounds, "
          f"{cores} cores ({platform.processor() or platform.machine()})", flush=True)
    results = interleave(variants, run, args.repeats)
    print("\nvariant      samples/s                bytes decoded per sample")
    for variant in variants:
        print(f"{variant:<12} {Spread.of(results[variant]):.1f}   {decoded[variant] / 2**20:.2f} MiB")
    one = Spread.of(results["chunk1-w1"])
    best = max(variants[:-1], key=lambda v: Spread.of(results[v]).median)
    p4 = Spread.of([r / GPU_SAMPLES_PER_S for r in results[best]])
    print(f"\nP4 = {best} samples/s / {GPU_SAMPLES_PER_S:g} = {p4:.2f} (goal >= {P4_GOAL:g}: "
          f"{sum(r / GPU_SAMPLES_PER_S >= P4_GOAL for r in results[best])}/{args.repeats} rounds)")
    print(f"cores per rank for {P4_GOAL * GPU_SAMPLES_PER_S:g} samples/s at {one.median:.1f} samples/s per worker: "
          f"{P4_GOAL * GPU_SAMPLES_PER_S / one.median:.1f} (estimate)")
    print(f"bytes decoded per sample, 8 rows per chunk / 1 row per chunk: "
          f"{decoded['chunk8-w1'] / decoded['chunk1-w1']:.2f}x")


if __name__ == "__main__":
    main()

"""The `pipeline` command line: parses arguments and calls the functions that do the work.

Exit codes: 0 success, 1 the job failed, 2 bad usage or bad input. Errors print as one line;
`--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from pipeline.data.errors import PipelineError, UsageError

DESCRIPTION = """\
Precompute frozen-teacher targets once into Zarr v3 target stores, then train OLA-VLM students on them.

typical run:
  pipeline demo-assets runs/demo
  pipeline precompute --shards runs/demo/shards --teachers manifests/teachers/demo.yaml --store runs/demo/store
  pipeline status runs/demo/store
  pipeline verify runs/demo/store --shards runs/demo/shards
  pipeline train --config manifests/experiments/demo.yaml
"""


def _cmd_demo_assets(args) -> int:
    from pipeline.demo import build_demo_assets

    assets = build_demo_assets(args.out, num_samples=args.samples, num_shards=args.shards, seed=args.seed)
    print(f"{assets.num_samples} samples in {assets.num_shards} shards under {assets.shards_dir}; "
          f"tiny teachers and student parts under {assets.root / 'assets'}")
    return 0


def _cmd_shards_llava(args) -> int:
    from pipeline.llava_shards import write_llava_shards

    summary = write_llava_shards(args.json, args.images, args.out, prefix=args.prefix,
                                 samples_per_shard=args.samples_per_shard, num_shards=args.shards,
                                 shuffle=args.shuffle, seed=args.seed, workers=args.workers,
                                 overwrite=args.overwrite, max_image_bytes=args.max_image_bytes,
                                 progress=not args.quiet)
    print(summary.report())
    return 0


SHARDS_LLAVA_HELP = """\
Write a LLaVA-format JSON (a list of {"id", "image" (optional, relative to --images), "conversations"}) and its
images as WebDataset shards in img2dataset layout: OUT/PREFIX-00000.tar, ... with per sample KEY.<ext> (the image
file's bytes unchanged, ext from its real format, whatever its file name says), KEY.txt (the caption: the answer
of a single-turn record whose human turn is <image> plus a one-line instruction, not a question, as in LLaVA-558K)
and KEY.json (the record). Keys are f"{shard:05d}{i:04d}", from position, never from the id (ids repeat in the
665K mix).
Text-only records become samples with KEY.json alone. Records whose image is missing, empty, unreadable or not an
image are left out and listed in OUT/PREFIX_failures.parquet, and so are those whose path is absolute or leads (by
.. or a symlink) outside --images, or names no regular file (a folder, device, FIFO), or a file over
--max-image-bytes. The summary counts the image samples that repeat an earlier image, by the same path or
byte-identical under another one, and the distinct images: a target store computes each distinct image once.
Rerunning the same command resumes: finished shards (those with a PREFIX-NNNNN_stats.json) are kept; the same
--prefix with a different input, --images folder or different arguments is refused (OUT/PREFIX_sharding.json
records them). Another JSON cut into the same OUT with another --prefix adds its shards beside the first ones: a
dataset grows by a shard set, and `pipeline precompute` on the same store appends them, whatever their names.

examples (the LLaVA-1.5 training data, as downloaded):
  pipeline shards llava LLaVA-Pretrain/blip_laion_cc_sbu_558k.json --images LLaVA-Pretrain/images --out shards/pt
  pipeline shards llava llava_v1_5_mix665k.json --images data --out shards/ift --shuffle --seed 0
    (data/ holds coco/train2017, gqa/images, ocr_vqa/images, textvqa/train_images, vg/VG_100K, vg/VG_100K_2)
  pipeline shards llava part1.json --images images --out shards/grown --prefix part1
  pipeline shards llava part2.json --images images --out shards/grown --prefix part2   # adds part2-*.tar
"""


def _cmd_index(args) -> int:
    import pyarrow.parquet as pq

    from pipeline.data.index import ImageCounts, assign_target_rows, build_index

    if os.path.isdir(args.out):  # before reading every shard, not when the index is written
        raise UsageError(f"--out {args.out} is a directory; pass the file to write, e.g. "
                         f"{os.path.join(args.out, 'index.parquet')}")
    index = build_index(args.shards, progress=not args.quiet)
    table = assign_target_rows(index.table, None, rows_per_block=1)  # as a new store would number them
    counts = ImageCounts.of(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    pq.write_table(table, args.out)
    print(f"{counts.samples} samples ({counts.images} distinct images, {counts.duplicates} repeats, "
          f"{counts.text_only} without an image) from {len(index.urls)} shard(s) -> {args.out} "
          f"(dataset fingerprint {index.fingerprint[:12]}..)")
    for error in index.shard_errors:
        print(f"warning: {error['shard']}: {error['error']}", file=sys.stderr)
    return 0


PRECOMPUTE_DESCRIPTION = """\
Run the teachers of a manifest over WebDataset shards into a target store, once per distinct image: samples that
show the same image (by the sha1 of its bytes, whatever the file name) share one target row.

A rerun of the same command after any crash computes what is left. Run on the store's shards plus new ones, it
grows the store: the new samples are added, and only images new to the store are computed, into new blocks (no
earlier file changes). A shard of the store that is missing or was rewritten is refused, naming it. With --reuse
OTHER_STORE, rows that another store holds for a teacher of the same fingerprint are copied, not computed.

examples:
  pipeline precompute --shards shards/pt --teachers manifests/teachers/olavlm.yaml --store stores/pt
  pipeline precompute --shards shards/ift --teachers manifests/teachers/olavlm.yaml --store stores/ift --reuse stores/pt
"""


def _cmd_precompute(args) -> int:
    from pipeline.precompute import PrecomputeConfig, run_precompute

    config = PrecomputeConfig.from_args(args)
    summary = run_precompute(args.shards, args.teachers, args.store, config, progress=not args.quiet)
    if summary.nothing_to_do:
        print(f"store {summary.store} is complete for these teachers: nothing to do")
    elif summary.finished_earlier_run:
        print(f"store {summary.store}: every block was already computed; wrote what the last run left unfinished "
              "(errors.parquet, statistics, completion flags)")
    else:
        reused = f", {summary.rows_reused} reused from --reuse stores" if config.reuse else ""
        print(f"computed {summary.blocks_computed} block(s), {summary.rows_computed} teacher-rows{reused}, "
              f"{summary.failures} failure(s) in {summary.seconds:.1f}s -> {summary.store}")
    for name, info in summary.teachers.items():
        print(f"  {name:<8} target {info['target_shape']} {info['dtype']}, "
              f"{info['blocks_done']}/{info['blocks_total']} blocks, {info['failures']} failed, "
              f"fingerprint {info['fingerprint'][:12]}..")
    return 0


def _cmd_status(args) -> int:
    from pipeline.status import format_status, store_status

    status = store_status(args.store)
    print(json.dumps(status.to_json(), indent=1) if args.json else format_status(status))
    return 0


def _cmd_verify(args) -> int:
    from pipeline.verify import verify_store

    report = verify_store(args.store, shards=args.shards, manifest=args.teachers, progress=not args.quiet)
    for problem in report.problems:
        print(f"problem: {problem}")
    for note in report.notes:
        print(f"note: {note}")
    if report.problems:
        print(f"store {args.store}: {len(report.problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"store {args.store}: complete, intact" + (" and aligned with the shards" if args.shards else ""))
    return 0


def _cmd_train(args) -> int:
    from pipeline.online_targets import online_targets_factory
    from student.config import load_experiment
    from student.trainer import train

    overrides = list(args.set) + (["data.online_teachers=true"] if args.online_teachers else []) \
        + ([f"train.resume={args.resume}"] if args.resume else [])
    cfg = load_experiment(args.config, overrides)
    result = train(cfg, online_targets=online_targets_factory(cfg), progress=not args.quiet)
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch` every rank returns a result: one summary per run
        print(result.summary())
    return 0


def _cmd_teachers_list(args) -> int:
    from teachers.describe import list_kinds

    print(list_kinds())
    return 0


def _cmd_teachers_show(args) -> int:
    from teachers.describe import describe_manifest, format_manifest

    description, reports = describe_manifest(args.manifest, download=args.download, load=not args.no_load)
    if args.json:
        print(json.dumps({"manifest": args.manifest, "description": description,
                          "teachers": [r.as_dict() for r in reports]}, indent=1))
    else:
        print(format_manifest(args.manifest, description, reports))
    return 1 if any(r.problems for r in reports) else 0


def _cmd_generate(args) -> int:
    from student.generate import generate

    print(generate(args.checkpoint, args.image, args.prompt, args.max_new_tokens))
    return 0


def _cmd_visualize(args) -> int:
    from pipeline.visualize import DEFAULT_PROMPT, visualize

    record = visualize(args.checkpoint, args.teachers, args.image, args.out, seed=args.seed, device=args.device,
                       prompt=DEFAULT_PROMPT if args.prompt is None else args.prompt)
    for task, info in record["tasks"].items():
        print(f"  {task:8s} {info.get('note') or info['decoder']['what']}, layers {info['layers']}")
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.json")
    return 0


def _int_list(text: str) -> tuple[int, ...] | None:
    """argparse type of a comma-separated list of integers (`1,3,4`); '' -> None (the default)."""
    try:
        return tuple(int(x) for x in text.split(",")) if text else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers; write e.g. "
                                         "1,3,4") from None


def _positive_int(text: str) -> int:
    """argparse type of a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1; pass e.g. 64")
    return value


def _cmd_probe(args) -> int:
    from student.probe import ProbeConfig, format_table, run_probe

    given = {"layers": args.layers, "teachers": tuple(args.teachers.split(",")) if args.teachers else None,
             "test_shards": args.test_shards, "max_images": args.max_images, "steps": args.steps,
             "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    config = ProbeConfig(**{k: v for k, v in given.items() if v is not None})
    results = run_probe(args.checkpoint, args.store, args.out, shards=args.shards, compare=args.compare,
                        config=config, progress=not args.quiet)
    print(format_table(results))
    print(f"wrote {args.out}/probe.json, probe.csv, probe.png")
    return 0


def _cmd_preview(args) -> int:
    from pipeline.preview import run_preview

    store = args.store_option or args.store
    if not store:
        raise UsageError("preview needs a store: `pipeline preview STORE --rows ...` or `--store STORE`")
    width, height = run_preview(store, args.rows, args.out, checkpoint=args.checkpoint, shards=args.shards)
    print(f"wrote {args.out} ({width}x{height} pixels)")
    return 0


def _cmd_estimate(args) -> int:
    from pipeline.estimate import estimate, format_estimate

    result = estimate(args.teachers, args.rows, rows_per_block=args.rows_per_block,
                      rows_per_chunk=args.rows_per_chunk, shards=args.shards, sample_count=args.sample_images,
                      load=not args.no_load)
    print(json.dumps(result.as_dict(), indent=1) if args.json else format_estimate(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-assets", help="write demo shards from bundled photos and tiny random-init checkpoints")
    p.add_argument("out", help="output directory (gets shards/ and assets/)")
    p.add_argument("--samples", type=int, default=200, help="number of demo samples (default 200)")
    p.add_argument("--shards", type=int, default=4, help="number of tar shards (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed for crops, flips and weights")
    p.set_defaults(func=_cmd_demo_assets)

    p = sub.add_parser("teachers", help="the teacher kinds this version knows, and what a manifest's teachers are")
    teachers_sub = p.add_subparsers(dest="teachers_command", required=True, metavar="SUBCOMMAND")
    q = teachers_sub.add_parser("list", help="every registered teacher kind with its spec fields and defaults")
    q.set_defaults(func=_cmd_teachers_list)
    q = teachers_sub.add_parser("show", help="per teacher: spec, target shape, fingerprint, parameters, bytes/row")
    q.add_argument("manifest", help="teacher manifest (manifests/teachers/*.yaml)")
    q.add_argument("--download", action="store_true", help="fetch missing hub weights (default: never download)")
    q.add_argument("--no-load", action="store_true", help="do not load weights; show declared shapes only")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=_cmd_teachers_show)

    p = sub.add_parser("shards", help="write WebDataset shards from a dataset's own files (LLaVA JSON + images)")
    shards_sub = p.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    q = shards_sub.add_parser("llava", help="LLaVA-format JSON + images folder -> img2dataset-layout tar shards",
                              description=SHARDS_LLAVA_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("json", help="the LLaVA JSON, e.g. blip_laion_cc_sbu_558k.json or llava_v1_5_mix665k.json")
    q.add_argument("--images", required=True, help="the folder the records' `image` paths are relative to")
    q.add_argument("--out", required=True, help="output directory for the shards (created if missing)")
    q.add_argument("--prefix", default=None,
                   help="shard file names are PREFIX-00000.tar... (default: the JSON's stem); another prefix adds "
                        "shards to an OUT that holds some")
    size = q.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, default=None,
                      help="records per shard (default 10000, as img2dataset: LLaVA-558K makes 56 shards)")
    size.add_argument("--shards", type=int, default=None, help="instead: exactly this many shards of near-equal size")
    q.add_argument("--shuffle", action="store_true", help="shuffle the records (seeded by --seed) before sharding")
    q.add_argument("--seed", type=int, default=0, help="seed of --shuffle (default 0)")
    q.add_argument("--workers", type=int, default=None,
                   help="processes writing shards, one shard each at a time (default: one per CPU)")
    q.add_argument("--overwrite", action="store_true",
                   help="if OUT holds PREFIX shards of another input or other arguments, delete them and start "
                        "over, and delete .tar files no run recorded; other prefixes' shards are kept "
                        "(default: refuse; a rerun of the same command always resumes)")
    q.add_argument("--max-image-bytes", type=int, default=None,
                   help="image files larger than this are left out unread (default 67108864, 64 MiB)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_shards_llava)

    p = sub.add_parser("index", help="list the samples of a shard set into index.parquet, with the target rows a new "
                                     "store gives them")
    p.add_argument("shards", help="directory, brace pattern (shard-{00000..00009}.tar) or fsspec URL")
    p.add_argument("--out", required=True, help="where to write the index (.parquet)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser(
        "precompute", help="run the teachers of a manifest over shards into a target store (Ray)",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=PRECOMPUTE_DESCRIPTION)
    p.add_argument("--shards", required=True, help="directory, brace pattern or fsspec URL of WebDataset tars")
    p.add_argument("--teachers", required=True, help="teacher manifest (manifests/teachers/*.yaml)")
    p.add_argument("--store", required=True, help="target store directory or fsspec URL (created if missing; a "
                                                   "store of some of these shards grows by the others)")
    from pipeline.precompute import PrecomputeConfig

    PrecomputeConfig.add_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_precompute)

    p = sub.add_parser("status", help="samples, distinct images, duplicates; per teacher: rows done / total, rows "
                                      "reused, failures, bytes, fingerprints")
    p.add_argument("store", help="target store directory or fsspec URL")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("verify", help="check completeness, stored bytes, finite values, fingerprints, alignment")
    p.add_argument("store", help="target store directory or fsspec URL")
    p.add_argument("--shards", default=None, help="also check the store matches these shards (re-reads them)")
    p.add_argument("--teachers", default=None, help="also check fingerprints against this teacher manifest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("train", help="train a student on shards + a target store (no teacher in memory)")
    p.add_argument("--config", required=True, help="experiment manifest (manifests/experiments/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=10 (repeatable)")
    p.add_argument("--online-teachers", action="store_true",
                   help="compute the targets with the teachers the store recorded instead of reading them (A/B "
                        "parity and timing; needs their weights); same as --set data.online_teachers=true")
    p.add_argument("--resume", default=None, metavar="auto|none|PATH",
                   help="resume from the latest checkpoint in output_dir (auto, the default), none, or a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("generate", help="answer a prompt about an image with a trained student checkpoint")
    p.add_argument("--checkpoint", required=True, help="a student directory written by `pipeline train`")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="at most this many tokens (default 64)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("visualize", help="decode a student's predicted embeddings with the teachers' own heads: "
                                         "one row per task, one column per tapped layer, beside the teacher's target")
    p.add_argument("--checkpoint", required=True, help="a student directory written by `pipeline train`")
    p.add_argument("--teachers", required=True,
                   help="teacher manifest naming the student's tasks (the teachers' decoders load from its entries)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", default=None, help="the user turn the student reads with the image "
                                                  "(default: \"Describe the image.\")")
    p.add_argument("--seed", type=int, default=0, help="seed of the generative decoders (unCLIP)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", required=True, help="PNG to write; its record goes beside it as .json")
    p.set_defaults(func=_cmd_visualize)
    p = sub.add_parser("probe", help="layer-wise probes of a frozen student on cached targets: table and plot")
    p.add_argument("--checkpoint", required=True, help="a student directory written by `pipeline train`")
    p.add_argument("--store", required=True, help="target store holding the teachers to probe")
    p.add_argument("--shards", default=None, help="the store's shards (default: the ones the checkpoint trained on)")
    p.add_argument("--compare", default=None, metavar="DIR2",
                   help="a second checkpoint, probed on the same split and drawn dashed in the same plot")
    p.add_argument("--out", required=True, help="directory for probe.json, probe.csv and probe.png")
    p.add_argument("--layers", type=_int_list, default=None,
                   help="comma-separated LLM layers, 1-indexed (default: all)")
    p.add_argument("--teachers", default=None, help="comma-separated teachers (default: every teacher in the store)")
    p.add_argument("--test-shards", type=int, default=None, help="how many last shards are held out (default 1)")
    p.add_argument("--max-images", type=int, default=None, help="at most this many train and held-out images each")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per probe (default 30)")
    p.add_argument("--batch-size", type=int, default=None, help="images per probe step (default 8)")
    p.add_argument("--lr", type=float, default=None, help="probe learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=None, help="seed of the probes' initialisation and order (default 0)")
    p.add_argument("--quiet", action="store_true", help="no per-probe lines")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("preview", help="PNG of a few rows: image and targets (PCA pictures), or predicted vs target")
    p.add_argument("store", nargs="?", default=None, help="target store directory or fsspec URL")
    p.add_argument("--store", dest="store_option", default=None, help="the store, as an option (for --checkpoint)")
    p.add_argument("--rows", required=True,
                   help="samples to show, as rows of the store's index.parquet, e.g. 0,5,9 or 0-3")
    p.add_argument("--shards", default=None,
                   help="the store's shards, to show the images (with --checkpoint: default the training shards)")
    p.add_argument("--checkpoint", default=None,
                   help="a student directory: show its predictions (last tapped layer) next to the targets")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=_cmd_preview)

    p = sub.add_parser("estimate", help="bytes on disk per teacher and storage option, and teacher FLOPs per image")
    p.add_argument("--teachers", required=True, help="teacher manifest (manifests/teachers/*.yaml)")
    p.add_argument("--rows", type=int, default=None,
                   help="target rows = distinct images (a store holds one row per image content; repeated images "
                        "and text-only samples take none): at most 558128 for LLaVA-558K, about 379000 for the "
                        "665K mix; default: count them in --shards")
    p.add_argument("--rows-per-block", type=int, default=64, help="as for precompute (default 64)")
    p.add_argument("--rows-per-chunk", type=int, default=1, help="as for precompute (default 1)")
    p.add_argument("--shards", default=None,
                   help="the dataset's shards: without --rows they are indexed and their distinct images counted; "
                        "compression is measured on their first images (default: bundled sample photos)")
    p.add_argument("--sample-images", type=int, default=16, help="images to measure compression on (default 16)")
    p.add_argument("--no-load", action="store_true", help="never load a model: declared shapes only, nothing measured")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_estimate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM, as Kubernetes, Slurm and `ray job stop` send it, is unwound like Ctrl-C, so that a job stops its
    # workers and releases its store's lock on the way out. It is told from Ctrl-C by its handler having run, not by
    # the exception's type: inside ray.get and ray.wait, Ray turns a handler's exception into a plain
    # KeyboardInterrupt.
    terminated = threading.Event()

    def on_sigterm(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while unwinding ends the process at once
        terminated.set()
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        return args.func(args)
    except PipelineError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        name, signum = ("SIGTERM", signal.SIGTERM) if terminated.is_set() else ("Ctrl-C", signal.SIGINT)
        print(f"interrupted by {name}: stopped; rerun the same command to resume", file=sys.stderr)
        return 128 + signum
    except Exception as exc:  # noqa: BLE001 - one readable line unless --debug
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

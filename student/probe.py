"""`pipeline probe`: the paper's layer-wise probing analysis (OLA-VLM section 3), on cached targets.

For every LLM layer l (hidden_states[l], 1..L) and every teacher in the store, a probe (learned queries, one per
target token, read that layer through a 1-layer Perceiver resampler, as `EmbeddingPredictor`) is trained with
smooth-L1 to predict the teacher's target while the student stays frozen. The score is the cosine similarity
between the probe's prediction and the target on held-out images (per token, mean over tokens, then over images).

    pipeline probe --checkpoint runs/demo/checkpoint --store runs/demo/store --out runs/demo/probe
    pipeline probe --checkpoint runs/base --compare runs/ola --store S --shards 'data/{00000..00099}.tar' --out P

Held-out images are those of the last `test_shards` shard(s), so a probe never sees a near-duplicate crop of a
test image. The frozen student runs once per image: every layer's hidden states are cached in memory (in the
student's dtype: images x layers x tokens x hidden values; use `layers` / `max_images` to bound it on big LLMs),
then each probe trains on the cache alone.

Writes OUT/probe.json (settings + table), OUT/probe.csv (the table) and OUT/probe.png (layer vs cosine, one line
per teacher; a `--compare` checkpoint dashed).
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.errors import UsageError
from student.checkpoint import checkpoint_max_length, load_frozen_student, shards_from_checkpoint
from student.predictor import EmbeddingPredictor

if TYPE_CHECKING:
    from student.data import EncodedSample

PLOT_SIZE_INCHES = (6.4, 4.0)
PLOT_DPI = 100
TABLE_COLUMNS = ("checkpoint", "teacher", "layer", "cosine", "untrained_cosine", "train_loss", "train_images",
                 "test_images")


@dataclass(frozen=True)
class ProbeConfig:
    """How the probes are trained; the defaults finish the demo (200 images, 4-layer LLM) in about a minute.

    layers: LLM layers to probe (1-indexed hidden states); None = all.  teachers: None = every teacher in the store.
    test_shards: how many of the last shards are held out.  max_images: cap per split (None = all).
    steps: optimizer steps per probe, batch_size images each.  dim: the resampler's width (None = target channels,
    as the student's own predictors).  max_length: text tokens per sample (None = the checkpoint's training value).
    """

    layers: tuple[int, ...] | None = None
    teachers: tuple[str, ...] | None = None
    test_shards: int = 1
    max_images: int | None = None
    steps: int = 30
    batch_size: int = 8
    lr: float = 2e-3
    dim: int | None = None
    heads: int = 4
    head_dim: int = 32
    max_length: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("test_shards", 1), ("steps", 0), ("batch_size", 1), ("max_length", 8), ("max_images", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise UsageError(f"probe {name} must be >= {low}, got {value}")
        if self.lr <= 0:
            raise UsageError(f"probe lr must be > 0, got {self.lr}")


class LayerProbe(nn.Module):
    """Learned queries `[T, H]` read one layer's hidden states `[B, L, H]` and predict a target `[B, T, C]`."""

    def __init__(self, hidden: int, tokens: int, channels: int, *, dim: int | None = None, heads: int = 4,
                 head_dim: int = 32) -> None:
        super().__init__()
        # Unit-variance queries like the student's task tokens: distinct per token, so each can learn its position.
        self.queries = nn.Parameter(torch.randn(tokens, hidden))
        self.resampler = EmbeddingPredictor(hidden, channels, dim=dim, heads=heads, head_dim=head_dim, depth=1)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.resampler(self.queries.expand(states.shape[0], -1, -1), states, mask)


@dataclass
class HiddenCache:
    """The frozen student's hidden states for one split: `states[l]` `[N, L, H]` for each probed layer l,
    `mask` `[N, L]` bool (right padding), `targets[t]` `[N, T, C]` float32 and `valid[t]` `[N]` bool."""

    rows: list[int]
    states: dict[int, torch.Tensor]
    mask: torch.Tensor
    targets: dict[str, torch.Tensor]
    valid: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class ProbeResult:
    checkpoint: str
    table: list[dict]
    config: dict
    shards_train: list[str]
    shards_test: list[str]
    seconds: float
    extra: dict = field(default_factory=dict)


def split_shards(shards: str, test_shards: int) -> tuple[list[str], list[str]]:
    """(train shard names, held-out shard names): the last `test_shards` shards are held out."""
    from pipeline.data.shards import list_shards, shard_name

    names = [shard_name(u) for u in list_shards(shards)]
    if len(names) <= test_shards:
        raise UsageError(f"probing holds out whole shards, but {shards} has {len(names)} shard(s) and "
                         f"{test_shards} would be held out; pass more shards (or fewer --test-shards)")
    return names[:-test_shards], names[-test_shards:]


@torch.no_grad()
def cache_hidden_states(model, tokenizer, image_processor, shards: str, store: str, teachers: list[str],
                        layers: list[int], test_names: set[str], *, max_images: int | None = None,
                        max_length: int = 96, batch_size: int = 8) -> tuple[HiddenCache, HiddenCache]:
    """Run the frozen student once per image of `shards`; return (train cache, test cache).

    Samples come through `pipeline.data.loader.TrainingSamples` (image hashes checked against the store's index) and
    are tokenized exactly as in training (`student.data.SampleEncoder`).
    """
    from pipeline.data.loader import TrainingSamples
    from pipeline.data.store import TargetStore
    from student.data import BatchCollator, SampleEncoder

    index = TargetStore(store).read_index()
    shard_of_row = dict(zip(index.column("row").to_pylist(), index.column("shard").to_pylist()))
    samples = TrainingSamples(shards, store, teachers, SampleEncoder(image_processor, tokenizer, max_length))
    collate = BatchCollator(tokenizer.pad_token_id, teachers)
    device = next(model.parameters()).device
    parts = {"train": _Collected(layers, teachers), "test": _Collected(layers, teachers)}
    pending: list[EncodedSample] = []

    def flush() -> None:
        batch = collate(pending)
        out = model(pixel_values=batch.pixel_values.to(device), input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device), output_hidden_states=True,
                    compute_predictions=False)
        n_states = len(out.hidden_states)
        if max(layers) >= n_states:
            raise UsageError(f"layer {max(layers)} asked for, but the student's LLM has {n_states - 1} layers")
        for b, sample in enumerate(pending):
            split = "test" if shard_of_row[sample.row] in test_names else "train"
            length = int(out.attention_mask[b].sum())
            parts[split].add(sample, {l: out.hidden_states[l][b, :length].cpu().clone() for l in layers})
        pending.clear()

    taken = {"train": 0, "test": 0}
    for sample in samples:
        split = "test" if shard_of_row[sample.row] in test_names else "train"
        if max_images is not None and taken[split] >= max_images:
            if min(taken.values()) >= max_images:
                break
            continue
        taken[split] += 1
        pending.append(sample)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    for split, part in parts.items():
        if not len(part):
            raise UsageError(f"no usable {split} images in {shards} (every sample skipped or not in the store "
                             f"{store}); check that the store was built from these shards")
    return parts["train"].stack(), parts["test"].stack()


class _Collected:
    def __init__(self, layers: list[int], teachers: list[str]):
        self.rows: list[int] = []
        self.states: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
        self.targets: dict[str, list] = {t: [] for t in teachers}
        self.valid: dict[str, list[bool]] = {t: [] for t in teachers}

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, sample: EncodedSample, states: dict[int, torch.Tensor]) -> None:
        self.rows.append(sample.row)
        for l, s in states.items():
            self.states[l].append(s)
        for t in self.targets:
            self.targets[t].append(torch.as_tensor(sample.targets[t]))
            self.valid[t].append(bool(sample.valid[t]))

    def stack(self) -> HiddenCache:
        lengths = [s.shape[0] for s in next(iter(self.states.values()))]
        longest = max(lengths)
        mask = torch.zeros(len(lengths), longest, dtype=torch.bool)
        for i, n in enumerate(lengths):
            mask[i, :n] = True
        states = {}
        for l, items in self.states.items():
            padded = items[0].new_zeros(len(items), longest, items[0].shape[-1])
            for i, s in enumerate(items):
                padded[i, : s.shape[0]] = s
            states[l] = padded
        return HiddenCache(rows=self.rows, states=states, mask=mask,
                           targets={t: torch.stack(v).float() for t, v in self.targets.items()},
                           valid={t: torch.tensor(v, dtype=torch.bool) for t, v in self.valid.items()})


def train_probe(probe: LayerProbe, states: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                valid: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """Train `probe` with smooth-L1 (beta 1) on the valid rows; returns the mean loss of the last quarter of steps."""
    keep = valid.nonzero().flatten()
    if steps == 0 or keep.numel() == 0:
        return float("nan")
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    order = keep[torch.randperm(keep.numel(), generator=generator)]
    cursor, losses = 0, []
    probe.train()
    for _ in range(steps):
        if cursor + batch_size > order.numel():
            order, cursor = keep[torch.randperm(keep.numel(), generator=generator)], 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        prediction = probe(states[idx].float(), mask[idx])
        loss = F.smooth_l1_loss(prediction, targets[idx], beta=1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tail = losses[-max(1, len(losses) // 4):]
    return sum(tail) / len(tail)


@torch.no_grad()
def probe_cosine(probe: LayerProbe, states: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                 valid: torch.Tensor, batch_size: int = 32) -> float:
    """Cosine similarity of prediction and target per token, mean over tokens, then over the valid images."""
    probe.eval()
    keep = valid.nonzero().flatten()
    if keep.numel() == 0:
        return float("nan")
    per_image = []
    for start in range(0, keep.numel(), batch_size):
        idx = keep[start : start + batch_size]
        prediction = probe(states[idx].float(), mask[idx])
        per_image.append(F.cosine_similarity(prediction, targets[idx], dim=-1).mean(dim=-1))
    return float(torch.cat(per_image).mean())


def probe_checkpoint(checkpoint: str, store: str, shards: str | None = None,
                     config: ProbeConfig = ProbeConfig(), *, progress: bool = False) -> ProbeResult:
    """Probe every (teacher, layer) of one checkpoint; the table has one row per pair (see TABLE_COLUMNS)."""
    from pipeline.data.store import TargetStore

    started = time.perf_counter()
    shards = shards or shards_from_checkpoint(checkpoint)
    train_names, test_names = split_shards(shards, config.test_shards)
    target_store = TargetStore(store)
    teachers = list(config.teachers or target_store.teacher_names())
    missing = [t for t in teachers if t not in target_store.teacher_names()]
    if missing or not teachers:
        raise UsageError(f"store {store} has no teacher(s) {missing}; it has {target_store.teacher_names()}")
    model, tokenizer, image_processor = load_frozen_student(checkpoint)
    n_layers = model.config.text_config.num_hidden_layers
    layers = sorted(config.layers or range(1, n_layers + 1))
    bad = [l for l in layers if not 1 <= l <= n_layers]
    if bad:
        raise UsageError(f"layers {bad} do not exist: the student's LLM has layers 1..{n_layers}")
    torch.manual_seed(config.seed)
    train, test = cache_hidden_states(model, tokenizer, image_processor, shards, store, teachers, layers,
                                      set(test_names), max_images=config.max_images,
                                      max_length=checkpoint_max_length(checkpoint, config.max_length))
    cached = time.perf_counter() - started
    hidden = model.config.text_config.hidden_size
    del model
    table = []
    for teacher in teachers:
        tokens, channels = train.targets[teacher].shape[1:]
        for layer in layers:
            torch.manual_seed(config.seed)
            probe = LayerProbe(hidden, tokens, channels, dim=config.dim, heads=config.heads,
                               head_dim=config.head_dim)
            # The same initial probe, untrained: the floor a trained probe has to clear.
            untrained = probe_cosine(probe, test.states[layer], test.mask, test.targets[teacher],
                                     test.valid[teacher])
            loss = train_probe(probe, train.states[layer], train.mask, train.targets[teacher], train.valid[teacher],
                               steps=config.steps, batch_size=config.batch_size, lr=config.lr, seed=config.seed)
            cosine = probe_cosine(probe, test.states[layer], test.mask, test.targets[teacher], test.valid[teacher])
            table.append({"checkpoint": checkpoint, "teacher": teacher, "layer": layer, "cosine": cosine,
                          "untrained_cosine": untrained, "train_loss": loss,
                          "train_images": int(train.valid[teacher].sum()),
                          "test_images": int(test.valid[teacher].sum())})
            if progress:
                print(f"  {teacher:<8} layer {layer:>3}: cosine {cosine:+.4f} (untrained {untrained:+.4f})",
                      flush=True)
    return ProbeResult(checkpoint=checkpoint, table=table, config=asdict(config), shards_train=train_names,
                       shards_test=test_names, seconds=time.perf_counter() - started,
                       extra={"cache_seconds": round(cached, 3)})


def run_probe(checkpoint: str, store: str, out: str, *, shards: str | None = None, compare: str | None = None,
              config: ProbeConfig = ProbeConfig(), progress: bool = False) -> list[ProbeResult]:
    """`pipeline probe`: probe `checkpoint` (and `compare`, on the same split), write OUT/probe.{json,csv,png}."""
    shards = shards or shards_from_checkpoint(checkpoint)
    results = []
    for path in [checkpoint] + ([compare] if compare else []):
        if progress:
            print(f"probing {path}", flush=True)
        results.append(probe_checkpoint(path, store, shards, config, progress=progress))
    os.makedirs(out, exist_ok=True)
    table = [row for r in results for row in r.table]
    with open(os.path.join(out, "probe.json"), "w") as f:
        json.dump({"store": store, "shards": shards, "config": asdict(config),
                   "runs": [{k: v for k, v in asdict(r).items() if k != "table"} for r in results],
                   "table": table}, f, indent=1)
    with open(os.path.join(out, "probe.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    plot_probe(table, os.path.join(out, "probe.png"), dashed=compare)
    return results


def plot_probe(table: list[dict], path: str, *, dashed: str | None = None) -> None:
    """Layer on x, held-out cosine on y, one colour per teacher; rows of checkpoint `dashed` drawn dashed."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in table))
    teachers = list(dict.fromkeys(r["teacher"] for r in table))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI)
    for c, checkpoint in enumerate(checkpoints):
        style = "--" if checkpoint == dashed else "-"
        for t, teacher in enumerate(teachers):
            rows = sorted((r for r in table if r["checkpoint"] == checkpoint and r["teacher"] == teacher),
                          key=lambda r: r["layer"])
            ax.plot([r["layer"] for r in rows], [r["cosine"] for r in rows], style, marker="o", markersize=4,
                    color=colours(t % 10))
    layers = sorted({r["layer"] for r in table})
    ax.set_xticks(layers if len(layers) <= 16 else layers[:: max(1, len(layers) // 16)])
    ax.set_xlabel("LLM layer (hidden_states[l])")
    ax.set_ylabel("probe cosine similarity (held-out)")
    ax.set_title("Layer-wise probes of the frozen student" + ("" if len(checkpoints) > 1 else
                                                               f"\n{_short(checkpoints[0], 60)}"), fontsize=10)
    ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colours(t % 10), marker="o", label=teacher) for t, teacher in enumerate(teachers)]
    if len(checkpoints) > 1:
        handles += [Line2D([], [], color="black", linestyle="--" if cp == dashed else "-", label=_short(cp))
                    for cp in checkpoints]
    ax.legend(handles=handles, fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def _short(path: str, limit: int = 40) -> str:
    path = os.path.normpath(path)
    return path if len(path) <= limit else "..." + path[-(limit - 3):]


def format_table(results: list[ProbeResult]) -> str:
    """One line per (checkpoint, teacher): cosine per layer."""
    lines = []
    for result in results:
        lines.append(f"{result.checkpoint}  ({result.seconds:.1f}s; held out: {', '.join(result.shards_test)})")
        for teacher in dict.fromkeys(r["teacher"] for r in result.table):
            rows = [r for r in result.table if r["teacher"] == teacher]
            cells = "  ".join(f"L{r['layer']} {r['cosine']:+.3f}" for r in rows)
            lines.append(f"  {teacher:<8} {cells}")
    return "\n".join(lines)

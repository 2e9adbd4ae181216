"""The device's work on a teacher's outputs after the forward, where they lie: the finiteness check, the float64
statistics and the storage encoding (`Storage.encode_tensor`), so that only the stored bytes and the sums cross
to the host. `Teacher.finish` calls it on the teacher's device; pipeline/block_stages.py places the results into a
block's arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.store import Storage


@dataclass
class FinishedBatch:
    """One batch of outputs finished on the device: which rows are finite (bool [n], on the host), and for those
    rows only their `Storage.encode_tensor` codes and scales (still on the device: block_stages' `_place` copies
    them into the block's arrays), token count and per-channel float64 sums of values and squares [C] (on the
    host)."""

    finite: np.ndarray
    codes: Any  # torch tensor on the device
    scales: Any  # torch tensor on the device, or None
    tokens: int
    sums: np.ndarray
    squares: np.ndarray


# Float64 elements per slice of the statistics on a CPU: a slice that stays in the cache makes them about 4x faster
# than one pass over the whole batch (torch reduces a middle dimension slowly there). An accelerator takes the batch
# in one pass: each slice would cost a kernel launch of host time.
_CPU_SLICE = 1 << 16


def finish(values, storage: Storage) -> FinishedBatch:
    """Check, sum and encode a batch of outputs [n, T, C] (a torch tensor) where it lies, on the teacher's device.

    A row is finite iff its float64 sums over tokens are: float32 values cannot overflow them and a NaN or an
    infinity carries through, so the sums that the statistics need are the check too (`torch.isfinite` over the
    whole output would cost more than they do on a CPU).
    """
    import torch

    with torch.inference_mode():
        values = values.to(torch.float32)
        sums, squares = _token_sums(values)
        finite = torch.isfinite(sums).all(dim=1)
        finite_rows = finite.cpu().numpy()
        if not finite_rows.all():
            values, sums, squares = values[finite], sums[finite], squares[finite]
        codes, scales = storage.encode_tensor(values)
        return FinishedBatch(finite_rows, codes, scales, values.shape[0] * values.shape[1],
                             sums.sum(dim=0).cpu().numpy(), squares.sum(dim=0).cpu().numpy())


def _token_sums(values):
    """float32 [n, T, C] -> float64 sums over tokens of the values and of their squares, [n, C] each (the squares
    of float32 values are exact in float64)."""
    import torch

    n, tokens, channels = values.shape
    if values.device.type != "cpu":
        wide = values.to(torch.float64)
        sums = wide.sum(dim=1)
        return sums, wide.square_().sum(dim=1)
    sums = torch.zeros((n, channels), dtype=torch.float64)
    squares = torch.zeros_like(sums)
    step = max(1, _CPU_SLICE // channels)
    for row in range(n):
        for start in range(0, tokens, step):
            wide = values[row, start : start + step].to(torch.float64)
            sums[row] += wide.sum(dim=0)
            squares[row] += wide.square_().sum(dim=0)
    return sums, squares

"""Teach zarr-python the Zarr v3 `bfloat16` data type (a registered v3 extension that tensorstore reads).

zarr-python 3.1 ships no bfloat16; this registers one backed by `ml_dtypes.bfloat16`, the NumPy
dtype JAX and tensorstore use, so `dtype: bfloat16` targets are written with the standard name and
any reader that knows the extension (tensorstore's zarr3 driver) opens them.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.common import DataTypeValidationError
from zarr.core.dtype.npy.float import BaseFloat

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


@dataclass(frozen=True, kw_only=True)
class BFloat16(BaseFloat):
    dtype_cls = type(BFLOAT16)
    _zarr_v3_name = "bfloat16"
    _zarr_v2_names = ()

    @property
    def item_size(self) -> int:
        return 2

    def to_native_dtype(self):
        return BFLOAT16

    @classmethod
    def from_native_dtype(cls, dtype):
        if np.dtype(dtype) == BFLOAT16:
            return cls(endianness="little")
        raise DataTypeValidationError(f"{dtype} is not bfloat16")


def register() -> None:
    """Idempotent: safe to call from every process that opens a store."""
    if "bfloat16" not in data_type_registry.contents:
        data_type_registry.register("bfloat16", BFloat16)

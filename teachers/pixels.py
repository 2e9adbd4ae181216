"""The CPU/device split of a teacher's input pipeline: compact uint8 pixels out, linear steps on the device.

A `Preprocessor` is the CPU half. Built by `Teacher.build_preprocessor(spec)` from the spec and the model's config
files (never its weights), picklable and small, it runs in CPU-only workers: list of RGB PIL images -> the pixels
the model will see, after exactly the PIL resizes and crops that decide them, as uint8 [B, 3, H, W] (a quarter of
the bytes of float32 pixel_values). `Preprocessor.normalize` is the device half, called by `Teacher.forward` on the
teacher's device: uint8 -> float32 pixel_values (rescale to [0, 1], mean/std); the teacher then casts them to its
compute dtype.

The linear steps are a table, `lut[c, v]`: the float32 value byte `v` of channel `c` becomes, computed once on the
CPU by the very code that normalised pixels before the split (numpy float64 for depth, the HF image processor's
own `rescale`/`normalize`, timm's `ToTensor`/`Normalize`). Those steps act on each value alone, so a lookup on the
device gives bit for bit the float32 pixel_values of the old CPU path, and the split changes no target.

A preprocessor whose pipeline cannot be split exactly returns float32 pixel_values (`compact` is False) and its
`normalize` passes them through; so does every preprocessor for a floating batch, which is how callers that build
their own pixel_values keep working.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

Batch = torch.Tensor | dict[str, torch.Tensor]

RGB = (0, 1, 2)
BGR = (2, 1, 0)


def byte_ramp() -> np.ndarray:
    """Every byte value once per channel: uint8 [3, 1, 256] (channels first, as the HF processors work)."""
    return np.ascontiguousarray(np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)))


def probe_images() -> list[Image.Image]:
    """Two small noise images of odd, different shapes: what build-time checks of a split run on."""
    rng = np.random.default_rng(12)
    return [Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)) for shape in ((45, 67, 3), (70, 33, 3))]


def split_is_exact(split: Preprocessor, whole: Callable[[Sequence[Image.Image]], torch.Tensor]) -> bool:
    """Whether `split`'s uint8 pixels through its table equal `whole`'s pixel_values bit for bit on
    `probe_images()`; a split that cannot even run on them is not exact."""
    probe = probe_images()
    try:
        return torch.equal(split.normalize(split(probe)), whole(probe))
    except (TypeError, ValueError, RuntimeError):
        return False


class Preprocessor:
    """CPU half of a teacher's preprocessing; see the module docstring. Subclasses implement `__call__`.

    Attributes:
        lut: float32 [3, 256] table of the linear steps, or None when `__call__` already returns pixel_values.
        channels: which input channel feeds each output channel before the lookup ((2, 1, 0) swaps RGB to BGR).
    """

    lut: np.ndarray | None = None
    channels: tuple[int, int, int] = RGB

    def __call__(self, images: Sequence[Image.Image]) -> Batch:
        """RGB PIL images -> uint8 [B, 3, H, W] on the CPU (or float32 pixel_values when `compact` is False)."""
        raise NotImplementedError

    @property
    def compact(self) -> bool:
        """True when `__call__` returns uint8 pixels that `normalize` turns into pixel_values."""
        return self.lut is not None

    def normalize(self, batch: Batch) -> Batch:
        """uint8 [B, 3, H, W] (on any device) -> float32 pixel_values there; a floating batch is returned as is."""
        if isinstance(batch, Mapping):
            return {k: self.normalize(v) if k == "pixel_values" else v for k, v in batch.items()}
        if self.lut is None or batch.is_floating_point():
            return batch
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}.normalize takes uint8 pixels [B, 3, H, W], got "
                             f"{batch.dtype} {list(batch.shape)}")
        table = self._table(batch.device)
        out = torch.empty(batch.shape, dtype=torch.float32, device=batch.device)
        # Per channel, index_select with int32 indices: 5x faster on the CPU than one advanced-indexing gather.
        for c, source in enumerate(self.channels):
            indices = batch[:, source].reshape(-1).int()
            out[:, c] = torch.index_select(table[c], 0, indices).view(batch.shape[0], *batch.shape[2:])
        return out

    def _table(self, device: torch.device) -> torch.Tensor:
        cache = self.__dict__.setdefault("_tables", {})
        if device not in cache:
            cache[device] = torch.from_numpy(np.ascontiguousarray(self.lut, dtype=np.float32)).to(device)
        return cache[device]

    def __getstate__(self) -> dict[str, Any]:
        # The per-device copies of the table stay behind: a CUDA tensor must not travel to a CPU-only worker.
        state = dict(self.__dict__)
        state.pop("_tables", None)
        return state


def stack_pixels(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """HWC uint8 arrays of one shape -> a contiguous uint8 tensor [B, 3, H, W]."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def hf_processor_lut(processor: Any) -> np.ndarray:
    """float32 [3, 256]: the byte ramp through the processor's own rescale and normalize, as its call does them."""
    ramp = byte_ramp()
    if processor.backend == "pil":
        values = ramp
        if processor.do_rescale:
            values = processor.rescale(values, processor.rescale_factor)
        if processor.do_normalize:
            values = processor.normalize(values, processor.image_mean, processor.image_std)
        values = np.asarray(values)
    else:  # torchvision backend: one fused call on a [1, 3, 1, 256] batch (mean/std hashable, as it caches them)
        mean, std = (tuple(v) if isinstance(v, list) else v for v in (processor.image_mean, processor.image_std))
        values = processor.rescale_and_normalize(torch.from_numpy(ramp)[None], processor.do_rescale,
                                                 processor.rescale_factor, processor.do_normalize, mean, std)
        values = values[0].numpy()
    return np.ascontiguousarray(values.reshape(3, 256), dtype=np.float32)


class ImageProcessorPreprocessor(Preprocessor):
    """A transformers image processor, split when that is exact: its resizes and crops on the CPU (the processor
    called with `do_rescale=False, do_normalize=False`, which leaves uint8), the rest as a table.

    Whether the split is exact is checked when it is built, on `probe_images()`, against the processor's normal
    output; a processor that fails (it pads, rescales before resizing, normalises per image, ...) is used whole and
    returns float32 pixel_values. `before` optionally maps each image first (a picklable callable).
    """

    def __init__(self, processor: Any, before: Callable[[Image.Image], Image.Image] | None = None) -> None:
        self.processor = processor
        self.before = before
        self.lut = None
        try:
            lut = hf_processor_lut(processor)
        except (AttributeError, TypeError, ValueError):
            return
        self.lut = lut
        if not split_is_exact(self, self._whole):
            self.lut = None

    def _images(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        return [self.before(image) for image in images] if self.before is not None else list(images)

    def _whole(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.processor(self._images(images), return_tensors="pt")["pixel_values"].to(torch.float32)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.lut is None:
            return self._whole(images)
        pixels = self.processor(self._images(images), do_rescale=False, do_normalize=False,
                                return_tensors="pt")["pixel_values"]
        if pixels.dtype != torch.uint8:
            raise TypeError(f"{type(self.processor).__name__} gave {pixels.dtype} pixels without rescaling")
        return pixels


class PilResize:
    """Pillow's `Image.resize` of uint8 RGB images from one fixed size to another, as torch ops on any device, bit
    for bit: Pillow's filter weights (its `precompute_coeffs`, in float64, then its 22-bit fixed point), a
    horizontal pass into uint8, then a vertical one, each summing in int32 and rounding and clipping as Pillow's
    8-bit resampling does. It lets a resize whose input size is fixed run on the teacher's device instead of a CPU
    core (OneFormer's 768 -> 800 is half of its preprocessing). Filters: Pillow's BOX, BILINEAR, HAMMING, BICUBIC
    and LANCZOS.

    Which pass comes first differs between Pillow versions for some sizes (the installed one shrinks first when
    one side shrinks and the other grows), so the order is the one that gives the installed Pillow's pixels on a
    noise image of the input size; ValueError when neither does.
    """

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int], resample: int) -> None:
        if resample not in _PIL_FILTERS:
            raise ValueError(f"PilResize has no Pillow filter {resample!r}; it knows {sorted(_PIL_FILTERS)}")
        self.in_hw, self.out_hw = tuple(in_hw), tuple(out_hw)
        # (dim, source index [out, taps], fixed-point weight [out, taps]) per pass; a side whose size stays is not
        # resampled.
        passes = [(dim, *_pil_weights(self.in_hw[i], self.out_hw[i], resample))
                  for dim, i in ((3, 1), (2, 0)) if self.in_hw[i] != self.out_hw[i]]
        noise = np.random.default_rng(0).integers(0, 256, size=(*self.in_hw, 3), dtype=np.uint8)
        expected = stack_pixels([np.asarray(Image.fromarray(noise).resize(self.out_hw[::-1], resample))])
        for self.passes in (passes, passes[::-1]):
            if torch.equal(self(stack_pixels([noise])), expected):
                return
        raise ValueError(f"PilResize cannot give Pillow {Image.__version__}'s pixels for {self.in_hw} -> "
                         f"{self.out_hw} with filter {resample}")

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, *in_hw] -> uint8 [B, 3, *out_hw], on the pixels' device."""
        if pixels.dtype != torch.uint8 or tuple(pixels.shape[2:]) != self.in_hw:
            raise ValueError(f"PilResize takes uint8 pixels [B, 3, {self.in_hw[0]}, {self.in_hw[1]}], got "
                             f"{pixels.dtype} {list(pixels.shape)}")
        for dim, index, weight in self.passes:
            pixels = _resample(pixels, dim, index.to(pixels.device), weight.to(pixels.device))
        return pixels


def _resample(pixels: torch.Tensor, dim: int, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One of Pillow's passes along `dim` (2: rows, 3: columns): out[.., o, ..] = clip8((2^21 + sum_t in[..,
    index[o, t], ..] * weight[o, t]) >> 22), in int32 as Pillow's C does (a sum that overflows wraps there too)."""
    shape = list(pixels.shape)
    shape[dim] = index.shape[0]
    along = [-1 if d == dim else 1 for d in range(pixels.ndim)]  # a weight per output row or column
    total = torch.full(shape, 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=pixels.device)
    for tap in range(index.shape[1]):
        total += pixels.index_select(dim, index[:, tap]).to(torch.int32) * weight[:, tap].view(along)
    return (total >> _PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images


def _pil_weights(in_size: int, out_size: int, resample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for one side, step for step in float64 (Python's
    float): (source index, int32 weight), both [out_size, taps]; unused taps have weight 0."""
    kernel, kernel_support = _PIL_FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = kernel_support * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    index = np.zeros((out_size, taps), dtype=np.int64)
    weight = np.zeros((out_size, taps), dtype=np.int32)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - xmin
        k = [kernel((x + xmin - center + 0.5) * (1.0 / filterscale)) for x in range(count)]
        total = 0.0
        for w in k:
            total += w
        for x, w in enumerate(k):
            w = w / total if total != 0.0 else w
            weight[xx, x] = int(-0.5 + w * (1 << _PRECISION_BITS)) if w < 0 else int(0.5 + w * (1 << _PRECISION_BITS))
            index[xx, x] = xmin + x
    return torch.from_numpy(index), torch.from_numpy(weight)


def _sinc(x: float) -> float:
    return 1.0 if x == 0.0 else math.sin(x * math.pi) / (x * math.pi)


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _hamming(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * math.pi
    return math.sin(x) / x * (_F32_054 + _F32_046 * math.cos(x))


_F32_054, _F32_046 = float(np.float32(0.54)), float(np.float32(0.46))  # Pillow writes them as C floats


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


# Pillow's filters and their supports (src/libImaging/Resample.c), by `Image.Resampling` value.
_PIL_FILTERS = {
    int(Image.Resampling.BOX): (_box, 0.5),
    int(Image.Resampling.BILINEAR): (_bilinear, 1.0),
    int(Image.Resampling.HAMMING): (_hamming, 1.0),
    int(Image.Resampling.BICUBIC): (_bicubic, 2.0),
    int(Image.Resampling.LANCZOS): (_lanczos, 3.0),
}

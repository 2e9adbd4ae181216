"""The CPU/device split of preprocessing: uint8 pixels from a picklable preprocessor, linear steps in the forward.

The old path (float32 pixel_values made on the CPU, `legacy_preprocess.py`) is the reference: the split must give
the same pixel_values and so the same targets. Full-size versions of the target checks are in test_full_size.py.
"""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import teachers
from teachers.base import tf32_mode
from teachers.kinds.oneformer import OneFormerPreprocessor
from teachers.pixels import PilResize, Preprocessor, stack_pixels
from tests.teachers.legacy_preprocess import LegacyPreprocess, legacy_targets, relative_l2

PAPER_CASES = [
    ("depth", {}),
    ("depth", {"channel_order": "bgr"}),
    ("depth", {"compute_dtype": "bfloat16"}),
    ("seg", {}),
    ("seg", {"processor_backend": "torchvision"}),
    ("gen", {}),
    ("gen", {"processor_backend": "torchvision"}),
]


def _case_id(case) -> str:
    name, overrides = case
    return "-".join([name, *(str(v) for v in overrides.values())])


@pytest.mark.parametrize("name, overrides", PAPER_CASES, ids=[_case_id(c) for c in PAPER_CASES])
def test_targets_through_uint8_pixels_equal_the_old_path(demo_manifest, images, name, overrides):
    spec = type(demo_manifest.teachers[name]).model_validate({**demo_manifest.teachers[name].model_dump(),
                                                              **overrides})
    teacher = teachers.create(spec)
    batch = teacher.preprocess(images)
    assert batch.dtype == torch.uint8 and batch.ndim == 4 and batch.shape[:2] == (len(images), 3)

    old_pixels = LegacyPreprocess(spec, teacher.locate(spec).root)(images)
    # The linear steps are a table made by the old code itself: the float32 pixel_values are the same bits.
    torch.testing.assert_close(teacher.preprocessor.normalize(batch), old_pixels, atol=0, rtol=0)

    new = teacher(batch)
    old = legacy_targets(teacher, images)
    assert new.shape == old.shape == (len(images), *teacher.target_shape)
    assert relative_l2(new, old) <= 1e-3


# ---- the fast OneFormer path ------------------------------------------------------------------------------------

def _photos_and_odd_sizes() -> list[Image.Image]:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field(),
              data.immunohistochemistry(), data.colorwheel(), data.camera()]
    rng = np.random.default_rng(3)
    odd = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((1, 1, 3), (37, 91, 3), (1001, 7, 3))]
    return [Image.fromarray(np.ascontiguousarray(a)).convert("RGB") for a in photos + odd]


@pytest.fixture(scope="module")
def hub_oneformer_processor():
    """shi-labs/oneformer_coco_swin_large's processor settings (shortest edge 800, longest 1333, bilinear)."""
    from transformers import OneFormerImageProcessorPil

    return OneFormerImageProcessorPil(size={"shortest_edge": 800, "longest_edge": 1333}, num_text=134,
                                      num_labels=133, ignore_index=255)


def test_fast_oneformer_pixels_equal_the_processor_at_full_size(hub_oneformer_processor):
    photos = _photos_and_odd_sizes()
    fast = OneFormerPreprocessor(hub_oneformer_processor, image_size=768)
    for i in range(0, len(photos), 4):
        chunk = photos[i : i + 4]
        resized = [image.resize((768, 768), Image.Resampling.BICUBIC) for image in chunk]
        expected = hub_oneformer_processor(resized, task_inputs=["panoptic"] * len(chunk),
                                           return_tensors="pt")["pixel_values"]
        batch = fast(chunk)
        # The CPU half stops at 768: the processor's own 768 -> 800 resize runs where the teacher does.
        assert batch.dtype == torch.uint8 and batch.shape == (len(chunk), 3, 768, 768)
        pixels = fast.normalize(batch)
        assert pixels.shape == expected.shape and pixels.dtype == torch.float32
        assert (pixels - expected).abs().max().item() <= 1e-5
        # An accelerator resizes with PilResize: the same pixels as Pillow's, bit for bit.
        assert torch.equal(fast.device_resize(batch), fast._pil_resize(batch))


@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS,
                                      Image.Resampling.HAMMING, Image.Resampling.BOX], ids=lambda r: r.name)
@pytest.mark.parametrize("sizes", [((768, 768), (800, 800)), ((37, 91), (50, 20)), ((64, 64), (17, 200)),
                                   ((300, 200), (300, 77)), ((5, 9), (64, 64))], ids=str)
def test_pil_resize_on_torch_gives_pillows_pixels(resample, sizes):
    (in_h, in_w), (out_h, out_w) = sizes
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, size=(in_h, in_w, 3), dtype=np.uint8)),
              _photos_and_odd_sizes()[0].resize((in_w, in_h))]
    expected = stack_pixels([np.asarray(image.resize((out_w, out_h), resample)) for image in images])
    resize = PilResize((in_h, in_w), (out_h, out_w), int(resample))
    assert torch.equal(resize(stack_pixels([np.asarray(image) for image in images])), expected)


# ---- building and shipping preprocessors ------------------------------------------------------------------------

def _all_kind_specs(teacher_dirs, generic_models) -> dict[str, teachers.TeacherSpecBase]:
    return {
        "depth": teachers.to_spec({"kind": "depth_anything_v2", "model": str(teacher_dirs["depth"]),
                                   "layers": [0, 1]}),
        "seg": teachers.to_spec({"kind": "oneformer", "model": str(teacher_dirs["seg"]), "image_size": 256}),
        "gen": teachers.to_spec({"kind": "unclip_image_encoder", "model": str(teacher_dirs["gen"])}),
        "timm": teachers.to_spec({"kind": "timm", "model": f"local-dir:{generic_models['timm_vit'][0]}"}),
        "hf_vision": teachers.to_spec({"kind": "hf_vision", "model": str(generic_models["hf_dinov2_reg"][0])}),
    }


def test_every_kind_has_a_preprocessor(teacher_dirs, generic_models):
    specs = _all_kind_specs(teacher_dirs, generic_models)
    assert sorted(teachers.get_teacher_class(s.kind).kind for s in specs.values()) == teachers.known_kinds()


def test_build_preprocessor_reads_no_weights_and_builds_no_model(teacher_dirs, generic_models, images, tmp_path,
                                                                  monkeypatch):
    import safetensors.torch
    import timm
    import transformers

    specs = _all_kind_specs(teacher_dirs, generic_models)
    expected = {}
    for name, spec in specs.items():
        loaded = teachers.create(spec)
        expected[name] = loaded.preprocess(images)
        assert expected[name].dtype == torch.uint8, name  # every tiny checkpoint here splits exactly
        del loaded

    def refuse(*args, **kwargs):
        raise AssertionError("build_preprocessor must not build a model or read weights")

    monkeypatch.setattr(transformers.PreTrainedModel, "__init__", refuse)
    monkeypatch.setattr(timm, "create_model", refuse)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    for name, spec in specs.items():
        # A copy whose weight files are not weights at all: only their presence is looked at.
        source = spec.model.removeprefix("local-dir:")
        copy = shutil.copytree(source, tmp_path / name)
        for weights in copy.rglob("*.safetensors"):
            weights.write_bytes(b"not weights")
        prefix = "local-dir:" if spec.kind == "timm" else ""
        cls = teachers.get_teacher_class(spec.kind)
        preprocessor = cls.build_preprocessor(spec.model_copy(update={"model": f"{prefix}{copy}"}))
        torch.testing.assert_close(preprocessor(images), expected[name], atol=0, rtol=0)


def test_preprocessors_pickle_small_with_identical_output(teacher_dirs, generic_models, images):
    for name, spec in _all_kind_specs(teacher_dirs, generic_models).items():
        preprocessor = teachers.get_teacher_class(spec.kind).build_preprocessor(spec)
        before = preprocessor(images)
        preprocessor.normalize(before)  # caches a table copy on the device, which must not travel
        payload = pickle.dumps(preprocessor)
        assert len(payload) < 100_000, (name, len(payload))
        copy = pickle.loads(payload)
        assert "_tables" not in copy.__dict__
        torch.testing.assert_close(copy(images), before, atol=0, rtol=0)
        torch.testing.assert_close(copy.normalize(before), preprocessor.normalize(before), atol=0, rtol=0)


def test_preprocess_is_the_preprocessor(demo_teachers, images):
    for teacher in demo_teachers.values():
        assert isinstance(teacher.preprocessor, Preprocessor) and teacher.preprocessor.compact
        torch.testing.assert_close(teacher.preprocess(images[:2]), teacher.preprocessor(images[:2]), atol=0, rtol=0)


def test_uint8_stays_uint8_until_the_device_and_floats_pass_through(demo_teachers, images):
    teacher = demo_teachers["depth"]
    batch = teacher.preprocess(images[:2])
    assert teacher._move(batch).dtype == torch.uint8
    pixels = teacher.preprocessor.normalize(batch)
    # A caller's own float32 pixel_values are taken as finished: only cast, never normalised twice.
    torch.testing.assert_close(teacher.normalize(pixels), pixels, atol=0, rtol=0)
    torch.testing.assert_close(teacher(pixels), teacher(batch), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"uint8 pixels \[B, 3, H, W\]"):
        teacher.preprocessor.normalize(batch[:, :2])


def test_bfloat16_compute_gets_bfloat16_pixel_values(teacher_dirs, images):
    teacher = teachers.create({"kind": "depth_anything_v2", "model": str(teacher_dirs["depth"]), "layers": [0],
                               "compute_dtype": "bfloat16"})
    batch = teacher.preprocess(images[:1])
    pixels = teacher.normalize(batch)
    assert pixels.dtype == torch.bfloat16
    torch.testing.assert_close(pixels, teacher.preprocessor.normalize(batch).to(torch.bfloat16), atol=0, rtol=0)


# ---- TF32 -------------------------------------------------------------------------------------------------------

def test_tf32_is_a_fingerprinted_float32_only_switch(teacher_dirs):
    spec = {"kind": "depth_anything_v2", "model": str(teacher_dirs["depth"]), "layers": [0]}
    plain = teachers.to_spec(spec)
    assert '"tf32":false' in plain.canonical_json()
    assert teachers.spec_fingerprint({**spec, "tf32": True}) != teachers.spec_fingerprint(plain)
    assert teachers.spec_fingerprint({**spec, "tf32": False}) == teachers.spec_fingerprint(plain)
    with pytest.raises(Exception, match="tf32"):
        teachers.to_spec({**spec, "tf32": True, "compute_dtype": "bfloat16"})


def test_tf32_mode_sets_and_restores_the_cuda_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for enabled in (True, False):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = (not enabled, not enabled)
            with tf32_mode(enabled, torch.device("cuda")):
                assert torch.backends.cuda.matmul.allow_tf32 is enabled
                assert torch.backends.cudnn.allow_tf32 is enabled
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (not enabled,) * 2
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
        with tf32_mode(True, torch.device("cpu")):  # no TF32 off CUDA: nothing is touched
            assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_changes_nothing_on_cpu(teacher_dirs, images):
    spec = {"kind": "depth_anything_v2", "model": str(teacher_dirs["depth"]), "layers": [0, 3]}
    plain, tf32 = teachers.create(spec), teachers.create({**spec, "tf32": True})
    batch = plain.preprocess(images[:2])
    torch.testing.assert_close(tf32(batch), plain(batch), atol=0, rtol=0)


def test_a_processor_that_does_not_split_exactly_is_used_whole(teacher_dirs, images, monkeypatch):
    from transformers import CLIPImageProcessorPil

    import teachers.pixels as pixels

    processor = CLIPImageProcessorPil.from_pretrained(teacher_dirs["gen"] / "feature_extractor")
    expected = processor(images, return_tensors="pt")["pixel_values"]
    # A table that disagrees with the processor, as one that pads or normalises per image would: the probe at
    # build time catches it and the processor runs whole, float32 out, passed through by normalize.
    monkeypatch.setattr(pixels, "hf_processor_lut", lambda p: np.zeros((3, 256), dtype=np.float32))
    whole = pixels.ImageProcessorPreprocessor(processor)
    assert not whole.compact
    out = whole(images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(whole.normalize(out), expected, atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_pil_resize_on_an_accelerator_gives_pillows_pixels():
    """OneFormer's 768 -> 800 as an accelerator runs it (the CPU test above checks the same arithmetic)."""
    images = [image.resize((768, 768), Image.Resampling.BICUBIC) for image in _photos_and_odd_sizes()[:4]]
    expected = stack_pixels([np.asarray(image.resize((800, 800), Image.Resampling.BILINEAR)) for image in images])
    resize = PilResize((768, 768), (800, 800), int(Image.Resampling.BILINEAR))
    assert torch.equal(resize(stack_pixels([np.asarray(image) for image in images]).cuda()).cpu(), expected)

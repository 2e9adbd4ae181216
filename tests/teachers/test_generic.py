"""Generic teachers (`timm`, `hf_vision`): targets equal the model's own outputs, laid out one documented way.

Every expected value is computed here from the in-memory model that was saved (its own `forward_intermediates`,
`hidden_states`, `last_hidden_state`), with tokens picked out by explicit indexing, never by calling the teacher's
helpers.
"""

from __future__ import annotations

import shutil
import textwrap

import pytest
import torch
import torch.nn.functional as F

import teachers
from teachers.kinds.hf_vision import HfVisionSpec

ATOL = 1e-5
RTOL = 1e-5


def _timm(generic_models, name, **overrides):
    return teachers.create({"kind": "timm", "model": f"local-dir:{generic_models[name][0]}", **overrides})


def _hf(generic_models, name, **overrides):
    return teachers.create({"kind": "hf_vision", "model": str(generic_models[name][0]), **overrides})


def _row_major(feature_map: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C] by explicit cell order: token r * W + c is cell (r, c)."""
    h, w = feature_map.shape[-2:]
    return torch.stack([feature_map[:, :, r, c] for r in range(h) for c in range(w)], dim=1)


def _tokens_to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, h*w, C] (row-major) -> [B, C, h, w] by explicit cell order."""
    out = tokens.new_empty(tokens.shape[0], tokens.shape[2], h, w)
    for r in range(h):
        for c in range(w):
            out[:, :, r, c] = tokens[:, r * w + c]
    return out


def _pixel_values(teacher, images):
    """The teacher's float32 pixel_values: its CPU half, then its linear steps (run on the CPU here)."""
    return teacher.preprocessor.normalize(teacher.preprocess(images))


def _timm_pixels(model, images):
    import timm

    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model), is_training=False)
    return torch.stack([transform(image) for image in images])


# ---- timm -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix_tokens, grid", [("drop", None), ("keep", None), ("cls", None), ("drop", 7),
                                                 ("keep", 4)])
def test_timm_vit_tokens_match_forward_intermediates(generic_models, images, prefix_tokens, grid):
    model = generic_models["timm_vit"][1]
    teacher = _timm(generic_models, "timm_vit", prefix_tokens=prefix_tokens, grid=grid)
    assert teacher.preprocess(images).dtype == torch.uint8  # timm's eval transform splits exactly
    pixels = _pixel_values(teacher, images)
    torch.testing.assert_close(pixels, _timm_pixels(model, images), atol=0, rtol=0)
    assert pixels.shape == (len(images), 3, 160, 160)

    # Independent route: the final block, normed, as a [C, 10, 10] map plus its 3 prefix tokens (CLS, 2 registers).
    with torch.no_grad():
        (spatial, prefix), = model.forward_intermediates(pixels, indices=1, norm=True, output_fmt="NCHW",
                                                        return_prefix_tokens=True, intermediates_only=True)
    assert spatial.shape[1:] == (64, 10, 10) and prefix.shape[1:] == (3, 64)
    if grid is not None:
        spatial = F.interpolate(spatial, size=(grid, grid), mode="bilinear", align_corners=False)
    patches = _row_major(spatial)
    expected = {"drop": patches, "keep": torch.cat([prefix, patches], 1), "cls": prefix[:, :1]}[prefix_tokens]

    out = teacher(pixels)
    assert teacher.target_shape == tuple(expected.shape[1:])
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["timm_convnext", "timm_mambaout"])
@pytest.mark.parametrize("grid", [None, 3, 8])
def test_timm_feature_maps_are_flattened_row_major(generic_models, images, name, grid):
    model = generic_models[name][1]
    teacher = _timm(generic_models, name, grid=grid)
    pixels = _timm_pixels(model, images)
    with torch.no_grad():
        features = model.forward_features(pixels)
    if name == "timm_mambaout":  # timm's channels-last models say so in `output_fmt`
        assert features.shape[1:] == (5, 5, 64)
        features = features.permute(0, 3, 1, 2)
    assert features.shape[1:] == (64, 5, 5)
    if grid is not None:
        features = F.interpolate(features, size=(grid, grid), mode="bilinear", align_corners=False)
    expected = _row_major(features)
    side = grid or 5
    assert teacher.target_shape == (side * side, 64)
    torch.testing.assert_close(teacher(teacher.preprocess(images)), expected, atol=ATOL, rtol=RTOL)


def test_timm_cls_needs_a_token_model(generic_models):
    with pytest.raises(ValueError, match=r"spec\.prefix_tokens: cls.*no \[CLS\]"):
        _timm(generic_models, "timm_convnext", prefix_tokens="cls")


# ---- hf_vision --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers, combine, final_norm", [
    ((-1,), "mean", False), ((1, 3), "mean", True), ((3, 1), "concat", False), ((0, 2, 3), "concat", True),
])
def test_hf_clip_hidden_states(generic_models, images, layers, combine, final_norm):
    from transformers import CLIPImageProcessorPil

    folder, model = generic_models["hf_clip"]
    teacher = _hf(generic_models, "hf_clip", layers=layers, combine=combine, final_norm=final_norm)
    pixels = CLIPImageProcessorPil.from_pretrained(folder)(images, return_tensors="pt")["pixel_values"]
    assert teacher.preprocess(images).dtype == torch.uint8  # the PIL CLIP processor splits exactly
    torch.testing.assert_close(_pixel_values(teacher, images), pixels, atol=0, rtol=0)

    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        picked = [model.post_layernorm(hidden[i]) if final_norm else hidden[i] for i in layers]
    picked = [h[:, 1:] for h in picked]  # CLIP: one [CLS] in front of 4x4 patches
    expected = torch.stack(picked).mean(0) if combine == "mean" else torch.cat(picked, dim=-1)

    out = teacher(pixels)
    assert out.shape == (len(images), 16, 32 if combine == "mean" else 32 * len(layers))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("prefix_tokens, grid", [("drop", None), ("keep", None), ("cls", None), ("drop", 24),
                                                 ("keep", 3)])
def test_hf_dinov2_registers_final_norm_is_last_hidden_state(generic_models, images, prefix_tokens, grid):
    folder, model = generic_models["hf_dinov2_reg"]
    teacher = _hf(generic_models, "hf_dinov2_reg", final_norm=True, prefix_tokens=prefix_tokens, grid=grid)
    pixels = _pixel_values(teacher, images)
    assert pixels.shape == (len(images), 3, 56, 56)
    with torch.no_grad():
        last = model(pixel_values=pixels).last_hidden_state  # the model's own final LayerNorm output
    prefix_count = 1 + model.config.num_register_tokens
    prefix, patches = last[:, :prefix_count], last[:, prefix_count:]
    assert patches.shape[1] == 16
    if grid is not None:
        resized = F.interpolate(_tokens_to_map(patches, 4, 4), size=(grid, grid), mode="bilinear",
                                align_corners=False)
        patches = _row_major(resized)
    expected = {"drop": patches, "keep": torch.cat([prefix, patches], 1), "cls": prefix[:, :1]}[prefix_tokens]

    out = teacher(pixels)
    assert teacher.target_shape == tuple(expected.shape[1:])
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


def test_hf_num_prefix_tokens_override(generic_models, images):
    _, model = generic_models["hf_dinov2_reg"]
    teacher = _hf(generic_models, "hf_dinov2_reg", num_prefix_tokens=1, prefix_tokens="drop")
    pixels = _pixel_values(teacher, images[:2])
    with torch.no_grad():
        expected = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
    assert teacher.target_shape == (4 + 16, 32)  # the registers now count as patch tokens
    torch.testing.assert_close(teacher(pixels), expected, atol=ATOL, rtol=RTOL)


def test_hf_convnet_feature_maps(generic_models, images):
    _, model = generic_models["hf_resnet"]
    teacher = _hf(generic_models, "hf_resnet", layers=[-1], grid=2)
    pixels = _pixel_values(teacher, images)
    with torch.no_grad():
        last = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
    assert last.shape[1:] == (16, 8, 8)
    expected = _row_major(F.interpolate(last, size=(2, 2), mode="bilinear", align_corners=False))
    torch.testing.assert_close(teacher(pixels), expected, atol=ATOL, rtol=RTOL)


def test_hf_spec_errors_name_the_field(generic_models):
    with pytest.raises(ValueError, match=r"spec\.final_norm: ResNetModel has no final norm"):
        _hf(generic_models, "hf_resnet", final_norm=True)
    with pytest.raises(ValueError, match=r"spec\.layers=\[1, 7\].*4 hidden states"):
        _hf(generic_models, "hf_clip", layers=[1, 7], combine="concat")
    with pytest.raises(ValueError, match=r"spec\.layers: hidden states of different shapes"):
        _hf(generic_models, "hf_resnet", layers=[1, 2])
    with pytest.raises(ValueError, match=r"spec\.prefix_tokens: cls"):
        _hf(generic_models, "hf_resnet", prefix_tokens="cls")
    with pytest.raises(Exception, match="grid"):
        teachers.to_spec({"kind": "hf_vision", "model": "a/b", "prefix_tokens": "cls", "grid": 4})


def test_mean_layers_are_one_spelling_concat_keeps_the_order():
    assert HfVisionSpec(model="a/b", layers=[3, 1]).layers == (1, 3)
    assert HfVisionSpec(model="a/b", layers=[3, 1], combine="concat").layers == (3, 1)


# ---- both -------------------------------------------------------------------------------------------------------

GENERIC = [("timm", "timm_vit", {}), ("timm", "timm_mambaout", {"grid": 4}),
           ("hf_vision", "hf_clip", {"layers": [1, 2], "combine": "concat", "final_norm": True}),
           ("hf_vision", "hf_dinov2_reg", {"prefix_tokens": "keep"})]


def _make(generic_models, kind, name, options):
    return _timm(generic_models, name, **options) if kind == "timm" else _hf(generic_models, name, **options)


@pytest.mark.parametrize("kind, name, options", GENERIC)
def test_batch_of_eight_equals_eight_singles(generic_models, images8, kind, name, options):
    teacher = _make(generic_models, kind, name, options)
    batch = teacher(teacher.preprocess(images8))
    singles = torch.cat([teacher(teacher.preprocess([image])) for image in images8])
    assert batch.shape == (8, *teacher.target_shape) and batch.dtype == torch.float32
    torch.testing.assert_close(batch, singles, atol=ATOL, rtol=RTOL)
    assert torch.isfinite(batch).all()


@pytest.mark.parametrize("kind, name, options", GENERIC)
def test_generic_teachers_are_frozen_and_deterministic(generic_models, images, kind, name, options):
    teacher = _make(generic_models, kind, name, options)
    assert teacher.kind == kind and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())
    batch = teacher.preprocess(images[:3])
    torch.testing.assert_close(teacher(batch), teacher(batch), atol=0, rtol=0)
    with pytest.raises(ValueError, match="RGB"):
        teacher.preprocess([images[0].convert("L")])


@pytest.mark.parametrize("kind, name, changes", [
    ("timm", "timm_vit", [{"grid": 5}, {"prefix_tokens": "keep"}, {"storage_dtype": "bfloat16"}]),
    ("hf_vision", "hf_clip", [{"layers": [1]}, {"layers": [2, 3]}, {"grid": 2}, {"final_norm": True},
                              {"combine": "concat"}, {"processor_backend": "torchvision"}]),
])
def test_fingerprint_follows_the_output_fields_and_the_weights(generic_models, tmp_path, kind, name, changes):
    from safetensors.torch import load_file, save_file

    base = _make(generic_models, kind, name, {})
    assert len(base.fingerprint) == 64
    for change in changes:
        assert _make(generic_models, kind, name, change).fingerprint != base.fingerprint, change
    for same in ({"batch_size": 1}, {"num_gpus": 0.5}, {"target_shape": list(base.target_shape)}):
        assert _make(generic_models, kind, name, same).fingerprint == base.fingerprint, same
    assert teachers.spec_fingerprint(base.spec) == base.fingerprint

    # A copy elsewhere is the same teacher; one changed weight is not.
    copy = shutil.copytree(generic_models[name][0], tmp_path / "copy")
    moved = {**generic_models, name: (copy, None)}
    assert _make(moved, kind, name, {}).fingerprint == base.fingerprint
    weights = copy / "model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[-1]
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    assert _make(moved, kind, name, {}).fingerprint != base.fingerprint


def test_target_shape_declaration_is_checked(generic_models):
    assert _timm(generic_models, "timm_vit", target_shape=[100, 64]).target_shape == (100, 64)
    with pytest.raises(teachers.TargetShapeMismatch, match=r"spec\.target_shape=\[576, 64\].*\[100, 64\]"):
        _timm(generic_models, "timm_vit", target_shape=[576, 64])
    with pytest.raises(teachers.TargetShapeMismatch, match=r"spec\.target_shape"):
        _hf(generic_models, "hf_clip", target_shape=[1, 32])


def test_timm_reads_safetensors_only(generic_models, tmp_path):
    folder = generic_models["timm_convnext"][0]
    # The teacher opens model.safetensors itself; a .bin beside it is never unpickled (this one would not load).
    both = shutil.copytree(folder, tmp_path / "both")
    (both / "pytorch_model.bin").write_bytes(b"not a pickle; loading this would fail")
    teachers.create({"kind": "timm", "model": f"local-dir:{both}"})

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle would run code on load")
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        teachers.create({"kind": "timm", "model": f"local-dir:{pickled}"})


@pytest.mark.parametrize("model, error, message", [
    ("local-dir:/no/such/folder", FileNotFoundError, r"spec\.model: no such directory /no/such/folder"),
    ("local-dir:runs/nowhere/x", FileNotFoundError, r"spec\.model: no such directory runs/nowhere/x"),
    ("not_a_timm_model_at_all", ValueError, r"spec\.model: 'not_a_timm_model_at_all' is not a timm model name"),
    ("resnet18.a1_in1k", OSError, r"spec\.model: cannot get timm/resnet18\.a1_in1k"),
    ("hf-hub:nobody-here/no-such-model", OSError, r"spec\.model: cannot get nobody-here/no-such-model"),
])
def test_timm_model_errors(monkeypatch, model, error, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(error, match=message):
        teachers.create({"kind": "timm", "model": model})


@pytest.mark.parametrize("model", ["org/name", "hf-hub:org/name@main", "local-dir:", "s3:bucket"])
def test_timm_model_syntax_is_validated(model):
    with pytest.raises(Exception, match="model"):
        teachers.to_spec({"kind": "timm", "model": model})


def test_a_manifest_entry_is_all_a_new_teacher_needs(generic_models, images, tmp_path):
    manifest = tmp_path / "generic.yaml"
    manifest.write_text(textwrap.dedent("""\
        teachers:
          dino_patches:
            kind: hf_vision
            model: ${GENERIC}/hf_dinov2_reg
            layers: [1, 3]
            final_norm: true
            target_shape: [16, 32]
          vit_cls:
            kind: timm
            model: local-dir:${GENERIC}/timm_vit
            prefix_tokens: cls
            target_shape: [1, 64]
        """))
    loaded = teachers.load_manifest(manifest, environ={"GENERIC": str(generic_models["timm_vit"][0].parent)})
    for name, spec in loaded.teachers.items():
        teacher = teachers.create(spec)
        out = teacher(teacher.preprocess(images[:2]))
        assert out.shape == (2, *spec.target_shape), name

"""Tiny real checkpoints for the generic teachers, written the way their libraries publish them.

timm: `timm.models.save_for_hf(..., safe_serialization=True)` (config.json + model.safetensors, the layout of the
hub's `timm/*` repos and of `local-dir:`). transformers: `save_pretrained` of a model and its image processor.
Each builder is seeded and returns (folder, the in-memory model it saved) so a test can compute the expected
target from the model itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def build_timm(out: Path, name: str = "test_vit", *, seed: int = 0, **model_args):
    """A random-initialised timm model from timm's own `test_*` family (a few hundred thousand parameters).

    test_vit: 160 px, patch 16 -> [CLS] (+ `reg_tokens`) + 10x10 patch tokens of width 64.
    test_convnext: 160 px -> a [64, 5, 5] feature map. test_mambaout: the same map, channels last (NHWC).
    """
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **model_args).eval()
    timm.models.save_for_hf(model, out, safe_serialization=True)
    return out, model


def build_hf_clip_vision(out: Path, *, seed: int = 0):
    """CLIPVisionModel: hidden 32, 3 layers, image 64, patch 16 -> [CLS] + 4x4 patch tokens; CLIP processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=64, patch_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(config).eval()
    model.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, resample=3,
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(out)
    return out, model


def build_hf_dinov2_registers(out: Path, *, seed: int = 0):
    """Dinov2WithRegistersModel: hidden 32, 3 layers, 4 registers, crop 56, patch 14 -> 1 + 4 + 4x4 tokens."""
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2,
                                       image_size=56, patch_size=14, num_register_tokens=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2WithRegistersModel(config).eval()
    model.save_pretrained(out)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, resample=3,
                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(out)
    return out, model


def build_hf_resnet(out: Path, *, seed: int = 0):
    """ResNetModel (no final norm): 64 px -> hidden states [8, 16, 16], [8, 16, 16], [16, 8, 8]."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNetModel(config).eval()
    model.save_pretrained(out)
    ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=1.0).save_pretrained(out)
    return out, model

"""The paper's three teacher checkpoints at full size, random weights, no download (used by test_full_size.py and
benchmarks/precision.py).

Each writer builds the hub checkpoint's architecture from a config with the real hyperparameters, fills it with
random weights and saves it with `save_pretrained` (safetensors) in the hub repo's layout, image processor included.
Default weights: bfloat16 values drawn directly from N(0, 0.02), norm scales too (the init functions are skipped:
3x faster; only shapes and finiteness are checked downstream). `own_init=True` runs the model's own initialisation
instead (unit norm scales, zero biases), in `dtype`: float32 weights for precision measurements.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

import teachers
from tests.teachers.conftest import OLAVLM_MANIFEST


def random_model(model_cls, config, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0, own_init: bool = False):
    """`model_cls(config)` in `dtype`, eval mode, with N(0, 0.02) weights (or its own init with `own_init`).
    Buffers such as Swin's relative position index are built by the constructor as usual."""
    from transformers.initialization import no_init_weights

    if own_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return model_cls._from_config(config, dtype=dtype).eval()
    with no_init_weights():
        model = model_cls._from_config(config, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def _save(model, out: Path) -> None:
    model.save_pretrained(out)
    del model
    gc.collect()


def write_depth_anything_v2_large(out: Path, **weights) -> Path:
    """Depth-Anything-V2-Large: DINOv2-L/14 backbone (hidden 1024, 24 layers, 16 heads) and its DPT head."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    # depth-anything/Depth-Anything-V2-Large-hf's config.json.
    backbone = Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4,
                            patch_size=14, image_size=518, layerscale_value=1.0,
                            out_features=["stage5", "stage12", "stage18", "stage24"],
                            reshape_hidden_states=False, apply_layernorm=True)
    config = DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=1024,
                                 reassemble_factors=[4, 2, 1, 0.5], neck_hidden_sizes=[256, 512, 1024, 1024],
                                 fusion_hidden_size=256, head_hidden_size=32, head_in_index=-1,
                                 depth_estimation_type="relative")
    _save(random_model(DepthAnythingForDepthEstimation, config, **weights), out)
    return out


def write_oneformer_coco_swin_large(out: Path, **weights) -> Path:
    """OneFormer COCO Swin-L, the full model (pixel decoder, transformer decoder, text encoder included), and the
    hub processor's settings (shortest edge 800: the 768 px input becomes 800 x 800)."""
    from transformers import OneFormerConfig, OneFormerForUniversalSegmentation, OneFormerImageProcessor, SwinConfig

    # shi-labs/oneformer_coco_swin_large: Swin-L (384 px, window 12) and the OneFormer decoder defaults it uses:
    # 150 queries, hidden 256, 10 decoder layers, 6 deformable encoder layers, text encoder width 256, 133 classes.
    backbone = SwinConfig(image_size=384, patch_size=4, embed_dim=192, depths=[2, 2, 18, 2],
                          num_heads=[6, 12, 24, 48], window_size=12, drop_path_rate=0.3,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    id2label = {i: f"class_{i}" for i in range(133)}
    config = OneFormerConfig(backbone_config=backbone, id2label=id2label,
                             label2id={v: k for k, v in id2label.items()}, num_queries=150, hidden_dim=256,
                             dim_feedforward=2048, decoder_layers=10, encoder_layers=6,
                             encoder_feedforward_dim=1024, num_attention_heads=8, mask_dim=256, conv_dim=256,
                             text_encoder_width=256, text_encoder_num_layers=6, text_encoder_context_length=77,
                             text_encoder_proj_layers=2, text_encoder_n_ctx=16, text_encoder_vocab_size=49408,
                             task_seq_len=77, query_dec_layers=2, common_stride=4, use_task_norm=True)
    _save(random_model(OneFormerForUniversalSegmentation, config, **weights), out)
    # The hub processor's settings, minus the class-info download (which the teacher never needs).
    processor = OneFormerImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333}, num_text=134,
                                        num_labels=133, ignore_index=255)
    processor.repo_path = None
    processor.save_pretrained(out)
    return out


def write_unclip_image_encoder_vit_h(out: Path, **weights) -> Path:
    """SD 2.1 unCLIP's image encoder: CLIP ViT-H/14 with projection (hidden 1280, 32 layers, 632M parameters), in
    `out/image_encoder`, and its CLIP feature extractor in `out/feature_extractor`."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    # stabilityai/stable-diffusion-2-1-unclip's image_encoder/config.json and feature_extractor settings.
    config = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                              num_attention_heads=16, patch_size=14, image_size=224, projection_dim=1024,
                              hidden_act="gelu", layer_norm_eps=1e-5)
    _save(random_model(CLIPVisionModelWithProjection, config, **weights), out / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(out / "feature_extractor")
    return out


WRITERS = {"depth": write_depth_anything_v2_large, "seg": write_oneformer_coco_swin_large,
           "gen": write_unclip_image_encoder_vit_h}


def olavlm_spec(name: str, model_dir: Path, **updates) -> teachers.TeacherSpecBase:
    """The olavlm.yaml spec of teacher `name` ("depth", "seg", "gen") with `model` pointing at `model_dir`."""
    spec = teachers.load_manifest(OLAVLM_MANIFEST, environ={}).teachers[name]
    return type(spec).model_validate({**spec.model_dump(), "model": str(model_dir), **updates})

"""The paper's three teachers at full size: real architectures and hyperparameters, random weights, no download.

Each test builds the hub checkpoint's architecture from a config with the real hyperparameters, fills it with
random bfloat16 weights (the init functions are skipped: drawing the values directly is 3x faster), saves it with
`save_pretrained` (safetensors) in the hub repo's layout, loads it through the real teacher code path with the
olavlm.yaml spec (only `model` points elsewhere), runs one image and checks the paper's target shape.

Measured alone on 2 CPU cores (AMD EPYC, another test suite running beside it), wall time / peak RSS of the
whole pytest process: depth 19 s / 2.9 GB, seg 30 s / 2.5 GB, gen 23 s / 4.6 GB (of which about 1.3 GB is the
memory-mapped bfloat16 checkpoint being read into float32). Every test deletes its checkpoint when done.
"""

from __future__ import annotations

import gc
import shutil

import pytest
import torch

import teachers
from tests.teachers.conftest import OLAVLM_MANIFEST

pytestmark = pytest.mark.slow


def _random_bf16(model_cls, config, seed: int = 0):
    """`model_cls(config)` in bfloat16 with N(0, 0.02) weights (norm scales too: only shapes and finiteness are
    checked downstream). Buffers such as Swin's relative position index are built by the constructor as usual."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = model_cls._from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


@pytest.fixture
def checkpoint_dir(tmp_path):
    """A folder for one full-size checkpoint, removed (with its GBs) as soon as the test ends."""
    path = tmp_path / "checkpoint"
    yield path
    shutil.rmtree(path, ignore_errors=True)
    gc.collect()


def _olavlm_spec(name: str, model_dir) -> teachers.TeacherSpecBase:
    spec = teachers.load_manifest(OLAVLM_MANIFEST, environ={}).teachers[name]
    return spec.model_copy(update={"model": str(model_dir)})


def _run_one(spec, image) -> tuple[teachers.Teacher, torch.Tensor]:
    teacher = teachers.create(spec)  # checks the manifest's declared target_shape against the model
    out = teacher(teacher.preprocess([image]))
    return teacher, out


def test_depth_anything_v2_large(checkpoint_dir, images):
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
    model = _random_bf16(DepthAnythingForDepthEstimation, config)
    model.save_pretrained(checkpoint_dir)
    del model
    gc.collect()

    teacher, out = _run_one(_olavlm_spec("depth", checkpoint_dir), images[0])
    assert teacher.target_shape == (576, 1024) and out.shape == (1, 576, 1024)
    assert torch.isfinite(out).all()
    assert len(teacher.backbone.encoder.layer) == 24
    # DINOv2 ViT-L/14 with its 518 px (37x37) position table: 304.4M parameters, the DPT head discarded.
    assert 300e6 < sum(p.numel() for p in teacher.parameters()) < 310e6


def test_oneformer_coco_swin_large(checkpoint_dir, images):
    """OneFormer COCO Swin-L, the full model (pixel decoder, transformer decoder, text encoder included). The
    768 px input becomes 800x800 in the processor, so Swin-L's last stage is 25x25 before the 24x24 resize."""
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
    model = _random_bf16(OneFormerForUniversalSegmentation, config)
    model.save_pretrained(checkpoint_dir)
    del model
    gc.collect()
    # The hub processor's settings, minus the class-info download (which the teacher never needs).
    processor = OneFormerImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333}, num_text=134,
                                        num_labels=133, ignore_index=255)
    processor.repo_path = None
    processor.save_pretrained(checkpoint_dir)

    teacher, out = _run_one(_olavlm_spec("seg", checkpoint_dir), images[0])
    assert teacher.target_shape == (576, 1536) and out.shape == (1, 576, 1536)
    assert torch.isfinite(out).all()
    assert list(teacher.encoder.channels) == [192, 384, 768, 1536]
    # Swin-L: 195-197M parameters in the kept backbone.
    assert 190e6 < sum(p.numel() for p in teacher.parameters()) < 200e6


def test_unclip_image_encoder_vit_h(checkpoint_dir, images):
    """SD 2.1 unCLIP's image encoder: CLIP ViT-H/14 with projection (hidden 1280, 32 layers, 632M parameters)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    # stabilityai/stable-diffusion-2-1-unclip's image_encoder/config.json and feature_extractor settings.
    config = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                              num_attention_heads=16, patch_size=14, image_size=224, projection_dim=1024,
                              hidden_act="gelu", layer_norm_eps=1e-5)
    model = _random_bf16(CLIPVisionModelWithProjection, config)
    model.save_pretrained(checkpoint_dir / "image_encoder")
    del model
    gc.collect()
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(
        checkpoint_dir / "feature_extractor")
    # What the real repo also holds; the teacher must neither read nor fingerprint it.
    (checkpoint_dir / "unet").mkdir()
    (checkpoint_dir / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"never read")

    teacher, out = _run_one(_olavlm_spec("gen", checkpoint_dir), images[0])
    assert teacher.target_shape == (1, 1024) and out.shape == (1, 1, 1024)
    assert torch.isfinite(out).all()
    assert 630e6 < sum(p.numel() for p in teacher.parameters()) < 635e6
    assert not any(f.startswith("unet/") for f in teacher.weight_files)

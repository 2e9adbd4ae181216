"""The offline demo: WebDataset shards of real photographs and tiny random-initialised checkpoints.

Everything here runs without a network and without the model hub: the images are the sample photographs that
scikit-image ships inside its wheel, and every checkpoint is a real `transformers` architecture (the same classes
the hub teachers and the student use) shrunk to a few hundred thousand parameters and saved with
`save_pretrained`, so the rest of the pipeline exercises exactly the code paths it uses on real weights.

The demo data takes the path real data takes: the photographs are written as a LLaVA-format dataset (a JSON and
its image files, like LLaVA-558K's), which `pipeline shards llava` (pipeline/llava_shards.py) turns into shards.

The whole build is seeded: the same `seed` gives byte-identical shards (and identical weights), so a demo store
built twice has the same dataset fingerprint.

    from pipeline.demo import build_demo_assets
    assets = build_demo_assets("runs/demo")        # under 10 s on 2 CPU cores

One module per part: `photos` (the samples), `llava` (LLaVA-format data and its shards), `teachers` (the three
tiny teachers), `unclip_pipeline` (the rest of the gen teacher's unCLIP pipeline, which decodes gen embeddings into
images), `tokenizer` (the student's tokenizer and chat template), `student_parts` (its vision encoder and LLM),
`build` (all of it, recorded), with `common` holding what several of them share.

Layout under OUT::

    llava/demo.json                    the demo data in LLaVA format, one record per sample (see write_demo_llava)
    llava/images/PHOTO/ID.jpg          its JPEG files
    shards/demo-00000.tar ...          `pipeline shards llava` of llava/: KEY.jpg, KEY.txt (a caption for every
                                       sample) and KEY.json (the record: for every third sample an instruction
                                       conversation, for the others a LLaVA-558K-style caption conversation)
    shards/demo_sharding.json, demo-00000_stats.json ..., demo_failures.parquet    the sharder's records
    assets/teachers/depth/             DepthAnythingForDepthEstimation (DINOv2 backbone) + DPT image processor
    assets/teachers/seg/               OneFormerForUniversalSegmentation (Swin backbone) + OneFormerProcessor
    assets/teachers/gen/image_encoder/     CLIPVisionModelWithProjection (the unCLIP image encoder layout)
    assets/teachers/gen/feature_extractor/ CLIPImageProcessor
    assets/teachers/gen/model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, image_normalizer/,
        image_noising_scheduler/       the rest of a StableUnCLIPImg2ImgPipeline (the gen decoder; 64x64 images)
    assets/student/vision/             CLIPVisionModel + CLIPImageProcessor (336 px, patch 14: 576 patch tokens)
    assets/student/llm/                LlamaForCausalLM
    assets/student/tokenizer/          byte-level BPE PreTrainedTokenizerFast with a chat template
    demo_assets.json                   what was built, from which seed, with which library versions
"""

from pipeline.demo.build import DemoAssets, build_demo_assets

__all__ = ["DemoAssets", "build_demo_assets"]

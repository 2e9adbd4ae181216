"""OlaStudent with a tiny real CLIP vision tower and a tiny real Llama: layout, shapes, masking, gradients, I/O."""

from __future__ import annotations

import pytest
import torch

from student.loss import coupled_loss
from student.model import OlaStudent
from student.hf_config import StudentConfig
from student.task import TaskSpec
from tests.student.tiny_parts import (
    IMAGE_TOKEN_ID,
    NUM_IMAGE_TOKENS,
    TASKS,
    build_student,
    tiny_text_config,
    tiny_vision_config,
)

I = IMAGE_TOKEN_ID
ROWS = [[1, 5, 6, I, 7, 8, 9, 10], [1, I, 11, 12]]  # different prompt lengths before and after the image
NUM_TASK_TOKENS = 8 * len(TASKS)


def assert_predictions_close(a, b, **tol):
    assert a.keys() == b.keys()
    for task in a:
        assert a[task].keys() == b[task].keys()
        for layer in a[task]:
            torch.testing.assert_close(a[task][layer], b[task][layer], **tol)


def test_output_shapes_for_depth_seg_and_gen_like_tasks(student, make_batch):
    batch = make_batch(ROWS)
    with torch.no_grad():
        out = student(**batch)
    expanded = len(ROWS[0]) - 1 + NUM_IMAGE_TOKENS + NUM_TASK_TOKENS
    assert out.logits.shape == (2, expanded, 300)
    assert out.attention_mask.tolist()[1] == [1] * (len(ROWS[1]) - 1 + NUM_IMAGE_TOKENS + NUM_TASK_TOKENS) + [0] * 4
    assert out.loss is not None and torch.isfinite(out.loss)
    expected = {"depth": (16, 12), "seg": (16, 20), "gen": (1, 10)}
    for spec in TASKS:
        assert sorted(out.predictions[spec["name"]]) == spec["layers"]
        for pred in out.predictions[spec["name"]].values():
            assert pred.shape == (2, *expected[spec["name"]])
    # Labels: only the text keeps labels; image and task tokens and padding are -100.
    image_start = ROWS[0].index(I)
    spliced = out.labels[0, image_start: image_start + NUM_IMAGE_TOKENS + NUM_TASK_TOKENS]
    assert torch.all(spliced == -100)
    assert out.labels[0, :image_start].tolist() == ROWS[0][:image_start]
    assert out.labels[0, image_start + NUM_IMAGE_TOKENS + NUM_TASK_TOKENS:].tolist() == ROWS[0][image_start + 1:]
    assert student(**make_batch(ROWS, with_labels=False)).loss is None


def test_sequence_layout_image_then_pooled_task_tokens_in_task_order(student, make_batch):
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach()

    handle = student.llm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        batch = make_batch(ROWS)
        with torch.no_grad():
            out = student(**batch)
            image = student.encode_images(batch["pixel_values"])
    finally:
        handle.remove()
    embeds = seen["embeds"]
    for b, row in enumerate(ROWS):
        p = row.index(I)
        torch.testing.assert_close(embeds[b, p: p + NUM_IMAGE_TOKENS], image[b])
        pos = p + NUM_IMAGE_TOKENS
        for name in ("gen", "depth", "seg"):  # default task_order
            assert out.task_positions[name][b].tolist() == list(range(pos, pos + 8))
            param = student.task_tokens[name].detach()
            expected = param if name == "gen" else param.view(8, 2, -1).mean(dim=1)  # 16 tokens in groups of 2
            torch.testing.assert_close(embeds[b, pos: pos + 8], expected)
            pos += 8
        text = student.get_input_embeddings()(torch.tensor(row[p + 1:]))
        torch.testing.assert_close(embeds[b, pos: pos + len(row) - p - 1], text)


def test_each_sample_of_a_padded_batch_predicts_as_it_does_alone(student, make_batch):
    with torch.no_grad():
        batched = student(**make_batch(ROWS))
        for b, row in enumerate(ROWS):
            alone_batch = make_batch([row])
            alone_batch["pixel_values"] = make_batch(ROWS)["pixel_values"][b: b + 1]
            alone = student(**alone_batch)
            one = {t: {l: p[b: b + 1] for l, p in per.items()} for t, per in batched.predictions.items()}
            assert_predictions_close(one, alone.predictions, rtol=1e-4, atol=1e-5)
            n = alone.logits.shape[1]
            torch.testing.assert_close(batched.logits[b: b + 1, :n], alone.logits, rtol=1e-4, atol=1e-5)


def test_left_padding_gives_the_same_predictions_as_right_padding(student, make_batch):
    right = make_batch(ROWS)
    left = {k: v.clone() if v is not None else None for k, v in right.items()}
    length = right["input_ids"].shape[1]
    for b, row in enumerate(ROWS):
        for key in ("input_ids", "attention_mask", "labels"):
            left[key][b] = torch.roll(right[key][b], length - len(row))
    with torch.no_grad():
        a, b_ = student(**right), student(**left)
    assert_predictions_close(a.predictions, b_.predictions, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.loss, b_.loss)


def test_other_tasks_task_token_states_do_not_reach_a_tasks_predictor(student, make_batch):
    with torch.no_grad():
        out = student(**make_batch(ROWS), output_hidden_states=True)
        for name in ("depth", "gen"):
            others = torch.cat([p for t, p in out.task_positions.items() if t != name], dim=1)
            for positions, should_change in ((others, False), (out.task_positions[name], True)):
                states = [h.clone() for h in out.hidden_states]
                for h in states:
                    for b in range(h.shape[0]):
                        h[b, positions[b]] = torch.randn_like(h[b, positions[b]]) * 5
                again = student.predict_from_hidden_states(states, out.attention_mask, out.task_positions)
                for layer, pred in out.predictions[name].items():
                    assert torch.allclose(again[name][layer], pred) != should_change, (name, layer, should_change)


def test_gradients_reach_projector_predictors_task_tokens_and_logit_scales(make_batch):
    model = build_student(seed=1).train()
    trainable = model.set_trainable(["projector", "predictors", "task_tokens"])
    assert any(n.startswith("logit_scales.") for n in trainable)
    assert not any(n.startswith(("llm.", "vision.")) for n in trainable)
    batch = make_batch(ROWS)
    out = model(**batch)
    targets = {n: torch.randn_like(p[next(iter(p))]).half() for n, p in out.predictions.items()}
    valid = {n: torch.ones(2, dtype=torch.bool) for n in targets}
    total, _ = coupled_loss(out.loss, out.predictions, targets, valid, model.logit_scales)
    total.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_save_pretrained_round_trip(tmp_path, make_batch):
    model = build_student(seed=2, logit_scale_per="task")
    with torch.no_grad():
        model.logit_scales["depth"].fill_(1.25)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = OlaStudent.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.task_names() == ["gen", "depth", "seg"]
    assert loaded.config.image_token_id == IMAGE_TOKEN_ID and loaded.config.logit_scale_per == "task"
    assert loaded.logit_scales["depth"].item() == 1.25
    batch = make_batch(ROWS)
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    assert torch.equal(a.logits, b.logits)
    assert_predictions_close(a.predictions, b.predictions, rtol=0, atol=0)
    for (na, pa), (nb, pb) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na


def test_round_trip_after_resizing_the_vocabulary(tmp_path, make_batch):
    model = build_student(seed=3)
    model.llm.resize_token_embeddings(310)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = OlaStudent.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.text_config.vocab_size == 310
    assert loaded.get_input_embeddings().num_embeddings == 310


@pytest.mark.parametrize("dual_encoder", [False, True])
def test_from_parts_loads_both_pretrained_parts_and_seeds_the_rest(tmp_path, make_batch, dual_encoder):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel, LlamaForCausalLM

    torch.manual_seed(10)
    if dual_encoder:  # like openai/clip-vit-large-patch14-336: a CLIPModel whose vision tower we take
        clip_cfg = CLIPConfig(vision_config=tiny_vision_config().to_dict(),
                              text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                           "num_attention_heads": 4, "vocab_size": 99})
        vision = CLIPModel(clip_cfg)
    else:
        vision = CLIPVisionModel(tiny_vision_config())
    llm = LlamaForCausalLM(tiny_text_config())
    vision.save_pretrained(tmp_path / "vision")
    llm.save_pretrained(tmp_path / "llm")

    built = []
    for _ in range(2):
        torch.manual_seed(0)
        built.append(OlaStudent.from_parts(str(tmp_path / "vision"), str(tmp_path / "llm"), tasks=TASKS,
                                           image_token_id=IMAGE_TOKEN_ID, predictor_heads=2))
    model = built[0]
    assert model.config.predictor_heads == 2
    def vision_params(m):  # CLIPModel (and CLIPVisionModel before transformers 5) nest under vision_model.
        sd = m.state_dict()
        prefix = "vision_model."
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        return sd

    source, loaded = vision_params(vision), vision_params(model.vision)
    assert source and source.keys() == loaded.keys()
    for name, param in source.items():
        assert torch.equal(loaded[name], param), name
    for name, param in llm.state_dict().items():
        assert torch.equal(model.llm.state_dict()[name], param), name
    for (name, a), (_, b) in zip(built[0].named_parameters(), built[1].named_parameters()):
        assert torch.equal(a, b), name  # random parts follow the caller's seed
    assert model.logit_scales["depth_2"].item() == 2.0
    assert 0.8 < model.task_tokens["depth"].std().item() < 1.2  # torch.randn-like, as the reference
    with torch.no_grad():
        out = model(**make_batch(ROWS))
    assert out.predictions["gen"][4].shape == (2, 1, 10)


def test_image_token_id_outside_the_vocabulary_and_custom_seq_tokens(make_batch):
    tasks = [dict(TASKS[0], seq_tokens=4), TASKS[2]]
    model = build_student(tasks=tasks, image_token_id=10_000, task_order=["depth", "gen"])
    rows = [[1, 2, 10_000, 3], [10_000, 4]]
    batch = make_batch([[1, 2, IMAGE_TOKEN_ID, 3], [IMAGE_TOKEN_ID, 4]])
    batch["input_ids"][batch["input_ids"] == IMAGE_TOKEN_ID] = 10_000
    batch["labels"] = None
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[1] == len(rows[0]) - 1 + NUM_IMAGE_TOKENS + 4 + 8
    assert out.task_positions["depth"][1].tolist() == [16, 17, 18, 19]
    assert out.task_positions["gen"][1].tolist() == list(range(20, 28))
    assert out.predictions["depth"][2].shape == (2, 16, 12)


def test_rows_with_two_image_tokens_or_no_image_under_embedding_losses_are_rejected(student, make_batch):
    # A text-only row is fine for the next-token loss alone (tests/student/test_text_only.py), but has no task
    # tokens to predict embeddings from.
    with pytest.raises(ValueError, match=r"rows \[1\] have no image"):
        student(**make_batch([[1, I, 2], [1, 2, 3]]))
    with pytest.raises(ValueError, match="row 0 .* 2 image tokens"):
        student(**make_batch([[1, I, I, 2]]))


def test_config_validation_names_the_problem():
    vc, tc = tiny_vision_config(), tiny_text_config()
    with pytest.raises(ValueError, match="valid: 1..4"):
        StudentConfig(vision_config=vc, text_config=tc, tasks=[dict(TASKS[0], layers=[5])])
    with pytest.raises(ValueError, match="not a multiple of seq_tokens"):
        TaskSpec(name="depth", layers=[1], target_tokens=12, target_dim=4, seq_tokens=8)
    with pytest.raises(ValueError, match="task_order"):
        StudentConfig(vision_config=vc, text_config=tc, tasks=TASKS, task_order=["depth", "seg"])
    with pytest.raises(ValueError, match="colour"):
        StudentConfig(vision_config=vc, text_config=tc, tasks=[dict(TASKS[0], colour="red")])
    with pytest.raises(ValueError, match="known"):
        build_student().set_trainable(["projector", "heads"])


def test_reference_depth_head_options_build(make_batch):
    tasks = [dict(TASKS[0], predictor_dim="hidden", out_mlp=True)]
    model = build_student(tasks=tasks, task_order=["depth"])
    assert model.predictors["depth_2"].dim == 64 and model.predictors["depth_2"].out_mlp is not None
    with torch.no_grad():
        assert model(**make_batch(ROWS)).predictions["depth"][4].shape == (2, 16, 12)


def test_auto_classes_resolve_a_saved_student(tmp_path):
    from transformers import AutoConfig, AutoModel

    build_student(seed=4).save_pretrained(tmp_path / "ckpt")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "ckpt"), StudentConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "ckpt"), OlaStudent)


def test_a_student_without_tasks_is_plain_llava(make_batch):
    model = build_student(tasks=[])
    with torch.no_grad():
        out = model(**make_batch(ROWS))
    assert out.predictions == {} and out.logits.shape[1] == len(ROWS[0]) - 1 + NUM_IMAGE_TOKENS
    total, terms = coupled_loss(out.loss, out.predictions, {}, {}, model.logit_scales)
    assert torch.equal(total, out.loss) and set(terms) == {"lm", "total"}

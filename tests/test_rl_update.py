"""RL's update pass: answers sharing their prompt, or packed each after a copy of it, give the padded loss and
gradients; the tower is not run again; per-token log-probabilities from the chunked head are the full softmax's."""

from __future__ import annotations

import pytest
import torch
from conftest import fixture_path
from PIL import Image

from llava_lite.data.collator import Collator
from llava_lite.data.conversation import Conversation, Message
from llava_lite.inference.generator import stop_token_ids
from llava_lite.inference.group_sampling import SamplingSettings, sample_groups
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.loss import trained_positions
from llava_lite.model.presets import preset
from llava_lite.model.processor_for_config import processor_for_config
from llava_lite.model.token_log_probs import token_log_probs
from llava_lite.train.reference import ReferenceLM
from llava_lite.train.rl_loss import LossSettings
from llava_lite.train.rl_update import UpdateObjective, completion_mask, update_inputs

GROUPS = 3


def _model() -> LlavaLiteModel:
    torch.manual_seed(0)
    varied = preset("tiny", language_model={"model_config": {"initializer_range": 0.3}})
    return LlavaLiteModel.from_config(varied)


def _groups(model: LlavaLiteModel, max_new_tokens: int = 8):
    pictures = [Image.open(fixture_path("images", n)).convert("RGB") for n in ("waterview.jpg", "extreme_ironing.jpg")]
    prompts = [
        Conversation([Message("user", "<image>\nWhat is in this picture?")], [pictures[0]]),
        Conversation([Message("user", "Name a colour.")]),
        Conversation([Message("user", "<image>\nFirst?\n<image>\nAnd this one?")], [pictures[1], pictures[0]]),
    ]
    processor = processor_for_config(model.config, model.tokenizer)
    samples = [processor.sample(c, add_generation_prompt=True) for c in prompts]
    batch = Collator(model.tokenizer.pad_token_id, "left")(samples)
    batch = {k: v for k, v in batch.items() if k not in ("labels", "position_ids")}
    torch.manual_seed(3)
    stops = stop_token_ids(model.tokenizer, processor.template)
    settings = SamplingSettings(GROUPS, max_new_tokens=max_new_tokens, temperature=1.3)
    return sample_groups(model, batch, settings, stops, model.tokenizer.pad_token_id)


def _loss_and_grads(model, groups, objective_for, layout: str):
    model.zero_grad()
    inputs = update_inputs(groups, layout=layout)
    output = model(**inputs, objective=objective_for())
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output, grads


@pytest.mark.parametrize("loss", ["grpo", "dapo", "gspo"])
def test_the_shared_and_packed_updates_equal_the_padded_one_in_loss_and_gradients(loss):
    model = _model()
    groups = _groups(model)
    reference = ReferenceLM(model)  # the starting weights; then the model moves away from them
    with torch.no_grad():
        for param in model.language_model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    mask = completion_mask(groups, mask_truncated=False)
    generator = torch.Generator().manual_seed(1)
    advantages = torch.randn(len(groups.completion_ids), generator=generator)
    settings = LossSettings(loss, epsilon=0.2, epsilon_high=0.28, beta=0.05, max_new_tokens=8)
    model.train()
    first_pass = UpdateObjective(settings, 1.3, advantages, mask, reference=reference)
    first = model(**update_inputs(groups), objective=first_pass)
    # An earlier policy's log-probabilities near these: ratios away from 1, some clipped.
    old = first.logps + torch.randn(mask.shape, generator=generator) * 0.3 * mask

    def objective():
        return UpdateObjective(settings, 1.3, advantages, mask, old_logps=old, reference=reference)

    padded, padded_grads = _loss_and_grads(model, groups, objective, "padded")
    assert padded.stats[0] > 0  # a KL was taken
    assert padded.stats[3] > 0 or loss == "gspo"  # and ratios clipped (gspo's one per answer, with few answers)
    assert len(padded_grads) > 10
    for layout in ("shared", "packed"):
        output, grads = _loss_and_grads(model, groups, objective, layout)
        assert output.loss.item() == pytest.approx(padded.loss.item(), rel=1e-5), layout
        assert torch.allclose(output.logps, padded.logps, rtol=1e-5, atol=1e-6), layout
        assert torch.allclose(output.ref_logps, padded.ref_logps, rtol=1e-5, atol=1e-6), layout
        assert grads.keys() == padded_grads.keys()
        for name, grad in grads.items():
            scale = padded_grads[name].abs().max().clamp(min=1e-8)
            assert ((grad - padded_grads[name]).abs().max() / scale).item() < 1e-5, (layout, name)


def test_the_shared_update_runs_each_prompt_once():
    model = _model()
    groups = _groups(model, max_new_tokens=4)
    shared, packed = update_inputs(groups, layout="shared"), update_inputs(groups, layout="packed")
    prompts = sum(len(ids) for ids in groups.prompt_ids)
    answers = sum(len(ids) for ids in groups.completion_ids)
    # Each prompt once but its last token, which leads each of its answers.
    assert shared["input_ids"].shape[1] == prompts + (GROUPS - 1) * len(groups.prompt_ids) + answers
    assert packed["input_ids"].shape[1] == GROUPS * prompts + answers
    assert len(shared["image_tokens"]) == 3 and len(packed["image_tokens"]) == 3 * GROUPS  # image slots too


def test_the_update_runs_no_tower_when_it_is_frozen_and_once_per_image_when_it_trains():
    model = _model()
    groups = _groups(model, max_new_tokens=4)
    model.train()
    mask = completion_mask(groups)
    settings = LossSettings("grpo", epsilon=0.2, epsilon_high=0.2)
    objective = UpdateObjective(settings, 1.0, torch.ones(len(mask)), mask)
    seen = []
    hook = model.vision_tower.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        model(**update_inputs(groups), objective=objective).loss.backward()
        assert seen == []  # the sampling's features serve all G answers of each prompt
        model(**update_inputs(groups, tower_trains=True), objective=objective).loss.backward()
        assert sum(seen) == 3  # three images, not three per answer
    finally:
        hook.remove()


def test_token_log_probs_are_the_full_softmax_and_so_are_their_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50)
    labels = torch.full((2, 6), -100)
    labels[0, 2:5] = torch.tensor([3, 7, 11])
    labels[1, 4:] = torch.tensor([1, 49])
    weights = torch.randn(5)
    ours = token_log_probs(hidden, head.weight, head.bias, labels, temperature=0.7)
    (ours * weights).sum().backward()
    ours_grads = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    for tensor in (hidden, head.weight, head.bias):
        tensor.grad = None
    selected, targets = trained_positions(hidden, labels)
    full = torch.log_softmax(head(selected) / 0.7, dim=-1).gather(1, targets[:, None]).squeeze(1)
    (full * weights).sum().backward()
    assert torch.allclose(ours, full, atol=1e-6)
    for mine, theirs in zip(ours_grads, (hidden.grad, head.weight.grad, head.bias.grad)):
        assert torch.allclose(mine, theirs, atol=1e-6)

"""RL's sampling: one prefill per prompt shared by its G answers gives, greedily, the answers each copy of the
prompt gets alone; the tower sees each image once; every row stops at its own end of turn."""

from __future__ import annotations

import pytest
import torch
from conftest import fixture_path
from PIL import Image

from llava_lite.data.collator import Collator
from llava_lite.data.conversation import Conversation, Message
from llava_lite.inference.generator import Generator
from llava_lite.inference.generator import SamplingSettings as AnswerSettings
from llava_lite.inference.group_sampling import SamplingSettings, sample_groups
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset

GROUPS = 3


@pytest.fixture(scope="module")
def generator() -> Generator:
    torch.manual_seed(0)
    # Varied random weights answer with varied tokens; float64 leaves no rounding between batch shapes to tip a
    # greedy choice.
    varied = preset("tiny", language_model={"model_config": {"initializer_range": 0.3}})
    return Generator(LlavaLiteModel.from_config(varied).to(torch.float64))


@pytest.fixture(scope="module")
def prompts():
    pictures = [Image.open(fixture_path("images", n)).convert("RGB") for n in ("waterview.jpg", "extreme_ironing.jpg")]
    return [
        (Conversation([Message("user", "<image>\nWhat is in this picture?")]), [pictures[0]]),
        (Conversation([Message("user", "Tell me a story about a very long day at the office.")]), []),
        (Conversation([Message("user", "<image>\nFirst?\n<image>\nAnd this one?")]), [pictures[1], pictures[0]]),
    ]


def _batch(generator: Generator, prompts) -> dict:
    encode = generator.processor.sample
    samples = [encode(Conversation(c.messages, images), add_generation_prompt=True) for c, images in prompts]
    batch = Collator(generator.model.tokenizer.pad_token_id, "left")(samples)
    return {k: v for k, v in batch.items() if k not in ("labels", "position_ids")}


def _sample(generator, prompts, settings):
    pad = generator.model.tokenizer.pad_token_id
    return sample_groups(generator.model, _batch(generator, prompts), settings, generator.stop_token_ids, pad)


def test_shared_prefix_sampling_greedily_answers_as_each_copy_of_the_prompt_alone(generator, prompts):
    alone = [generator.complete([c], [i], AnswerSettings(max_new_tokens=10))[0].token_ids for c, i in prompts]
    # A token the first answer says fourth (and not before) ends a turn too: that row stops early, the others go on.
    stop = alone[0][3]
    assert stop not in alone[0][:3]
    expected = [ids[: ids.index(stop) + 1] if stop in ids else ids for ids in alone]
    seen = []
    body = generator.model.base_language_model.model
    hook = body.register_forward_pre_hook(lambda m, args, kwargs: seen.append(_shape(kwargs)), with_kwargs=True)
    try:
        groups = sample_groups(
            generator.model,
            _batch(generator, prompts),
            SamplingSettings(GROUPS, max_new_tokens=10, greedy=True),
            [*generator.stop_token_ids, stop],
            generator.model.tokenizer.pad_token_id,
        )
    finally:
        hook.remove()
    assert len(groups.completion_ids) == GROUPS * len(prompts)
    for index in range(len(prompts)):
        for copy in range(GROUPS):
            ids = groups.completion_ids[index * GROUPS + copy].tolist()
            assert ids == expected[index], (index, copy)
            assert bool(groups.truncated[index * GROUPS + copy]) == (len(ids) == 10 and ids[-1] != stop)
    assert len(expected[0]) == 4 and any(len(ids) == 10 for ids in expected)
    # Each prompt is prefilled once (all but its last token); then every step runs one new position per answer.
    longest = max(len(ids) for ids in groups.prompt_ids)
    assert seen[0] == (len(prompts), longest - 1) and set(seen[1:]) == {(GROUPS * len(prompts), 1)}
    # The prompts come back without their padding, as the processor encoded them.
    for ids, (conversation, images) in zip(groups.prompt_ids, prompts):
        encoded = generator.processor.encode(Conversation(conversation.messages, images), add_generation_prompt=True)
        assert ids.tolist() == encoded.input_ids.tolist()
    assert groups.images_per_prompt == [1, 0, 2]


def _shape(kwargs: dict) -> tuple[int, int]:
    given = kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
    return tuple(given.shape[:2])


def test_the_tower_runs_once_per_image_of_the_batch_not_per_answer(generator, prompts):
    seen = []
    hook = generator.model.vision_tower.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        groups = _sample(generator, prompts, SamplingSettings(GROUPS, max_new_tokens=4))
    finally:
        hook.remove()
    assert sum(seen) == 3 and len(seen) == 1  # three images, one pass
    assert len(groups.image_features) == 3


def test_sampled_rows_stop_at_their_own_end_of_turn_and_differ(generator, prompts):
    torch.manual_seed(1)
    groups = _sample(generator, prompts, SamplingSettings(4, max_new_tokens=24, temperature=1.5))
    stops = set(generator.stop_token_ids)
    for ids, truncated in zip(groups.completion_ids, groups.truncated.tolist()):
        ends_on_stop = ids[-1].item() in stops
        assert ends_on_stop != truncated and not stops & set(ids[:-1].tolist())
        assert len(ids) == 24 or not truncated
    assert len({tuple(ids.tolist()) for ids in groups.completion_ids}) > len(prompts)  # sampled, not copied
    assert (groups.entropy > 0).all()

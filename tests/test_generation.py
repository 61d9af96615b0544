"""Generation: the KV cache and batching change nothing; answers stop at end of turn; streams match."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import fixture_path, processor_for
from PIL import Image
from transformers import StoppingCriteria

from llava_lite.data.conversation import Conversation, Message
from llava_lite.inference.generator import Generator, SamplingSettings, stop_token_ids
from llava_lite.model.llava import LlavaLiteModel
from llava_lite.model.presets import preset


@pytest.fixture(scope="module")
def generator() -> Generator:
    torch.manual_seed(0)
    # Larger random weights give varied answers rather than one token repeated; float64 leaves no float noise
    # between batch shapes to tip a greedy choice.
    varied = preset("tiny", language_model={"model_config": {"initializer_range": 0.3}})
    return Generator(LlavaLiteModel.from_config(varied).to(torch.float64))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [
        Image.open(fixture_path("images", name)).convert("RGB") for name in ("waterview.jpg", "extreme_ironing.jpg")
    ]


def prompts(images):
    return [
        (Conversation([Message("user", "<image>\nWhat is in this picture?")]), [images[0]]),
        (Conversation([Message("user", "Tell me a story about a very long day at the office.")]), []),
        (
            Conversation(
                [
                    Message("system", "Be brief."),
                    Message("user", "<image>\nFirst?"),
                    Message("assistant", "A lake."),
                    Message("user", "<image>\nAnd this one?"),
                ]
            ),
            [images[0], images[1]],
        ),
    ]


GREEDY = SamplingSettings(max_new_tokens=12)


def test_greedy_with_kv_cache_equals_greedy_without(generator, images):
    conversations, image_lists = zip(*prompts(images))
    cached = generator.complete(list(conversations), list(image_lists), GREEDY)
    uncached = generator.complete(list(conversations), list(image_lists), SamplingSettings(12, use_cache=False))
    assert [c.token_ids for c in cached] == [c.token_ids for c in uncached]
    assert all(len(set(c.token_ids)) > 3 for c in cached)


def test_batched_left_padded_generation_equals_one_by_one(generator, images):
    conversations, image_lists = zip(*prompts(images))
    batched = generator.complete(list(conversations), list(image_lists), GREEDY)
    alone = [generator.complete([c], [i], GREEDY)[0] for c, i in zip(conversations, image_lists)]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [c.prompt_tokens for c in batched] == [c.prompt_tokens for c in alone]


def test_stream_gives_the_same_answer_as_a_whole_completion(generator, images):
    for conversation, image_list in prompts(images):
        whole = generator.complete([conversation], [image_list], GREEDY)[0]
        stream = generator.stream(conversation, image_list, GREEDY)
        pieces = list(stream)
        assert pieces and "".join(pieces) == stream.completion.text == whole.text
        assert stream.completion.completion_tokens == whole.completion_tokens
        assert stream.completion.finish_reason == whole.finish_reason


def test_stream_leaves_out_whitespace_around_the_answer_as_a_completion_does(generator, images):
    conversation, image_list = prompts(images)[1]
    free = generator.complete([conversation], [image_list], GREEDY)[0].text
    stop = free.split(" ")[1]
    assert free[: free.index(stop)].endswith(" ")  # the text before the stop string ends in a space
    settings = SamplingSettings(max_new_tokens=12, stop=[stop])
    whole = generator.complete([conversation], [image_list], settings)[0]
    stream = generator.stream(conversation, image_list, settings)
    assert "".join(stream) == whole.text == free[: free.index(stop)].strip()


def test_an_answer_of_only_whitespace_streams_nothing(images):
    model = LlavaLiteModel.from_config(preset("tiny"))
    [newline] = model.tokenizer("\n", add_special_tokens=False)["input_ids"]
    generator = Generator(always_next(model, newline))
    conversation, image_list = prompts(images)[1]
    settings = SamplingSettings(max_new_tokens=6)
    whole = generator.complete([conversation], [image_list], settings)[0]
    assert whole.token_ids == [newline] * 6 and whole.text == ""
    stream = generator.stream(conversation, image_list, settings)
    assert list(stream) == [] and stream.completion.text == ""


def always_next(model: LlavaLiteModel, token: int) -> LlavaLiteModel:
    """The model with `token` the likeliest next token after anything, whatever its random weights."""
    head = model.language_model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[token] = 1e4
    head.register_forward_hook(lambda module, args, logits: logits + bias.to(logits))
    return model


def test_answer_ends_at_the_end_of_turn_token(images):
    model = LlavaLiteModel.from_config(preset("tiny"))
    always_next(model, model.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    completion = Generator(model).complete([prompts(images)[1][0]], [[]], SamplingSettings(max_new_tokens=20))[0]
    assert completion.finish_reason == "stop"
    assert completion.completion_tokens == 1 and completion.text == ""


def test_answer_cut_by_max_new_tokens_reports_length(generator, images):
    conversation, image_list = prompts(images)[1]
    completion = generator.complete([conversation], [image_list], SamplingSettings(max_new_tokens=3))[0]
    assert completion.finish_reason == "length"
    assert completion.completion_tokens == 3


def test_stop_string_ends_the_answer_before_it(generator, images):
    conversation, image_list = prompts(images)[1]
    free = generator.complete([conversation], [image_list], SamplingSettings(max_new_tokens=12))[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    assert len(stop) == 2
    cut = generator.complete([conversation], [image_list], SamplingSettings(max_new_tokens=12, stop=[stop]))[0]
    assert cut.text == free[: free.index(stop)].strip() and cut.finish_reason == "stop"
    streamed = generator.stream(conversation, image_list, SamplingSettings(max_new_tokens=12, stop=[stop]))
    assert "".join(streamed) == cut.text


def test_sampling_is_reproducible_for_a_seed_and_varies_across_seeds(generator, images):
    conversation, image_list = prompts(images)[1]

    def sample(seed):
        settings = SamplingSettings(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=seed)
        return generator.generate([conversation], [image_list], settings)[0]

    assert sample(1) == sample(1)
    assert len({sample(1), sample(2), sample(3)}) > 1


@pytest.fixture(scope="module")
def endless() -> Generator:
    """A model that never ends an answer by itself: its end-of-text and end-of-turn logits are 0, never the
    largest with these random weights."""
    torch.manual_seed(0)
    model = LlavaLiteModel.from_config(preset("tiny", language_model={"model_config": {"tie_word_embeddings": False}}))
    with torch.no_grad():
        for token in stop_token_ids(model.tokenizer, processor_for(model).template):
            model.language_model.get_output_embeddings().weight[token] = 0
    return Generator(model)


@pytest.mark.parametrize("how", ["answer", "iterator"])
def test_closing_a_stream_early_stops_generation_at_once(endless, images, how):
    conversation, image_list = prompts(images)[1]
    before = set(threading.enumerate())
    stream = endless.stream(conversation, image_list, SamplingSettings(max_new_tokens=5000))
    pieces = iter(stream)
    next(pieces)
    # A client that went away: the generation is cancelled and its thread has ended when `close` returns.
    (stream if how == "answer" else pieces).close()
    assert set(threading.enumerate()) <= before
    generated = stream.generated_tokens
    time.sleep(0.2)
    assert stream.generated_tokens == generated < 500


class StopRowsAfter(StoppingCriteria):
    """Ends the given rows once `after` tokens have been generated, as the server does for clients that left."""

    def __init__(self, rows: set[int], after: int) -> None:
        self.rows, self.after, self.calls = rows, after, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.tensor([self.calls >= self.after and row in self.rows for row in range(input_ids.shape[0])])


def test_stopping_criteria_end_answers_row_by_row_and_the_batch_once_all_are_done(generator, images):
    conversations, image_lists = (list(part) for part in zip(*prompts(images)[:2]))
    free = generator.complete(conversations, image_lists, GREEDY)
    assert all(len(c.token_ids) == 12 for c in free)  # neither ends by itself within 12 tokens

    one = StopRowsAfter({0}, 3)
    stopped, going = generator.complete(conversations, image_lists, GREEDY, [one])
    assert going.token_ids == free[1].token_ids  # the other answer is untouched
    assert stopped.token_ids[:3] == free[0].token_ids[:3]
    assert set(stopped.token_ids[3:]) == {generator.model.tokenizer.pad_token_id}  # then only padding

    both = StopRowsAfter({0, 1}, 3)
    generator.complete(conversations, image_lists, GREEDY, [both])
    assert both.calls == 3  # no token generated after every row was stopped

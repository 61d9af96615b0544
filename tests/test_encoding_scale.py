"""Encoding takes time linear in a conversation's length, and records far over `max_length` are cut (or refused)
from their character count before they are rendered and tokenized whole.

Timings are CPU time of this process (other work on a shared machine slows it less than wall time) and are
asserted with a wide margin; what makes encoding linear is checked exactly, by counting the template's renders.
"""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
from conftest import REAL_TOKENIZERS
from transformers import AutoTokenizer

import llava_lite.data.templates.tokenizer_template as tokenizer_template
from llava_lite.data.conversation import Conversation, Message
from llava_lite.data.errors import BadRecordError
from llava_lite.data.templates import TemplateError
from llava_lite.data.templates.tokenizer_template import TokenizerChatTemplate
from llava_lite.model.presets import preset
from llava_lite.model.processor_for_config import processor_for_config
from llava_lite.model.tiny_tokenizer import TINY_TOKENIZER_DIR


def turns(pairs: int, system: bool = False, ask: bool = False) -> list[Message]:
    messages = [Message("system", "Answer briefly.")] if system else []
    for i in range(pairs):
        messages.append(Message("user", f"What colour is thing number {i} in the picture?"))
        messages.append(Message("assistant", f"Thing {i} is red, with a few blue stripes across it."))
    return messages + ([Message("user", "And the last one?")] if ask else [])


def random_turns(rng: random.Random, pairs: int, system: bool, ask: bool) -> list[Message]:
    pieces = ["the", " cat", "  sat ", "\n", "on", "mat.", "é", "  ", "<b>", "42"]

    def text() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))).strip() or "x"

    roles = ["user", "assistant"] * pairs + (["user"] if ask else [])
    return ([Message("system", text())] if system else []) + [Message(role, text()) for role in roles]


def by_prefixes(template: TokenizerChatTemplate, messages: list[Message], generation_prompt: bool = False):
    """What rendering every prefix gives: the definition the one-render layout must agree with."""
    linear_from = tokenizer_template.LINEAR_FROM
    tokenizer_template.LINEAR_FROM = 10**9
    try:
        return template.render(messages, generation_prompt)
    finally:
        tokenizer_template.LINEAR_FROM = linear_from


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_one_render_gives_the_spans_of_rendering_every_prefix(name, real_tokenizers):
    template = TokenizerChatTemplate(real_tokenizers[name])
    rng = random.Random(0)
    for trial in range(8):
        messages = random_turns(rng, rng.randint(8, 14), system=trial % 2 == 0, ask=trial % 4 >= 2)
        for generation_prompt in (False, True):
            assert template.render(messages, generation_prompt) == by_prefixes(template, messages, generation_prompt)


def _counting(tokenizer):
    """Count the template's renders and the characters they write."""
    counts = {"renders": 0, "characters": 0}
    apply = tokenizer.apply_chat_template

    def counted(*args, **kwargs):
        text = apply(*args, **kwargs)
        counts["renders"] += 1
        counts["characters"] += len(text)
        return text

    tokenizer.apply_chat_template = counted
    return counts


@pytest.mark.parametrize("name", ["tiny", "qwen2.5"])
def test_a_long_conversation_is_rendered_a_fixed_number_of_times(name, real_tokenizers):
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR) if name == "tiny" else real_tokenizers[name]
    template = TokenizerChatTemplate(tokenizer)
    template.render(turns(20))  # the probe for this shape is laid out once, then kept
    counts = _counting(tokenizer)
    try:
        rendered = template.render(turns(2000), add_generation_prompt=True)
    finally:
        del tokenizer.apply_chat_template
    assert len(rendered.assistant_spans) == 2000
    assert counts["renders"] == 3  # the conversation, with markers for its contents, and with the generation prompt
    assert counts["characters"] <= 3 * len(rendered.text)


def test_a_template_that_changes_between_turns_is_laid_out_by_prefixes_up_to_a_limit():
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    tokenizer.chat_template = (
        "{% for m in messages %}[Round {{ loop.index }}] {{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n"
        "{% endfor %}{% if add_generation_prompt %}[Round {{ messages|length + 1 }}] assistant: {% endif %}"
    )
    template = TokenizerChatTemplate(tokenizer)
    messages = turns(20)
    assert template._layout_by_glues(messages) is None  # the glue numbers its rounds: no single layout fits
    rendered = template.render(messages)
    for message, (start, end) in zip(messages[1::2], rendered.assistant_spans):
        assert rendered.text[start:end] == f"{message.content}<|endoftext|>"
    limit = tokenizer_template.MAX_PREFIX_MESSAGES
    with pytest.raises(TemplateError, match=f"at most {limit} messages"):
        template.render(turns(limit // 2 + 1))


def _cpu_seconds(processor, conversation: Conversation, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        processor.encode(conversation)
        best = min(best, time.process_time() - start)
    return best


def test_encoding_time_grows_linearly_with_the_turns():
    processor = processor_for_config(preset("tiny"))
    processor.encode(Conversation(turns(20)))
    seconds = {pairs: _cpu_seconds(processor, Conversation(turns(pairs)), 2) for pairs in (250, 1000, 4000)}
    # Linear: x4 the turns, about x4 the time; the square would be x16. The bound is 5 s for 4,000 pairs
    # on this machine; a shared machine gets twice that.
    assert seconds[4000] / seconds[1000] < 8, seconds
    assert seconds[1000] / seconds[250] < 8, seconds
    assert seconds[4000] < 10, seconds


def test_a_record_far_over_max_length_keeps_the_first_tokens_of_the_whole_record():
    whole = processor_for_config(preset("tiny"))
    cut = processor_for_config(preset("tiny"), max_length=300)
    conversation = Conversation(turns(1500))
    expected, got = whole.encode(conversation), cut.encode(conversation)
    assert np.array_equal(got.input_ids, expected.input_ids[:300])
    assert np.array_equal(got.labels, expected.labels[:300])


def test_huge_records_are_cut_or_refused_in_moments():
    huge = [Conversation(turns(10_000), source="r1"), Conversation(turns(1) + [Message("user", "x" * 50_000_000)])]
    cut = processor_for_config(preset("tiny"), max_length=512)
    drop = processor_for_config(preset("tiny"), max_length=512, overflow="drop")
    for conversation in huge:
        start = time.process_time()
        assert len(cut.encode(conversation).input_ids) == 512
        with pytest.raises(BadRecordError, match="characters cannot fit in max_length 512 tokens") as refused:
            drop.encode(conversation)
        assert refused.value.reason == "too_long"
        assert time.process_time() - start < 2


def test_training_on_a_ten_thousand_turn_record_starts_within_seconds(tmp_path):
    from llava_lite.config_io import from_dict
    from llava_lite.train.config import TrainConfig
    from llava_lite.train.run import run_training

    conversations = [
        {"from": role, "value": text} for m in turns(10_000) for role, text in [(_ROLES[m.role], m.content)]
    ]
    records = [{"id": "huge", "conversations": conversations}, {"id": "small", "conversations": conversations[:2]}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    config = from_dict(
        TrainConfig,
        {
            "recipe": "stage2",
            "model": "tiny",
            "output_dir": str(tmp_path / "run"),
            "data": {"sources": [{"path": str(data)}], "max_length": 256},
            "train": {"max_steps": 1, "batch_size": 2, "report_to": "none", "save_steps": 100},
        },
    )
    start = time.monotonic()
    run_training(config)
    assert time.monotonic() - start < 60
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 1


_ROLES = {"user": "human", "assistant": "gpt"}

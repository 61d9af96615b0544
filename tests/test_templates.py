"""Chat templates and label masking against real tokenizers and real multi-turn LLaVA records."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from conftest import REAL_TOKENIZERS, fixture_path
from transformers import AutoTokenizer

from llava_lite.data.conversation import Message
from llava_lite.data.formats import parse_record
from llava_lite.data.masking import IGNORE_INDEX, tokenize_rendered
from llava_lite.data.templates import BUILTIN_FORMATS, TemplateError, get_template
from llava_lite.data.templates.tokenizer_template import TokenizerChatTemplate
from llava_lite.model.tiny_tokenizer import TINY_TOKENIZER_DIR

BUILTINS = list(BUILTIN_FORMATS)
SYSTEM = "You are a careful visual assistant."


def real_conversations(count: int = 3) -> list[list[Message]]:
    """The first records of the real LLaVA-Instruct fixture (8-10 turns each), with a system message added."""
    records = json.loads(fixture_path("data", "llava_instruct_100.json").read_text())
    conversations = []
    for index, record in enumerate(records[:count]):
        messages = parse_record(record, f"record {index}").messages
        conversations.append([Message("system", SYSTEM), *messages])
    return conversations


def prepared(tokenizer, template_name: str):
    """A copy of the tokenizer with <image> and the template's markers added, as the model prepares it."""
    extra = ("<image>", *BUILTIN_FORMATS.get(template_name, BUILTIN_FORMATS["plain"]).special_tokens)
    return _prepared(tokenizer.name_or_path, extra)


@functools.cache
def _prepared(path: str, extra: tuple[str, ...]):
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_tokens([t for t in extra if t not in tokenizer.get_vocab()], special_tokens=True)
    return tokenizer


def trained_runs(labels: np.ndarray) -> list[np.ndarray]:
    """Indices of each maximal run of trained tokens."""
    trained = np.flatnonzero(labels != IGNORE_INDEX)
    if len(trained) == 0:
        return []
    return np.split(trained, np.flatnonzero(np.diff(trained) > 1) + 1)


def check_masking(tokenizer, template, messages: list[Message]) -> None:
    rendered = template.render(messages)
    tokens = tokenize_rendered(tokenizer, rendered)
    assistant = [m for m in messages if m.role == "assistant"]
    runs = trained_runs(tokens.labels)
    # One trained run per assistant message, in order, each decoding to the message and its end marker.
    assert len(runs) == len(assistant) == len(rendered.assistant_spans)
    for message, run, (start, end) in zip(assistant, runs, rendered.assistant_spans):
        span_text = rendered.text[start:end]
        if isinstance(template, TokenizerChatTemplate):  # real templates may trim the message
            said = span_text.lstrip()  # whitespace between the generation prompt and the message
            assert said.startswith(message.content.strip())
            assert said[len(message.content.strip()) :].strip() == template.end_of_turn
        else:
            assert span_text == template.assistant_text(message.content)
            assert span_text.endswith(template.end_of_turn)
        decoded = tokenizer.decode(tokens.input_ids[run], clean_up_tokenization_spaces=False)
        assert decoded.strip() == span_text.strip()
    # The ids the labels were computed on are exactly what the tokenizer gives for the rendered text.
    again = tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
    assert again == tokens.input_ids.tolist()
    assert np.array_equal(tokens.labels[tokens.labels != IGNORE_INDEX], tokens.input_ids[tokens.labels != IGNORE_INDEX])


@pytest.mark.parametrize("template_name", BUILTINS)
@pytest.mark.parametrize("tokenizer_name", REAL_TOKENIZERS)
def test_builtin_template_trains_exactly_the_assistant_messages(real_tokenizers, tokenizer_name, template_name):
    tokenizer = prepared(real_tokenizers[tokenizer_name], template_name)
    template = get_template(template_name, tokenizer)
    for messages in real_conversations():
        check_masking(tokenizer, template, messages)


@pytest.mark.parametrize("tokenizer_name", REAL_TOKENIZERS)
def test_tokenizer_own_template_trains_exactly_the_assistant_messages(real_tokenizers, tokenizer_name):
    tokenizer = prepared(real_tokenizers[tokenizer_name], "tokenizer")
    template = get_template("tokenizer", tokenizer)
    for messages in real_conversations():
        check_masking(tokenizer, template, messages)


def test_tiny_tokenizer_own_template_trains_exactly_the_assistant_messages():
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    for messages in real_conversations():
        check_masking(tokenizer, get_template("auto", tokenizer), messages)


@pytest.mark.parametrize("tokenizer_name", REAL_TOKENIZERS)
@pytest.mark.parametrize("template_name", ["tokenizer", *BUILTINS])
def test_no_system_or_user_text_is_trained(real_tokenizers, tokenizer_name, template_name):
    tokenizer = prepared(real_tokenizers[tokenizer_name], template_name)
    template = get_template(template_name, tokenizer)
    messages = real_conversations(1)[0]
    tokens = tokenize_rendered(tokenizer, template.render(messages))
    trained = tokens.labels != IGNORE_INDEX
    trained_text = tokenizer.decode(tokens.input_ids[trained])
    ignored_text = tokenizer.decode(tokens.input_ids[~trained])
    for message in messages:
        if message.role == "assistant":
            continue
        words = message.content.replace("<image>", "").strip()
        if template_name == "plain":  # stage 1 drops instruction text; only the image placeholders remain
            assert words not in trained_text
            continue
        assert words not in trained_text
        assert words.split()[-1] in ignored_text
    assert "<image>" not in trained_text


ANSWERS = ["The man is ironing clothes.", "42 of them.", "他们在庆祝。", " Leading space kept."]


@pytest.mark.parametrize("answer", ANSWERS)
@pytest.mark.parametrize("template_name", ["tokenizer", *BUILTINS])
@pytest.mark.parametrize("tokenizer_name", [*REAL_TOKENIZERS, "tiny"])
def test_generation_prompt_tokenizes_as_the_trained_prefix(real_tokenizers, tokenizer_name, template_name, answer):
    # What inference feeds the model must be token for token what training saw before the answer,
    # and the first trained token must be the first one the model generates.
    source = real_tokenizers.get(tokenizer_name) or AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    tokenizer = prepared(source, template_name)
    template = get_template(template_name, tokenizer)
    history = real_conversations(1)[0][:2]
    full = tokenize_rendered(tokenizer, template.render([*history, Message("assistant", answer)]))
    prompt = template.render(history, add_generation_prompt=True).text
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert full.input_ids[: len(prompt_ids)].tolist() == prompt_ids
    assert np.flatnonzero(full.labels != IGNORE_INDEX)[0] == len(prompt_ids)


def test_builtin_llama2_renders_like_the_real_llama2_template(real_tokenizers):
    tokenizer = real_tokenizers["llama2"]
    messages = real_conversations(1)[0]
    ours = get_template("llama2", tokenizer).render(messages).text
    theirs = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages], tokenize=False)
    assert ours == theirs


def test_builtin_chatml_renders_like_the_real_qwen_template(real_tokenizers):
    tokenizer = real_tokenizers["qwen2.5"]
    messages = real_conversations(1)[0]
    ours = get_template("chatml", tokenizer).render(messages).text
    theirs = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages], tokenize=False)
    assert ours == theirs


def test_vicuna_v1_matches_llava_v1_layout(real_tokenizers):
    tokenizer = real_tokenizers["llama2"]
    messages = [Message("user", "<image>\nHi?"), Message("assistant", "Hello."), Message("user", "Bye?")]
    text = get_template("vicuna_v1", tokenizer).render(messages, add_generation_prompt=True).text
    assert text == (
        "<s>A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nHi? ASSISTANT: Hello.</s>"
        "USER: Bye? ASSISTANT:"
    )


def test_plain_template_keeps_only_images_and_caption(real_tokenizers):
    tokenizer = real_tokenizers["qwen2.5"]
    messages = [Message("user", "Describe the image briefly.\n<image>"), Message("assistant", "A red bus.")]
    rendered = get_template("plain", tokenizer).render(messages)
    assert rendered.text == "<image>\nA red bus.<|im_end|>"
    start, end = rendered.assistant_spans[0]
    assert rendered.text[start:end] == "A red bus.<|im_end|>"


def test_json_template_escapes_content_and_masks_the_escaped_text(real_tokenizers):
    tokenizer = real_tokenizers["qwen2.5"]
    answer = 'He said "hi"\nthen left.'
    rendered = get_template("json", tokenizer).render([Message("user", "Q?"), Message("assistant", answer)])
    start, end = rendered.assistant_spans[0]
    assert rendered.text[start:end] == " " + json.dumps(answer) + "}<|im_end|>"
    user_line, assistant_line = rendered.text.splitlines()
    assert json.loads(user_line) == {"role": "user", "content": "Q?"}
    assert json.loads(assistant_line.removesuffix("<|im_end|>")) == {"role": "assistant", "content": answer}


def test_template_that_rewrites_history_is_refused(real_tokenizers):
    tokenizer = AutoTokenizer.from_pretrained(real_tokenizers["qwen2.5"].name_or_path)
    # Shows only the last message: adding a turn rewrites everything before it.
    tokenizer.chat_template = "{{ messages[-1]['role'] }}: {{ messages[-1]['content'] }}<|im_end|>"
    with pytest.raises(TemplateError, match="rewrites earlier text"):
        TokenizerChatTemplate(tokenizer)


def test_roles_out_of_order_are_refused(real_tokenizers):
    template = get_template("chatml", real_tokenizers["qwen2.5"])
    with pytest.raises(TemplateError, match="expected user"):
        template.render([Message("assistant", "Hi"), Message("user", "Hello")])


def test_unknown_template_name_is_refused(real_tokenizers):
    with pytest.raises(TemplateError, match="unknown chat template"):
        get_template("vicuna_v9", real_tokenizers["qwen2.5"])


@pytest.mark.parametrize(
    ("template_name", "visible"),
    [("chatml", ""), ("llama2", ""), ("xml", "</assistant>"), ("json", '"}'), ("tokenizer", "")],
)
def test_visible_end_of_turn_is_what_decoding_without_special_tokens_leaves(real_tokenizers, template_name, visible):
    tokenizer = prepared(real_tokenizers["qwen2.5"], template_name)
    template = get_template(template_name, tokenizer)
    assert template.visible_end_of_turn == visible
    question = [Message("user", "What is this?")]
    prompt = template.render(question, add_generation_prompt=True).text
    said = template.render([*question, Message("assistant", "A red bus.")]).text[len(prompt) :]
    decoded = tokenizer.decode(tokenizer(said, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
    assert decoded.strip().endswith(visible)
    assert template.answer_from(decoded) == "A red bus."


@pytest.mark.parametrize("tokenizer_name", REAL_TOKENIZERS)
def test_an_empty_earlier_answer_renders_with_an_empty_span_at_the_end_of_its_generation_prompt(
    real_tokenizers, tokenizer_name
):
    # A model's empty first answer stays in the context of the second turn (MT-Bench asks turn 2 after it).
    tokenizer = prepared(real_tokenizers[tokenizer_name], "tokenizer")
    template = get_template("tokenizer", tokenizer)
    messages = [Message("user", "Name a colour."), Message("assistant", ""), Message("user", "And another?")]
    rendered = template.render(messages, add_generation_prompt=True)
    as_dicts = [{"role": m.role, "content": m.content} for m in messages]
    assert rendered.text == tokenizer.apply_chat_template(as_dicts, tokenize=False, add_generation_prompt=True)
    ((start, end),) = rendered.assistant_spans
    assert start == len(tokenizer.apply_chat_template(as_dicts[:1], tokenize=False, add_generation_prompt=True))
    assert start <= end <= rendered.text.index("And another?")  # only the end-of-turn marker, if any

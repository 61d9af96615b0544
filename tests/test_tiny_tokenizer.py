"""The shipped tiny tokenizer is exactly what its documented build gives, and works as a chat tokenizer."""

from __future__ import annotations

import json

from transformers import AutoTokenizer

from llava_lite.model.tiny_tokenizer import TINY_TOKENIZER_DIR, write_tiny_tokenizer


def test_shipped_tokenizer_is_what_the_build_script_writes(tmp_path):
    write_tiny_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((TINY_TOKENIZER_DIR / name).read_text())


def test_tiny_tokenizer_round_trips_any_text():
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    text = "Ünïcödé, 数字 42 and a red circle!\n\ttab"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_tiny_tokenizer_has_a_chatml_template_with_single_token_markers():
    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 1
    assert tokenizer.eos_token == "<|im_end|>"

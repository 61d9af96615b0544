"""The small tokenizer shipped in the package, for tiny offline models, and how it is built.

Origin: a byte-level BPE (vocabulary 1024, so any text still encodes) trained with the `tokenizers`
library on the corpus below - English words and sentences written for this project, no outside data -
with three ChatML special tokens and a ChatML chat template. `tools/build_tiny_tokenizer.py` rebuilds it;
a test checks that the shipped files are exactly what that build gives.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink", "brown"]
_SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "rectangle", "line", "dot"]
_PLACES = ["left", "right", "top", "bottom", "center", "middle", "corner", "edge", "side", "background"]
_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_NOUNS = [
    "image",
    "picture",
    "photo",
    "man",
    "woman",
    "person",
    "people",
    "child",
    "dog",
    "cat",
    "car",
    "bus",
    "street",
    "table",
    "room",
    "tree",
    "water",
    "sky",
    "food",
    "plate",
    "window",
    "door",
    "building",
    "city",
    "road",
    "field",
    "ball",
    "bird",
    "horse",
    "train",
    "boat",
    "kitchen",
    "chair",
    "house",
    "hand",
    "shirt",
    "object",
    "question",
    "answer",
    "scene",
    "color",
    "shape",
    "size",
    "number",
    "group",
    "area",
    "day",
]
_VERBS = [
    "is",
    "are",
    "was",
    "has",
    "have",
    "shows",
    "show",
    "see",
    "look",
    "sitting",
    "standing",
    "holding",
    "wearing",
    "walking",
    "playing",
    "eating",
    "riding",
    "looking",
    "describe",
    "tell",
    "explain",
    "count",
    "think",
    "can",
    "could",
    "would",
    "should",
    "do",
    "does",
    "make",
    "take",
    "help",
    "find",
    "give",
]
_SMALL = [
    "the",
    "a",
    "an",
    "of",
    "in",
    "on",
    "at",
    "to",
    "with",
    "and",
    "or",
    "but",
    "is",
    "it",
    "this",
    "that",
    "there",
    "what",
    "which",
    "where",
    "how",
    "many",
    "why",
    "who",
    "yes",
    "no",
    "not",
    "some",
    "all",
    "they",
    "he",
    "she",
    "you",
    "we",
    "i",
    "its",
    "their",
    "from",
    "by",
    "for",
    "as",
    "be",
    "near",
    "next",
    "above",
    "below",
    "behind",
    "front",
    "large",
    "small",
    "big",
    "little",
    "bright",
    "dark",
    "other",
]


def _corpus() -> list[str]:
    lines = []
    for colour, shape in itertools.product(_COLOURS, _SHAPES):
        lines.append(f"There is a {colour} {shape} in the image.")
        lines.append(f"What color is the {shape}? The {shape} is {colour}.")
        lines.append(f"A {colour} {shape}.")
    for shape, place in itertools.product(_SHAPES, _PLACES):
        lines.append(f"Where is the {shape}? It is on the {place} of the picture.")
    for number, shape in itertools.product(_NUMBERS, _SHAPES):
        lines.append(f"How many {shape}s are there? There are {number} {shape}s.")
    for noun, verb in itertools.product(_NOUNS, _VERBS):
        lines.append(f"The {noun} {verb} in the {_PLACES[len(noun) % len(_PLACES)]}.")
    lines.append(" ".join(_SMALL))
    lines.extend(f"{word.capitalize()} {word}, {word}. {word}? {word}!" for word in _SMALL + _NOUNS + _VERBS)
    lines.extend(str(n) for n in range(0, 1000, 7))
    lines.extend(f"{role}\n{role}:" for role in ("system", "user", "assistant") for _ in range(20))
    lines.append("Describe the image in detail. Answer the question using a single word or phrase.")
    return lines


def build_tiny_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write_tiny_tokenizer(folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().save(str(folder / "tokenizer.json"), pretty=True)
    text = json.dumps(tokenizer_config(), indent=2) + "\n"
    (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")

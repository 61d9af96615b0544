"""Preference pairs - a prompt with its images, a chosen and a rejected answer - read from the formats the peers write.

Each record is recognised by its keys (one data file may even mix them):
- TRL's preference rows (first-class: `llava-lite data pairs` writes them): `prompt` (a list of messages, or a
  string), `chosen` and `rejected` (a list holding one assistant message, or a string), `images` or `image`; a
  message's content is a string with `<image>` placeholders or parts, `{"type": "image"}` standing for the next of
  the record's images. Without `prompt`, `chosen` and `rejected` are whole conversations and their shared start is
  the prompt (TRL's implicit prompt).
- RLAIF-V's rows: `image`, `question`, `chosen`, `rejected` (strings); a question without a placeholder gets the
  image before it, LLaVA's layout.
- LLaVA-RLHF's human preference rows: `image`, `conversations` (the prompt, LLaVA's `{from, value}` turns),
  `output_1` / `output_2` (`{"value"}`), `preference` (1 or 2: which output is preferred).
- LLaMA-Factory's ranking rows: `conversations` (or `messages`), `chosen` / `rejected` (`{"from", "value"}`),
  `images`.

Reading goes through the same row readers, role names, column mapping and image resolution as instruction data
(`llava_lite.data.formats`): images resolve inside the image folder, never outside it. A bad pair is a
`BadRecordError` naming the file and record, or under `on_bad_record: skip` a skip counted by its reason:
`no_chosen` / `no_rejected`, `identical_answers`, `image_count_mismatch` (placeholders and images differ, or an
answer holds a placeholder), `prompt_not_ending_on_user`, and `malformed`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from llava_lite.data.config import DataConfig, DataSource
from llava_lite.data.conversation import IMAGE_PLACEHOLDER, Conversation, Message, images_first
from llava_lite.data.errors import BadRecordError
from llava_lite.data.formats import DEFAULT_ROLES, image_list, parse_message, read_source, read_sources


@dataclass
class PreferencePair:
    """A prompt (messages ending on the user's turn, its images' placeholders in it) and two answers to it."""

    prompt: list[Message]
    chosen: str
    rejected: str
    images: list[str] = field(default_factory=list)  # in placeholder order; absolute once read from a source
    id: str | None = None
    source: str = "<memory>"

    def conversation(self, answer: str) -> Conversation:
        """The prompt followed by `answer` as the assistant's turn."""
        return Conversation([*self.prompt, Message("assistant", answer)], list(self.images), self.id, self.source)


def load_pairs(data: DataConfig) -> tuple[list[PreferencePair], Counter]:
    """Every source's pairs, in order, and the pairs skipped while reading them, by reason."""
    if not data.sources:
        raise ValueError("data: no sources given")
    return read_sources(data.sources, data.on_bad_record, data.check_images_exist, read=read_pairs)


def read_pairs(
    source: DataSource, on_bad_record: str = "error", check_images_exist: bool = True
) -> tuple[list[PreferencePair], Counter]:
    """Every pair of one source, images resolved inside its image folder, and the pairs skipped, by reason."""
    return read_source(source, on_bad_record, check_images_exist, parse=parse_pair)


def parse_pair(row: Any, where: str, roles: dict[str, str] | None = None) -> PreferencePair:
    """One raw record of any of the four formats as a checked PreferencePair (image paths as the record gives them)."""
    roles = roles or DEFAULT_ROLES
    if not isinstance(row, dict):
        raise BadRecordError(where, "malformed", f"a record must be an object, got {type(row).__name__}")
    if row.get("id") is not None:
        where = f"{where} (id {row['id']})"
    if "prompt" in row:
        pair = _trl(row, where, roles)
    elif "question" in row:
        pair = _rlaif_v(row, where)
    elif {"output_1", "output_2", "preference"} & set(row):
        pair = _llava_rlhf(row, where, roles)
    elif "conversations" in row or "messages" in row:
        pair = _llama_factory(row, where, roles)
    elif "chosen" in row or "rejected" in row:
        pair = _trl_implicit_prompt(row, where, roles)
    else:
        raise BadRecordError(
            where,
            "malformed",
            "not a preference record: expected prompt/chosen/rejected (TRL), question/chosen/rejected (RLAIF-V), "
            "conversations/output_1/output_2/preference (LLaVA-RLHF) or conversations/chosen/rejected (LLaMA-Factory)",
        )
    pair.id = None if row.get("id") is None else str(row["id"])
    check_pair(pair)
    return pair


def check_pair(pair: PreferencePair) -> None:
    """The checks every pair passes, whatever its format: a BadRecordError naming what is wrong."""
    where = pair.source
    if not pair.prompt or pair.prompt[-1].role != "user":
        last = pair.prompt[-1].role if pair.prompt else "nothing"
        raise BadRecordError(where, "prompt_not_ending_on_user", f"the prompt must end on the user's turn, not {last}")
    for name, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        if IMAGE_PLACEHOLDER in answer:
            raise BadRecordError(where, "image_count_mismatch", f"the {name} answer holds an {IMAGE_PLACEHOLDER}")
    if pair.chosen.strip() == pair.rejected.strip():
        raise BadRecordError(where, "identical_answers", "the chosen and the rejected answer are the same")
    placeholders = sum(message.content.count(IMAGE_PLACEHOLDER) for message in pair.prompt)
    if placeholders != len(pair.images):
        raise BadRecordError(
            where,
            "image_count_mismatch",
            f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(pair.images)} image(s)",
        )


# ----- the four formats ---------------------------------------------------------------------------------------
def _trl(row: dict, where: str, roles: dict[str, str]) -> PreferencePair:
    images = image_list(row.get("images", row.get("image")), where)
    prompt = row["prompt"]
    if isinstance(prompt, str):
        messages = [Message("user", prompt)]
    else:
        messages = _messages(prompt, where, roles, images, "prompt")
    chosen = _answer(row.get("chosen"), where, roles, "chosen")
    rejected = _answer(row.get("rejected"), where, roles, "rejected")
    return PreferencePair(messages, chosen, rejected, images, source=where)


def _trl_implicit_prompt(row: dict, where: str, roles: dict[str, str]) -> PreferencePair:
    images: list[str] = image_list(row.get("images", row.get("image")), where)
    for name in ("chosen", "rejected"):
        if not row.get(name):
            raise BadRecordError(where, f"no_{name}", f"no {name} answer (`{name}` is missing or empty)")
    chosen = _messages(row["chosen"], where, roles, images, "chosen")
    rejected = _messages(row["rejected"], where, roles, [], "rejected")  # the shared prompt's images, read once
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if (len(chosen), len(rejected)) != (shared + 1, shared + 1):
        raise BadRecordError(
            where, "malformed", "chosen and rejected must be one conversation that differs in its last answer only"
        )
    answers = _text_of(chosen[-1], where, "chosen"), _text_of(rejected[-1], where, "rejected")
    return PreferencePair(chosen[:shared], *answers, images, source=where)


def _rlaif_v(row: dict, where: str) -> PreferencePair:
    image = row.get("image", row.get("image_path"))
    if isinstance(image, dict):  # a `datasets` Image column read without decoding: {"bytes", "path"}
        image = image.get("path")
    if image is not None and not isinstance(image, str):
        raise BadRecordError(where, "malformed", "`image` must be a path inside the image folder")
    images = [image] if image else []
    question = row["question"]
    if not isinstance(question, str) or not question.strip():
        raise BadRecordError(where, "malformed", "`question` must be a non-empty string")
    if IMAGE_PLACEHOLDER not in question:
        question = images_first(question, len(images))
    chosen = _answer(row.get("chosen"), where, DEFAULT_ROLES, "chosen")
    rejected = _answer(row.get("rejected"), where, DEFAULT_ROLES, "rejected")
    return PreferencePair([Message("user", question)], chosen, rejected, images, source=where)


def _llava_rlhf(row: dict, where: str, roles: dict[str, str]) -> PreferencePair:
    images = image_list(row.get("images", row.get("image")), where)
    prompt = _messages(row.get("conversations"), where, roles, images, "conversations")
    preference = row.get("preference")
    if preference not in (1, 2, "1", "2"):
        raise BadRecordError(
            where, "malformed", f"`preference` must be 1 or 2 (which output is preferred), got {preference!r}"
        )
    outputs = {}
    for number in (1, 2):
        output = row.get(f"output_{number}")
        outputs[number] = output.get("value") if isinstance(output, dict) else output
    better = int(preference)
    chosen = _answer(outputs[better], where, roles, "chosen", f"output_{better}")
    rejected = _answer(outputs[3 - better], where, roles, "rejected", f"output_{3 - better}")
    return PreferencePair(prompt, chosen, rejected, images, source=where)


def _llama_factory(row: dict, where: str, roles: dict[str, str]) -> PreferencePair:
    images = image_list(row.get("images", row.get("image")), where)
    prompt = _messages(row.get("conversations", row.get("messages")), where, roles, images, "conversations")
    chosen = _answer(row.get("chosen"), where, roles, "chosen")
    rejected = _answer(row.get("rejected"), where, roles, "rejected")
    return PreferencePair(prompt, chosen, rejected, images, source=where)


# ----- pieces -------------------------------------------------------------------------------------------------
def _messages(turns: Any, where: str, roles: dict[str, str], images: list[str], name: str) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise BadRecordError(where, "malformed", f"`{name}` must be a non-empty list of messages")
    messages = [parse_message(turn, number, where, roles, images) for number, turn in enumerate(turns, 1)]
    # A system message leads, then user and assistant alternate, as the templates render them.
    for index, message in enumerate(messages):
        expected = ("user", "assistant")[(index - (messages[0].role == "system")) % 2]
        if message.role != expected and not (index == 0 and message.role == "system"):
            raise BadRecordError(
                where, "malformed", f"`{name}` message {index + 1} is from {message.role}, expected {expected}"
            )
    return messages


def _answer(value: Any, where: str, roles: dict[str, str], name: str, key: str | None = None) -> str:
    """One answer: a string, an assistant message `{from|role, value|content}`, or a list holding one."""
    key = key or name
    if isinstance(value, list):
        if len(value) != 1:
            raise BadRecordError(where, "malformed", f"`{key}` must hold one assistant message, not {len(value)}")
        value = value[0]
    if isinstance(value, dict):
        message = parse_message(value, 1, where, roles, [])
        if message.role != "assistant":
            raise BadRecordError(where, "malformed", f"`{key}` is from {message.role}, not the assistant")
        value = message.content
    if value is None or (isinstance(value, str) and not value.strip()):
        raise BadRecordError(where, f"no_{name}", f"no {name} answer (`{key}` is missing or empty)")
    if not isinstance(value, str):
        raise BadRecordError(where, "malformed", f"`{key}` must be a string or an assistant message")
    return value


def _text_of(message: Message, where: str, name: str) -> str:
    if message.role != "assistant":
        raise BadRecordError(where, "malformed", f"`{name}` must end on an assistant message")
    if not message.content.strip():
        raise BadRecordError(where, f"no_{name}", f"no {name} answer (its last message is empty)")
    return message.content

"""Prompts per kind: a system message and worked examples, as YAML files in this folder or in a user's own folder.

A kind's chat is: the system message, then each example as a user turn (its context) and an assistant turn
(its reply), then the image's own context - few-shot, as LLaVA prompted GPT-4. A folder given by the user
replaces the built-in file of every kind it has a file for (`conversation.yaml`, ..., `judge.yaml`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

KINDS = ("conversation", "detail", "reasoning")
JUDGE = "judge"


@dataclass(frozen=True)
class PromptSet:
    kind: str
    system: str
    examples: tuple[tuple[str, str], ...] = ()  # (context, reply) pairs
    questions: tuple[str, ...] = ()  # detail: the user turns a description answers
    request: str = "{context}"  # judge: the user turn, filled with {context} and {dialogue}
    text: str = field(default="", repr=False)  # the file as read, for the run's fingerprint

    def messages(self, context: str) -> list[dict[str, str]]:
        """The chat for one image: system, the worked examples, then this image's context."""
        messages = [{"role": "system", "content": self.system}]
        for example_context, reply in self.examples:
            messages += [{"role": "user", "content": example_context}, {"role": "assistant", "content": reply}]
        messages.append({"role": "user", "content": context})
        return messages


def load_prompts(kinds: list[str], folder: str | None = None) -> dict[str, PromptSet]:
    """The prompt set of each kind: from `folder` where it has `KIND.yaml`, else the built-in one."""
    if folder is not None and not Path(folder).is_dir():
        raise ValueError(f"{folder}: no such prompts folder")
    prompts = {}
    for kind in kinds:
        user_file = Path(folder) / f"{kind}.yaml" if folder else None
        if user_file is not None and user_file.is_file():
            prompts[kind] = _parse(kind, user_file.read_text(encoding="utf-8"), str(user_file))
        else:
            text = resources.files(__package__).joinpath(f"{kind}.yaml").read_text(encoding="utf-8")
            prompts[kind] = _parse(kind, text, "built-in")
    return prompts


def fingerprint(prompts: dict[str, PromptSet]) -> str:
    digest = hashlib.sha256()
    for kind in sorted(prompts):
        digest.update(f"{kind}\0{prompts[kind].text}\0".encode())
    return digest.hexdigest()[:16]


def _parse(kind: str, text: str, origin: str) -> PromptSet:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{origin} ({kind}): not valid YAML ({str(err).splitlines()[0]})") from None
    where = f"{origin} ({kind} prompts)"
    if not isinstance(data, dict) or not isinstance(data.get("system"), str) or not data["system"].strip():
        raise ValueError(f"{where}: needs a `system` message")
    examples = []
    for number, example in enumerate(data.get("examples") or [], 1):
        if not isinstance(example, dict) or not all(isinstance(example.get(k), str) for k in ("context", "reply")):
            raise ValueError(f"{where}: example {number} needs `context` and `reply` texts")
        examples.append((example["context"].strip(), example["reply"].strip()))
    questions = data.get("questions") or []
    if not isinstance(questions, list) or not all(isinstance(q, str) and q.strip() for q in questions):
        raise ValueError(f"{where}: `questions` must be a list of texts")
    if kind == "detail" and not questions:
        raise ValueError(f"{where}: detail prompts need `questions` (the instructions a description answers)")
    request = data.get("request", "{context}")
    if kind == JUDGE and ("{context}" not in request or "{dialogue}" not in request):
        raise ValueError(f"{where}: the judge's `request` must hold {{context}} and {{dialogue}}")
    return PromptSet(kind, data["system"].strip(), tuple(examples), tuple(q.strip() for q in questions), request, text)

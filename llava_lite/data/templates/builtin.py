"""Built-in chat templates for base models, written as data: how each turn is wrapped.

Every built-in template ends an assistant turn with one token (the tokenizer's EOS or `<|im_end|>`),
so a model trained with it stops with plain `eos_token_id`, in our generator or in any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from llava_lite.data.conversation import IMAGE_PLACEHOLDER, Message
from llava_lite.data.templates.base import ChatTemplate, RenderedConversation, TemplateError, check_roles


@dataclass(frozen=True)
class TurnFormat:
    """How one template writes each part. `{content}`, `{bos}` and `{eos}` are filled in at render time."""

    system: str = "{content}"
    user: str = "{content}"
    assistant_prefix: str = ""
    # How the answer itself is written; the trained span starts here.
    assistant_body: str = "{content}"
    # The end-of-turn marker; trained together with the assistant's words so the model learns to stop.
    assistant_suffix: str = "{eos}"
    # Text after the marker that is not trained (a newline between turns).
    assistant_after: str = ""
    # What inference appends to ask for an answer; defaults to `assistant_prefix`, of which it must be
    # the start. Training starts exactly where it ends, so the model learns whatever follows it. A header
    # ending in a space leaves the space out: tokenizers fold it into the first word (" The").
    generation_prompt: str | None = None
    default_system: str | None = None
    # Llama-2 folds the system prompt into the first user message instead of a turn of its own.
    system_in_first_user: str | None = None
    # Start the text with the tokenizer's BOS when its plain encoding would add one.
    bos: bool = True
    json_content: bool = False
    # Stage-1 captioning: user turns keep only their image placeholders (LLaVA's `plain`).
    images_only_user: bool = False
    special_tokens: tuple[str, ...] = ()


_VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

BUILTIN_FORMATS: dict[str, TurnFormat] = {
    "plain": TurnFormat(user="{content}\n", images_only_user=True),
    "chatml": TurnFormat(
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>",
        assistant_after="\n",
        special_tokens=("<|im_start|>", "<|im_end|>"),
    ),
    "llama2": TurnFormat(
        user="{bos}[INST] {content} [/INST]",
        assistant_prefix=" ",
        assistant_suffix=" {eos}",
        generation_prompt="",
        system_in_first_user="<<SYS>>\n{system}\n<</SYS>>\n\n",
        bos=False,
    ),
    "vicuna_v1": TurnFormat(
        system="{content} ",
        user="USER: {content} ",
        assistant_prefix="ASSISTANT: ",
        generation_prompt="ASSISTANT:",
        default_system=_VICUNA_SYSTEM,
    ),
    "alpaca": TurnFormat(
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        assistant_prefix="### Response:\n",
        assistant_after="\n\n",
        default_system=_ALPACA_SYSTEM,
    ),
    # Headers end in a newline: BPE tokenizers glue a `>` or `"` to the word after it (">The").
    "xml": TurnFormat(
        system="<system>{content}</system>\n",
        user="<user>{content}</user>\n",
        assistant_prefix="<assistant>\n",
        assistant_suffix="</assistant>{eos}",
        assistant_after="\n",
    ),
    "json": TurnFormat(
        system='{{"role": "system", "content": "{content}"}}\n',
        user='{{"role": "user", "content": "{content}"}}\n',
        # The answer is trained from its opening quote, so the header ends on a clean token boundary.
        assistant_prefix='{{"role": "assistant", "content": ',
        assistant_body='"{content}',
        assistant_suffix='"}}{eos}',
        generation_prompt='{{"role": "assistant", "content":',
        assistant_after="\n",
        json_content=True,
    ),
}


class BuiltinTemplate(ChatTemplate):
    def __init__(self, name: str, tokenizer: PreTrainedTokenizerBase) -> None:
        if name not in BUILTIN_FORMATS:
            raise TemplateError(f"unknown chat template {name!r}; built-in: {', '.join(BUILTIN_FORMATS)}")
        self.name = name
        self.tokenizer = tokenizer
        self.format = BUILTIN_FORMATS[name]
        self.special_tokens = self.format.special_tokens
        if tokenizer.eos_token is None:
            raise TemplateError(f"template {name}: the tokenizer has no EOS token to end assistant turns with")
        self._bos = tokenizer.bos_token or ""
        self._eos = tokenizer.eos_token
        self._lead = self._bos if self.format.bos and adds_bos(tokenizer) else ""
        self._prompt = (
            self.format.assistant_prefix if self.format.generation_prompt is None else self.format.generation_prompt
        )
        if not self._fill(self.format.assistant_prefix, "").startswith(self._fill(self._prompt, "")):
            raise TemplateError(f"template {name}: the generation prompt must be the start of the assistant header")

    @property
    def end_of_turn(self) -> str:
        return self._fill(self.format.assistant_suffix, "").strip()

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> RenderedConversation:
        check_roles(messages)
        fmt = self.format
        system = fmt.default_system
        if messages and messages[0].role == "system":
            system, messages = messages[0].content, messages[1:]
        if fmt.images_only_user:
            system = None
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        length = 0

        def emit(piece: str) -> None:
            nonlocal length
            parts.append(piece)
            length += len(piece)

        emit(self._lead)
        if system is not None and fmt.system_in_first_user is None:
            emit(self._fill(fmt.system, system))
        for index, message in enumerate(messages):
            if message.role == "user":
                content = message.content
                if fmt.images_only_user:
                    content = IMAGE_PLACEHOLDER * content.count(IMAGE_PLACEHOLDER)
                elif index == 0 and system is not None and fmt.system_in_first_user is not None:
                    content = fmt.system_in_first_user.format(system=system) + content
                emit(self._fill(fmt.user, content))
                continue
            start = length + len(self._fill(self._prompt, ""))
            emit(self._fill(fmt.assistant_prefix, "") + self._fill(fmt.assistant_body, message.content))
            emit(self._fill(fmt.assistant_suffix, ""))
            spans.append((start, length))
            emit(self._fill(fmt.assistant_after, ""))
        if add_generation_prompt:
            emit(self._fill(self._prompt, ""))
        return RenderedConversation("".join(parts), tuple(spans))

    def assistant_text(self, content: str) -> str:
        """Exactly the trained span of an answer: what follows the generation prompt, end marker included."""
        fmt = self.format
        header = self._fill(fmt.assistant_prefix, "")[len(self._fill(self._prompt, "")) :]
        return header + self._fill(fmt.assistant_body, content) + self._fill(fmt.assistant_suffix, "")

    def answer_from(self, generated: str) -> str:
        text = super().answer_from(generated)
        if self.format.json_content:
            try:
                return json.loads(text + '"')
            except json.JSONDecodeError:
                return text
        return text

    def _content(self, content: str) -> str:
        return json.dumps(content, ensure_ascii=False)[1:-1] if self.format.json_content else content

    def _fill(self, pattern: str, content: str) -> str:
        return pattern.format(content=self._content(content), bos=self._bos, eos=self._eos)


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's plain encoding starts with BOS - then a template should write it itself."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id

"""Chat templates: built-in formats for base models and the tokenizer's own Jinja template, one interface."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from llava_lite.data.templates.base import ChatTemplate, RenderedConversation, TemplateError
from llava_lite.data.templates.builtin import BUILTIN_FORMATS, BuiltinTemplate
from llava_lite.data.templates.tokenizer_template import TokenizerChatTemplate

TEMPLATE_NAMES = ("auto", "tokenizer", *BUILTIN_FORMATS)


def get_template(name: str, tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """`auto` picks the tokenizer's own template when it has one, else `chatml`."""
    if name == "auto":
        name = "tokenizer" if getattr(tokenizer, "chat_template", None) else "chatml"
    if name == "tokenizer":
        return TokenizerChatTemplate(tokenizer)
    if name not in BUILTIN_FORMATS:
        raise TemplateError(f"unknown chat template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
    return BuiltinTemplate(name, tokenizer)


def template_special_tokens(name: str, tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """Tokens the template `name` needs as single special tokens in this tokenizer (added if missing)."""
    if name == "tokenizer" or (name == "auto" and getattr(tokenizer, "chat_template", None)):
        return ()
    resolved = "chatml" if name == "auto" else name
    if resolved not in BUILTIN_FORMATS:
        raise TemplateError(f"unknown chat template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
    return BUILTIN_FORMATS[resolved].special_tokens


__all__ = [
    "BUILTIN_FORMATS",
    "TEMPLATE_NAMES",
    "ChatTemplate",
    "RenderedConversation",
    "TemplateError",
    "get_template",
    "template_special_tokens",
]

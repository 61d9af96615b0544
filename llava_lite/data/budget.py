"""Cheap bounds on a conversation's length, checked before it is rendered or tokenized.

A token covers at most as many characters as the tokenizer's longest token (a byte-level token's string has a
character per byte, so it is never shorter than the text it stands for), so text of more than `budget x longest`
characters cannot fit in `budget` tokens: a request can be refused, and a training record cut, from its
character count alone - before a huge input is rendered and tokenized whole.
"""

from __future__ import annotations

import dataclasses

from transformers import PreTrainedTokenizerBase

from llava_lite.data.conversation import Conversation, Message

# Characters kept beyond the bound when a record is cut, so the cut falls well past the last token that fits: the
# tokens before it are the whole record's (a word straddling the cut tokenizes differently, but it lies beyond).
CUT_MARGIN_TOKENS = 64


def characters_per_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most characters one token of `tokenizer` can stand for: its longest token (added tokens included)."""
    return max(1, max(map(len, tokenizer.get_vocab()), default=1))


def text_characters(conversation: Conversation) -> int:
    return sum(len(message.content) for message in conversation.messages)


def cut_to_characters(conversation: Conversation, characters: int, placeholder: str) -> Conversation:
    """The conversation's first `characters` characters of message text (what a template writes around them
    aside): later messages dropped, the one that crosses the limit cut short, and only the images whose
    placeholders were kept."""
    kept: list[Message] = []
    left = characters
    for message in conversation.messages:
        if left <= 0:
            break
        if len(message.content) > left:
            kept.append(Message(message.role, message.content[:left]))
            break
        kept.append(message)
        left -= len(message.content)
    images = sum(message.content.count(placeholder) for message in kept)
    return dataclasses.replace(conversation, messages=kept, images=list(conversation.images[:images]))

"""A model's chat template as the Jinja text transformers keeps beside a tokenizer or processor.

Built-in templates are Python (`llava_lite.data.templates.builtin`); here each becomes Jinja that renders
the same text for the same messages, so `apply_chat_template` on the exported folder and our own
rendering agree character for character. A tokenizer's own Jinja template is kept as it is.

Either way, messages may give `content` as a string (`"<image>\\nWhat is this?"`) or as OpenAI-style parts
(`[{"type": "image"}, {"type": "text", "text": "What is this?"}]`): an image part becomes `<image>` and the
parts are joined in order with nothing between them, as our readers join them.
"""

from __future__ import annotations

import json

from transformers import PreTrainedTokenizerBase

from llava_lite.data.templates import ChatTemplate
from llava_lite.data.templates.builtin import BuiltinTemplate, adds_bos

_MARK = "\x00CONTENT\x00"


def _flatten_parts(image_token: str) -> str:
    """Jinja that rewrites `messages` with list contents into messages with string contents."""
    return (
        "{%- set flat = namespace(messages=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string or m['content'] is none -%}"
        "{%- set flat.messages = flat.messages + [m] -%}"
        "{%- else -%}"
        "{%- set text = namespace(value='') -%}"
        "{%- for part in m['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{%- set text.value = text.value + {_literal(image_token)} -%}}"
        "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set flat.messages = flat.messages + [{'role': m['role'], 'content': text.value}] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = flat.messages -%}"
    )


def jinja_chat_template(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase, image_token: str) -> str:
    """The Jinja for `template` (the model's resolved chat template), accepting string or list contents."""
    if isinstance(template, BuiltinTemplate):
        return _flatten_parts(image_token) + _builtin_jinja(template, tokenizer, image_token)
    own = getattr(tokenizer, "chat_template", None)
    if not isinstance(own, str):
        raise ValueError(f"chat template {template.name}: the tokenizer holds no single Jinja template to export")
    return _flatten_parts(image_token) + own


def _builtin_jinja(template: BuiltinTemplate, tokenizer: PreTrainedTokenizerBase, image_token: str) -> str:
    fmt = template.format
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token

    def pieces(pattern: str) -> tuple[str, str]:
        """The literal text before and after `{content}` in a turn pattern, with BOS and EOS filled in."""
        before, _, after = pattern.format(content=_MARK, bos=bos, eos=eos).partition(_MARK)
        return before, after

    def fill(pattern: str, expression: str) -> str:
        before, after = pieces(pattern)
        content = f"({expression} | tojson)[1:-1]" if fmt.json_content else expression
        return f"{{{{ {_literal(before)} }}}}{{{{ {content} }}}}{{{{ {_literal(after)} }}}}"

    def text(pattern: str) -> str:
        return f"{{{{ {_literal(pattern.format(content='', bos=bos, eos=eos))} }}}}"

    lead = bos if fmt.bos and adds_bos(tokenizer) else ""
    prompt = fmt.assistant_prefix if fmt.generation_prompt is None else fmt.generation_prompt
    default_system = "none" if fmt.default_system is None or fmt.images_only_user else _literal(fmt.default_system)
    parts = [
        f"{{{{ {_literal(lead)} }}}}",
        f"{{%- set ns = namespace(system={default_system}, turns=messages) -%}}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set ns.turns = messages[1:] -%}",
        "" if fmt.images_only_user else "{%- set ns.system = messages[0]['content'] -%}",
        "{%- endif -%}",
    ]
    if fmt.system_in_first_user is None:
        parts.append(f"{{%- if ns.system is not none -%}}{fill(fmt.system, 'ns.system')}{{%- endif -%}}")
    parts.append("{%- for message in ns.turns -%}")
    parts.append("{%- if message['role'] == 'user' -%}")
    if fmt.images_only_user:
        parts.append(
            f"{{%- set user = {_literal(image_token)} * message['content'].count({_literal(image_token)}) -%}}"
        )
    elif fmt.system_in_first_user is not None:
        before, _, after = fmt.system_in_first_user.partition("{system}")
        parts.append(
            "{%- if loop.first and ns.system is not none -%}"
            f"{{%- set user = {_literal(before)} + ns.system + {_literal(after)} + message['content'] -%}}"
            "{%- else -%}{%- set user = message['content'] -%}{%- endif -%}"
        )
    else:
        parts.append("{%- set user = message['content'] -%}")
    parts.append(fill(fmt.user, "user"))
    parts.append("{%- else -%}")
    parts.append(text(fmt.assistant_prefix))
    parts.append(fill(fmt.assistant_body, "message['content']"))
    parts.append(text(fmt.assistant_suffix))
    parts.append(text(fmt.assistant_after))
    parts.append("{%- endif -%}")
    parts.append("{%- endfor -%}")
    parts.append(f"{{%- if add_generation_prompt -%}}{text(prompt)}{{%- endif -%}}")
    return "".join(part for part in parts if part)


def _literal(text: str) -> str:
    """A Jinja string literal; Jinja decodes the same backslash escapes as JSON writes (\\n, \\", \\uXXXX)."""
    return json.dumps(text, ensure_ascii=True)

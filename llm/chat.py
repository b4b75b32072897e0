"""Chat templates: the Jinja template of a model's ``tokenizer_config.json`` rendered into a prompt.

Rendered the way Hugging Face tokenizers render them (``apply_chat_template``): a sandboxed,
immutable Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, a ``tojson`` filter that keeps non-ASCII text, the ``raise_exception`` and
``strftime_now`` helpers, and the tokenizer's special tokens (``bos_token``, ``eos_token``, ...)
as variables beside ``messages`` and ``add_generation_prompt``.
"""
from __future__ import annotations

import datetime
import json

from .errors import ModelError


class TemplateError(ModelError):
    """A chat template that cannot be rendered (or that refused the conversation)."""


def _raise_exception(message):
    raise TemplateError(f"the chat template refused the conversation: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                **variables) -> str:
    """The text of ``messages`` (``[{"role": ..., "content": ...}]``) under ``template``;
    ``variables`` are the special tokens (``bos_token="<s>"``, ...)."""
    from jinja2 import TemplateError as JinjaError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **variables)
    except JinjaError as exc:
        raise TemplateError(f"cannot render the chat template: {exc}") from None


def messages(user: str, system: str | None = None) -> list[dict]:
    """A one-turn conversation, with a system message first when one is given."""
    turn = [{"role": "system", "content": system}] if system is not None else []
    return turn + [{"role": "user", "content": user}]

"""Text <-> token ids through a model directory's ``tokenizer.json`` (Hugging Face format).

Without a ``tokenizer.json`` there is no tokenizer (``load_tokenizer`` returns None) and prompts
must be given as token ids. ``tokenizer_config.json``, when present, gives the special tokens,
whether a BOS token is prepended (``add_bos_token``) and the chat template (also read from
``chat_template.jinja``). Prompts follow the tokenizer's own rule for the BOS token, as Hugging
Face tokenizers do: ``add_bos_token`` when the config sets it, else the ``tokenizer.json``
post-processor (which may add nothing). Text is decoded with the special tokens kept.
"""
from __future__ import annotations

import json
import pathlib

from tokenizers import Tokenizer as _HFTokenizer

from .config import read_json
from .errors import ModelError

TOKENIZER_FILE, TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE = "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_INCOMPLETE = "\ufffd"   # what a partial UTF-8 sequence decodes to


class Tokenizer:
    """Encode/decode with the model's rule for the beginning-of-sequence token.

    ``add_bos``: True/False to prepend the BOS token or not; None to let the tokenizer's
    post-processor decide (Hugging Face's ``add_special_tokens=True``). ``special_tokens``: the
    texts of ``bos_token``, ``eos_token``, ... (the chat template's variables)."""

    def __init__(self, tok: _HFTokenizer, bos_token_id: int | None = None, add_bos: bool | None = None,
                 add_eos: bool = False, chat_template: str | None = None, special_tokens: dict | None = None):
        self._tok = tok
        self.special_tokens = dict(special_tokens or {})
        bos_text = self.special_tokens.get("bos_token")
        from_text = tok.token_to_id(bos_text) if bos_text else None
        self.bos_token_id = from_text if from_text is not None else (
            bos_token_id if bos_token_id is not None else tok.token_to_id("<s>"))
        eos_text = self.special_tokens.get("eos_token")
        self.eos_token_id = tok.token_to_id(eos_text) if eos_text else None
        self.add_bos, self.add_eos, self.chat_template = add_bos, add_eos, chat_template

    @classmethod
    def from_file(cls, path: str | pathlib.Path, **options) -> "Tokenizer":
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception on bad files
            raise ModelError(f"cannot read tokenizer {path}: {exc}") from None
        return cls(tok, **options)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of ``text``. ``add_bos`` True/False prepends the BOS token or not; None
        follows the tokenizer's rule. ``special=False``: no special token is added unless
        ``add_bos`` asks for the BOS (a rendered chat template writes its own)."""
        if special and add_bos is None:
            add_bos = self.add_bos
            if add_bos is None:
                return self._tok.encode(text, add_special_tokens=True).ids
        if add_bos and self.bos_token_id is None:
            raise ModelError("this tokenizer has no BOS token to add")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        ids = [self.bos_token_id, *ids] if add_bos else ids
        return ids + [self.eos_token_id] if special and self.add_eos and self.eos_token_id is not None else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation under the model's chat template."""
        if not self.chat_template:
            raise ModelError("this model's tokenizer has no chat template (tokenizer_config.json "
                             "chat_template): give --prompt")
        from .chat import render_chat
        return render_chat(self.chat_template, messages, add_generation_prompt, **self.special_tokens)

    def stream(self) -> "StreamDecoder":
        """A decoder for printing tokens as they are generated."""
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental decoding: ``push(id)`` returns the text that became final with that token.

    Byte-level tokens can end inside a multi-byte character; such text is held back until the
    character is complete, so the concatenated pushes equal ``decode`` of all the ids.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith(_INCOMPLETE) or not text.startswith(self.text):
            return ""
        new, self.text = text[len(self.text):], text
        return new

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the end)."""
        text = self.tokenizer.decode(self.ids)
        new, self.text = text[len(self.text):] if text.startswith(self.text) else "", text
        return new


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(directory: pathlib.Path, config: dict) -> str | None:
    """``chat_template`` of the config (a string, or a list of named templates: the default
    one), else ``chat_template.jinja``."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (directory / CHAT_TEMPLATE_FILE).is_file():
        template = (directory / CHAT_TEMPLATE_FILE).read_text()
    return template if isinstance(template, str) else None


def load_tokenizer(model_dir: str | pathlib.Path, bos_token_id: int | None = None) -> Tokenizer | None:
    """The tokenizer of a model directory, or None when it has no ``tokenizer.json``.

    The BOS token is, in order: ``bos_token`` of ``tokenizer_config.json``, the argument,
    ``bos_token_id`` of ``config.json``, ``<s>``."""
    directory = pathlib.Path(model_dir)
    path, config = directory / TOKENIZER_FILE, directory / "config.json"
    if not path.is_file():
        return None
    if bos_token_id is None and config.is_file():
        try:
            bos_token_id = json.loads(config.read_text()).get("bos_token_id")
        except (json.JSONDecodeError, AttributeError):
            bos_token_id = None     # a broken config is reported by the checkpoint loader
    settings = read_json(directory / TOKENIZER_CONFIG)
    for key in ("add_bos_token", "add_eos_token"):
        if settings.get(key) is not None and not isinstance(settings[key], bool):
            raise ModelError(f"{directory / TOKENIZER_CONFIG}: {key} must be true or false, "
                             f"found {json.dumps(settings[key])}")
    special = {name: _token_text(settings.get(name)) for name in SPECIAL_TOKENS}
    special = {name: text for name, text in special.items() if text is not None}
    extra = settings.get("additional_special_tokens")
    if isinstance(extra, list):
        special["additional_special_tokens"] = [t for t in map(_token_text, extra) if t is not None]
    return Tokenizer.from_file(path, bos_token_id=bos_token_id, add_bos=settings.get("add_bos_token"),
                               add_eos=bool(settings.get("add_eos_token")),
                               chat_template=_chat_template(directory, settings), special_tokens=special)

"""Text <-> token ids through a model directory's ``tokenizer.json`` (Hugging Face format).

Without a ``tokenizer.json`` there is no tokenizer (``load_tokenizer`` returns None) and prompts
must be given as token ids.
"""
from __future__ import annotations

import json
import pathlib

from tokenizers import Tokenizer as _HFTokenizer

from .errors import ModelError

TOKENIZER_FILE = "tokenizer.json"
_INCOMPLETE = "\ufffd"   # what a partial UTF-8 sequence decodes to


class Tokenizer:
    """Encode/decode with explicit control of the beginning-of-sequence token."""

    def __init__(self, path: str | pathlib.Path, bos_token_id: int | None = None):
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception on bad files
            raise ModelError(f"cannot read tokenizer {path}: {exc}") from None
        self.bos_token_id = bos_token_id if bos_token_id is not None else self._tok.token_to_id("<s>")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, preceded by the BOS token when ``add_bos`` and one exists."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos and self.bos_token_id is not None else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

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


def load_tokenizer(model_dir: str | pathlib.Path, bos_token_id: int | None = None) -> Tokenizer | None:
    """The tokenizer of a model directory, or None when it has no ``tokenizer.json``.

    The BOS id is, in order: the argument, ``bos_token_id`` of ``config.json``, the id of ``<s>``.
    """
    directory = pathlib.Path(model_dir)
    path, config = directory / TOKENIZER_FILE, directory / "config.json"
    if not path.is_file():
        return None
    if bos_token_id is None and config.is_file():
        try:
            bos_token_id = json.loads(config.read_text()).get("bos_token_id")
        except (json.JSONDecodeError, AttributeError):
            bos_token_id = None     # a broken config is reported by the checkpoint loader
    return Tokenizer(path, bos_token_id)

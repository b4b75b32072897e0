"""Small pieces of English for messages and reports."""
from __future__ import annotations

import re


def plural(n, word: str, words: str | None = None) -> str:
    """``1 rank``, ``2 ranks`` (``words``: an irregular plural)."""
    return f"{n} {word if n == 1 else words or word + 's'}"


def article(text: str) -> str:
    """``a`` or ``an`` before ``text`` as it is read aloud: an 8x8 mesh, an 11x11, a 16x16, an wse2."""
    digits = re.match(r"[0-9]+", text)
    if digits:   # eight..., eleven, eighteen (and their thousands, millions)
        d = digits.group()
        vowel = d.startswith("8") or (d[:2] in ("11", "18") and len(d) % 3 == 2)
    else:
        vowel = text[:1].lower() in "aeio"
    return "an" if vowel else "a"

"""Title cleaning shared by every loader.

A title is what the LLM reads and writes, so it must be plain text on one line: HTML entities are
decoded (Amazon dumps double-escape some, ``&amp;amp;``), literal tags are removed, every run of whitespace
(tabs, newlines, non-breaking spaces) becomes one space. Titles that say nothing (empty, or the
placeholders MovieLens uses for its one unnamed item: ``unknown``, and RecBole's typo ``unkonwn``)
come back as ``""`` and the loaders drop the item and count it.
"""
from __future__ import annotations

import html
import re

_TAG = re.compile(r"<[^<>]{0,200}>")
_WS = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
PLACEHOLDER_TITLES = frozenset({"unknown", "unkonwn", "none", "null", "nan", "n/a"})


def clean_title(raw: object) -> str:
    """Plain one-line title, or ``""`` when there is none worth keeping."""
    if raw is None:
        return ""
    if isinstance(raw, list):  # some Amazon meta dumps store the title as a one-element list
        raw = " ".join(str(x) for x in raw)
    s = str(raw)
    s = _TAG.sub(" ", s)  # literal tags only: an escaped "&lt;3&gt;" is text and survives
    for _ in range(3):  # undo up to triple escaping; stops as soon as nothing changes
        un = html.unescape(s)
        if un == s:
            break
        s = un
    s = _CONTROL.sub(" ", s)
    s = _WS.sub(" ", s).strip()
    if s.lower() in PLACEHOLDER_TITLES:
        return ""
    return s


# MovieLens (and IMDb) write a leading article after the title: "Fugitive, The (1993)".
_ARTICLES = ("The", "A", "An", "Les", "La", "Le", "L'", "Il", "Lo", "Das", "Der", "Die", "El", "Los", "Las", "Det",
             "Den", "De", "Het", "Une", "Un")
_TRAILING_ARTICLE = re.compile(
    r"^(?P<head>.+?), (?P<art>" + "|".join(re.escape(a) for a in _ARTICLES) + r")(?P<tail>(?: \(.*\))?)$"
)


def natural_title(title: str) -> str:
    """The title as a sentence would say it: ``Fugitive, The (1993)`` -> ``The Fugitive (1993)``,
    ``Atalante, L' (1934)`` -> ``L'Atalante (1934)``. Only an article right before the end or before
    the trailing parenthesised parts moves; any other title comes back unchanged.

    Why: a generator tuned on "Fugitive, The (1993)" tends to start its answer with "The" and, unable
    to go on with a head noun that comes first in the catalogue form, writes "The (1993)" (BENCHMARKS §2.4)."""
    m = _TRAILING_ARTICLE.match(title)
    if not m:
        return title
    art, head, tail = m.group("art"), m.group("head"), m.group("tail")
    sep = "" if art.endswith("'") else " "
    return f"{art}{sep}{head}{tail}"

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

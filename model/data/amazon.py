"""The Amazon reviews reader: reviews JSON lines + ``meta_<Category>.json`` (see ``model/data/loaders.py``)."""
from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path
from typing import Iterator

from model.data.reading import (DataFormatError, LoadedDataset, LoadReport, Rows, add_title, finish, no_rows,
                                parse_timestamp, read_lines)

log = logging.getLogger(__name__)

JSON_EXT = re.compile(r"\.jsonl?(\.gz)?$", re.IGNORECASE)


def _amazon_category(filename: str) -> str:
    """``reviews_Books_5.json.gz`` / ``meta_Books.json.gz`` / ``Books.jsonl`` -> ``Books``."""
    s = JSON_EXT.sub("", filename)
    for prefix in ("reviews_", "meta_"):
        if s.startswith(prefix):
            s = s[len(prefix):]
    return re.sub(r"_5$", "", s)


def _norm_cat(s: str) -> str:
    return re.sub(r"[\s_\-&]+", "", s).lower()


def _amazon_files(path: Path, category: str | None) -> tuple[Path, Path, str]:
    """(reviews file, meta file, category)."""
    if path.is_file():
        folder, reviews = path.parent, [path]
    else:
        folder = path
        reviews = [p for p in sorted(folder.iterdir())
                   if p.is_file() and JSON_EXT.search(p.name) and not p.name.startswith("meta_")]
    metas = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name.startswith("meta_") and JSON_EXT.search(p.name)]
    expected = ("Amazon: expected a reviews file (reviews_<Category>[_5].json[.gz] or <Category>.jsonl[.gz]) "
                "and meta_<Category>.json[.gz]")
    if category:
        reviews = [p for p in reviews if _norm_cat(_amazon_category(p.name)) == _norm_cat(category)] or reviews
    if not reviews:
        raise DataFormatError(f"{expected}; no reviews file in {folder}")
    if len(reviews) > 1:
        raise DataFormatError(
            f"{folder} holds several reviews files {[p.name for p in reviews]}: pass the reviews file as the "
            "path, or name the category (dataset amazon-<category>)"
        )
    rev = reviews[0]
    cat = _amazon_category(rev.name)
    match = [p for p in metas if _norm_cat(_amazon_category(p.name)) == _norm_cat(cat)]
    if not match and len(metas) == 1:
        match = metas
    if len(match) != 1:
        raise DataFormatError(
            f"{expected}; for {rev.name} found meta files {[p.name for p in metas] or 'none'} in {folder}"
        )
    return rev, match[0], cat


def _parse_record(line: str) -> dict | None:
    """One dict from a line: strict JSON, else a python literal (the 2014 meta dumps)."""
    try:
        rec = json.loads(line)
    except ValueError:
        try:
            rec = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    return rec if isinstance(rec, dict) else None


def _records(path: Path, report: LoadReport) -> Iterator[tuple[int, dict]]:
    """(line number, dict) of every non-blank line of a JSON-lines dump; other lines are reported."""
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        rec = _parse_record(line)
        if rec is None:
            report.skip(path, lineno, "neither JSON nor a python literal dict")
            continue
        yield lineno, rec


def load_amazon(path: Path, name: str | None = None, domain: str | None = None,
                category: str | None = None) -> LoadedDataset:
    """Amazon review dumps (2014/2018: reviewerID, asin, unixReviewTime; 2023: user_id, parent_asin,
    timestamp in ms) with the matching ``meta_*`` file for titles."""
    rev_p, meta_p, cat = _amazon_files(Path(path), category)
    report = LoadReport(format="amazon", files=[str(rev_p), str(meta_p)])
    rows = Rows()
    for lineno, rec in _records(rev_p, report):
        user = rec.get("reviewerID", rec.get("user_id"))
        item = rec.get("parent_asin") or rec.get("asin")
        if "unixReviewTime" in rec:
            ts = rec["unixReviewTime"]
        elif "timestamp" in rec:
            ts = parse_timestamp(rec["timestamp"])
            if ts is not None and abs(ts) > 10**11:  # 2023 dumps: milliseconds
                ts //= 1000
        else:
            report.skip(rev_p, lineno, "no unixReviewTime/timestamp")
            continue
        if user is None or item is None:
            report.skip(rev_p, lineno, "no reviewerID/user_id or asin")
            continue
        rows.add(rev_p, lineno, user, item, ts, report)
    if not rows:
        raise no_rows(rev_p, report)

    wanted = set(rows.items)
    titles: dict[str, str] = {}
    n_meta = 0
    for lineno, rec in _records(meta_p, report):
        n_meta += 1
        item = rec.get("parent_asin") or rec.get("asin")
        if item is None:
            report.skip(meta_p, lineno, "no asin")
            continue
        item = str(item).strip()
        if item in wanted:
            add_title(titles, item, rec.get("title"), report)
        else:  # meta of an item nobody reviewed: counted, not kept (Books meta holds millions)
            report.item_rows += 1
    if not n_meta:
        raise no_rows(meta_p, report)
    if domain is None:
        domain = "book" if "book" in cat.lower() else "product"
    return finish(name or f"amazon-{cat.lower()}", domain, rows, titles, report)


# ----------------------------------------------------------------------------- dispatch

"""What every dataset reader shares: the load report, line and table reading, timestamps, and the
assembly of rows and titles into one ``Interactions`` table (the policy is in ``model/data/loaders.py``)."""
from __future__ import annotations

import csv
import gzip
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from model.data.text import clean_title
from model.data.types import Catalogue, Interactions

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5


class DataFormatError(ValueError):
    """The input files are not in the expected format; the message names file, line and problem."""


@dataclass
class LoadReport:
    format: str
    files: list[str] = field(default_factory=list)
    rows_read: int = 0  # interaction rows parsed successfully (before the title filter)
    malformed_skipped: int = 0  # bad rows in any file (interactions or items)
    malformed_examples: list[str] = field(default_factory=list)  # first few "file:line: reason"
    item_rows: int = 0  # rows read from the item file
    duplicate_item_rows: int = 0  # later rows for an item id already seen (first one wins)
    duplicate_titles: int = 0  # kept items whose title equals an earlier item's (ML-100K has 18)
    items_without_title: int = 0  # distinct interacted items with no usable title: dropped
    interactions_without_title: int = 0  # their interactions: dropped
    interactions: int = 0  # kept
    users: int = 0
    items: int = 0

    def skip(self, path: Path, lineno: int, reason: str) -> None:
        self.malformed_skipped += 1
        if len(self.malformed_examples) < MAX_EXAMPLES:
            self.malformed_examples.append(f"{path.name}:{lineno}: {reason}")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class LoadedDataset:
    interactions: Interactions
    domain: str  # the word the prompt uses: movie, product, book, item
    name: str
    report: LoadReport


# ----------------------------------------------------------------------------- small helpers


def sort_ids(ids: Iterable[str]) -> list[str]:
    """Ids in their natural order: numeric when all are decimal integers, else string order.

    This one order is used for the catalogue's dense indices and for every tie-breaker on ids.
    """
    ids = list(ids)
    if ids and all(s.isdigit() for s in ids):
        return sorted(ids, key=lambda s: (int(s), s))
    return sorted(ids)


def open_binary(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number from 1, text without newline)``; gzip-aware; utf-8, else latin-1 per line."""
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("latin-1")
            if lineno == 1:
                line = line.lstrip("\ufeff")
            yield lineno, line.rstrip("\r\n")


_INT = re.compile(r"-?\d+")


def parse_timestamp(s: object) -> int | None:
    """Seconds as int, or None when ``s`` is not a usable time (floats floored, ISO-8601 accepted)."""
    if isinstance(s, bool) or s is None:
        return None
    if isinstance(s, int):
        return s
    if isinstance(s, float):
        return int(math.floor(s)) if math.isfinite(s) else None
    s = str(s).strip()
    if not s:
        return None
    if _INT.fullmatch(s):
        return int(s)
    try:
        v = float(s)
    except ValueError:
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            return None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return int(math.floor(dt.timestamp()))
    return int(math.floor(v)) if math.isfinite(v) else None


def require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataFormatError(f"{what}: expected file {path} does not exist")
    return path


def no_rows(path: Path, report: LoadReport) -> DataFormatError:
    ex = "; ".join(e for e in report.malformed_examples if e.startswith(path.name + ":"))
    return DataFormatError(
        f"{path}: no valid row could be read (wrong separator or format?)" + (f" First problems: {ex}" if ex else "")
    )


class Rows:
    """Accumulates interaction rows as parallel lists of strings / ints."""

    def __init__(self) -> None:
        self.users: list[str] = []
        self.items: list[str] = []
        self.ts: list[int] = []

    def add(self, path: Path, lineno: int, user: object, item: object, ts_raw: object,
            report: LoadReport) -> None:
        u = "" if user is None else str(user).strip()
        i = "" if item is None else str(item).strip()
        if not u or not i:
            report.skip(path, lineno, "empty user or item id")
            return
        ts = parse_timestamp(ts_raw)
        if ts is None:
            report.skip(path, lineno, f"timestamp {str(ts_raw)[:40]!r} is not a number")
            return
        self.users.append(u)
        self.items.append(i)
        self.ts.append(ts)

    def __len__(self) -> int:
        return len(self.ts)


def add_title(titles: dict[str, str], item: str, raw_title: object, report: LoadReport) -> None:
    report.item_rows += 1
    item = item.strip()
    if item in titles:
        report.duplicate_item_rows += 1
        if titles[item]:  # first usable title wins
            return
    titles[item] = clean_title(raw_title)


def finish(name: str, domain: str, rows: Rows, titles: dict[str, str], report: LoadReport) -> LoadedDataset:
    """Drop interactions on untitled items, build the catalogue and the table."""
    report.rows_read = len(rows)
    titled = {i for i in set(rows.items) if titles.get(i)}
    untitled = set(rows.items) - titled
    keep = [k for k, i in enumerate(rows.items) if i in titled]
    report.items_without_title = len(untitled)
    report.interactions_without_title = len(rows) - len(keep)
    ids = sort_ids(titled)
    cat = Catalogue(item_ids=ids, titles=[titles[i] for i in ids])
    users = np.array([rows.users[k] for k in keep], dtype=object)
    items = np.fromiter((cat.index_of(rows.items[k]) for k in keep), dtype=np.int64, count=len(keep))
    ts = np.fromiter((rows.ts[k] for k in keep), dtype=np.int64, count=len(keep))
    inter = Interactions(user=users, item=items, timestamp=ts, catalogue=cat)
    report.interactions = len(inter)
    report.users = len(set(users.tolist()))
    report.items = len(cat)
    report.duplicate_titles = len(cat) - len(set(cat.titles))
    if report.malformed_skipped:
        log.warning("%s: skipped %d malformed rows, e.g. %s", name, report.malformed_skipped,
                    "; ".join(report.malformed_examples))
    if report.items_without_title:
        log.info("%s: dropped %d items without a title (%d interactions)", name,
                 report.items_without_title, report.interactions_without_title)
    return LoadedDataset(interactions=inter, domain=domain, name=name, report=report)


# ----------------------------------------------------------------------------- delimited text


def split_rows(path: Path, sep: str) -> Iterator[tuple[int, list[str]]]:
    for lineno, line in read_lines(path):
        if line.strip():
            yield lineno, line.split(sep)


def csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """CSV records with their physical line number (the last line of a record that spans several)."""
    lines = read_lines(path)
    current = [0]

    def text() -> Iterator[str]:
        for lineno, line in lines:
            current[0] = lineno
            yield line

    reader = csv.reader(text())
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataFormatError(f"{path}:{current[0]}: unreadable CSV ({e})") from e
        if row and any(c.strip() for c in row):
            yield current[0], row


def header_index(path: Path, header: list[str], required: dict[str, tuple[str, ...]], lineno: int = 1) -> dict[str, int]:
    """Column positions of the required fields (each with accepted spellings)."""
    norm = [h.strip() for h in header]
    out, missing = {}, []
    for key, names in required.items():
        pos = next((norm.index(n) for n in names if n in norm), None)
        if pos is None:
            missing.append("/".join(names))
        else:
            out[key] = pos
    if missing:
        raise DataFormatError(
            f"{path}:{lineno}: header lacks column(s) {', '.join(missing)}; found {norm}"
        )
    return out


def read_table(path: Path, rows_iter: Iterator[tuple[int, list[str]]], required: dict[str, tuple[str, ...]],
                report: LoadReport):
    """Yield ``(lineno, {key: value})`` for each data row of a file with a header."""
    try:
        lineno, header = next(rows_iter)
    except StopIteration:
        raise DataFormatError(f"{path}: file is empty (expected a header line)") from None
    idx = header_index(path, header, required, lineno)
    width = len(header)
    for lineno, row in rows_iter:
        if len(row) != width:
            report.skip(path, lineno, f"expected {width} fields, got {len(row)}")
            continue
        yield lineno, {k: row[p] for k, p in idx.items()}


# ----------------------------------------------------------------------------- format loaders

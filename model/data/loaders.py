"""Readers for every supported dataset format, all producing one ``Interactions`` table.

Formats (``load_dataset(name, path)``; ``name="auto"`` detects the format from the files):

=================  ===============================================  =====================
format             files in the directory                           domain
=================  ===============================================  =====================
``recbole``        ``<stem>.inter`` + ``<stem>.item`` (RecBole       movie for ``ml-*`` or
                   atomic files, tab-separated, typed header         a ``movie_title``
                   ``user_id:token item_id:token ... timestamp:float``) column, else item
``ml-100k-orig``   ``u.data`` (tab: user item rating ts) +          movie
                   ``u.item`` (``|``-separated, latin-1)
``movielens-csv``  ``ratings.csv`` (userId,movieId,rating,timestamp) movie
                   + ``movies.csv`` (movieId,title,genres)
``movielens-dat``  ``ratings.dat`` + ``movies.dat`` (``::``; ML-1M)  movie
``amazon``         reviews JSON lines (``reviewerID, asin,           book if the category
                   unixReviewTime``; the 2023 dumps' ``user_id,      names books, else
                   parent_asin, timestamp`` in ms also work) +       product
                   ``meta_<Category>.json`` (``asin, title``);
                   gzip or not; strict JSON or the 2014 meta dumps'
                   python-literal dicts
``csv``            ``interactions.csv`` (user_id,item_id,timestamp)  item (option)
                   + ``items.csv`` (item_id,title)
=================  ===============================================  =====================

Dataset names: ``ml-100k`` (default path: the fetched RecBole copy), any ``ml-*``/``movielens*``
(detected among the MovieLens formats), ``amazon`` or ``amazon-<category>`` (the category picks the
files when a folder holds several), ``csv``, ``recbole``, ``auto``; any other name with a path is
autodetected and keeps its name.

Malformed input policy:

- **structural errors raise** ``DataFormatError`` naming the file and line: a missing file, an empty
  file, a header without the required columns, a file in which not a single row could be read (the
  wrong separator or the wrong format altogether);
- **bad rows are skipped and counted** in ``LoadReport``: a wrong number of fields, an empty id, a
  timestamp that is not a number (fractional seconds are floored; ISO-8601 dates are accepted), a
  line that is neither JSON nor a python literal dict, a record missing a required key. The first
  few are listed as ``file:line: reason``. Blank lines are ignored.

Titles are cleaned (``text.clean_title``). Interactions on items without a usable title are
dropped, and both the items and the interactions are counted. The catalogue holds the titled items
that occur in the interactions, ordered by ``sort_ids`` (numeric order when every id is a decimal
integer, else string order).
"""
from __future__ import annotations

import ast
import csv
import gzip
import json
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


def _open_binary(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number from 1, text without newline)``; gzip-aware; utf-8, else latin-1 per line."""
    with _open_binary(path) as f:
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


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataFormatError(f"{what}: expected file {path} does not exist")
    return path


def _no_rows(path: Path, report: LoadReport) -> DataFormatError:
    ex = "; ".join(e for e in report.malformed_examples if e.startswith(path.name + ":"))
    return DataFormatError(
        f"{path}: no valid row could be read (wrong separator or format?)" + (f" First problems: {ex}" if ex else "")
    )


class _Rows:
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


def _add_title(titles: dict[str, str], item: str, raw_title: object, report: LoadReport) -> None:
    report.item_rows += 1
    item = item.strip()
    if item in titles:
        report.duplicate_item_rows += 1
        if titles[item]:  # first usable title wins
            return
    titles[item] = clean_title(raw_title)


def _finish(name: str, domain: str, rows: _Rows, titles: dict[str, str], report: LoadReport) -> LoadedDataset:
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


def _split_rows(path: Path, sep: str) -> Iterator[tuple[int, list[str]]]:
    for lineno, line in read_lines(path):
        if line.strip():
            yield lineno, line.split(sep)


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
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


def _header_index(path: Path, header: list[str], required: dict[str, tuple[str, ...]], lineno: int = 1) -> dict[str, int]:
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


def _read_table(path: Path, rows_iter: Iterator[tuple[int, list[str]]], required: dict[str, tuple[str, ...]],
                report: LoadReport):
    """Yield ``(lineno, {key: value})`` for each data row of a file with a header."""
    try:
        lineno, header = next(rows_iter)
    except StopIteration:
        raise DataFormatError(f"{path}: file is empty (expected a header line)") from None
    idx = _header_index(path, header, required, lineno)
    width = len(header)
    for lineno, row in rows_iter:
        if len(row) != width:
            report.skip(path, lineno, f"expected {width} fields, got {len(row)}")
            continue
        yield lineno, {k: row[p] for k, p in idx.items()}


# ----------------------------------------------------------------------------- format loaders


_YEAR = re.compile(r"1[89]\d\d|20\d\d")


def load_recbole(folder: Path, name: str | None = None, domain: str | None = None, stem: str | None = None,
                 with_year: bool = True) -> LoadedDataset:
    """RecBole atomic files ``<stem>.inter`` + ``<stem>.item`` (typed, tab-separated headers).

    RecBole's ML-100K keeps the year apart (``release_year``); with ``with_year`` it is appended the way
    the original ``u.item`` writes titles (``Toy Story (1995)``), which also tells remakes apart
    (Cape Fear 1962/1991, Sabrina 1954/1995, ...).
    """
    folder = Path(folder)
    if stem is None:
        stems = sorted(p.name[: -len(".inter")] for p in folder.glob("*.inter"))
        if len(stems) != 1:
            raise DataFormatError(
                f"{folder}: expected exactly one RecBole <name>.inter file, found {stems or 'none'}"
            )
        stem = stems[0]
    inter_p = _require(folder / f"{stem}.inter", "RecBole interactions")
    item_p = _require(folder / f"{stem}.item", "RecBole items")
    report = LoadReport(format="recbole", files=[str(inter_p), str(item_p)])

    def typed_header(path: Path, lineno: int, header: list[str]) -> list[str]:
        if not all(":" in h for h in header):
            raise DataFormatError(
                f"{path}:{lineno}: not a RecBole header (expected tab-separated 'field:type' "
                f"columns, e.g. 'user_id:token'), got {header}"
            )
        return [h.split(":", 1)[0] for h in header]

    def first_row(path: Path) -> tuple[int, list[str], Iterator[tuple[int, list[str]]]]:
        it = _split_rows(path, "\t")
        first = next(it, None)
        if first is None:
            raise DataFormatError(f"{path}: file is empty (expected a header line)")
        return first[0], first[1], it

    rows = _Rows()
    lineno, header, it = first_row(inter_p)
    names = typed_header(inter_p, lineno, header)
    req = {"user": ("user_id",), "item": ("item_id",), "ts": ("timestamp",)}
    for ln, r in _read_table(inter_p, _chain((lineno, names), it), req, report):
        rows.add(inter_p, ln, r["user"], r["item"], r["ts"], report)
    if not rows:
        raise _no_rows(inter_p, report)

    titles: dict[str, str] = {}
    lineno, header, it = first_row(item_p)
    names = typed_header(item_p, lineno, header)
    title_col = next((c for c in ("movie_title", "title", "item_title", "name", "item_name") if c in names),
                     next((c for c in names if "title" in c), None))
    if title_col is None:
        raise DataFormatError(f"{item_p}:{lineno}: no title column (movie_title, title, ...); found {names}")
    item_req = {"item": ("item_id",), "title": (title_col,)}
    if with_year and "release_year" in names:
        item_req["year"] = ("release_year",)
    for ln, r in _read_table(item_p, _chain((lineno, names), it), item_req, report):
        title = r["title"]
        year = r.get("year", "").strip()
        if clean_title(title) and _YEAR.fullmatch(year):  # "Toy Story" + 1995 -> "Toy Story (1995)", as in u.item
            title = f"{title} ({year})"
        _add_title(titles, r["item"], title, report)

    if domain is None:
        domain = "movie" if (title_col == "movie_title" or stem.startswith("ml-")) else "item"
    return _finish(name or stem, domain, rows, titles, report)


def _chain(first, rest):
    yield first
    yield from rest


def _load_delimited_pair(folder: Path, name: str, domain: str, fmt: str, what: str,
                         data_file: str, data_sep: str, item_file: str, item_sep: str) -> LoadedDataset:
    """A ratings file (user, item, rating, timestamp; ``data_sep``-separated) + an items file whose
    first two fields are the item id and its title (``item_sep``-separated; more fields ignored)."""
    folder = Path(folder)
    data_p = _require(folder / data_file, f"{what} ratings")
    item_p = _require(folder / item_file, f"{what} items")
    report = LoadReport(format=fmt, files=[str(data_p), str(item_p)])
    shown = {"\t": "tab", "|": "'|'", "::": "'::'"}
    rows = _Rows()
    for lineno, r in _split_rows(data_p, data_sep):
        if len(r) != 4:
            report.skip(data_p, lineno, f"expected 4 {shown.get(data_sep, repr(data_sep))}-separated fields, got {len(r)}")
            continue
        rows.add(data_p, lineno, r[0], r[1], r[3], report)
    if not rows:
        raise _no_rows(data_p, report)
    titles: dict[str, str] = {}
    n_item_rows = 0
    for lineno, r in _split_rows(item_p, item_sep):
        if len(r) < 2:
            report.skip(item_p, lineno, f"expected {shown.get(item_sep, repr(item_sep))}-separated fields, got {len(r)}")
            continue
        n_item_rows += 1
        _add_title(titles, r[0], r[1], report)
    if not n_item_rows:
        raise _no_rows(item_p, report)
    return _finish(name, domain, rows, titles, report)


def load_movielens_100k_original(folder: Path, name: str = "ml-100k", domain: str | None = None) -> LoadedDataset:
    """The GroupLens ML-100K release: ``u.data`` (user\\titem\\trating\\tts) and ``u.item`` (``|``)."""
    return _load_delimited_pair(folder, name, domain or "movie", "ml-100k-orig", "MovieLens-100K",
                                "u.data", "\t", "u.item", "|")


def _load_csv_pair(folder: Path, name: str, domain: str, fmt: str, what: str,
                   inter_file: str, inter_cols: tuple[str, str, str], item_file: str,
                   item_cols: tuple[str, str]) -> LoadedDataset:
    """An interactions CSV (user, item, timestamp columns; others ignored) + an items CSV (item, title)."""
    folder = Path(folder)
    int_p = _require(folder / inter_file, f"{what} interactions")
    item_p = _require(folder / item_file, f"{what} items")
    report = LoadReport(format=fmt, files=[str(int_p), str(item_p)])
    rows = _Rows()
    req = {"user": (inter_cols[0],), "item": (inter_cols[1],), "ts": (inter_cols[2],)}
    for lineno, r in _read_table(int_p, _csv_rows(int_p), req, report):
        rows.add(int_p, lineno, r["user"], r["item"], r["ts"], report)
    if not rows:
        raise _no_rows(int_p, report)
    titles: dict[str, str] = {}
    item_req = {"item": (item_cols[0],), "title": (item_cols[1],)}
    for lineno, r in _read_table(item_p, _csv_rows(item_p), item_req, report):
        _add_title(titles, r["item"], r["title"], report)
    return _finish(name, domain, rows, titles, report)


def load_movielens_csv(folder: Path, name: str = "movielens-csv", domain: str | None = None) -> LoadedDataset:
    """MovieLens CSV releases (ml-latest, ml-20m, ml-25m, ml-32m): ``ratings.csv`` + ``movies.csv``."""
    return _load_csv_pair(folder, name, domain or "movie", "movielens-csv", "MovieLens",
                          "ratings.csv", ("userId", "movieId", "timestamp"), "movies.csv", ("movieId", "title"))


def load_movielens_dat(folder: Path, name: str = "movielens-dat", domain: str | None = None) -> LoadedDataset:
    """ML-1M / ML-10M style ``ratings.dat`` (user::item::rating::ts) + ``movies.dat`` (id::title::genres)."""
    return _load_delimited_pair(folder, name, domain or "movie", "movielens-dat", "MovieLens",
                                "ratings.dat", "::", "movies.dat", "::")


def load_generic_csv(folder: Path, name: str = "csv", domain: str | None = None) -> LoadedDataset:
    """``interactions.csv`` (user_id,item_id,timestamp, extra columns ignored) + ``items.csv`` (item_id,title)."""
    return _load_csv_pair(folder, name, domain or "item", "csv", "generic CSV",
                          "interactions.csv", ("user_id", "item_id", "timestamp"), "items.csv", ("item_id", "title"))


# ----------------------------------------------------------------------------- Amazon

_JSON_EXT = re.compile(r"\.jsonl?(\.gz)?$", re.IGNORECASE)


def _amazon_category(filename: str) -> str:
    """``reviews_Books_5.json.gz`` / ``meta_Books.json.gz`` / ``Books.jsonl`` -> ``Books``."""
    s = _JSON_EXT.sub("", filename)
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
                   if p.is_file() and _JSON_EXT.search(p.name) and not p.name.startswith("meta_")]
    metas = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name.startswith("meta_") and _JSON_EXT.search(p.name)]
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
    rows = _Rows()
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
        raise _no_rows(rev_p, report)

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
            _add_title(titles, item, rec.get("title"), report)
        else:  # meta of an item nobody reviewed: counted, not kept (Books meta holds millions)
            report.item_rows += 1
    if not n_meta:
        raise _no_rows(meta_p, report)
    if domain is None:
        domain = "book" if "book" in cat.lower() else "product"
    return _finish(name or f"amazon-{cat.lower()}", domain, rows, titles, report)


# ----------------------------------------------------------------------------- dispatch

_EXPECTED = (
    "expected one of: <name>.inter + <name>.item (RecBole); u.data + u.item (MovieLens-100K); "
    "ratings.csv + movies.csv (MovieLens CSV); ratings.dat + movies.dat (MovieLens-1M); "
    "interactions.csv + items.csv (generic); reviews_*.json[.gz] + meta_*.json[.gz] (Amazon)"
)


def detect_format(folder: Path, movielens_only: bool = False) -> str:
    """The format of the files in ``folder`` (see the module docstring for the names)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataFormatError(f"{folder} is not a directory; {_EXPECTED}")
    has = lambda n: (folder / n).is_file()  # noqa: E731
    if any(folder.glob("*.inter")):
        return "recbole"
    if has("u.data"):
        return "ml-100k-orig"
    if has("ratings.csv"):
        return "movielens-csv"
    if has("ratings.dat"):
        return "movielens-dat"
    if not movielens_only:
        if has("interactions.csv"):
            return "csv"
        if any(p.name.startswith("meta_") for p in folder.iterdir()):
            return "amazon"
    raise DataFormatError(f"cannot tell the format of {folder} (files: "
                          f"{sorted(p.name for p in folder.iterdir())[:10]}); {_EXPECTED}")


def load_dataset(name: str, path: Path | str | None = None, *, domain: str | None = None) -> LoadedDataset:
    """Load ``name`` from ``path`` (a folder; for Amazon also the reviews file).

    ``ml-100k`` without a path reads the RecBole copy fetched by ``model.assets``. ``domain``
    overrides the format's default domain word.
    """
    key = name.strip().lower()
    if path is None:
        if key == "ml-100k":
            from model.assets import asset_paths

            path = asset_paths().ml100k_dir
            if not (path / "ml-100k.inter").is_file():
                raise DataFormatError(f"ML-100K is not fetched yet ({path}/ml-100k.inter missing): "
                                      "run `automr assets fetch` or pass --path")
        else:
            raise DataFormatError(f"dataset {name!r} needs a path; {_EXPECTED}")
    path = Path(path).expanduser()
    if not path.exists():
        raise DataFormatError(f"{path} does not exist")

    if key.startswith("amazon"):
        cat = key[len("amazon"):].lstrip("-_") or None
        return load_amazon(path, name=name if cat else None, domain=domain, category=cat)
    folder = path if path.is_dir() else path.parent
    if key in ("csv", "generic", "generic-csv"):
        fmt = "csv"
    elif key in ("recbole", "atomic"):
        fmt = "recbole"
    elif key in ("movielens-csv", "ml-csv"):
        fmt = "movielens-csv"
    elif key in ("movielens-dat", "ml-dat"):
        fmt = "movielens-dat"
    elif key.startswith("ml-") or key.startswith("movielens"):
        fmt = detect_format(folder, movielens_only=True)
    else:  # "auto" or a user's own name
        fmt = detect_format(folder) if path.is_dir() else ("amazon" if _JSON_EXT.search(path.name) else detect_format(folder))
    out_name = None if key == "auto" else name
    if fmt == "recbole":
        stem = path.name[: -len(".inter")] if path.is_file() and path.name.endswith(".inter") else None
        return load_recbole(folder, name=out_name, domain=domain, stem=stem)
    if fmt == "ml-100k-orig":
        return load_movielens_100k_original(folder, name=out_name or "ml-100k", domain=domain)
    if fmt == "movielens-csv":
        return load_movielens_csv(folder, name=out_name or fmt, domain=domain)
    if fmt == "movielens-dat":
        return load_movielens_dat(folder, name=out_name or fmt, domain=domain)
    if fmt == "csv":
        return load_generic_csv(folder, name=out_name or fmt, domain=domain)
    return load_amazon(path, name=out_name, domain=domain)

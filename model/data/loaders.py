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

import logging
import re
from pathlib import Path
from typing import Iterator

from model.data.amazon import JSON_EXT, load_amazon
from model.data.text import clean_title
from model.data.reading import (DataFormatError, LoadedDataset, LoadReport, Rows, add_title, csv_rows, finish, no_rows,
                                read_table, require, split_rows)

log = logging.getLogger(__name__)

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
    inter_p = require(folder / f"{stem}.inter", "RecBole interactions")
    item_p = require(folder / f"{stem}.item", "RecBole items")
    report = LoadReport(format="recbole", files=[str(inter_p), str(item_p)])

    def typed_header(path: Path, lineno: int, header: list[str]) -> list[str]:
        if not all(":" in h for h in header):
            raise DataFormatError(
                f"{path}:{lineno}: not a RecBole header (expected tab-separated 'field:type' "
                f"columns, e.g. 'user_id:token'), got {header}"
            )
        return [h.split(":", 1)[0] for h in header]

    def first_row(path: Path) -> tuple[int, list[str], Iterator[tuple[int, list[str]]]]:
        it = split_rows(path, "\t")
        first = next(it, None)
        if first is None:
            raise DataFormatError(f"{path}: file is empty (expected a header line)")
        return first[0], first[1], it

    rows = Rows()
    lineno, header, it = first_row(inter_p)
    names = typed_header(inter_p, lineno, header)
    req = {"user": ("user_id",), "item": ("item_id",), "ts": ("timestamp",)}
    for ln, r in read_table(inter_p, _chain((lineno, names), it), req, report):
        rows.add(inter_p, ln, r["user"], r["item"], r["ts"], report)
    if not rows:
        raise no_rows(inter_p, report)

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
    for ln, r in read_table(item_p, _chain((lineno, names), it), item_req, report):
        title = r["title"]
        year = r.get("year", "").strip()
        if clean_title(title) and _YEAR.fullmatch(year):  # "Toy Story" + 1995 -> "Toy Story (1995)", as in u.item
            title = f"{title} ({year})"
        add_title(titles, r["item"], title, report)

    if domain is None:
        domain = "movie" if (title_col == "movie_title" or stem.startswith("ml-")) else "item"
    return finish(name or stem, domain, rows, titles, report)


def _chain(first, rest):
    yield first
    yield from rest


def _load_delimited_pair(folder: Path, name: str, domain: str, fmt: str, what: str,
                         data_file: str, data_sep: str, item_file: str, item_sep: str) -> LoadedDataset:
    """A ratings file (user, item, rating, timestamp; ``data_sep``-separated) + an items file whose
    first two fields are the item id and its title (``item_sep``-separated; more fields ignored)."""
    folder = Path(folder)
    data_p = require(folder / data_file, f"{what} ratings")
    item_p = require(folder / item_file, f"{what} items")
    report = LoadReport(format=fmt, files=[str(data_p), str(item_p)])
    shown = {"\t": "tab", "|": "'|'", "::": "'::'"}
    rows = Rows()
    for lineno, r in split_rows(data_p, data_sep):
        if len(r) != 4:
            report.skip(data_p, lineno, f"expected 4 {shown.get(data_sep, repr(data_sep))}-separated fields, got {len(r)}")
            continue
        rows.add(data_p, lineno, r[0], r[1], r[3], report)
    if not rows:
        raise no_rows(data_p, report)
    titles: dict[str, str] = {}
    n_item_rows = 0
    for lineno, r in split_rows(item_p, item_sep):
        if len(r) < 2:
            report.skip(item_p, lineno, f"expected {shown.get(item_sep, repr(item_sep))}-separated fields, got {len(r)}")
            continue
        n_item_rows += 1
        add_title(titles, r[0], r[1], report)
    if not n_item_rows:
        raise no_rows(item_p, report)
    return finish(name, domain, rows, titles, report)


def load_movielens_100k_original(folder: Path, name: str = "ml-100k", domain: str | None = None) -> LoadedDataset:
    """The GroupLens ML-100K release: ``u.data`` (user\\titem\\trating\\tts) and ``u.item`` (``|``)."""
    return _load_delimited_pair(folder, name, domain or "movie", "ml-100k-orig", "MovieLens-100K",
                                "u.data", "\t", "u.item", "|")


def _load_csv_pair(folder: Path, name: str, domain: str, fmt: str, what: str,
                   inter_file: str, inter_cols: tuple[str, str, str], item_file: str,
                   item_cols: tuple[str, str]) -> LoadedDataset:
    """An interactions CSV (user, item, timestamp columns; others ignored) + an items CSV (item, title)."""
    folder = Path(folder)
    int_p = require(folder / inter_file, f"{what} interactions")
    item_p = require(folder / item_file, f"{what} items")
    report = LoadReport(format=fmt, files=[str(int_p), str(item_p)])
    rows = Rows()
    req = {"user": (inter_cols[0],), "item": (inter_cols[1],), "ts": (inter_cols[2],)}
    for lineno, r in read_table(int_p, csv_rows(int_p), req, report):
        rows.add(int_p, lineno, r["user"], r["item"], r["ts"], report)
    if not rows:
        raise no_rows(int_p, report)
    titles: dict[str, str] = {}
    item_req = {"item": (item_cols[0],), "title": (item_cols[1],)}
    for lineno, r in read_table(item_p, csv_rows(item_p), item_req, report):
        add_title(titles, r["item"], r["title"], report)
    return finish(name, domain, rows, titles, report)


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
        fmt = detect_format(folder) if path.is_dir() else ("amazon" if JSON_EXT.search(path.name) else detect_format(folder))
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

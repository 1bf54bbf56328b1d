"""Every loader on small files in the real formats (tests/fixtures/data/), plus bad input."""
from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from model.data.loaders import load_dataset
from model.data.reading import DataFormatError, parse_timestamp, sort_ids
from model.data.text import clean_title

FIX = Path(__file__).parent / "fixtures" / "data"


def table(ds):
    """(user, original item id, timestamp) rows in file order."""
    i = ds.interactions
    ids = i.catalogue.item_ids
    return [(u, ids[k], t) for u, k, t in zip(i.user.tolist(), i.item.tolist(), i.timestamp.tolist())]


# ----------------------------------------------------------------------------- helpers


def test_clean_title():
    assert clean_title("  Tom &amp;amp; Jerry\t\n  Show\u00a0 ") == "Tom & Jerry Show"
    assert clean_title("<span class='x'>Kite</span> Deluxe") == "Kite Deluxe"
    assert clean_title("I &lt;3 NY") == "I <3 NY"  # escaped text is kept, literal tags are not
    assert clean_title("unkonwn") == "" and clean_title("  Unknown ") == "" and clean_title(None) == ""
    assert clean_title(["Two", "Parts"]) == "Two Parts"


def test_parse_timestamp():
    assert parse_timestamp("881250949") == 881250949
    assert parse_timestamp("150.9") == 150
    assert parse_timestamp("-3.5") == -4  # floored, not truncated
    assert parse_timestamp("2021-01-01T00:00:00Z") == 1609459200
    assert parse_timestamp("1970-01-02") == 86400  # naive dates are UTC
    for bad in ("", "abc", "nan", "inf", None, True):
        assert parse_timestamp(bad) is None


def test_sort_ids_natural_order():
    assert sort_ids(["10", "9", "2"]) == ["2", "9", "10"]
    assert sort_ids(["10", "9", "a"]) == ["10", "9", "a"]  # not all integers: string order


# ----------------------------------------------------------------------------- formats


def test_recbole_atomic():
    ds = load_dataset("auto", FIX / "recbole")
    assert (ds.name, ds.domain) == ("ml-tiny", "movie")
    cat = ds.interactions.catalogue
    assert cat.item_ids == ["2", "10"]
    # year appended like u.item; whitespace collapsed; item 3 only occurs in a skipped row
    assert cat.titles == ["Heat (1995)", "Twelve Monkeys (1995)"]
    assert table(ds) == [("1", "10", 100), ("1", "2", 100), ("2", "10", 200), ("2", "2", 150)]
    r = ds.report
    assert (r.rows_read, r.malformed_skipped) == (5, 3)
    assert r.malformed_examples == [
        "ml-tiny.inter:5: timestamp 'abc' is not a number",
        "ml-tiny.inter:7: timestamp '' is not a number",
        "ml-tiny.inter:9: expected 4 fields, got 2",
    ]
    # item 7 is titled "unkonwn" (RecBole's ML-100K item 267): dropped with its one interaction
    assert (r.items_without_title, r.interactions_without_title) == (1, 1)
    assert (r.interactions, r.users, r.items, r.item_rows) == (4, 2, 2, 4)


def test_recbole_named_ml100k_and_without_year():
    from model.data.loaders import load_recbole

    assert load_dataset("ml-100k", FIX / "recbole").name == "ml-100k"
    ds = load_recbole(FIX / "recbole", with_year=False)
    assert ds.interactions.catalogue.titles == ["Heat", "Twelve Monkeys"]


def test_movielens_100k_original_latin1():
    ds = load_dataset("ml-100k", FIX / "ml-100k-orig")
    assert (ds.name, ds.domain, ds.report.format) == ("ml-100k", "movie", "ml-100k-orig")
    cat = ds.interactions.catalogue
    assert cat.item_ids == ["5", "6"]
    assert cat.titles == ["Misérables, Les (1995)", "Toy Story (1995)"]  # latin-1 decoded
    assert table(ds) == [("1", "5", 881250949), ("1", "6", 881250950), ("2", "5", 881250951)]
    r = ds.report
    assert r.malformed_examples == ["u.data:4: expected 4 tab-separated fields, got 2"]
    assert (r.items_without_title, r.interactions_without_title) == (1, 1)  # "unknown" item 7


def test_movielens_csv_quoted_titles():
    ds = load_dataset("movielens-csv", FIX / "movielens-csv")
    cat = ds.interactions.catalogue
    assert cat.item_ids == ["1", "3", "50"]  # 99 is never rated: not in the catalogue
    assert cat.titles == ["Toy Story (1995)", "Grumpier Old Men, The (1995)", "Usual Suspects, The (1995)"]
    assert table(ds) == [("1", "1", 964982703), ("1", "3", 964981247), ("2", "50", 964982931)]
    assert ds.report.malformed_examples == [
        "ratings.csv:4: timestamp 'not-a-time' is not a number",
        "ratings.csv:6: expected 4 fields, got 2",
    ]
    assert ds.domain == "movie" and ds.report.item_rows == 4
    # any ml-* name detects the format; a file path means its folder
    assert table(load_dataset("ml-latest-small", FIX / "movielens-csv" / "ratings.csv")) == table(ds)


def test_movielens_dat():
    ds = load_dataset("ml-1m", FIX / "movielens-dat")
    assert ds.report.format == "movielens-dat"
    assert ds.interactions.catalogue.item_ids == ["661", "1193"]
    assert table(ds) == [("1", "1193", 978300760), ("1", "661", 978302109), ("2", "1193", 978298413)]
    assert ds.report.malformed_skipped == 1


def test_amazon_2014_gzip_and_python_literal_meta():
    ds = load_dataset("auto", FIX / "amazon")
    assert (ds.name, ds.domain) == ("amazon-books", "book")
    cat = ds.interactions.catalogue
    assert cat.item_ids == ["000100039X", "0001055178"]  # string order (ids are not all numbers)
    assert cat.titles == ["The Prophet", "Master Georgie & Friends"]
    assert table(ds) == [("A1", "000100039X", 1355616000), ("A1", "0001055178", 1360000000),
                         ("A2", "000100039X", 1370000000), ("A3", "000100039X", 1380000000)]
    r = ds.report
    assert r.rows_read == 5
    assert r.malformed_examples == [
        "reviews_Books_5.json.gz:5: no unixReviewTime/timestamp",
        "reviews_Books_5.json.gz:6: neither JSON nor a python literal dict",
        "meta_Books.json:5: neither JSON nor a python literal dict",
    ]
    assert (r.items_without_title, r.interactions_without_title) == (1, 1)  # B000NOTITL
    assert r.item_rows == 4
    # the reviews file as the path finds its meta file; a category name picks it too
    assert table(load_dataset("amazon", FIX / "amazon" / "reviews_Books_5.json.gz")) == table(ds)
    assert load_dataset("amazon-books", FIX / "amazon").name == "amazon-books"


def test_amazon_2023_layout_ms_timestamps(tmp_path):
    ds = load_dataset("amazon", FIX / "amazon2023")
    assert ds.domain == "product"
    assert ds.interactions.catalogue.titles == ["Toy Car", "Kite"]
    assert table(ds) == [("U1", "P01", 1588687728), ("U1", "P02", 1588687729)]
    # gzip is detected by content, domain can be overridden
    (tmp_path / "Toys.jsonl.gz").write_bytes(gzip.compress((FIX / "amazon2023" / "Toys_and_Games.jsonl").read_bytes()))
    (tmp_path / "meta_Toys.jsonl").write_bytes((FIX / "amazon2023" / "meta_Toys_and_Games.jsonl").read_bytes())
    ds2 = load_dataset("amazon", tmp_path, domain="toy")
    assert ds2.domain == "toy" and table(ds2) == table(ds)


def test_generic_csv():
    ds = load_dataset("csv", FIX / "csv")
    assert (ds.name, ds.domain) == ("csv", "item")
    cat = ds.interactions.catalogue
    assert cat.item_ids == ["a", "b"]
    assert cat.titles == ["Widget, Deluxe & Co", "Gadget Pro"]  # first title of "a" wins
    assert table(ds) == [("u1", "a", 10), ("u1", "b", 1609459200)]
    r = ds.report
    assert r.malformed_examples == ["interactions.csv:4: timestamp '' is not a number",
                                    "interactions.csv:6: expected 4 fields, got 3"]
    assert (r.duplicate_item_rows, r.items_without_title, r.interactions_without_title) == (1, 1, 1)
    assert load_dataset("my-shop", FIX / "csv", domain="product").name == "my-shop"


# ----------------------------------------------------------------------------- bad input


def test_missing_file_names_expected_file(tmp_path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4,5\n")
    with pytest.raises(DataFormatError, match=r"movies\.csv does not exist"):
        load_dataset("movielens-csv", tmp_path)
    with pytest.raises(DataFormatError, match=r"does not exist"):
        load_dataset("csv", tmp_path / "nope")


def test_wrong_header_columns(tmp_path):
    (tmp_path / "interactions.csv").write_text("user,item,time\nu1,a,1\n")
    (tmp_path / "items.csv").write_text("item_id,title\na,A\n")
    with pytest.raises(DataFormatError, match=r"interactions\.csv:1: header lacks column\(s\) user_id, item_id, timestamp"):
        load_dataset("csv", tmp_path)


def test_untyped_recbole_header(tmp_path):
    (tmp_path / "x.inter").write_text("user_id\titem_id\ttimestamp\n1\t2\t3\n")
    (tmp_path / "x.item").write_text("item_id:token\ttitle:token_seq\n2\tB\n")
    with pytest.raises(DataFormatError, match=r"x\.inter:1: not a RecBole header"):
        load_dataset("recbole", tmp_path)


def test_wrong_separator_everywhere_is_structural(tmp_path):
    (tmp_path / "u.data").write_text("1,5,3,881250949\n1,6,4,881250950\n")
    (tmp_path / "u.item").write_text("5|A|x\n")
    with pytest.raises(DataFormatError, match=r"u\.data: no valid row.*u\.data:1: expected 4 tab-separated fields, got 1"):
        load_dataset("ml-100k", tmp_path)


def test_empty_file_and_unknown_folder(tmp_path):
    (tmp_path / "interactions.csv").write_text("")
    (tmp_path / "items.csv").write_text("item_id,title\n")
    with pytest.raises(DataFormatError, match=r"interactions\.csv: file is empty"):
        load_dataset("csv", tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(DataFormatError, match=r"cannot tell the format .*ratings\.csv \+ movies\.csv"):
        load_dataset("auto", other)


def test_amazon_ambiguous_and_missing_meta(tmp_path):
    for cat in ("Books", "Toys"):
        (tmp_path / f"reviews_{cat}_5.json").write_text('{"reviewerID": "A", "asin": "B", "unixReviewTime": 1}\n')
    with pytest.raises(DataFormatError, match=r"several reviews files"):
        load_dataset("amazon", tmp_path)
    with pytest.raises(DataFormatError, match=r"meta_<Category>\.json.*found meta files none"):
        load_dataset("amazon-books", tmp_path)


def test_ml100k_not_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOMR_HOME", str(tmp_path))
    with pytest.raises(DataFormatError, match=r"not fetched yet.*automr assets fetch"):
        load_dataset("ml-100k")
    with pytest.raises(DataFormatError, match=r"needs a path"):
        load_dataset("csv")

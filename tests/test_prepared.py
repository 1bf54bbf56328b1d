"""prepare -> files -> PreparedDataset.load round trip, on the hand-made dataset of test_protocol."""
from __future__ import annotations

import csv
import json

import pytest

from model.data.prepared import PreparedDataset, PreparedFormatError, prepare, prepare_cmd
from model.data.protocol import ProtocolConfig
from tests.test_protocol import CFG, ROWS, S_U1P4, S_U2P4, S_U2P5, samples_as_tuples


@pytest.fixture()
def raw(tmp_path):
    d = tmp_path / "raw"
    d.mkdir()
    with open(d / "interactions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        w.writerows(ROWS)
    with open(d / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item_id", "title"])
        w.writerows([(i, f"Title, {i} &amp; co") for i in ("1", "2", "3", "4", "5", "7", "9", "10")])
    return d


def test_round_trip(raw, tmp_path):
    out = tmp_path / "prep"
    ds = prepare("shop", raw, out, CFG, domain="product", progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["dataset.json", "items.jsonl", "interactions.csv", "train.jsonl", "valid.jsonl", "test.jsonl", "stats.json"])

    ds = PreparedDataset.load(out)
    assert ds.catalogue.item_ids == ["1", "2", "3", "7", "9", "10"]
    assert ds.catalogue.titles[5] == "Title, 10 & co"
    assert samples_as_tuples(ds.split("valid")) == [S_U2P4]
    assert samples_as_tuples(ds.split("test")) == [S_U2P5]
    assert samples_as_tuples(ds.split("train"))[-1] == S_U1P4 and len(ds.split("train")) == 7

    c = ds.config
    assert (c["name"], c["domain"], c["k_short"], c["max_history"], c["min_item"], c["min_user"]) == (
        "shop", "product", 2, 4, 2, 4)
    assert c["split"] == [0.8, 0.1, 0.1] and c["format"] == "csv" and c["source"] == str(raw.resolve())
    assert c["dropped"]["duplicate_interactions"] == 1
    assert (c["dropped"]["items_below_min_item"], c["dropped"]["users_below_min_user"]) == (2, 1)
    assert ds.protocol == CFG

    s = ds.stats
    assert {k: s[k] for k in ("interactions", "users", "items", "samples", "train", "valid", "test")} == {
        "interactions": 15, "users": 3, "items": 6, "samples": 9, "train": 7, "valid": 1, "test": 1}
    assert s["interactions_per_user"] == {"min": 4, "median": 5.0, "mean": 5.0, "max": 6}
    assert s["samples_with_full_history"] == 3  # u1p4, u2p4, u2p5
    assert s["density"] == round(15 / 18, 6)

    inter = ds.interactions
    assert inter.user.tolist() == ["u1"] * 5 + ["u10"] * 4 + ["u2"] * 6
    assert inter.item.tolist() == [1, 4, 5, 2, 0, 1, 0, 2, 4, 0, 1, 5, 2, 4, 3]
    assert (out / "interactions.csv").read_text().splitlines()[:3] == [
        "user_id,item_id,timestamp", "u1,2,100", "u1,9,100"]


def test_prepare_cmd_and_overwrite(raw, tmp_path):
    out = tmp_path / "prep"
    r = prepare_cmd("csv", str(out), path=str(raw), min_item=2, min_user=4, k_short=2, max_history=4)
    assert (r["out"], r["name"], r["domain"], r["train"], r["valid"], r["test"]) == (str(out), "csv", "item", 7, 1, 1)
    # preparing again into the same folder replaces it
    r2 = prepare_cmd("csv", str(out), path=str(raw), min_item=2, min_user=4, k_short=2, max_history=4,
                     split=(0.5, 0.25, 0.25))
    assert (r2["train"], r2["valid"], r2["test"]) == (4, 2, 3)
    assert len(PreparedDataset.load(out).split("test")) == 3


def test_refuses_foreign_folder(raw, tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(PreparedFormatError, match="not a prepared dataset; refusing"):
        prepare("csv", raw, foreign, CFG, progress=False)


def test_load_errors(raw, tmp_path):
    with pytest.raises(PreparedFormatError, match=r"is not a prepared dataset \(no dataset.json\)"):
        PreparedDataset.load(tmp_path / "nothing")
    out = tmp_path / "prep"
    prepare("csv", raw, out, CFG, progress=False)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        PreparedDataset.load(out).split("dev")
    (out / "test.jsonl").unlink()
    with pytest.raises(PreparedFormatError, match="test.jsonl is missing"):
        PreparedDataset.load(out)
    prepare("csv", raw, out, CFG, progress=False)
    (out / "valid.jsonl").write_text('{"user_id": "u2", "target": 99, "timestamp": 1, "history": [], "history_ts": []}\n')
    with pytest.raises(PreparedFormatError, match=r"valid.jsonl:1: target 99 outside the catalogue of 6"):
        PreparedDataset.load(out).split("valid")


def test_real_ml100k_if_fetched(tmp_path):
    """ML-100K from the fetched RecBole files (skipped when not fetched): counts of METHOD.md §1."""
    from model.assets import asset_paths

    paths = asset_paths()
    if not paths.ml100k_inter.is_file():
        pytest.skip("ML-100K not fetched (automr assets fetch)")
    ds = prepare("ml-100k", None, tmp_path / "ml", ProtocolConfig(), progress=False)
    s = ds.stats
    assert (s["users"], s["items"], s["interactions"]) == (941, 1348, 99240)
    assert (s["train"], s["valid"], s["test"]) == (71864, 8983, 8983)
    assert s["samples"] == s["interactions"] - 10 * s["users"]  # every user has >= 20 > K items
    assert json.loads((tmp_path / "ml" / "dataset.json").read_text())["domain"] == "movie"


def test_natural_titles_move_a_trailing_article_to_the_front(tmp_path):
    """`--titles natural`: catalogue titles as a sentence says them, everything else unchanged."""
    from model.data.prepared import PreparedDataset, prepare
    from model.data.protocol import ProtocolConfig
    from model.data.text import natural_title
    from tests.conftest import write_tiny_csv_dataset

    assert natural_title("Fugitive, The (1993)") == "The Fugitive (1993)"
    assert natural_title("Atalante, L' (1934)") == "L'Atalante (1934)"
    assert natural_title("Postman, The (Postino, Il) (1994)") == "The Postman (Postino, Il) (1994)"
    assert natural_title("Good, the Bad and the Ugly, The (1966)") == "The Good, the Bad and the Ugly (1966)"
    assert natural_title("Wings of Desire (Himmel über Berlin, Der) (1987)") == "Wings of Desire (Himmel über Berlin, Der) (1987)"
    assert natural_title("Star Wars (1977)") == "Star Wars (1977)"
    assert natural_title("Boot, Das") == "Das Boot"

    raw = tmp_path / "raw"
    write_tiny_csv_dataset(raw, n_users=4, per_user=12, seed=1)
    items = (raw / "items.csv").read_text().splitlines()
    items[1] = items[1].split(",")[0] + ",\"Fugitive, The (1993)\""
    (raw / "items.csv").write_text("\n".join(items) + "\n")
    cfg = ProtocolConfig(min_item=1, min_user=1, k_short=3)
    plain = prepare("csv", raw, tmp_path / "plain", cfg, progress=False)
    nat = prepare("csv", raw, tmp_path / "nat", cfg, progress=False, titles="natural")
    assert nat.config["titles"] == "natural" and plain.config["titles"] == "as-is"
    assert nat.catalogue.item_ids == plain.catalogue.item_ids
    assert nat.catalogue.titles == [natural_title(t) for t in plain.catalogue.titles]
    assert "The Fugitive (1993)" in nat.catalogue.titles and "Fugitive, The (1993)" in plain.catalogue.titles
    assert [s.to_json() for s in nat.split("test")] == [s.to_json() for s in plain.split("test")]
    assert PreparedDataset.load(tmp_path / "nat").catalogue.titles == nat.catalogue.titles

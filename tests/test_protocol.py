"""The protocol on a hand-made dataset whose samples and split are worked out by hand below."""
from __future__ import annotations

import numpy as np
import pytest

from model.data.protocol import ProtocolConfig, ProtocolError, apply_protocol, split_sizes
from model.data.types import Catalogue, Interactions

CFG = ProtocolConfig(min_item=2, min_user=4, k_short=2, max_history=4, split=(0.8, 0.1, 0.1))

# (user, original item id, timestamp)
ROWS = [
    # u1: three items at t=100 (tie), a duplicate row, item 5 (seen once in all: filtered)
    ("u1", "10", 100), ("u1", "9", 100), ("u1", "2", 100), ("u1", "3", 101), ("u1", "3", 101),
    ("u1", "5", 102), ("u1", "1", 103),
    ("u2", "1", 50), ("u2", "2", 60), ("u2", "10", 60), ("u2", "3", 70), ("u2", "9", 200), ("u2", "7", 210),
    ("u10", "2", 90), ("u10", "1", 95), ("u10", "3", 95), ("u10", "9", 100),
    # u3 has 4 interactions, but item 4 (seen once) goes first, leaving 3 < min_user: u3 goes.
    # Filtering users first would have kept u3. Item 7 then has 1 interaction left and stays (filter once).
    ("u3", "1", 10), ("u3", "2", 20), ("u3", "7", 35), ("u3", "4", 40),
]
# the input catalogue is deliberately in no particular order
IDS = ["10", "4", "2", "9", "1", "5", "3", "7"]


def make(rows=ROWS) -> Interactions:
    cat = Catalogue(item_ids=IDS, titles=[f"T{i}" for i in IDS])
    return Interactions(
        user=np.array([r[0] for r in rows], dtype=object),
        item=np.array([cat.index_of(r[1]) for r in rows], dtype=np.int64),
        timestamp=np.array([r[2] for r in rows], dtype=np.int64),
        catalogue=cat,
    )


def samples_as_tuples(samples):
    return [(s.user_id, s.target, s.timestamp, s.history, s.history_ts) for s in samples]


# By hand. Surviving items 1,2,3,7,9,10 -> dense 0..5 in numeric id order (9 before 10).
# Sequences by (timestamp, id): u1 [2,9,10 @100; 3 @101; 1 @103] = [1,4,5,2,0]
#                               u2 [1 @50; 2,10 @60; 3 @70; 9 @200; 7 @210] = [0,1,5,2,4,3]
#                               u10 [2 @90; 1,3 @95; 9 @100] = [1,0,2,4]
# Samples at positions >= 2, history = up to 4 previous. Ordered by (ts, user in string order
# u1 < u10 < u2, position): u1p2 and u10p3 tie at t=100.
S_U2P2 = ("u2", 5, 60, [0, 1], [50, 60])
S_U2P3 = ("u2", 2, 70, [0, 1, 5], [50, 60, 60])
S_U10P2 = ("u10", 2, 95, [1, 0], [90, 95])
S_U1P2 = ("u1", 5, 100, [1, 4], [100, 100])
S_U10P3 = ("u10", 4, 100, [1, 0, 2], [90, 95, 95])
S_U1P3 = ("u1", 2, 101, [1, 4, 5], [100, 100, 100])
S_U1P4 = ("u1", 0, 103, [1, 4, 5, 2], [100, 100, 100, 101])
S_U2P4 = ("u2", 4, 200, [0, 1, 5, 2], [50, 60, 60, 70])
S_U2P5 = ("u2", 3, 210, [1, 5, 2, 4], [60, 60, 70, 200])  # 5 previous items, the oldest cut


def test_filters_reindex_and_counts():
    res = apply_protocol(make(), CFG)
    assert res.catalogue.item_ids == ["1", "2", "3", "7", "9", "10"]
    assert res.catalogue.titles == ["T1", "T2", "T3", "T7", "T9", "T10"]
    r = res.report
    assert (r.interactions_in, r.duplicates_dropped) == (21, 1)
    assert (r.items_below_min, r.interactions_dropped_items) == (2, 2)  # items 4 and 5
    assert (r.users_below_min, r.interactions_dropped_users) == (1, 3)  # u3
    assert (r.interactions, r.users, r.items, r.samples) == (15, 3, 6, 9)
    inter = res.interactions  # sorted by (user, ts, item); users in natural (string) order
    assert inter.user.tolist() == ["u1"] * 5 + ["u10"] * 4 + ["u2"] * 6
    assert inter.item.tolist() == [1, 4, 5, 2, 0, 1, 0, 2, 4, 0, 1, 5, 2, 4, 3]
    assert inter.timestamp.tolist() == [100, 100, 100, 101, 103, 90, 95, 95, 100, 50, 60, 60, 70, 200, 210]


def test_samples_and_default_split():
    res = apply_protocol(make(), CFG)
    # 9 samples: train floor(7.2) = 7, valid floor(8.1) - 7 = 1, test 1
    assert samples_as_tuples(res.splits["train"]) == [S_U2P2, S_U2P3, S_U10P2, S_U1P2, S_U10P3, S_U1P3, S_U1P4]
    assert samples_as_tuples(res.splits["valid"]) == [S_U2P4]
    assert samples_as_tuples(res.splits["test"]) == [S_U2P5]
    assert (res.report.train, res.report.valid, res.report.test) == (7, 1, 1)
    assert res.report.split_timestamps == {"train": [60, 103], "valid": [200, 200], "test": [210, 210]}
    s = res.splits["test"][0]
    assert s.short_term(2) == [2, 4] and s.memory(2) == [1, 5]


def test_boundary_inside_a_timestamp_tie():
    # 0.5/0.25/0.25 of 9: train 4, valid floor(6.75) - 4 = 2, test 3; the train/valid boundary falls
    # between u1p2 and u10p3, both at t=100: the user tie-breaker decides.
    res = apply_protocol(make(), ProtocolConfig(min_item=2, min_user=4, k_short=2, max_history=4,
                                                split=(0.5, 0.25, 0.25)))
    assert samples_as_tuples(res.splits["train"]) == [S_U2P2, S_U2P3, S_U10P2, S_U1P2]
    assert samples_as_tuples(res.splits["valid"]) == [S_U10P3, S_U1P3]
    assert samples_as_tuples(res.splits["test"]) == [S_U1P4, S_U2P4, S_U2P5]


def test_independent_of_input_row_order():
    rng = np.random.default_rng(0)
    rows = [ROWS[i] for i in rng.permutation(len(ROWS))]
    a, b = apply_protocol(make(), CFG), apply_protocol(make(rows), CFG)
    for name in ("train", "valid", "test"):
        assert samples_as_tuples(a.splits[name]) == samples_as_tuples(b.splits[name])


def test_split_sizes_exact_decimals():
    assert split_sizes(10, (0.8, 0.1, 0.1)) == (8, 1, 1)
    assert split_sizes(100, (0.7, 0.2, 0.1)) == (70, 20, 10)  # 0.7 + 0.2 is 0.8999... in floats
    assert split_sizes(89830, (0.8, 0.1, 0.1)) == (71864, 8983, 8983)
    assert split_sizes(3, (0.8, 0.1, 0.1)) == (2, 0, 1)


def test_empty_after_filtering_is_a_clear_error():
    with pytest.raises(ProtocolError, match=r"nothing left after filtering items with < 2 and then users with < 40"):
        apply_protocol(make(), ProtocolConfig(min_item=2, min_user=40, k_short=2, max_history=4))
    with pytest.raises(ProtocolError, match=r"no user has more than k_short=6"):
        apply_protocol(make(), ProtocolConfig(min_item=2, min_user=4, k_short=6, max_history=6))


def test_bad_config():
    with pytest.raises(ValueError, match="max_history"):
        ProtocolConfig(k_short=10, max_history=5)
    with pytest.raises(ValueError, match="split"):
        ProtocolConfig(split=(0.8, 0.1, 0.2))
    assert ProtocolConfig.from_json(CFG.to_json()) == CFG

"""A dataset after loading and the protocol, stored as plain files that later stages read quickly.

Directory format::

    DIR/dataset.json      name, domain, format, source, the ProtocolConfig fields, and what was dropped
    DIR/items.jsonl       {"item_id", "title"} per line, in dense index order
    DIR/interactions.csv  user_id,item_id,timestamp (original ids; filtered; sorted by user, time, item)
    DIR/train.jsonl, valid.jsonl, test.jsonl   one Sample.to_json() per line, in split (time) order
    DIR/stats.json        interactions, users, items, samples, train, valid, test, ...

``dataset.json`` is written last: a folder without it is an interrupted ``prepare``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.data.loaders import load_dataset
from model.data.protocol import SPLITS, ProtocolConfig, ProtocolResult, apply_protocol, no_gc
from model.data.text import natural_title
from model.data.types import Catalogue, Interactions, Sample

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FILES = ("dataset.json", "items.jsonl", "interactions.csv", "train.jsonl", "valid.jsonl", "test.jsonl", "stats.json")


class PreparedFormatError(ValueError):
    """A prepared-dataset folder is missing, incomplete or inconsistent."""


@dataclass
class PreparedDataset:
    root: Path
    config: dict  # dataset.json
    stats: dict  # stats.json
    catalogue: Catalogue
    _splits: dict[str, list[Sample]] = field(default_factory=dict, repr=False)
    _interactions: Interactions | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.config["name"]

    @property
    def domain(self) -> str:
        return self.config["domain"]

    @property
    def k_short(self) -> int:
        return int(self.config["k_short"])

    @property
    def protocol(self) -> ProtocolConfig:
        return ProtocolConfig.from_json(self.config)

    @classmethod
    def load(cls, root: Path | str) -> "PreparedDataset":
        """Read the config, stats and catalogue; splits and interactions load on first use."""
        root = Path(root).expanduser()
        if not (root / "dataset.json").is_file():
            raise PreparedFormatError(
                f"{root} is not a prepared dataset (no dataset.json); run `automr data prepare --out {root}`"
            )
        for f in FILES:
            if not (root / f).is_file():
                raise PreparedFormatError(f"{root} is incomplete: {f} is missing; prepare it again")
        config = json.loads((root / "dataset.json").read_text())
        stats = json.loads((root / "stats.json").read_text())
        ids, titles = [], []
        with open(root / "items.jsonl", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                try:
                    d = json.loads(line)
                    ids.append(str(d["item_id"]))
                    titles.append(d["title"])
                except (ValueError, KeyError) as e:
                    raise PreparedFormatError(f"{root / 'items.jsonl'}:{lineno}: bad item line ({e})") from e
        if len(ids) != stats.get("items", len(ids)):
            raise PreparedFormatError(f"{root}: items.jsonl has {len(ids)} items, stats.json says {stats['items']}")
        return cls(root=root, config=config, stats=stats, catalogue=Catalogue(item_ids=ids, titles=titles))

    def split(self, name: str) -> list[Sample]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; one of {SPLITS}")
        if name not in self._splits:
            self._splits[name] = _read_samples(self.root / f"{name}.jsonl", len(self.catalogue))
        return self._splits[name]

    @property
    def interactions(self) -> Interactions:
        if self._interactions is None:
            self._interactions = _read_interactions(self.root / "interactions.csv", self.catalogue)
        return self._interactions


def _read_samples(path: Path, n_items: int) -> list[Sample]:
    out = []
    with no_gc(), open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                s = Sample(**json.loads(line))  # written by us: the keys are Sample's fields
            except (ValueError, TypeError) as e:
                raise PreparedFormatError(f"{path}:{lineno}: not a sample ({e})") from e
            if not 0 <= s.target < n_items:
                raise PreparedFormatError(f"{path}:{lineno}: target {s.target} outside the catalogue of {n_items}")
            out.append(s)
    return out


def _read_interactions(path: Path, cat: Catalogue) -> Interactions:
    users, items, ts = [], [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["user_id", "item_id", "timestamp"]:
            raise PreparedFormatError(f"{path}:1: expected header user_id,item_id,timestamp, got {header}")
        for row in reader:
            try:
                users.append(row[0])
                items.append(cat.index_of(row[1]))
                ts.append(int(row[2]))
            except (IndexError, KeyError, ValueError) as e:
                raise PreparedFormatError(f"{path}:{reader.line_num}: bad row {row} ({e!r})") from e
    return Interactions(user=np.array(users, dtype=object), item=np.array(items, dtype=np.int64),
                        timestamp=np.array(ts, dtype=np.int64), catalogue=cat)


# ----------------------------------------------------------------------------- writing


def _replace_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        write(f)
    os.replace(tmp, path)


def _stats(res: ProtocolResult, max_history: int) -> dict:
    rep, inter = res.report, res.interactions
    per_user = np.unique(inter.user.astype(str), return_counts=True)[1]
    n_users, n_items = rep.users, rep.items
    hist = [len(s.history) for sp in res.splits.values() for s in sp]
    return {
        "interactions": rep.interactions,
        "users": n_users,
        "items": n_items,
        "samples": rep.samples,
        "train": rep.train,
        "valid": rep.valid,
        "test": rep.test,
        "density": round(rep.interactions / (n_users * n_items), 6),
        "interactions_per_user": {"min": int(per_user.min()), "median": float(np.median(per_user)),
                                  "mean": round(float(per_user.mean()), 2), "max": int(per_user.max())},
        "history_length_mean": round(float(np.mean(hist)), 2),
        "samples_with_full_history": int(sum(h >= max_history for h in hist)),
        "samples_target_in_history": rep.samples_target_in_history,
        "split_timestamps": rep.split_timestamps,
        "duplicate_titles": len(res.catalogue) - len(set(res.catalogue.titles)),
    }


def write_prepared(res: ProtocolResult, out_dir: Path, *, name: str, domain: str, cfg: ProtocolConfig,
                   source: str, fmt: str, load_report: dict, titles: str = "as-is") -> None:
    out_dir = Path(out_dir).expanduser()
    if out_dir.is_file() or (out_dir.exists() and any(out_dir.iterdir())
                             and not any((out_dir / f).exists() for f in FILES)):
        raise PreparedFormatError(f"{out_dir} exists and is not a prepared dataset; refusing to write into it")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dataset.json").unlink(missing_ok=True)  # marks the folder incomplete until the end
    cat = res.catalogue

    def items(f):
        for iid, title in zip(cat.item_ids, cat.titles):
            f.write(json.dumps({"item_id": iid, "title": title}, ensure_ascii=False) + "\n")

    def interactions(f):
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["user_id", "item_id", "timestamp"])
        inter = res.interactions
        ids = cat.item_ids
        for u, i, t in zip(inter.user.tolist(), inter.item.tolist(), inter.timestamp.tolist()):
            w.writerow([u, ids[i], t])

    def samples(sp):
        def write(f):
            for s in sp:
                f.write(json.dumps(s.to_json(), separators=(",", ":")) + "\n")
        return write

    _replace_write(out_dir / "items.jsonl", items)
    _replace_write(out_dir / "interactions.csv", interactions)
    for name_ in SPLITS:
        _replace_write(out_dir / f"{name_}.jsonl", samples(res.splits[name_]))
    stats = _stats(res, cfg.max_history)
    _replace_write(out_dir / "stats.json", lambda f: f.write(json.dumps(stats, indent=2) + "\n"))
    rep = res.report.to_json()
    config = {
        "name": name,
        "domain": domain,
        **cfg.to_json(),
        "format": fmt,
        "titles": titles,
        "source": source,
        "format_version": FORMAT_VERSION,
        "order": "per user by (timestamp, item id in natural order); split by (target timestamp, user id, position)",
        "split_boundaries": "floor(n*train), floor(n*(train+valid))",
        "dropped": {
            "malformed_rows": load_report.get("malformed_skipped", 0),
            "malformed_examples": load_report.get("malformed_examples", []),
            "items_without_title": load_report.get("items_without_title", 0),
            "interactions_without_title": load_report.get("interactions_without_title", 0),
            "duplicate_interactions": rep["duplicates_dropped"],
            "items_below_min_item": rep["items_below_min"],
            "interactions_of_rare_items": rep["interactions_dropped_items"],
            "users_below_min_user": rep["users_below_min"],
            "interactions_of_rare_users": rep["interactions_dropped_users"],
        },
        "loaded": {k: load_report.get(k) for k in ("rows_read", "interactions", "users", "items", "item_rows")},
    }
    _replace_write(out_dir / "dataset.json", lambda f: f.write(json.dumps(config, indent=2, ensure_ascii=False) + "\n"))


TITLE_STYLES = ("as-is", "natural")


def prepare(name: str, path: Path | str | None, out_dir: Path | str, cfg: ProtocolConfig = ProtocolConfig(),
            *, domain: str | None = None, progress: bool = True, titles: str = "as-is") -> PreparedDataset:
    """Load ``name`` from ``path``, apply the protocol, write ``out_dir``, and return it loaded.
    ``titles="natural"``: a trailing article moves to the front (``text.natural_title``)."""
    if titles not in TITLE_STYLES:
        raise ValueError(f"titles must be one of {TITLE_STYLES}, got {titles!r}")
    t0 = time.perf_counter()
    loaded = load_dataset(name, path, domain=domain)
    if titles == "natural":
        cat = loaded.interactions.catalogue
        natural = Catalogue(list(cat.item_ids), [natural_title(t) for t in cat.titles])
        loaded = dataclasses.replace(loaded, interactions=dataclasses.replace(loaded.interactions, catalogue=natural))
    t1 = time.perf_counter()
    res = apply_protocol(loaded.interactions, cfg, progress=progress)
    t2 = time.perf_counter()
    source = loaded.report.files[0] if path is None else str(Path(path).expanduser().resolve())
    write_prepared(res, Path(out_dir), name=loaded.name, domain=loaded.domain, cfg=cfg, source=source,
                   fmt=loaded.report.format, load_report=loaded.report.to_json(), titles=titles)
    t3 = time.perf_counter()
    log.info("prepared %s in %.1fs (load %.1fs, protocol %.1fs, write %.1fs)", loaded.name, t3 - t0,
             t1 - t0, t2 - t1, t3 - t2)
    return PreparedDataset.load(out_dir)


def prepare_cmd(dataset: str, out: str, path: str | None = None, domain: str | None = None,
                min_item: int = 5, min_user: int = 20, k_short: int = 10, max_history: int = 100,
                split: tuple[float, float, float] = (0.8, 0.1, 0.1), titles: str = "as-is") -> dict:
    """For ``automr data prepare --dataset NAME [--path P] --out DIR``: returns ``{"out", **stats}``."""
    cfg = ProtocolConfig(min_item=min_item, min_user=min_user, max_history=max_history, k_short=k_short,
                         split=tuple(split))
    ds = prepare(dataset, path, out, cfg, domain=domain, titles=titles)
    return {"out": str(ds.root), "name": ds.name, "domain": ds.domain, **ds.stats}

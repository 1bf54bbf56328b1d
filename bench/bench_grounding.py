"""Recall of the approximate grounding indexes (IVF, HNSW) against exact IndexFlatL2, with build and
query times, on a synthetic clustered catalogue (title embeddings cluster by genre and wording).

    python bench/bench_grounding.py --items 100000 --dim 576 --queries 200
"""
from __future__ import annotations

import argparse

from model.grounding import CatalogueIndex, IndexConfig, measure_recall, synthetic_catalogue


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--clusters", type=int, default=4096)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--k", type=int, default=20)
    args = ap.parse_args()

    items, queries = synthetic_catalogue(args.items, args.dim, args.queries, n_clusters=args.clusters,
                                         noise=args.noise)
    exact = CatalogueIndex(items, IndexConfig(kind="flat"))
    print(f"catalogue {args.items} x {args.dim}, {args.clusters} clusters, {args.queries} queries, k={args.k}")
    for kind, params in [("ivf", {"nprobe": 8}), ("ivf", {"nprobe": 32}),
                         ("hnsw", {"ef_search": 64}), ("hnsw", {"ef_search": 256})]:
        print(measure_recall(kind, items, queries, k=args.k, exact=exact, **params).row())


if __name__ == "__main__":
    main()

"""Markdown table of the layer sweep (bench/sweep_layers.sh): per L, bigrec and automr on the validation
subset and the paired bootstrap CI of automr - bigrec.

    python bench/sweep_report.py runs/ml-100k/sweep
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(root: Path) -> str:
    rows = ["| L | n | " + " | ".join(f"bigrec {m} | automr {m} | diff [95% CI]" for m in ("recall@20", "ndcg@20")) + " |",
            "|---:|---:|" + "---:|---:|---|" * 2]
    for d in sorted(root.glob("L*"), key=lambda p: int(p.name[1:])):
        cmp_p = d / "compare.json"
        if not cmp_p.is_file():
            continue
        c = json.loads(cmp_p.read_text())
        cells = []
        for m in ("recall@20", "ndcg@20"):
            x = c[m]
            cells.append(f"{x['b']:.4f} | {x['a']:.4f} | {x['diff']:+.4f} [{x['lo']:+.4f}, {x['hi']:+.4f}]")
        rows.append(f"| {d.name[1:]} | {c['n']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ml-100k/sweep")))

"""Markdown tables from a run of experiments/difr/run.py (for RESULTS.md).

    .venv/bin/python experiments/difr/tables.py experiments/difr/results_smollm2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd


def md(t: pd.DataFrame, index: bool = True) -> str:
    """A DataFrame as a markdown table (no tabulate dependency)."""
    t = t.reset_index() if index else t
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    rows = [" | ".join(map(str, t.columns))] + [" | ".join("---" for _ in t.columns)]
    rows += [" | ".join(fmt(v) for v in r) for r in t.itertuples(index=False)]
    return "\n".join(f"| {r} |" for r in rows)


MAIN = ["activation k=2", "activation k=8", "activation k=32", "activation k=128", "activation k=8 orthonormal",
        "activation k=8 L2", "token", "TOPLOC"]


def auc_table(df: pd.DataFrame, n: int) -> str:
    sub = df[(df.n_tokens == n) & df.method.isin(MAIN)]
    t = sub.pivot_table(index="condition", columns="method", values="auc").reindex(columns=[m for m in MAIN if m in set(sub.method)])
    return md(t.round(3))


def auc_vs_n(df: pd.DataFrame, condition: str) -> str:
    sub = df[(df.condition == condition) & df.method.isin(MAIN)]
    t = sub.pivot_table(index="method", columns="n_tokens", values="auc").reindex([m for m in MAIN if m in set(sub.method)])
    return md(t.round(3))


def fpr_table(fpr: pd.DataFrame) -> str:
    cols = ["method", "n_tokens", "threshold", "heldout_fpr", "n_heldout_windows"]
    tpr = [c for c in fpr.columns if c.startswith("tpr: ") and any(w in c for w in ("4-bit RTN g128", "8-bit", "steering"))]
    return md(fpr[cols + tpr], index=False)


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    df, fpr = pd.read_csv(out / "auc.csv"), pd.read_csv(out / "fpr.csv")
    meta = json.loads((out / "meta.json").read_text())
    print("## meta\n```json\n" + json.dumps(meta, indent=1) + "\n```\n")
    for n in (1, 2, 8, 32):
        print(f"## ROC AUC at n = {n} tokens\n\n{auc_table(df, n)}\n")
    for cond in ("4-bit RTN g128", "8-bit RTN g128", "1% sampling bug", "temperature 0.9 (claims 1.0)"):
        if cond in set(df.condition):
            print(f"## AUC vs n: {cond}\n\n{auc_vs_n(df, cond)}\n")
    print(f"## calibrated thresholds: held-out FPR and power\n\n{fpr_table(fpr)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

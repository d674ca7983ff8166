"""Markdown tables from a run of experiments/difr/run.py (for RESULTS.md).

    .venv/bin/python experiments/difr/tables.py experiments/difr/results_smollm2
"""

from __future__ import annotations

import json
import math
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
        "activation k=8 L2", "activation k=8 ulp", "activation k=8 ulp unfloored", "token", "token clip 1.0", "TOPLOC"]


def auc_table(df: pd.DataFrame, n: int) -> str:
    sub = df[(df.n_tokens == n) & df.method.isin(MAIN)]
    t = sub.pivot_table(index="condition", columns="method", values="auc").reindex(columns=[m for m in MAIN if m in set(sub.method)])
    return md(t.round(3))


def auc_vs_n(df: pd.DataFrame, condition: str) -> str:
    sub = df[(df.condition == condition) & df.method.isin(MAIN)]
    t = sub.pivot_table(index="method", columns="n_tokens", values="auc").reindex([m for m in MAIN if m in set(sub.method)])
    return md(t.round(3))


def fpr_table(fpr: pd.DataFrame) -> str:
    cols = ["method", "target_fpr", "n_tokens", "n_calibration_windows", "status", "threshold", "heldout_fpr",
            "n_heldout_windows"]
    cols = [c for c in cols if c in fpr.columns]
    tpr = [c for c in fpr.columns if c.startswith("tpr: ") and any(w in c for w in ("4-bit RTN g128", "8-bit", "steering"))]
    return md(fpr[cols + tpr], index=False)


def binom_tail(x: int, n: int, p: float) -> float:
    """P(X >= x) for X ~ Binomial(n, p): how surprising x false positives in n windows are at rate p."""
    log_pmf = lambda i: (math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)  # noqa: E731
                         + i * math.log(p) + (n - i) * math.log1p(-p))
    return sum(math.exp(log_pmf(i)) for i in range(x, n + 1))  # in logs: comb(1494, i) overflows a float


def fpr_summary(fpr: pd.DataFrame) -> str:
    """Per (method, target FPR) and n: false positives / held-out windows, or "insuff. (m/needed)"."""
    out = []
    if "status" not in fpr:  # files from before the conformal rule: one target, every cell "calibrated"
        fpr = fpr.assign(status="calibrated", n_calibration_windows=float("nan"), windows_needed=float("nan"))
    for target, f in fpr.groupby("target_fpr", sort=True):
        f = f.copy()
        cells = []
        for r in f.itertuples():
            if r.status != "calibrated":
                cells.append(f"insuff. ({int(r.n_calibration_windows)}/{int(r.windows_needed)})")
            elif r.n_heldout_windows == 0:
                cells.append("no held-out window")
            else:
                c, w = int(round(r.heldout_fpr * r.n_heldout_windows)), int(r.n_heldout_windows)
                over = f" **over** (p = {binom_tail(c, w, target):.2f})" if r.heldout_fpr > target else ""
                cells.append(f"{c}/{w}{over}")
        f["cell"] = cells
        t = f.pivot(index="method", columns="n_tokens", values="cell").reindex(list(dict.fromkeys(f.method)))
        ok = f[(f.status == "calibrated") & (f.n_heldout_windows > 0)]
        if "heldout_fpr" not in ok:
            ok = ok.assign(heldout_fpr=float("nan"))
        over = int((ok.heldout_fpr > target).sum())
        out.append(f"target FPR {target:g} (p: exact binomial P(>= this many | FPR = target)):\n\n{md(t)}\n\n"
                   f"calibrated cells over the target: {over} of {len(ok)}; "
                   f"insufficient cells: {int((f.status != 'calibrated').sum())} of {len(f)}")
    return "\n\n".join(out)


def power_table(fpr: pd.DataFrame, ns=(1, 8, 32)) -> str:
    """Share of each cheating run's windows over the calibrated threshold, per method, target FPR and n in ns,
    for every condition of the run ("ins." where the cell has no threshold, blank where the method's
    reference does not apply to the condition)."""
    conds = [c for c in fpr.columns if c.startswith("tpr: ")]
    f = fpr[fpr.n_tokens.isin(ns)]
    t = f[["method", "target_fpr", "n_tokens"]].copy()
    for c in conds:
        vals = f[c].round(3).astype(object)
        if "status" in f:
            vals[f.status != "calibrated"] = "ins."
        t[c[5:]] = vals.where(vals.notna(), "")
    return md(t, index=False)


def min_n_table(df: pd.DataFrame, level: float = 0.999) -> str:
    """Smallest n with AUC >= level per condition and method ("-" if never)."""
    sub = df[df.method.isin(MAIN)]
    rows = {}
    for (cond, method), g in sub.groupby(["condition", "method"]):
        ok = g[g.auc >= level].n_tokens
        rows.setdefault(cond, {})[method] = int(ok.min()) if len(ok) else "-"
    t = pd.DataFrame(rows).T.reindex(columns=[m for m in MAIN if m in set(sub.method)])
    return md(t)


def claims_table(claims: pd.DataFrame) -> str:
    """Whole claims decided per sequence: verified / rejected / insufficient of the claims of each run."""
    c = claims.copy()
    c["cell"] = [f"{r.verified}/{r.rejected}/{r.insufficient}" for r in c.itertuples()]
    t = c.pivot_table(index=["target_fpr", "method", "sequences_per_claim", "tokens_per_sequence"], columns="run", values="cell",
                      aggfunc="first")
    return md(t.reindex(columns=list(dict.fromkeys(c.run))))


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
    print(f"## smallest n with AUC >= 0.999\n\n{min_n_table(df)}\n")
    print(f"## held-out false positives / windows\n\n{fpr_summary(fpr)}\n")
    print(f"## calibrated thresholds: held-out FPR and power\n\n{fpr_table(fpr)}\n")
    print(f"## power (share of cheating windows over the threshold), every condition\n\n{power_table(fpr)}\n")
    if (out / "claims.csv").is_file():
        print("## whole claims, decided per sequence (verified/rejected/insufficient claims)\n\n"
              f"{claims_table(pd.read_csv(out / 'claims.csv'))}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

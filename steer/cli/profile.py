"""`steer profile`: fTRI expert profiling of an MoE (steer.ftri)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from steer.cli import CLIError, print_json
from steer.options import PROFILE_ENGINES, PROFILE_SCORES, PROFILE_TOKENS
from steer.progress import bar

DEFAULT_MODEL = "smollm2-moe"
# Overrides the default model (e.g. a tiny checkpoint in tests, or your own MoE for every run).
MODEL_ENV = "STEER_PROFILE_MODEL"
# French vs English everyday questions (steer/data/prompts): a behaviour SmolLM2 shows reliably
# (it mostly answers French questions in French) that a transparent labeller can measure.
DEFAULT_CLASSES = ("french=builtin:questions-fr", "english=builtin:questions-en")

EXAMPLES = """\
examples:
  steer profile                                    French vs English questions on the SmolLM2 MoE
  steer profile --model ./my_moe_checkpoint --class harmful=builtin:advbench --class benign=builtin:benign
  steer profile --class refusal=refusal.txt --class base=base.jsonl --score risk_diff --tokens response
  steer profile --prompts builtin:advbench --labeller refusal --target REFUSED --limit 100
  steer profile --out runs/fr --top 20 --json
  steer profile --engine vllm --tensor-parallel-size 2      the same profile counted inside a vLLM engine

Class SOURCE is a .txt (one prompt per line), .jsonl, .yaml (list, {prompts: [...]}, PyRIT seeds, or
{template: "What happened {time} {place}?", slots: {...}}) or builtin:NAME (questions-en,
questions-fr, advbench, benign, prose). The first class is the target unless --target says.
Writes DIR/profile.safetensors, DIR/profile.json, DIR/heatmap.png, DIR/heatmap.html, DIR/top.html
(the HTML files load DIR/plotly.min.js, so they open offline). The default model is
$STEER_PROFILE_MODEL if set, else smollm2-moe (built from SmolLM2 on first use, minutes).
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "profile", help="fTRI: find the experts a behaviour uses (per-class routing maps, scores, CIs)",
        description="Run prompt classes through an MoE, count per (layer, expert) the tokens routed there, "
                    "score experts (mote / risk_diff / npmi) with bootstrap CIs, save the profile and heatmaps.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get(MODEL_ENV) or DEFAULT_MODEL,
                   help=f"packaged name, checkpoint dir or .gguf (default %(default)s, built on first use; "
                        f"${MODEL_ENV} changes it)")
    p.add_argument("--class", dest="classes", action="append", metavar="NAME=SOURCE",
                   help=f"a prompt class (repeat; default {' '.join(DEFAULT_CLASSES)})")
    p.add_argument("--prompts", metavar="SOURCE", help="one pooled prompt set whose classes come from --labeller")
    p.add_argument("--labeller", help="label the model's answers (refusal, french, numbered, code) into classes")
    p.add_argument("--tokens", choices=PROFILE_TOKENS, default="prompt",
                   help="which tokens count (default %(default)s: MoTE; response = SteerMoE, teacher-forced)")
    p.add_argument("--score", choices=PROFILE_SCORES, default="mote", help="default %(default)s")
    p.add_argument("--target", help="the behaviour class (default: the first class)")
    p.add_argument("--no-normalize", action="store_true", help="mote: raw counts, not per-prompt fractions")
    p.add_argument("--bootstrap", type=int, default=200, help="Poisson bootstrap replicates (default %(default)s)")
    p.add_argument("--limit", type=int, help="at most this many prompts per class (seeded sample)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length for --labeller / response tokens")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts raw")
    p.add_argument("--top", type=int, default=10, help="rows of the printed ranking (default %(default)s)")
    p.add_argument("--out", type=Path, help="output dir (default runs/profile-<timestamp>)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--engine", choices=PROFILE_ENGINES, default="hf",
                   help="hf: steer's Hugging Face forward (default); vllm: count the routing a vLLM engine makes "
                        "(needs vLLM installed; a checkpoint directory or packaged name, not GGUF)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="--engine vllm: tensor parallel ranks")
    p.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _classes(args):
    from steer.prompts import parse_class_spec

    if args.prompts:
        if args.classes:
            raise CLIError("give either --class (prompt classes) or --prompts with --labeller, not both")
        if not args.labeller:
            raise CLIError("--prompts needs --labeller to split the answers into classes")
        sets = [parse_class_spec(args.prompts)]
    else:
        if args.labeller:
            raise CLIError("--labeller needs --prompts SOURCE (the pooled prompts to answer and label)")
        specs = args.classes or list(DEFAULT_CLASSES)
        if len(specs) < 2:
            raise CLIError("give at least two --class NAME=SOURCE (a behaviour and a baseline)")
        sets = [parse_class_spec(s) for s in specs]
    if args.limit:
        sets = [s.sample(args.limit, seed=0) for s in sets]
    return sets


def run(args) -> int:
    import torch

    from steer.ftri import ProfileConfig, profile
    from steer.models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ProfileConfig(tokens=args.tokens, score=args.score, target=args.target,
                           normalize=not args.no_normalize, n_bootstrap=args.bootstrap, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, chat_template=False if args.no_chat_template else None)
    config.validate()
    sets = _classes(args)
    classes = sets[0] if args.labeller else sets
    if args.engine == "vllm":
        prof, name = _profile_vllm(args, classes, config)
    else:
        lm = load(args.model, progress=bar("steer: loading", enabled=not args.quiet))
        name = lm.name
        prof = profile(lm.model, lm.tokenizer, classes, config, labeller=args.labeller, progress=_bar(args),
                       weights_hash=lm.weights_hash)
    prof.stats["model_name"] = args.model  # lets `steer switch --profile DIR` reload the same model
    out = args.out or Path("runs") / f"profile-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    st, js = prof.save(out)
    png = write_heatmap_png(prof, out / "heatmap.png")
    prof.figure().write_html(out / "heatmap.html", include_plotlyjs="directory")
    prof.bar_figure(min(args.top, prof.scores.numel())).write_html(out / "top.html", include_plotlyjs="directory")
    top = prof.top(args.top)
    summary = {"out": str(out), "files": [str(st), str(js), str(png), str(out / "heatmap.html"), str(out / "top.html")],
               "model": name, "classes": prof.classes, "target": prof.target, "score": config.score,
               "tokens": config.tokens, "stats": prof.stats,
               "top": [t.__dict__ for t in top]}
    if args.json:
        print_json(summary)
        return 0
    print(f"{name}: {prof.stats['prompts']} prompts ({prof.stats['prompts_per_class']}), "
          f"{prof.stats['tokens']} tokens, {prof.stats['seconds']} s; target {prof.target!r}, score {config.score}")
    ci = f" {round(config.ci * 100)}% CI" if prof.ci_low is not None else ""
    print(f"{'rank':>4} {'layer':>5} {'expert':>6} {'score':>9}{ci}")
    for t in top:
        tail = f"  [{t.ci_low:+.4f}, {t.ci_high:+.4f}]" if t.ci_low is not None else ""
        print(f"{t.rank:>4} {t.layer:>5} {t.expert:>6} {t.score:+9.4f}{tail}")
    print(f"wrote {out}/ (profile.safetensors, profile.json, heatmap.png, heatmap.html, top.html)", file=sys.stderr)
    return 0


def checkpoint_dir(model: str) -> Path:
    """A checkpoint directory for an engine that loads one (vLLM): packaged names are fetched/built."""
    from steer.models import _ensure_built, _looks_like_path, fetch, resolve_name

    entry = None if _looks_like_path(model) else resolve_name(model)
    if entry is not None:
        return _ensure_built(entry) if entry.built_by else fetch(entry.name)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise CLIError(f"--engine vllm needs a checkpoint directory (config.json + *.safetensors) or a packaged "
                       f"model name; {model!r} is not one (GGUF files: convert with `steer models` first)")
    return path


def _bar(args):
    return bar("steer profile", "prompt", enabled=not args.quiet)


def _profile_vllm(args, classes, config):
    try:
        import vllm  # noqa: F401

        from steer.serving.vllm_profile import profile_vllm
    except ImportError as exc:
        raise CLIError(f"--engine vllm needs vLLM in this environment ({exc}); install it beside steer "
                       f"(see .ci/vllm.sh) or use --engine hf") from exc
    if args.tensor_parallel_size < 1:
        raise CLIError(f"--tensor-parallel-size must be >= 1, got {args.tensor_parallel_size}")
    path = checkpoint_dir(args.model)
    prof = profile_vllm(str(path), classes, config, labeller=args.labeller, progress=_bar(args),
                        tensor_parallel_size=args.tensor_parallel_size)
    return prof, args.model


def _diverging(v: float) -> tuple[int, int, int]:
    """Blue (-1) - white (0) - red (+1), like plotly's RdBu_r at its ends."""
    v = max(-1.0, min(1.0, v))
    end = (178, 24, 43) if v > 0 else (33, 102, 172)
    a = abs(v)
    return tuple(round(255 + (c - 255) * a) for c in end)


def write_heatmap_png(prof, path: Path, cell: tuple[int, int] = (22, 14)) -> Path:
    """The profile's layer x expert heatmap as a PNG drawn with Pillow.

    Plotly's PNG export needs kaleido and a browser; a PNG that any viewer opens offline only needs
    the score grid, so it is drawn directly (same colours and symmetric range as `Profile.figure`).
    """
    from PIL import Image, ImageDraw, ImageFont

    z = prof.scores.float()
    n_rows, n_cols = z.shape
    lim = float(z.abs().max()) or 1.0
    font = ImageFont.load_default(size=11)
    cw, ch = cell
    left, top, bar_w = 60, 40, 14
    width = left + n_cols * cw + 30 + bar_w + 70
    height = top + n_rows * ch + 40
    img = Image.new("RGB", (width, max(height, top + 160)), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), f"{prof.config.score}: {prof.target} vs rest (max |score| {lim:.3g})", fill="black", font=font)
    for r in range(n_rows):
        y = top + r * ch
        if n_rows <= 40 or r % 2 == 0:
            d.text((left - 6, y + ch / 2), str(prof.layers[r]), fill="black", font=font, anchor="rm")
        for c in range(n_cols):
            x = left + c * cw
            d.rectangle([x, y, x + cw - 1, y + ch - 1], fill=_diverging(float(z[r, c]) / lim))
    for c in range(n_cols):
        if n_cols <= 32 or c % 4 == 0:
            d.text((left + c * cw + cw / 2, top + n_rows * ch + 4), str(c), fill="black", font=font, anchor="mt")
    d.text((left + n_cols * cw / 2, top + n_rows * ch + 20), "expert", fill="black", font=font, anchor="mt")
    d.text((6, top - 16), "MoE layer", fill="black", font=font)
    bx, bh = left + n_cols * cw + 30, n_rows * ch
    for i in range(bh):
        d.line([bx, top + i, bx + bar_w, top + i], fill=_diverging(1 - 2 * i / max(bh - 1, 1)))
    d.text((bx + bar_w + 4, top), f"{lim:+.3g}", fill="black", font=font, anchor="lt")
    d.text((bx + bar_w + 4, top + bh / 2), "0", fill="black", font=font, anchor="lm")
    d.text((bx + bar_w + 4, top + bh), f"{-lim:+.3g}", fill="black", font=font, anchor="lb")
    img.save(path)
    return path

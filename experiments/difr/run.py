"""DiFR detection experiment: can a verifier tell an honest provider from a cheating one?

An honest provider serves the reference model (fp32 SmolLM2-135M-Instruct, seeded Gumbel sampling
at T=1, top-p=0.95) under benign numerical noise: batch composition and padding, eager vs SDPA
attention, 1 vs 2 threads. A cheating provider claims the same but serves 4-/8-bit RTN weights, a
different model, the wrong temperature / top-p / seed, a sampler with a 1% bug, or a steering
intervention that was (not) applied. The verifier teacher-forces every claim once through the
reference model and scores it with Activation-DiFR (several k), Token-DiFR and TOPLOC.

Scores are averaged over disjoint windows of n consecutive generated tokens inside one sequence
(never across a sequence boundary; a sequence's last len % n tokens are dropped); ROC AUC compares
the windows of the held-out honest runs with those of each cheating run. Thresholds are split-
conformal ranks over the same kind of windows of separate honest runs (other prompts, other seeds)
at each target FPR; a cell with fewer than 1/FPR calibration windows is "insufficient" (no
threshold, never counted as a pass). The FPR is measured on the held-out honest runs.

    .venv/bin/python experiments/difr/run.py                  # SmolLM2, ~20-40 min on 1 busy core
    .venv/bin/python experiments/difr/run.py --model smollm2-moe --n-calib 6 --n-heldout 6 \
        --max-new-tokens 16 --conditions g128 steering
    .venv/bin/python experiments/difr/run.py --rescore         # re-analyse the kept raw runs only
    # only a new condition, against a kept collection's calibration and honest runs (repeat its settings):
    .venv/bin/python experiments/difr/run.py --n-calib 38 --n-heldout 12 --max-new-tokens 128 \
        --benign-batch 13 13 13 --cheat-batch 12 --conditions "wrong seed" --no-steering \
        --extend ~/.cache/steer/difr/raw_results_smollm2_long.pt --out experiments/difr/results_more
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from steer.difr import (
    Calibration,
    DiFRConfig,
    Fingerprints,
    GumbelSampler,
    SamplingParams,
    fingerprint_prompts,
    projection_matrix,
    quantize_rtn,
    teacher_force,
    toploc,
)
from steer.difr.fingerprint import encode_prompts
from steer.difr.sampling import gumbel_noise
from steer.difr.verify import (
    ROUNDING_BOUND,
    TOKEN_CLIP,
    Reference,
    activation_distances,
    clip_margins,
    window_means,
)
from steer.identity import model_identity

HERE = Path(__file__).parent
KS = (2, 4, 8, 16, 32, 64, 128)
NS = (1, 2, 4, 8, 16, 32, 64, 128)
CLAIM = SamplingParams(temperature=1.0, top_p=0.95)
# Benign provider variants: (attention, batch size, threads)
BENIGN_VARIANTS = (("sdpa", 3, 1), ("eager", 2, 1), ("sdpa", 3, 2))
VERIFIER_BATCH = 4  # the verifier's own batch composition differs from every provider's


def log(msg: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Providers


class BuggySampler(GumbelSampler):
    """Claims the shared seed but draws fresh noise for `rate` of the tokens (a 1% sampling bug)."""

    def __init__(self, params, seeds, prompt_length, rate=0.01, seed=1234):
        super().__init__(params, seeds, prompt_length)
        self.rate, self.gen = rate, torch.Generator().manual_seed(seed)

    def noise(self, row, step, vocab):
        if float(torch.rand(1, generator=self.gen)) < self.rate:
            return gumbel_noise(int(torch.randint(2**62, (1,), generator=self.gen)), step, vocab)
        return super().noise(row, step, vocab)


@contextlib.contextmanager
def attn_impl(model: nn.Module, impl: str):
    old = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


@contextlib.contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def provide(model, tok, prompts, *, seed, claim_id, claim_identity, variant=("sdpa", 9, 1), max_new_tokens,
            sampler_factory=None, intervention=None) -> Fingerprints:
    """One provider run; the claim always names the reference model and the honest sampling."""
    impl, batch, n_threads = variant
    ctx = intervention.apply(model) if intervention is not None else contextlib.nullcontext()
    with attn_impl(model, impl), threads(n_threads), ctx:
        fp = fingerprint_prompts(model, tok, prompts, config=DiFRConfig(k=max(KS)), sampling=CLAIM, seed=seed,
                                 max_new_tokens=max_new_tokens, batch_size=batch, model_id=claim_id,
                                 keep_hidden=True, sampler_factory=sampler_factory)
    fp.identity = claim_identity  # a cheating provider claims the reference model's identity
    return fp


def benign_variants(batches: list[int] | None) -> tuple:
    """BENIGN_VARIANTS with other batch sizes (--benign-batch: larger batches give more tokens per decode step)."""
    if not batches:
        return BENIGN_VARIANTS
    if len(batches) != len(BENIGN_VARIANTS) or min(batches) < 1:
        raise SystemExit(f"--benign-batch needs {len(BENIGN_VARIANTS)} batch sizes >= 1, got {batches}")
    return tuple((impl, b, n) for (impl, _, n), b in zip(BENIGN_VARIANTS, batches, strict=True))


def benign_mix(model, tok, prompts, variants=BENIGN_VARIANTS, **kw) -> Fingerprints:
    """Honest runs spread over the benign noise variants."""
    parts = []
    for i, variant in enumerate(variants):
        sub = prompts[i::len(variants)]
        if sub:
            parts.append(provide(model, tok, sub, variant=variant, **kw))
    return Fingerprints.concat(parts)


def layer_dropped(model: nn.Module, drop: tuple[int, ...]) -> nn.Module:
    """A cheaper 'different model': the reference with some decoder layers removed."""
    m = copy.deepcopy(model)
    keep = [layer for i, layer in enumerate(m.model.layers) if i not in drop]
    for i, layer in enumerate(keep):
        layer.self_attn.layer_idx = i
    m.model.layers = nn.ModuleList(keep)
    m.config.num_hidden_layers = len(keep)
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = [t for i, t in enumerate(m.config.layer_types) if i not in drop]
    return m


# ---------------------------------------------------------------------------------------------
# Scores per window of n tokens


def windows(scores: np.ndarray, lengths: torch.Tensor, n: int) -> np.ndarray:
    """Means of the disjoint n-token windows inside each sequence (steer.difr.verify.window_means)."""
    return window_means(torch.as_tensor(scores, dtype=torch.float64), lengths, n).numpy()


def toploc_windows(hid_p: torch.Tensor, hid_v: torch.Tensor, lengths: torch.Tensor, n: int, cap: int,
                   seed: int) -> np.ndarray:
    """TOPLOC score per within-sequence n-token window: the provider commits to its chunks of <= 32 tokens."""
    params = toploc.TopLocParams()
    spans, start = [], 0
    for length in lengths.tolist():
        spans += [(start + w * n, start + (w + 1) * n) for w in range(length // n)]
        start += length
    idx = np.arange(len(spans))
    if len(spans) > cap:
        idx = np.sort(np.random.default_rng(seed).choice(len(spans), cap, replace=False))
    out = []
    for w in idx:
        a, b = spans[w]
        res = toploc.verify_proofs(hid_v[a:b], toploc.build_proofs(hid_p[a:b], params), params)
        out.append(np.mean([r.score for r in res]))
    return np.array(out)


def auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score of a cheating window > an honest one), ties counted half (Mann-Whitney)."""
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    allv = np.concatenate([neg, pos])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks of ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[len(neg):].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


# Every per-token score the analysis compares: (name, statistic) of Activation-DiFR variants; "token"
# is Token-DiFR at the paper's clip 0.5, "token clip 1.0" the earlier rule's clip on these models
OLD_TOKEN_CLIP = 1.0  # what max(99.9th percentile of benign margins, 1 logit) gave in the first runs


def per_token(fp: Fingerprints, ref) -> dict[str, np.ndarray]:
    """Per-token scores of every method variant (TOPLOC is per window, computed separately)."""
    out = {}
    for k in KS:
        out[f"activation k={k}"] = activation_distances(fp.reproject(DiFRConfig(k=k)), ref.hidden, "l2").numpy()
    out["activation k=8 orthonormal"] = activation_distances(
        fp.reproject(DiFRConfig(k=8, projection="orthonormal")), ref.hidden, "l2").numpy()
    k8 = fp.reproject(DiFRConfig(k=8))
    for k in (2, 8, 32):
        out[f"activation k={k} ulp"] = activation_distances(fp.reproject(DiFRConfig(k=k)), ref.hidden, "ulp").numpy()
    out["activation k=8 ulp unfloored"] = activation_distances(k8, ref.hidden, "ulp_unfloored").numpy()
    out["token"] = clip_margins(ref.margins, TOKEN_CLIP).numpy()
    out["token clip 1.0"] = clip_margins(ref.margins, OLD_TOKEN_CLIP).numpy()
    return out


# methods that get a calibrated threshold: name -> (statistic, min_threshold)
CALIBRATED = {
    "activation k=2": ("l2", None), "activation k=8": ("l2", None), "activation k=32": ("l2", None),
    "activation k=2 ulp": ("ulp", ROUNDING_BOUND["ulp"]), "activation k=8 ulp": ("ulp", ROUNDING_BOUND["ulp"]),
    "activation k=32 ulp": ("ulp", ROUNDING_BOUND["ulp"]), "activation k=8 ulp unfloored": ("ulp_unfloored", None),
    "token": (None, None), "token clip 1.0": (None, None),
}


def calibration_of(scores: np.ndarray, lengths: torch.Tensor, name: str, fpr: float, fp: Fingerprints) -> Calibration:
    """The steer Calibration these benign per-token scores give (what steer.difr.calibrate builds)."""
    stat, floor = CALIBRATED[name]
    method = "token" if name.startswith("token") else "activation"
    return Calibration(method, fpr, torch.as_tensor(scores, dtype=torch.float32), lengths.to(torch.int64), fp.config,
                       fp.identity, fp.model_id, statistic=stat or "l2", min_threshold=floor,
                       clip=(TOKEN_CLIP if name == "token" else OLD_TOKEN_CLIP) if method == "token" else None)


def bytes_per_token(method: str, n: int) -> float:
    if method.startswith("activation"):
        return 2.0 * int(method.split("k=")[1].split()[0])
    if method == "token":
        return 0.0  # the tokens and an 8-byte seed per sequence, which any claim carries anyway
    return toploc.TopLocParams().bytes_per_chunk / min(n, toploc.TopLocParams().chunk_size)


# ---------------------------------------------------------------------------------------------


def steering_for(model, args, out: Path):
    """The steering intervention a provider exports, and the digest its claim names.

    On an MoE: MoTE expert switching, written as a steer.config InterventionConfig and applied from
    that file (what a server would load). On the dense model a residual-stream addition (a real change
    of the forward; ACT needs calibrated heads).
    """
    layer = model.config.num_hidden_layers // 2
    if getattr(model.config, "num_experts", None):
        from steer.config import InterventionConfig, MoTESection
        from steer.difr import intervention_digest
        from steer.mote import ExpertSwitch

        switch = ExpertSwitch(experts=[(layer, 0), (layer, 1), (layer + 1, 0)], mode="off_mask")
        cfg = InterventionConfig.for_model(model, mote=MoTESection.from_switch(switch, source="experiments/difr"),
                                           description="DiFR verifiable-steering experiment: 3 experts off (mask)")
        path = cfg.save(out / "steering_config")
        (steering,) = InterventionConfig.load(path).interventions(model)
        return steering, f"MoTE ExpertSwitch off_mask {switch.experts} from {path.name}/", intervention_digest(path)
    from steer.interventions import AddVector

    g = torch.Generator().manual_seed(7)
    direction = torch.randn(model.config.hidden_size, generator=g)
    steering = AddVector(f"blocks.{layer}.resid_post", direction / direction.norm(), scale=args.steer_scale)
    return steering, f"AddVector(blocks.{layer}.resid_post, random unit vector, scale {args.steer_scale})", None


def cheat_specs(model, layer: int, steering) -> dict[str, dict]:
    return {
        "4-bit RTN g128": dict(model=lambda: quantize_rtn(model, 4, 128)),
        "8-bit RTN g128": dict(model=lambda: quantize_rtn(model, 8, 128)),
        "4-bit RTN g32": dict(model=lambda: quantize_rtn(model, 4, 32)),
        "different model (2 layers dropped)": dict(model=lambda: layer_dropped(model, (layer - 1, layer))),
        "temperature 0.9 (claims 1.0)": dict(sampler_factory=lambda s, seeds, pl: GumbelSampler(
            SamplingParams(0.9, s.top_p), seeds, pl)),
        "top-p 0.9 (claims 0.95)": dict(sampler_factory=lambda s, seeds, pl: GumbelSampler(
            SamplingParams(s.temperature, 0.9), seeds, pl)),
        "wrong seed": dict(sampler_factory=lambda s, seeds, pl: GumbelSampler(s, seeds + 99991, pl)),
        "1% sampling bug": dict(sampler_factory=lambda s, seeds, pl: BuggySampler(s, seeds, pl)),
        "steering applied, not claimed": dict(intervention=steering),
    }


def collect(args, lm, out: Path, base: dict | None = None) -> dict:
    """Every provider run and every teacher-forced reference (the slow part; cached by main).

    With `base` (a raw collection checked by `check_base`), its calibration and held-out honest runs and
    their references are reused: only the cheating runs named by --conditions (and the steering runs)
    are collected, and the result holds the base's runs and the new ones together."""
    model, tok = lm.model, lm.tokenizer
    claim_id, claim_identity = lm.name, model_identity(model, any_family=True)
    calib_prompts, held_prompts = prompt_sets(args)
    kw = dict(claim_id=claim_id, claim_identity=claim_identity, max_new_tokens=args.max_new_tokens)
    log(f"model {claim_id} ({lm.weights_hash[:12]}), {len(calib_prompts)} calibration + {len(held_prompts)} held-out prompts")
    steering, steering_desc, steering_digest = steering_for(model, args, out) if not args.no_steering else (None,) * 3
    kw["variants"] = variants = benign_variants(args.benign_batch)
    if base is None:
        log(f"honest runs (calibration prompts, seeds {args.calib_seeds}): variants {variants}")
        calib = Fingerprints.concat([benign_mix(model, tok, calib_prompts, seed=s, **kw) for s in args.calib_seeds])
        log("honest runs (held-out prompts, seed 1)")
        claims = {"benign": benign_mix(model, tok, held_prompts, seed=1, **kw)}
    else:
        log(f"calibration and held-out honest runs reused from {args.extend} (collected {base.get('date')})")
        calib, claims = base["calib"], {}
    held = dict(seed=1, **{k: v for k, v in kw.items() if k != "variants"})
    cheats = select_cheats(cheat_specs(model, model.config.num_hidden_layers // 2, steering), args, base)
    touched = cheating_runs(model, tok, held_prompts, cheats, claims, held, args.cheat_batch, steering)
    steered = steered_runs(model, tok, steering, held_prompts, calib_prompts, args.calib_seeds[0], kw, held, touched)
    benign = claims["benign"] if base is None else base["claims"]["benign"]
    refs, ref_calib, ref_steer = verifier_runs(model, claims, calib if base is None else None, benign, steering,
                                               steered, touched)
    raw = dict(claim_id=claim_id, weights_hash=lm.weights_hash, calib=calib, claims=claims, refs=refs,
               ref_calib=ref_calib, steered_benign=steered[0], steered_calib=steered[1],
               ref_steer=ref_steer[0], ref_steer_calib=ref_steer[1], cheats=list(cheats), touched=touched,
               steering=steering_desc, steering_digest=steering_digest,
               args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"out": str(out)})
    return raw if base is None else merged(base, raw, args)


def prompt_sets(args) -> tuple[list[str], list[str]]:
    """The calibration prompts and the held-out prompts (honest and cheating runs), from aplomb's benign set."""
    from steer.packages import packaged_file

    prompts = json.loads(packaged_file("aplomb", "0.3.0", "aplomb/data/benign_anchors_v1.json").read_text())["benign"]
    return prompts[: args.n_calib], prompts[args.n_calib: args.n_calib + args.n_heldout]


def select_cheats(cheats: dict, args, base: dict | None) -> dict:
    """The cheating runs to collect: --conditions' words pick them; a base collection's own are refused."""
    if cheats["steering applied, not claimed"]["intervention"] is None:
        cheats.pop("steering applied, not claimed")
    if args.conditions:
        cheats = {n: c for n, c in cheats.items() if any(w in n for w in args.conditions)}
    if base is not None:
        again = [n for n in cheats if n in base["cheats"]]
        if again:
            raise SystemExit(f"{args.extend} already holds {again}: leave them out of --conditions "
                             f"(its conditions: {base['cheats']})")
        if base["steered_benign"] is not None and not args.no_steering:
            raise SystemExit(f"{args.extend} already holds the steering runs: pass --no-steering")
        if not cheats and args.no_steering:
            raise SystemExit("nothing to add: --conditions names no new condition and --no-steering is set")
    return cheats


def cheating_runs(model, tok, held_prompts, cheats: dict, claims: dict, held: dict, batch: int, steering) -> dict:
    """One provider run per cheating condition on the held-out prompts (into `claims`); steering's touch counts."""
    touched = {}
    for name, spec in cheats.items():
        log(f"cheating run: {name}")
        m = spec.pop("model", lambda: model)()
        claims[name] = provide(m, tok, held_prompts, **spec, **held, variant=("sdpa", batch, 1))
        if "intervention" in spec:
            touched[name] = steering.total_touched
        if m is not model:
            del m
    return touched


def steered_runs(model, tok, steering, held_prompts, calib_prompts, calib_seed, kw, held, touched) -> tuple:
    """Verifiable steering: the claim includes the intervention and the verifier runs it too. The honest
    steered provider runs under the same benign noise variants as the plain honest runs.
    Returns (held-out, calibration) steered honest runs, (None, None) without steering."""
    if steering is None:
        return None, None
    log("honest steered runs (claim the steering intervention)")
    steered_benign = benign_mix(model, tok, held_prompts, kw["variants"], intervention=steering, **held)
    touched["honest steered provider (held-out)"] = steering.total_touched
    steered_calib = benign_mix(model, tok, calib_prompts, intervention=steering, seed=calib_seed, **kw)
    return steered_benign, steered_calib


def verifier_runs(model, claims, calib, benign, steering, steered, touched) -> tuple:
    """Teacher forcing of every new claim (and of `calib` unless it is None: reused) through the reference
    model; with steering, the steered honest runs and the unsteered honest claim under the intervention."""
    log("verifier: teacher forcing every claim through the reference model")
    refs = {name: teacher_force(model, fp, VERIFIER_BATCH) for name, fp in claims.items()}
    ref_calib = teacher_force(model, calib, VERIFIER_BATCH) if calib is not None else None
    if steering is None:
        return refs, ref_calib, (None, None)
    steered_benign, steered_calib = steered
    with steering.apply(model):
        ref_steer = {"benign": teacher_force(model, steered_benign, VERIFIER_BATCH),
                     "steering claimed, not applied": teacher_force(model, benign, VERIFIER_BATCH)}
    touched["verifier, steering claimed, not applied"] = steering.total_touched
    with steering.apply(model):
        ref_steer_calib = teacher_force(model, steered_calib, VERIFIER_BATCH)
    log(f"steering touched token positions: {touched}")
    return refs, ref_calib, (ref_steer, ref_steer_calib)


# what fixes a collection's calibration and held-out honest runs: an --extend run must repeat them
SHARED_ARGS = ("n_calib", "calib_seeds", "max_new_tokens", "benign_batch")


def load_raw(path: Path) -> dict:
    # weights_only: nothing is unpickled beyond tensors, plain containers and steer's own result types
    import pathlib  # raw files whose args kept a --raw path

    with torch.serialization.safe_globals([Fingerprints, DiFRConfig, SamplingParams, Reference, pathlib.PosixPath]):
        return torch.load(path, weights_only=True)


def check_base(base: dict, args, lm, out: Path, raw_file: Path) -> None:
    """Refuse an --extend base whose calibration and honest runs are not what this run would collect:
    other weights, model, claim, seeds, prompts or token budget, or an output that would overwrite it."""
    src = args.extend
    if raw_file.resolve() == src.resolve():
        raise SystemExit(f"--extend {src} would be overwritten: name another raw file with --raw or another --out")
    if Path(base["args"].get("out", "")).resolve() == out.resolve():
        raise SystemExit(f"--out {out} is {src}'s results folder: name a new one, so its results stay as they are")
    if base["weights_hash"] != lm.weights_hash or base["claim_id"] != lm.name:
        raise SystemExit(f"{src} was made with {base['claim_id']} ({base['weights_hash'][:12]}), this run loads "
                         f"{lm.name} ({lm.weights_hash[:12]}): extend a collection of the same model and weights")
    if base["calib"].sampling != CLAIM.to_dict():
        raise SystemExit(f"{src} claims sampling {base['calib'].sampling}, this script claims {CLAIM.to_dict()}")
    wrong = {a: (base["args"].get(a), getattr(args, a)) for a in SHARED_ARGS if base["args"].get(a) != getattr(args, a)}
    if wrong:
        flag = lambda a, v: f"--{a.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, list) else str(v))  # noqa: E731
        seen = ", ".join(f"{a}: {b} there, {n} here" for a, (b, n) in wrong.items())
        raise SystemExit(f"{src} was collected with other settings ({seen}): pass "
                         + " ".join(flag(a, b) for a, (b, _) in wrong.items()))
    if args.n_heldout > base["args"]["n_heldout"]:
        raise SystemExit(f"--n-heldout {args.n_heldout} is more than {src}'s {base['args']['n_heldout']} held-out "
                         "prompts: the new cheating runs must use its held-out prompts (or a first part of them)")
    for name, fp, prompts in zip(("calibration", "held-out"), (base["calib"], base["claims"]["benign"]),
                                 prompt_sets(args), strict=True):
        kept = {tuple(x.tolist()) for x in torch.split(fp.prompt_ids, fp.prompt_lengths.tolist())}
        if not {tuple(x) for x in encode_prompts(lm.tokenizer, prompts)} <= kept:
            raise SystemExit(f"{src}'s {name} runs were made from other prompts than this run's: extend a collection "
                             "made from the same prompt set")


def merged(base: dict, new: dict, args) -> dict:
    """The base collection with the new runs added (what --rescore and the analysis read)."""
    out = dict(base)
    out.update(claims=base["claims"] | new["claims"], refs=base["refs"] | new["refs"],
               cheats=base["cheats"] + new["cheats"], touched=base["touched"] | new["touched"])
    if new["steered_benign"] is not None:
        out.update({k: new[k] for k in ("steered_benign", "steered_calib", "ref_steer", "ref_steer_calib", "steering",
                                        "steering_digest")})
    out["args"] = new["args"]
    out["extends"] = dict(raw=str(args.extend), collected=base.get("date"), collect_minutes=base.get("collect_minutes"),
                          args=base["args"], conditions=base["cheats"])
    return out


def raw_path(out: Path) -> Path:
    """Where the raw runs (fingerprints with hidden states, references) are kept between analyses."""
    from steer.packages import cache_dir

    return cache_dir() / "difr" / f"raw_{out.resolve().name}.pt"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--n-calib", type=int, default=9, help="calibration prompts (honest runs)")
    ap.add_argument("--n-heldout", type=int, default=9, help="held-out prompts (honest + cheating runs)")
    ap.add_argument("--calib-seeds", type=int, nargs="+", default=[0],
                    help="sampling seeds of the honest calibration runs (one sequence per prompt and seed; "
                         "never the held-out seed 1)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--benign-batch", type=int, nargs=3, default=None,
                    help=f"batch sizes of the three benign variants (default {[b for _, b, _ in BENIGN_VARIANTS]}); "
                         f"a decode step costs about the same at batch 3 or 9 on a CPU, so larger batches are faster")
    ap.add_argument("--cheat-batch", type=int, default=9, help="batch size of the cheating runs (default %(default)s)")
    ap.add_argument("--target-fpr", type=float, nargs="+", default=[0.01, 0.05],
                    help="false-positive rates to calibrate for (each needs 1/FPR calibration windows)")
    ap.add_argument("--toploc-cap", type=int, default=80, help="max TOPLOC windows per claim and n")
    ap.add_argument("--steer-scale", type=float, default=4.0, help="size of the stand-in steering vector")
    ap.add_argument("--no-steering", action="store_true",
                    help="skip the steering runs (both directions and the steered calibration: 4 of the runs)")
    ap.add_argument("--conditions", nargs="*", help="only cheating runs whose name contains one of these words")
    ap.add_argument("--rescore", action="store_true",
                    help="skip generation and teacher forcing: re-analyse the raw runs kept by the last full run")
    ap.add_argument("--raw", type=Path, default=None,
                    help="raw-runs file to write, or with --rescore to read (default: steer's cache, named after --out)")
    ap.add_argument("--extend", type=Path, default=None, metavar="RAW",
                    help="reuse the calibration and held-out honest runs kept in RAW (same model, weights, claim, "
                         "seeds, --n-calib, --max-new-tokens, --benign-batch; --n-heldout at most RAW's) and "
                         "collect only the new --conditions (and the steering runs unless --no-steering); writes "
                         "a new raw file holding both, never RAW itself or its results folder")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--claims-only", action="store_true",
                    help="only claims.csv (whole claims decided per sequence) from --out's scores.csv.gz; no model")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.claims_only:
        claims_from_scores(args.out or HERE / f"results_{args.model}", args.target_fpr)
        return 0
    torch.set_num_threads(1)
    out = args.out or HERE / f"results_{args.model}"
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    from steer.models import load

    lm = load(args.model, progress=False)
    raw_file = args.raw or raw_path(out)
    if args.rescore:
        if not raw_file.is_file():
            raise SystemExit(f"no raw runs at {raw_file}: run without --rescore first")
        raw = load_raw(raw_file)
        if raw["weights_hash"] != lm.weights_hash:
            raise SystemExit(f"{raw_file} was made with other weights ({raw['weights_hash']}); rerun without --rescore")
        log(f"re-analysing raw runs from {raw_file} (collected {raw.get('date')})")
    else:
        raw = collected(args, lm, out, raw_file, t_start)
    analyse(raw, lm.model, args, out)
    log(f"done in {round((time.time() - t_start) / 60, 1)} min: {out}")
    return 0


def collected(args, lm, out: Path, raw_file: Path, t_start: float) -> dict:
    """Collect the raw runs (reusing --extend's calibration and honest runs) and keep them in raw_file."""
    base = None
    if args.extend is not None:
        if not args.extend.is_file():
            raise SystemExit(f"--extend {args.extend}: no such raw file (run.py keeps them in {raw_path(out).parent})")
        base = load_raw(args.extend)
        check_base(base, args, lm, out, raw_file)
    raw = collect(args, lm, out, base)
    raw["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    raw["collect_minutes"] = round((time.time() - t_start) / 60, 1)
    raw_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(raw, raw_file)
    log(f"raw runs kept in {raw_file}")
    return raw


def per_item_scores(out: Path, runs: dict) -> None:
    """Every per-token score of every run (scores.csv.gz): what all tables are computed from, so they
    can be re-derived without the raw hidden states (the full --rescore needs the raw .pt file)."""
    import pandas as pd

    parts = []
    for name, (fp, sc) in runs.items():
        seq = torch.repeat_interleave(torch.arange(fp.n_sequences), fp.output_lengths).numpy()
        pos = torch.cat([torch.arange(int(n)) for n in fp.output_lengths]).numpy()
        parts.append(pd.DataFrame({"run": name, "sequence": seq, "position": pos, "token_id": fp.output_ids.numpy(),
                                   **{m: np.round(v.astype(np.float64), 7) for m, v in sc.items()}}))
    pd.concat(parts).to_csv(out / "scores.csv.gz", index=False)


def analyse(raw: dict, model: nn.Module, args, out: Path) -> None:
    """AUCs, conformal thresholds, held-out FPR and power from the raw runs; writes the csv/html files."""
    import pandas as pd

    claims, refs, cheats = raw["claims"], raw["refs"], raw["cheats"]
    steered_benign, ref_steer = raw["steered_benign"], raw["ref_steer"]
    calib, ref_calib = raw["calib"], raw["ref_calib"]
    lengths = {name: fp.output_lengths for name, fp in claims.items()}

    # scores per token and per within-sequence window
    rows = []
    scores = {name: per_token(fp, refs[name]) for name, fp in claims.items()}
    steered = steered_benign is not None  # runs made with --no-steering have none
    steer_scores = {"benign": per_token(steered_benign, ref_steer["benign"]),
                    "steering claimed, not applied": per_token(claims["benign"], ref_steer["steering claimed, not applied"])
                    } if steered else {}
    steer_lengths = {"benign": steered_benign.output_lengths, "steering claimed, not applied": lengths["benign"]
                     } if steered else {}
    log("TOPLOC proofs and checks")
    tl = {name: {n: toploc_windows(fp.hidden, refs[name].hidden, fp.output_lengths, n, args.toploc_cap, n) for n in NS}
          for name, fp in claims.items()}
    tl_steer = {name: {n: toploc_windows(fp.hidden, ref_steer[name].hidden, fp.output_lengths, n, args.toploc_cap, n)
                       for n in NS}
                for name, fp in (("benign", steered_benign), ("steering claimed, not applied", claims["benign"]))
                } if steered else {}

    def add_rows(cond, s_neg, s_pos, len_neg, len_pos, t_neg, t_pos, group):
        for method in s_neg:
            for n in NS:
                neg, pos = windows(s_neg[method], len_neg, n), windows(s_pos[method], len_pos, n)
                rows.append(dict(condition=cond, group=group, method=method, n_tokens=n,
                                 bytes_per_token=bytes_per_token(method, n), auc=auc(neg, pos),
                                 n_honest_windows=len(neg), n_cheat_windows=len(pos)))
        for n in NS:
            rows.append(dict(condition=cond, group=group, method="TOPLOC", n_tokens=n,
                             bytes_per_token=bytes_per_token("TOPLOC", n), auc=auc(t_neg[n], t_pos[n]),
                             n_honest_windows=len(t_neg[n]), n_cheat_windows=len(t_pos[n])))

    for name in cheats:
        add_rows(name, scores["benign"], scores[name], lengths["benign"], lengths[name], tl["benign"], tl[name],
                 "plain reference")
    if steered:
        add_rows("steering claimed, not applied", steer_scores["benign"], steer_scores["steering claimed, not applied"],
                 steer_lengths["benign"], steer_lengths["steering claimed, not applied"], tl_steer["benign"],
                 tl_steer["steering claimed, not applied"], "steered reference")
    df = pd.DataFrame(rows)
    df.to_csv(out / "auc.csv", index=False)
    per_item_scores(out, {"calibration": (calib, per_token(calib, ref_calib))}
                    | {name: (claims[name], scores[name]) for name in claims}
                    | ({f"steered reference: {name}": (fp, steer_scores[name]) for name, fp in
                        (("benign", steered_benign), ("steering claimed, not applied", claims["benign"]))}
                       if steered else {}))

    # conformal thresholds (calibration runs), false positives on held-out honest runs, and power
    calib_scores = per_token(calib, ref_calib)
    steered_calib_scores = per_token(raw["steered_calib"], raw["ref_steer_calib"]) if steered else {}
    fpr_rows = []

    def add_fpr(name, cal, neg, neg_len, pos: dict, pos_len: dict, label):
        for n in NS:
            thr, held = cal.threshold(n), windows(neg, neg_len, n)
            r = dict(method=label, target_fpr=cal.target_fpr, n_tokens=n, n_calibration_windows=cal.n_units(n),
                     windows_needed=cal.min_units, status="calibrated" if thr is not None else "insufficient",
                     threshold=thr, n_heldout_windows=len(held))
            if thr is not None:
                fp_count = int((held > thr).sum())
                r.update(n_heldout_false_positives=fp_count,
                         heldout_fpr=fp_count / len(held) if len(held) else float("nan"))
                for c, sc in pos.items():
                    w = windows(sc, pos_len[c], n)
                    r[f"tpr: {c}"] = float((w > thr).mean()) if len(w) else float("nan")
            fpr_rows.append(r)

    for fpr in args.target_fpr:
        for name in CALIBRATED:
            cal = calibration_of(calib_scores[name], calib.output_lengths, name, fpr, calib)
            add_fpr(name, cal, scores["benign"][name], lengths["benign"], {c: scores[c][name] for c in cheats},
                    {c: lengths[c] for c in cheats}, name)
        for name in ("activation k=8", "activation k=8 ulp") if steered else ():
            cal = calibration_of(steered_calib_scores[name], raw["steered_calib"].output_lengths, name, fpr, calib)
            add_fpr(name, cal, steer_scores["benign"][name], steer_lengths["benign"],
                    {"steering claimed, not applied": steer_scores["steering claimed, not applied"][name]},
                    {"steering claimed, not applied": steer_lengths["steering claimed, not applied"]},
                    f"{name}, steered reference")
    fpr_df = pd.DataFrame(fpr_rows)
    fpr_df.to_csv(out / "fpr.csv", index=False)
    claim_decisions(out, args.target_fpr, calib.output_lengths, calib_scores,
                    {r: (claims[r].output_lengths, scores[r]) for r in ["benign", *cheats]})

    benign_k8 = scores["benign"]["activation k=8"]
    hid = claims["benign"].hidden
    f_norm = (hid @ projection_matrix(DiFRConfig(k=8), hid.shape[1])).norm(dim=-1).numpy()
    meta = dict(
        model=raw["claim_id"], weights_hash=raw["weights_hash"], collected=raw.get("date"),
        collect_minutes=raw.get("collect_minutes"), analysed=datetime.now(UTC).isoformat(timespec="seconds"),
        analysis="windows inside sequences; split-conformal thresholds over disjoint calibration windows; "
                 "paper L2 default; Token-DiFR clip 0.5",
        machine=f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, 1 thread",
        run_args={k: v for k, v in raw["args"].items() if k not in ("rescore",)},
        analysis_args={"target_fpr": args.target_fpr, "toploc_cap": args.toploc_cap},
        calib_tokens=int(calib.n_tokens), calib_sequences=int(calib.n_sequences),
        heldout_benign_tokens=int(claims["benign"].n_tokens), heldout_benign_sequences=int(claims["benign"].n_sequences),
        steered_heldout_benign_tokens=int(steered_benign.n_tokens) if steered else None,
        cheat_tokens={n: int(fp.n_tokens) for n, fp in claims.items()},
        claim=CLAIM.to_dict(), benign_variants=benign_variants(raw["args"].get("benign_batch")), verifier_batch=VERIFIER_BATCH,
        steering=raw["steering"], steering_config_digest=raw["steering_digest"], steering_touched=raw["touched"],
        token_clip=TOKEN_CLIP,
        benign_max_l2_k8=float(benign_k8.max()), benign_mean_l2_k8=float(benign_k8.mean()),
        benign_max_ulp_k8=float(scores["benign"]["activation k=8 ulp"].max()),
        benign_max_ulp_k8_unfloored=float(scores["benign"]["activation k=8 ulp unfloored"].max()),
        # why "ulp" exists: the L2 rounding floor grows with |f|; this is how much on the benign runs
        benign_l2_vs_fingerprint_norm_spearman=float(pd.Series(benign_k8).rank().corr(pd.Series(f_norm).rank())),
        mean_hidden_norm=float(hid.norm(dim=-1).mean()),
    )
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    figures(df, out)


CLAIM_METHODS = ("activation k=2", "activation k=8", "activation k=8 ulp", "token")
CLAIM_SIZES = (1, 4, 12)  # sequences per claim (requests concatenated into one claim)
CLAIM_TOKENS = (8, 32, None)  # each request's first t tokens (None: all); a claim of T tokens needs ~T/FPR benign


def claim_decisions(out: Path, fprs, calib_lengths, calib_scores, runs: dict) -> None:
    """Whole claims decided by steer.difr's per-sequence rule (Calibration.decide_sequences): the held-out
    sequences of each run, cut to their first t tokens, grouped into claims of g consecutive sequences;
    claims.csv counts verified /
    rejected / insufficient claims per run, and how many sequences were rejected (named).

    `runs`: name -> (sequence lengths, {method: per-token scores}), the benign run first."""
    import types

    import pandas as pd

    ident = types.SimpleNamespace(config=DiFRConfig(k=8), identity={}, model_id="")
    rows = []
    for fpr in fprs:
        for name in CLAIM_METHODS:
            cal = calibration_of(calib_scores[name], calib_lengths, name, fpr, ident)
            for (run, (full, sc)), t in itertools.product(runs.items(), CLAIM_TOKENS):
                per_seq = [x[:t] for x in torch.split(torch.as_tensor(sc[name], dtype=torch.float32), full.tolist())]
                lengths = torch.tensor([x.numel() for x in per_seq])
                for g in (g for g in CLAIM_SIZES if g <= len(per_seq)):
                    counts = {"verified": 0, "rejected": 0, "insufficient": 0}
                    named = 0
                    for a in range(0, len(per_seq) - g + 1, g):
                        decisions = cal.decide_sequences(torch.cat(per_seq[a:a + g]), lengths[a:a + g])
                        kinds = {d.decision for d in decisions}
                        counts[next(k for k in ("rejected", "insufficient", "verified") if k in kinds)] += 1
                        named += sum(d.decision == "rejected" for d in decisions)
                    rows.append(dict(method=name, target_fpr=fpr, run=run, sequences_per_claim=g,
                                     tokens_per_sequence=t or "all", claim_tokens_mean=float(lengths.sum()) / len(per_seq) * g,
                                     claims=sum(counts.values()), **counts, sequences_rejected=named))
    pd.DataFrame(rows).to_csv(out / "claims.csv", index=False)


def claims_from_scores(out: Path, fprs) -> None:
    """claims.csv from a results folder's scores.csv.gz alone (no model, no raw runs)."""
    import pandas as pd

    df = pd.read_csv(out / "scores.csv.gz")
    runs = {}
    for run, g in df.groupby("run", sort=False):
        g = g.sort_values(["sequence", "position"], kind="stable")
        runs[run] = (torch.tensor(g.groupby("sequence").size().tolist()), {m: g[m].to_numpy().copy() for m in CLAIM_METHODS})
    calib_lengths, calib_scores = runs.pop("calibration")
    runs = {"benign": runs.pop("benign")} | {r: v for r, v in runs.items() if not r.startswith("steered reference")}
    claim_decisions(out, fprs, calib_lengths, calib_scores, runs)


def figures(df, out: Path) -> None:
    import plotly.express as px

    main_methods = ["activation k=2", "activation k=8", "activation k=32", "activation k=128", "activation k=8 ulp",
                    "token", "TOPLOC"]
    sub = df[df.method.isin(main_methods)]
    fig = px.line(sub, x="n_tokens", y="auc", color="method", facet_col="condition", facet_col_wrap=4,
                  markers=True, log_x=True, title="DiFR: ROC AUC vs tokens averaged (held-out honest vs cheating runs)")
    fig.update_layout(height=900)
    fig.write_html(out / "auc_vs_tokens.html", include_plotlyjs="cdn")
    q = df[df.condition.isin(["4-bit RTN g128", "8-bit RTN g128"]) & (df.bytes_per_token > 0)]
    fig = px.scatter(q, x="bytes_per_token", y="auc", color="method", symbol="condition", facet_col="n_tokens",
                     facet_col_wrap=4, log_x=True, title="ROC AUC vs bytes per token (4- and 8-bit RTN)")
    fig.update_layout(height=700)
    fig.write_html(out / "auc_vs_bytes.html", include_plotlyjs="cdn")


if __name__ == "__main__":
    raise SystemExit(main())

"""Property-based tests (hypothesis) of what parses user input and of the numeric cores.

- intervention configs: any valid config survives save/load unchanged; any single corruption of a
  valid document is refused with a ConfigError whose message names the field;
- export writers: EasySteer and SGLang documents pass their target's validator and read back equal;
- prompt-set readers: files written in each format read back as written; arbitrary bytes in a prompt
  file give a PromptSet or a ValueError naming the file, never another exception;
- routing edits (steer.kernels.router): route() against a per-token brute-force of the documented
  semantics, over random families, shapes and masks;
- the conformal quantile (steer.difr Calibration.threshold / p_value).

Fast: small shapes, modest max_examples, no model weights.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis (in steer's dev extra)")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from steer.config import ConfigError, DiFRSection, InterventionConfig, ModelIdentity, MoTESection  # noqa: E402

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------------------------------------
# Intervention configs


@st.composite
def configs(draw):
    n_layers = draw(st.integers(1, 6))
    num_experts = draw(st.integers(2, 16))
    moe_layers = sorted(draw(st.sets(st.integers(0, n_layers - 1), min_size=1)))
    top_k = draw(st.integers(1, num_experts))
    ident = ModelIdentity(family=draw(st.sampled_from(["qwen2_moe", "mixtral", "olmoe"])), model_type="qwen2_moe",
                          n_layers=n_layers, d_model=draw(st.integers(8, 64)), num_experts=num_experts,
                          config_hash="c" * 16, params_hash="p" * 16, moe_layers=moe_layers, top_k=top_k)
    mote = None
    if draw(st.booleans()):
        pairs = draw(st.lists(st.tuples(st.sampled_from(moe_layers), st.integers(0, num_experts - 1)), min_size=1,
                              max_size=8, unique=True))
        mode = draw(st.sampled_from(["off_mask", "off_zero", "on"]))
        mote = MoTESection(pairs, mode, mode == "off_zero" and draw(st.booleans()),  # the validator's rule
                           draw(st.sampled_from(["gate", "max"])), draw(st.none() | st.text(min_size=1, max_size=20)))  # "" is saved as no source
    difr = DiFRSection(draw(st.integers(1, 64)), draw(st.integers(0, 2**31 - 1))) if draw(st.booleans()) else None
    assume(mote is not None or difr is not None)
    return InterventionConfig(ident, mote=mote, difr=difr, description=draw(st.text(max_size=30)))


@FAST
@given(cfg=configs())
def test_config_save_load_round_trip(cfg, tmp_path_factory):
    out = cfg.save(tmp_path_factory.mktemp("cfg"))
    back = InterventionConfig.load(out)
    assert back.to_json() == cfg.to_json()
    assert back.mote == cfg.mote and back.difr == cfg.difr and back.model == cfg.model


def _corruptions(doc: dict):
    """(field path, corrupted document) pairs: a wrong type, a missing required field, an unknown field."""
    out = []
    for path in [("model", "n_layers"), ("model", "num_experts"), ("model", "family"), ("version",)]:
        bad = json.loads(json.dumps(doc))
        node = bad
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = {"not": "this"}
        out.append((".".join(path), bad))
    bad = json.loads(json.dumps(doc))
    del bad["model"]["d_model"]
    out.append(("model.d_model", bad))
    bad = json.loads(json.dumps(doc))
    bad["model"]["surprise"] = 1
    out.append(("model.surprise", bad))
    if "mote" in doc:
        bad = json.loads(json.dumps(doc))
        bad["mote"]["mode"] = "sideways"
        out.append(("mote.mode", bad))
        bad = json.loads(json.dumps(doc))
        bad["mote"]["experts"][0]["expert"] = -1
        out.append(("mote.experts[0].expert", bad))
    if "difr" in doc:
        bad = json.loads(json.dumps(doc))
        bad["difr"]["k"] = "eight"
        out.append(("difr.k", bad))
    return out


@FAST
@given(cfg=configs(), pick=st.integers(0, 100))
def test_config_corruptions_are_refused_naming_the_field(cfg, pick):
    cases = _corruptions(cfg.to_json())
    field, bad = cases[pick % len(cases)]
    with pytest.raises(ConfigError) as exc:
        InterventionConfig.from_json(bad)
    msg = str(exc.value)
    assert field in msg or (field == "version" and "version" in msg), (field, msg)


@FAST
@given(doc=st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                        max_leaves=12))
def test_arbitrary_json_is_a_config_error_not_a_crash(doc):
    try:
        InterventionConfig.from_json(doc)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


# ---------------------------------------------------------------------------------------------
# Export writers


@FAST
@given(cfg=configs())
def test_export_writers_round_trip(cfg, tmp_path_factory):
    from steer.export import easysteer_problems, export_easysteer, export_sglang, sglang_problems

    assume(cfg.mote is not None and cfg.mote.mode != "off_zero")
    d = tmp_path_factory.mktemp("export")
    res = export_easysteer(cfg, d / "es")
    doc = json.loads(res.path.read_text())
    assert easysteer_problems(doc) == []
    mode = "deactivate" if cfg.mote.mode == "off_mask" else "activate"
    assert {int(la): (p["mode"], p["expert_ids"]) for la, p in doc["layer_configs"].items()} == {
        la: (mode, es) for la, es in cfg.mote.by_layer().items()}
    res = export_sglang(cfg, d / "sg")
    specs = json.loads(res.path.read_text())  # the JSON list SGLang's --forward-hooks parses
    assert sglang_problems(specs) == []
    back = {int(s["target_modules"][0].split(".")[2]): s["config"]["experts"] for s in specs}
    assert back == cfg.mote.by_layer()
    assert all(s["config"]["num_experts"] == cfg.model.num_experts for s in specs)


@FAST
@given(cfg=configs(), tmp=st.just(None))
def test_export_vllm_writes_a_loadable_config(cfg, tmp, tmp_path_factory):
    from steer.export import export_vllm

    res = export_vllm(cfg, tmp_path_factory.mktemp("vllm"))
    assert InterventionConfig.load(res.path).to_json() == cfg.to_json()
    args = json.loads((res.path / "vllm_args.json").read_text())
    assert ("logits_processors" in args) == (cfg.difr is not None)


# ---------------------------------------------------------------------------------------------
# Prompt-set readers

prompt_text = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=30).filter(
    lambda s: s.strip() == s and not s.startswith("#") and s.strip())


@FAST
@given(prompts=st.lists(prompt_text, min_size=1, max_size=8), labelled=st.booleans(),
       fmt=st.sampled_from(["txt", "jsonl", "json", "yaml"]))
def test_prompt_files_read_back_as_written(prompts, labelled, fmt, tmp_path_factory):
    from steer.prompts import load_prompts

    labels = [f"c{i % 2}" for i in range(len(prompts))] if labelled and fmt != "txt" else None
    items = [{"prompt": p, "label": lab} for p, lab in zip(prompts, labels)] if labels else list(prompts)
    path = tmp_path_factory.mktemp("prompts") / f"set.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(x) for x in items), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps({"prompts": items}), encoding="utf-8")
    else:
        import yaml

        path.write_text(yaml.safe_dump({"prompts": items}, allow_unicode=True), encoding="utf-8")
    ps = load_prompts(path)
    assert list(ps) == prompts
    assert (ps.labels if ps.labels is None else list(ps.labels)) == labels


@FAST
@given(text=st.text(max_size=80) | st.sampled_from(["{", "[1, 2", "- [", "prompts: 3", "{\"prompts\": [null]}",
                                                   "template: 'a {x}'\nslots: {x: []}", ": :", "[{}]", "\"x\"",
                                                   "\t- a", "42", "prompts: {a: 1}", "{\"prompts\": [[1]]}"]),
       fmt=st.sampled_from(["txt", "jsonl", "json", "yaml"]))
def test_any_prompt_file_reads_or_says_what_is_wrong(text, fmt, tmp_path_factory):
    from steer.prompts import load_prompts

    path = tmp_path_factory.mktemp("bad") / f"set.{fmt}"
    path.write_text(text, encoding="utf-8")
    try:
        ps = load_prompts(path)
    except ValueError as exc:  # EmptyPromptSetError is one
        assert str(path) in str(exc) or path.name in str(exc) or "no prompt" in str(exc), str(exc)
    else:
        assert len(ps) > 0 and all(isinstance(p, str) for p in ps)


# ---------------------------------------------------------------------------------------------
# Routing edits against a per-token brute force of the documented semantics


def _brute_route(x: list[float], kind: str, k: int, norm: bool, masked: set, zeroed: set, forced: set,
                 renorm: bool, force_max: bool) -> dict[int, float]:
    """{expert: weight} for one token, straight from the module docstring's rules."""
    E = len(x)
    if kind == "softmax_topk":
        # off_mask is logit-level: a masked expert's logit is -inf, so it is absent from the softmax
        # (its exp is 0 in the denominator too), not only from the selection
        m = max(v for e, v in enumerate(x) if e not in masked)
        ex = [0.0 if e in masked else math.exp(v - m) for e, v in enumerate(x)]
        score = [v / sum(ex) for v in ex]
    else:
        score = list(x)
    eligible = [e for e in range(E) if e not in masked and e not in forced]
    pick = sorted(eligible, key=lambda e: (-score[e], e))[: k - len(forced)]
    sel = sorted(set(pick) | forced)
    val = {e: score[e] for e in sel}
    if force_max and forced:
        others = [val[e] for e in sel if e not in forced]
        if others:
            for e in forced:
                val[e] = max(others)
    if kind == "softmax_topk":
        total = sum(val.values())
        w = {e: (v / total if norm else v) for e, v in val.items()}
    else:
        m = max(val.values())
        ex = {e: math.exp(v - m) for e, v in val.items()}
        w = {e: v / sum(ex.values()) for e, v in ex.items()}
    if zeroed & set(sel):
        before = sum(w.values())
        w0 = {e: (0.0 if e in zeroed else v) for e, v in w.items()}
        after = sum(w0.values())
        if renorm:
            w0 = {e: (v * before / after if after > 0 else 0.0) for e, v in w0.items()}
        w = w0
    return w


@settings(max_examples=60, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["softmax_topk", "topk_softmax"]), T=st.integers(1, 6),
       E=st.integers(2, 12), mode=st.sampled_from(["off_mask", "off_zero", "force_on"]), norm=st.booleans(),
       renorm=st.booleans(), force_max=st.booleans(), use_token_mask=st.booleans())
def test_route_matches_brute_force_semantics(data, kind, T, E, mode, norm, renorm, force_max, use_token_mask):
    from steer.kernels.router import RouterEdit, RoutingRule, route

    k = data.draw(st.integers(1, E))
    experts = data.draw(st.sets(st.integers(0, E - 1), max_size=E))
    if mode == "off_mask":
        assume(E - len(experts) >= k)
    if mode == "force_on":
        assume(len(experts) <= k)
    mask = torch.zeros(E, dtype=torch.bool)
    mask[sorted(experts)] = True
    edit = RouterEdit(**{mode: mask}, renormalize=renorm, force_weight="max" if force_max else "gate")
    rule = RoutingRule(kind, k, norm_topk_prob=norm)
    # distinct logits per token (a permutation of spaced values), so the top-k has no ties
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    logits = torch.stack([torch.randperm(E, generator=g).float() * 0.37 - 1.0 for _ in range(T)])
    token_mask = torch.rand(T, generator=g) < 0.6 if use_token_mask else None
    res = route(logits, rule, edit, token_mask=token_mask)
    plain = route(logits, rule)
    changed = 0
    for t in range(T):
        got = {int(i): float(w) for i, w in zip(res.indices[t], res.weights[t])}
        base = {int(i): float(w) for i, w in zip(plain.indices[t], plain.weights[t])}
        assert len(got) == k and all(0 <= i < E for i in got)
        if token_mask is not None and not bool(token_mask[t]):
            assert got == base  # outside the mask: the family's own routing
            continue
        want = _brute_route(logits[t].tolist(), kind, k, norm, experts if mode == "off_mask" else set(),
                            experts if mode == "off_zero" else set(), experts if mode == "force_on" else set(),
                            renorm, force_max)
        same_as_base = set(want) == set(base) and all(abs(want[e] - base[e]) <= 1e-6 for e in want)
        if same_as_base:
            assert set(got) == set(base)
        else:
            changed += 1
            assert set(got) == set(want), (got, want)
            assert all(abs(got[e] - want[e]) <= 1e-5 for e in want), (got, want)
        if mode == "off_mask":
            assert not set(got) & experts
        if mode == "force_on":
            assert experts <= set(got)
    assert int(res.touched) == changed


# ---------------------------------------------------------------------------------------------
# The conformal quantile


def _brute_windows(vals: list[float], lengths: list[int], n: int) -> list[float]:
    """Means of the disjoint n-token windows inside each sequence (none crosses a boundary)."""
    out, at = [], 0
    for L in lengths:
        seq = vals[at: at + L]
        at += L
        out += [sum(seq[i: i + n]) / n for i in range(0, L - L % n, n)]
    return out


@FAST
@given(data=st.data(), fpr=st.floats(0.05, 0.5), n=st.integers(1, 6))
def test_conformal_threshold_holds_the_false_positive_rate(data, fpr, n):
    from steer.difr import DiFRConfig
    from steer.difr.verify import Calibration

    lengths = data.draw(st.lists(st.integers(1, 30), min_size=1, max_size=8))
    vals = data.draw(st.lists(st.floats(0, 100, allow_nan=False, width=32), min_size=sum(lengths),
                              max_size=sum(lengths)))

    def calibration(scores, lens, alpha):
        return Calibration("activation", alpha, torch.tensor(scores, dtype=torch.float32),
                           torch.tensor(lens, dtype=torch.int64), DiFRConfig(k=8, seed=0), "c", "m")

    cal = calibration(vals, lengths, fpr)
    want = sorted(_brute_windows(vals, lengths, n))
    units = cal.units(n)  # the calibration units: disjoint within-sequence windows
    assert units.numel() == len(want) and all(abs(float(u) - w) <= 1e-5 * (1 + abs(w)) for u, w in zip(units, want))
    m, need = units.numel(), math.ceil(1 / fpr - 1e-9)
    t = cal.threshold(n)
    hypothesis.event("insufficient" if m < need else "calibrated")
    if m < need:
        # too few windows: insufficient, never a pass, whatever the score
        assert t is None and not cal.sufficient(n)
        assert {cal.decide(s, n) for s in (0.0, float(units.min()) if m else 0.0, -1.0)} == {"insufficient"}
        return
    assert t is not None and float(units.min()) <= t <= float(units.max())
    # the split-conformal guarantee: a new exchangeable window exceeds t with probability
    # (1 + #{units > t}) / (m + 1) at most, and that is <= fpr ...
    assert (1 + int((units > t).sum())) / (m + 1) <= fpr + 1e-9
    # ... and t is the smallest unit with that property: one rank lower breaks it
    lower = units[units < t]
    if lower.numel():
        assert (1 + int((units > lower.max()).sum())) / (m + 1) > fpr - 1e-9
    # the guarantee itself, exactly: over every choice of which window is the "new" one (the
    # permutation average that exchangeability makes the probability), a threshold calibrated on
    # the other windows rejects the held-out one at most fpr of the time (where it has enough units)
    if m - 1 >= need:
        held_out = [calibration(torch.cat([units[:i], units[i + 1:]]).tolist(), [1] * (m - 1), fpr)
                    for i in range(m)]
        rejected = sum(float(units[i]) > c.threshold(1) for i, c in enumerate(held_out))
        assert rejected / m <= fpr + 1e-9
    assert cal.decide(t, n) == "verified" and cal.decide(float("nan"), n) == "rejected"
    # a looser target never raises the threshold; p-values are valid and decreasing in the score
    looser = calibration(vals, lengths, min(0.99, fpr * 1.5)).threshold(n)
    assert looser is not None and t >= looser
    p_lo, p_hi = cal.p_value(float(units.min()), n), cal.p_value(float(units.max()) + 1, n)
    assert 0 < p_hi <= p_lo <= 1
    assert p_hi == pytest.approx(1 / (m + 1))

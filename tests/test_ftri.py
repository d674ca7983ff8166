"""fTRI profiling: counts equal a full capture, scores match hand formulas, streaming, persistence, errors."""

import functools
import math

import pytest
import torch

from steer.ftri import (
    DenseModelError,
    Profile,
    ProfileAccumulator,
    ProfileConfig,
    profile,
    prompt_batches,
    scores,
)
from steer.hooks import capture
from steer.identity import ModelMismatchError, model_identity
from steer.prompts import EmptyPromptSetError, PromptSet
from steer.tiny import tiny_model as _build_tiny
from steer.tiny import tiny_tokenizer


@functools.cache
def tiny_model(family, seed=0):
    """Tiny models are built once per test module: nothing here mutates them (hooks are removed)."""
    return _build_tiny(family, seed=seed)


MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "granitemoe")
A = [f"alpha beta {i} gamma" for i in range(6)]
B = [f"ZZ{i}!!QQ" * (1 + i % 2) for i in range(5)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _hand_counts(model, tok, prompts, layers, E):
    """Per-prompt expert counts from full router-index captures, one prompt at a time (no padding)."""
    out = []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        with capture(model, [f"blocks.{L}.mlp.router.indices" for L in layers]) as cap:
            model(**enc)
        out.append(torch.stack([torch.bincount(cap[f"blocks.{L}.mlp.router.indices"][0].reshape(-1), minlength=E)
                                for L in layers]).double())
    return out


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe"])
def test_counts_equal_full_capture_and_scores_match_formulas(family, tok):
    model = tiny_model(family)
    cfg = ProfileConfig(n_bootstrap=0, batch_size=4)
    prof = profile(model, tok, {"a": A, "b": B}, cfg, progress=False)
    layers = prof.layers
    assert layers == ([1, 2] if family in ("deepseek_v3", "qwen2_moe") else [0, 1, 2])
    ca, cb = _hand_counts(model, tok, A, layers, 8), _hand_counts(model, tok, B, layers, 8)
    ta = torch.tensor([len(tok(p).input_ids) for p in A], dtype=torch.float64)
    tb = torch.tensor([len(tok(p).input_ids) for p in B], dtype=torch.float64)
    torch.testing.assert_close(prof.sums["count"][0], sum(ca))
    torch.testing.assert_close(prof.sums["count"][1], sum(cb))
    assert prof.sums["tokens"].tolist() == [ta.sum().item(), tb.sum().item()]
    # mote: mean over prompts of count / tokens, target minus rest
    fa = torch.stack([c / t for c, t in zip(ca, ta)]).mean(0)
    fb = torch.stack([c / t for c, t in zip(cb, tb)]).mean(0)
    torch.testing.assert_close(prof.scores, (fa - fb).float())
    # unnormalised mote: mean raw counts
    raw = prof.rescore(normalize=False).scores
    torch.testing.assert_close(raw, (torch.stack(ca).mean(0) - torch.stack(cb).mean(0)).float())
    # risk_diff (SteerMoE): a1/(a1+d1) - a2/(a2+d2) with a+d = tokens of the class
    rd = prof.rescore("risk_diff").scores
    torch.testing.assert_close(rd, (sum(ca) / ta.sum() - sum(cb) / tb.sum()).float())
    # npmi (RICE) from token-level joint probabilities
    N = ta.sum() + tb.sum()
    pec, pe, pc = sum(ca) / N, (sum(ca) + sum(cb)) / N, ta.sum() / N
    want = torch.log(pec / (pe * pc)) / -torch.log(pec)
    want = torch.where(pec == 0, torch.full_like(want, -1.0), want)
    torch.testing.assert_close(prof.rescore("npmi").scores, want.float())
    # target switch flips the sign of the mean difference
    torch.testing.assert_close(prof.rescore(target="b").scores, -prof.scores)


@pytest.mark.parametrize("family", MOE)
def test_every_moe_family_profiles(family, tok):
    prof = profile(tiny_model(family), tok, {"a": A[:3], "b": B[:3]}, ProfileConfig(n_bootstrap=20), progress=False)
    L = len(prof.layers)
    assert prof.scores.shape == (L, 8) and prof.ci_low.shape == (L, 8)
    # each token goes to exactly top_k experts per layer
    assert torch.equal(prof.sums["count"].sum(-1), prof.sums["tokens"][:, None].expand(-1, L) * 2)
    assert (prof.ci_low <= prof.scores + 1e-6).all() and (prof.scores <= prof.ci_high + 1e-6).all()


def test_response_tokens_are_teacher_forced_and_selected(tok):
    model = tiny_model("olmoe")
    prompts = {"a": ["p1", "p22"], "b": ["q333", "q4"]}
    responses = ["xyz", "hello", "ok", "abcdef"]
    cfg = ProfileConfig(tokens="response", n_bootstrap=0, chat_template=False)
    prof = profile(model, tok, prompts, cfg, responses=responses, progress=False)
    assert prof.sums["tokens"].tolist() == [3 + 5, 2 + 6]
    both = profile(model, tok, prompts, ProfileConfig(tokens="both", n_bootstrap=0), responses=responses,
                   progress=False)
    assert both.sums["tokens"].tolist() == [2 + 3 + 3 + 5, 4 + 2 + 2 + 6]
    # the selection is per position: batches are left padded and the mask marks the response tail
    b = next(prompt_batches(tok, ["p1", "p22"], [0, 0], cfg, ["xyz", "hello"]))
    assert b.selection.sum(1).tolist() == [3, 5] and not (b.selection & ~b.attention_mask.bool()).any()


def test_classes_from_labelled_responses(tok):
    model = tiny_model("mixtral")
    labeller = lambda r: "EVEN" if len(r.encode()) % 2 == 0 else "ODD"  # a pluggable labeller
    prompts = PromptSet([f"q{i}" for i in range(8)], "pool")
    try:
        prof = profile(model, tok, prompts, ProfileConfig(n_bootstrap=0, max_new_tokens=3), labeller=labeller,
                       progress=False)
    except ValueError as exc:  # all answers one label: the error must say so
        assert "at least two classes" in str(exc)
        return
    assert set(prof.classes) == {"EVEN", "ODD"}
    assert int(prof.sums["n"].sum()) == 8


def test_memory_is_flat_in_the_number_of_prompts(tok):
    model = tiny_model("qwen3_moe")
    small = profile(model, tok, {"a": A[:2], "b": B[:2]}, ProfileConfig(n_bootstrap=30), progress=False)
    big = profile(model, tok, {"a": A * 4, "b": B * 4}, ProfileConfig(n_bootstrap=30), progress=False)
    assert small.stats["accumulator_bytes"] == big.stats["accumulator_bytes"]
    acc = ProfileAccumulator(2, [0, 1, 2], 8, n_bootstrap=30)
    assert acc.nbytes() == small.stats["accumulator_bytes"]


def test_poisson_bootstrap_ci_narrows_with_more_prompts(tok):
    model = tiny_model("mixtral")
    many_a = [f"alpha beta {i} gamma {i * 7}" for i in range(40)]
    many_b = [f"ZZ{i}!!QQ{i * 3}" for i in range(40)]
    few = profile(model, tok, {"a": many_a[:5], "b": many_b[:5]}, ProfileConfig(n_bootstrap=200), progress=False)
    lots = profile(model, tok, {"a": many_a, "b": many_b}, ProfileConfig(n_bootstrap=200), progress=False)
    w_few = (few.ci_high - few.ci_low).mean()
    w_lots = (lots.ci_high - lots.ci_low).mean()
    assert w_lots < w_few * 0.75  # ~ 1/sqrt(8) in theory; loose bound
    # replicate weights average to 1: the bootstrap prompt counts centre on the real counts
    assert abs(float(lots.boot["n"].mean()) - 40) < 2


def test_save_load_dataframe_and_figures(tok, tmp_path):
    model = tiny_model("deepseek_v3")
    prof = profile(model, tok, {"a": A, "b": B}, ProfileConfig(n_bootstrap=25, score="risk_diff"), progress=False)
    st, js = prof.save(tmp_path / "out")
    assert st.name == "profile.safetensors" and js.exists()
    back = Profile.load(tmp_path / "out")
    torch.testing.assert_close(back.scores, prof.scores)
    torch.testing.assert_close(back.ci_low, prof.ci_low)
    assert back.config == prof.config and back.classes == ["a", "b"] and back.layers == [1, 2]
    assert back.model == model_identity(model)
    torch.testing.assert_close(back.rescore("npmi").ci_high, prof.rescore("npmi").ci_high)
    back.check_model(model)
    df = prof.to_dataframe()
    assert len(df) == 2 * 8 and set(df.columns) >= {"layer", "expert", "score", "ci_low", "ci_high", "rank",
                                                      "mean_a", "mean_b"}
    top = prof.top(3)
    assert [t.rank for t in top] == [1, 2, 3] and top[0].score == df.score.max()
    assert df.loc[df["rank"] == 1, ["layer", "expert"]].values.tolist() == [[top[0].layer, top[0].expert]]
    per = prof.top(2, per_layer=True)
    assert [t.layer for t in per] == [1, 1, 2, 2]
    fig = prof.figure()
    assert fig.data[0].type == "heatmap" and fig.data[0].z.shape == (2, 8)
    bar = prof.bar_figure(5)
    assert len(bar.data[0].x) == 5 and bar.data[0].error_y.array is not None


def test_bad_inputs(tok, tmp_path):
    with pytest.raises(DenseModelError, match="dense llama model"):
        profile(tiny_model("llama"), tok, {"a": A, "b": B}, progress=False)
    moe = tiny_model("olmoe")
    with pytest.raises(EmptyPromptSetError, match="empty"):
        profile(moe, tok, {"a": A, "b": []}, progress=False)
    with pytest.raises(ValueError, match="at least two classes"):
        profile(moe, tok, {"a": A}, progress=False)
    with pytest.raises(ValueError, match="target class 'c'"):
        profile(moe, tok, {"a": A, "b": B}, ProfileConfig(target="c"), progress=False)
    with pytest.raises(ValueError, match="score must be"):
        profile(moe, tok, {"a": A, "b": B}, ProfileConfig(score="pmi"), progress=False)
    prof = profile(moe, tok, {"a": A, "b": B}, ProfileConfig(n_bootstrap=0), progress=False)
    with pytest.raises(ModelMismatchError, match="different model"):
        prof.check_model(tiny_model("olmoe", seed=3))
    with pytest.raises(ModelMismatchError, match="family"):
        prof.check_model(tiny_model("mixtral"))
    with pytest.raises(FileNotFoundError, match="profile file .* does not exist; create one with `steer profile"):
        Profile.load(tmp_path / "nothing")


def test_scores_edge_cases():
    sums = {"n": torch.tensor([2.0, 2.0], dtype=torch.float64),
            "tokens": torch.tensor([10.0, 10.0], dtype=torch.float64),
            "frac": torch.zeros(2, 1, 2, dtype=torch.float64),
            "count": torch.tensor([[[10.0, 0.0]], [[0.0, 10.0]]], dtype=torch.float64)}
    npmi = scores(sums, "npmi", 0)
    # expert 0 fires on every target token and never otherwise: nPMI 1; expert 1 never with the target: -1
    assert math.isclose(float(npmi[0, 0]), 1.0, abs_tol=1e-9) and float(npmi[0, 1]) == -1.0
    rd = scores(sums, "risk_diff", 0)
    assert rd.tolist() == [[1.0, -1.0]]


def test_cli_profile_then_switch_on_a_local_checkpoint(tmp_path, tok, capsys):
    from steer.cli import main

    ckpt = tmp_path / "tiny_moe"
    tiny_model("qwen3_moe").save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    (tmp_path / "a.txt").write_text("\n".join(A))
    (tmp_path / "b.txt").write_text("\n".join(B))
    out = tmp_path / "prof"
    rc = main(["profile", "--model", str(ckpt), "--class", f"a={tmp_path / 'a.txt'}", "--class",
               f"b={tmp_path / 'b.txt'}", "--bootstrap", "20", "--out", str(out), "--quiet", "--json"])
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"profile.safetensors", "profile.json", "heatmap.html", "top.html"}
    capsys.readouterr()
    rc = main(["switch", "--profile", str(out), "--k", "3", "--prompt", "hello", "--max-new-tokens", "3",
               "--quiet", "--json"])
    assert rc == 0
    assert '"touched"' in capsys.readouterr().out
    assert main(["switch", "--model", str(ckpt), "--experts", "1:9", "--prompt", "x", "--quiet"]) == 2
    assert "experts[0].expert: 9 out of range 0..7" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n")
    assert main(["profile", "--model", str(ckpt), "--class", f"a={tmp_path / 'a.txt'}", "--class",
                 f"b={tmp_path / 'empty.txt'}", "--quiet"]) == 2
    assert "empty" in capsys.readouterr().err
    dense = tmp_path / "dense"
    tiny_model("llama").save_pretrained(dense)
    tok.save_pretrained(dense)
    assert main(["profile", "--model", str(dense), "--class", f"a={tmp_path / 'a.txt'}", "--class",
                 f"b={tmp_path / 'b.txt'}", "--quiet"]) == 2
    assert "no routed experts" in capsys.readouterr().err
    other = tmp_path / "other"
    tiny_model("qwen3_moe", seed=5).save_pretrained(other)
    tok.save_pretrained(other)
    assert main(["switch", "--profile", str(out), "--model", str(other), "--prompt", "x", "--quiet"]) == 2
    assert "different model" in capsys.readouterr().err


def test_chat_template_shared_prefix_is_not_counted():
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}SYS: be nice|U: {{ m['content'] }}|{% endfor %}A:"
    b = next(prompt_batches(tok, ["why?", "ok"], [0, 1], ProfileConfig()))
    assert [tok.decode(r[s]) for r, s in zip(b.input_ids, b.selection)] == ["why?|A:", "ok|A:"]
    b = next(prompt_batches(tok, ["why?"], [0], ProfileConfig(count_template_prefix=True)))
    assert tok.decode(b.input_ids[0][b.selection[0]]) == "SYS: be nice|U: why?|A:"

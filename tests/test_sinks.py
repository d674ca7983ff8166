import pytest
import torch

from steer.hooks import capture
from steer.sinks import SinkResult, book_inputs, detect_sinks, sink_rate_interval, sink_threshold
from steer.tiny import FAMILIES, tiny_model, tiny_tokenizer

TEXTS = ["hello world, a longer one here", "short", "abc abc abc abc"]


def _window(model, layer):
    cfg = getattr(model.config, "text_config", None) or model.config
    types = getattr(cfg, "layer_types", None)
    return cfg.sliding_window if types and types[layer] == "sliding_attention" else None


def _reference_scores(model, tok, text):
    """s_k from full eager maps, one unpadded input: sum over observing queries / number of them."""
    ids = torch.tensor([tok(text).input_ids])
    with capture(model, "blocks.*.attn.pattern") as cap:
        model(ids)
    out = []
    for layer in range(model.config.num_hidden_layers):
        a = cap[f"blocks.{layer}.attn.pattern"][0][0].double()
        n = a.shape[-1]
        i, k = torch.arange(n)[:, None], torch.arange(n)[None]
        vis = k <= i
        if (w := _window(model, layer)) is not None:
            vis &= (i - k) < w
        out.append(a.sum(1) / vis.sum(0))
    return torch.stack(out)  # [L, H, n]


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_scores_match_full_maps_with_left_padding(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    res = detect_sinks(model, tok, TEXTS, min_queries=1)
    assert res.path == ("exact" if family == "gpt_oss" else "streaming")
    for i, text in enumerate(TEXTS):
        ref = _reference_scores(model, tok, text)
        n = ref.shape[-1]
        assert int(res.lengths[i]) == n
        assert torch.allclose(res.scores[i, :, :, :n].double(), ref, atol=1e-5)
        assert res.scores[i, :, :, n:].isnan().all()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt_oss"])
def test_unpadded_batches_take_the_causal_sdpa_path_with_same_numbers(family):
    """Without padding the streaming hook runs SDPA is_causal (no explicit mask): same outputs, same scores."""
    from steer.hooks import attach
    from steer.sinks import _Collector, _streaming_hook

    model, tok = tiny_model(family), tiny_tokenizer()
    text = TEXTS[0] + " and more words to pass a small sliding window " * 2
    ids = torch.tensor([tok(text).input_ids] * 2)
    coll = _Collector(model.config.num_hidden_layers, keep_maps=False)
    coll.unpadded = True
    with attach(model, {"blocks.*.attn.impl": _streaming_hook(coll)}):
        got = model(ids).logits
    assert coll.causal_calls > 0
    assert torch.allclose(got, model(ids).logits, atol=1e-5)
    res = detect_sinks(model, tok, [text], min_queries=1)
    assert torch.allclose(res.scores[0].double(), _reference_scores(model, tok, text), atol=1e-5)


def test_force_exact_path_agrees_with_streaming():
    model, tok = tiny_model("gemma3_text"), tiny_tokenizer()
    a = detect_sinks(model, tok, TEXTS)
    b = detect_sinks(model, tok, TEXTS, force_exact=True)
    assert b.path == "exact"
    assert torch.allclose(a.scores.nan_to_num(), b.scores.nan_to_num(), atol=1e-5)
    assert torch.equal(a.n_obs, b.n_obs)


def _synthetic(scores, n_obs, lengths, **kw):
    n = scores.shape[0]
    tokens = [[f"t{p}" for p in range(scores.shape[-1])] for _ in range(n)]
    return SinkResult(scores, n_obs, torch.tensor(lengths), tokens, **kw)


def test_rules_min_queries_and_sink_rate():
    scores = torch.zeros(2, 1, 2, 10)
    scores[:, 0, 0, 0] = 0.5  # head 0: initial sink in both inputs
    scores[0, 0, 1, 0] = 0.2  # head 1: only input 0 (below eps)
    scores[:, 0, 0, 4] = 0.15  # hidden sink, well observed
    scores[:, 0, 0, 9] = 0.9  # the last key: one observer, must not be a sink
    n_obs = torch.arange(10, 0, -1).expand(2, 1, 10).clone()
    res = _synthetic(scores, n_obs, [10, 10], tau=0.1, min_queries=4)
    mask = res.sink_mask()
    assert mask[0, 0, 0].nonzero().flatten().tolist() == [0, 4]
    assert not mask[..., 9].any()
    hidden = res.hidden_sinks()
    assert list(hidden["position"]) == [4, 4] and list(hidden["token"]) == ["t4", "t4"]
    assert res.sink_rate() == pytest.approx(0.5)  # head 0 yes, head 1 no (0.2 < eps 0.3)
    assert res.sink_rate(eps=0.1) == pytest.approx(0.75)
    assert res.head_sink_rate(eps=0.1)[0].tolist() == [1.0, 0.5]
    alpha = _synthetic(scores, n_obs, [10, 10], tau=None, alpha=2.0, min_queries=1)  # threshold 0.2
    assert alpha.sink_mask()[0, 0, 0].nonzero().flatten().tolist() == [0, 9]
    lo, hi = sink_rate_interval(res)
    assert lo <= res.sink_rate() <= hi


def test_figures_dataframe_and_roundtrip(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    res = detect_sinks(model, tok, TEXTS, tau=0.05, min_queries=2)
    assert set(res.maps) == {0, 1, 2} and res.maps[0].shape == (4, res.lengths[0], res.lengths[0])
    heat = res.figure("heatmap")
    assert heat.data[0].z.shape == (3, 4)
    fmap = res.figure("map", layer=1, head=2)
    assert fmap.data[0].z.shape == (int(res.lengths[0]),) * 2
    strip = res.figure("tokens", input=1)
    assert len(strip.data[0].x) == int(res.lengths[1])
    with pytest.raises(ValueError, match="out of range"):
        res.figure("map", layer=3, head=0)
    df = res.to_dataframe()
    assert len(df) == 12 and {"sink_rate", "first_score", "hidden_per_input"} <= set(df.columns)
    assert res.summary()["inputs"] == 3
    path = tmp_path / "sinks.safetensors"
    res.to_safetensors(path)
    again = SinkResult.from_safetensors(path)
    assert torch.equal(again.scores.nan_to_num(-1), res.scores.nan_to_num(-1))
    assert again.tokens == res.tokens and again.tau == res.tau and set(again.maps) == set(res.maps)
    assert again.hidden_sinks().equals(res.hidden_sinks())


def test_long_inputs_keep_no_maps():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    res = detect_sinks(model, tok, ["x" * 200])
    assert res.maps == {}
    with pytest.raises(ValueError, match="keep_maps"):
        res.figure("map", layer=0, head=0)


def test_book_inputs_have_exact_length():
    tok = tiny_tokenizer()
    seqs = book_inputs(tok, n=3, length=64)
    assert len(seqs) == 3 and all(len(s) == 64 for s in seqs)
    assert seqs == book_inputs(tok, n=3, length=64)


def test_bad_inputs():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="tau"):
        detect_sinks(model, tok, TEXTS, tau=1.5)
    with pytest.raises(ValueError, match="alpha"):
        detect_sinks(model, tok, TEXTS, alpha=0.0)
    with pytest.raises(ValueError, match="min_queries"):
        detect_sinks(model, tok, TEXTS, min_queries=0)
    with pytest.raises(ValueError, match="no inputs"):
        detect_sinks(model, tok, [])
    with pytest.raises(ValueError, match="tokenizer"):
        detect_sinks(model, None, ["text"])
    assert float(sink_threshold(None, 2.0, 8)) == 0.25


def test_cli_sinks_prints_summary_and_writes_figures(tiny_dir, tmp_path, capsys):
    from steer.cli import main

    out = tmp_path / "o"
    rc = main(["sinks", "--model", str(tiny_dir), "--text", "hello there world", "--text", "abc",
               "--tau", "0.05", "--min-queries", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "sink rate" in text and "published 7B" in text
    for name in ("sinks.safetensors", "sink_heatmap.html", "sink_map.html", "sink_tokens.html"):
        assert (out / name).exists()
    assert SinkResult.from_safetensors(out / "sinks.safetensors").n_inputs == 2
    rc = main(["sinks", "--model", str(tiny_dir), "--n", "2", "--length", "16", "--json", "--out", str(out)])
    assert rc == 0 and '"sink_rate"' in capsys.readouterr().out


def test_cli_sinks_bad_input(tiny_dir, tmp_path, capsys):
    from steer.cli import main

    assert main(["sinks", "--model", str(tiny_dir), "--tau", "2", "--text", "x", "--out", str(tmp_path)]) == 2
    assert "tau must be in (0, 1)" in capsys.readouterr().err
    assert main(["sinks", "--model", str(tiny_dir), "--file", str(tmp_path / "nope.txt")]) == 2


@pytest.mark.slow
def test_smollm2_streaming_equals_exact_and_has_sinks(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    inputs = book_inputs(tok, n=3, length=64)
    stream = detect_sinks(model, tok, inputs)
    exact = detect_sinks(model, tok, inputs, force_exact=True)
    assert torch.allclose(stream.scores, exact.scores, atol=1e-4)
    assert 0.3 < stream.sink_rate() <= 1.0
    assert len(stream.hidden_sinks()) > 0


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_candidate_scores_equal_the_full_scan_on_their_positions(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    full = detect_sinks(model, tok, TEXTS, min_queries=1)
    cand = detect_sinks(model, tok, TEXTS, min_queries=1, candidates=[3, 0, 1, 40])
    assert cand.path == "candidates" and cand.stderr is None
    for i in range(len(TEXTS)):
        n = int(full.lengths[i])
        keep = [p for p in (0, 1, 3) if p < n]
        torch.testing.assert_close(cand.scores[i, ..., keep], full.scores[i, ..., keep], atol=1e-6, rtol=1e-5)
        others = [p for p in range(cand.scores.shape[-1]) if p not in keep]
        assert cand.scores[i, ..., others].isnan().all()
    assert torch.equal(cand.n_obs, full.n_obs)
    assert detect_sinks(model, tok, TEXTS, min_queries=1, candidates=[40]).scores.isnan().all()  # all past the end


def test_sampled_scores_carry_standard_errors(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    full = detect_sinks(model, tok, TEXTS, min_queries=1)
    est = detect_sinks(model, tok, TEXTS, min_queries=1, sample_rows=4, seed=1)
    assert est.path == "sampled"
    real = ~full.scores.isnan()
    assert torch.equal(real, ~est.scores.isnan()) and torch.equal(real, ~est.stderr.isnan())
    assert (est.stderr[real] >= 0).all() and (est.stderr[real] > 0).any()
    # every input's first key is seen by all rows; the estimate is within a few standard errors there
    z = (est.scores[..., 0] - full.scores[..., 0]) / est.stderr[..., 0].clamp_min(1e-6)
    assert z.abs().max() < 6
    # as many sampled rows as the input has: the exact scores, standard error 0
    one = detect_sinks(model, tok, TEXTS[:1], min_queries=1, sample_rows=1000)
    torch.testing.assert_close(one.scores[0], full.scores[0, ..., : one.scores.shape[-1]], atol=1e-6, rtol=1e-5)
    assert (one.stderr == 0).all()
    est.to_safetensors(tmp_path / "s.safetensors")
    back = SinkResult.from_safetensors(tmp_path / "s.safetensors")
    assert torch.equal(back.stderr.nan_to_num(), est.stderr.nan_to_num()) and back.path == "sampled"


def test_candidates_and_sampling_are_refused_where_they_cannot_apply():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="not both"):
        detect_sinks(model, tok, TEXTS, candidates=[0], sample_rows=4)
    with pytest.raises(ValueError, match="exact path"):
        detect_sinks(model, tok, TEXTS, candidates=[0], force_exact=True)
    with pytest.raises(ValueError, match="sample_rows"):
        detect_sinks(model, tok, TEXTS, sample_rows=1)
    with pytest.raises(ValueError, match="candidates"):
        detect_sinks(model, tok, TEXTS, candidates=[])

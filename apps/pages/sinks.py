"""Attention sinks: layer x head sink rate, one head's map with its sinks, token strip; ACT on/off."""

from __future__ import annotations

import streamlit as st

from steer.act import BETA, ACTConfig
from steer.act_section import ACTSection
from steer.apps.explorer_common import (
    ACT_KEY,
    current_model,
    lines,
    parse_pairs,
    result_bytes,
    saved_result,
    show_figure,
    using_model,
)
from steer.prompts import generate_responses
from steer.sinks import TAU, SinkResult, book_inputs, detect_sinks

st.title("Attention sinks and ACT")
lm = current_model()
spec = st.session_state["model_spec"]

st.header("1. Sink statistics")
source = st.radio("Sink result source", ("run live", "load saved"), horizontal=True, key="sink_source")
res: SinkResult | None = None
if source == "run live":
    c1, c2, c3 = st.columns(3)
    what = c1.radio("Inputs", ("book prose", "my text"), key="sink_inputs")
    n = c2.number_input("Inputs", 1, 200, 8, key="sink_n", disabled=what != "book prose")
    length = c3.number_input("Tokens per input", 8, 128, 64, key="sink_len", disabled=what != "book prose")
    text = st.text_area("Texts (one per line)", "The cat sat on the mat. Then it slept, and dreamt of fish.",
                        key="sink_text", disabled=what != "my text")
    tau = st.slider("Sink threshold tau", 0.01, 0.9, TAU, key="sink_tau")
    run_key = (spec, what, int(n), int(length), text, tau)
    if st.button("Detect sinks", type="primary", key="run_sinks"):
        try:
            with using_model("Detecting sinks…"):
                inputs = book_inputs(lm.tokenizer, int(n), int(length)) if what == "book prose" else lines(text)
                st.session_state["sinks"] = (run_key, detect_sinks(lm.model, lm.tokenizer, inputs, tau=tau))
        except ValueError as exc:
            st.error(str(exc))
    saved = st.session_state.get("sinks")
    if saved and saved[0][0] == spec:
        res = saved[1]
else:
    res = saved_result("Sink result", SinkResult.from_safetensors, key="sink_file", types=["safetensors"],
                       help="written by SinkResult.to_safetensors / `steer sinks --out`")

if res is not None:
    s = res.summary()
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Sink rate", f"{s['sink_rate']:.1%}")
    c2.metric("Heads with hidden sinks", s["heads_with_hidden_sinks"])
    c3.metric("Hidden sinks / input", f"{s['hidden_sinks_per_input']:.2f}")
    c4.metric("Inputs", s["inputs"])
    st.download_button("Download sink result (.safetensors)", result_bytes(res.to_safetensors, "sinks.safetensors"),
                       file_name="sinks.safetensors", key="dl_sinks")
    show_figure(res.figure("heatmap"), key="sink_heatmap")
    hidden = [(la, h) for la, h, _ in res.heads_with_hidden_sinks() if la in res.maps]
    default = hidden[0] if hidden else (min(res.maps) if res.maps else 0, 0)
    c1, c2 = st.columns(2)
    layer = c1.selectbox("Layer", range(res.n_layers), index=default[0], key="map_layer")
    head = c2.selectbox("Head", range(res.n_heads), index=default[1], key="map_head")
    if res.maps:
        show_figure(res.figure("map", layer=int(layer), head=int(head)), key="sink_map")
    else:
        st.info("No attention maps were kept (the first input is longer than 128 tokens); use shorter inputs.")
    i = st.number_input("Input shown in the token strip", 0, res.n_inputs - 1, 0, key="strip_input")
    show_figure(res.figure("tokens", input=int(i)), key="sink_tokens")
    with st.expander("Per-head table"):
        st.dataframe(res.to_dataframe(), hide_index=True, width="stretch")

st.header("2. ACT: calibrate sink attention and compare outputs")
cfg_file = saved_result("ACT config (optional)", ACTConfig.load, key="act_file", types=["json"],
                        help="act.json from `steer calibrate` (calibrate_heads)")
if cfg_file is not None:
    default_heads = ", ".join(f"{la}:{h}" for la, h in cfg_file.heads)
    default_beta = cfg_file.beta
elif res is not None:
    default_heads = ", ".join(f"{la}:{h}" for la, h, _ in res.heads_with_hidden_sinks()[:4])
    default_beta = BETA
else:
    default_heads, default_beta = "", BETA
c1, c2, c3 = st.columns([3, 1, 1])
heads_text = c1.text_input("Heads (LAYER:HEAD, ...)", default_heads, key=f"act_heads_{default_heads}",
                           help="default: the four heads most often showing hidden sinks")
beta = c2.slider("beta (scale of non-initial sinks)", 0.0, 1.0, float(default_beta), key="act_beta")
act_tau = c3.slider("tau (sink threshold)", 0.01, 0.9, float(cfg_file.tau if cfg_file and cfg_file.tau else TAU),
                    key="act_tau")
prompts = lines(st.text_area("Prompts (one per line)", "Name three colours of the rainbow.", key="act_prompts"))
max_new = st.slider("New tokens", 4, 96, 24, key="act_tokens")
if st.button("Generate without and with ACT", type="primary", key="run_act"):
    try:
        act_cfg = ACTConfig(parse_pairs(heads_text, "LAYER:HEAD"), beta=beta, tau=act_tau,
                            model=lm.name)
        act = act_cfg.intervention(on_no_effect="warn")
        if not prompts:
            raise ValueError("give at least one prompt")
    except ValueError as exc:
        st.error(str(exc))
    else:
        try:
            with using_model("Generating…"):
                base = generate_responses(lm.model, lm.tokenizer, prompts, max_new_tokens=max_new, progress=False)
                with act.apply(lm.model):
                    steered = generate_responses(lm.model, lm.tokenizer, prompts, max_new_tokens=max_new,
                                                 progress=False)
        except (ValueError, NotImplementedError) as exc:
            st.error(str(exc))
        else:
            st.session_state["act_out"] = dict(spec=spec, prompts=prompts, base=base, steered=steered,
                                               touched=act.total_touched, heads=act.heads)
            st.session_state[ACT_KEY] = ACTSection.from_act_config(act_cfg)
out = st.session_state.get("act_out")
if out and out["spec"] == spec:
    st.success(f"ACT on {len(out['heads'])} heads rescaled {out['touched']} attention rows. Added to the Config page.")
    if not out["touched"]:
        st.warning("ACT touched no row: these heads showed no sink on these prompts, so outputs cannot differ.")
    for p, b, s in (zip(out["prompts"], out["base"], out["steered"])):
        st.markdown(f"**{p}**")
        c1, c2 = st.columns(2)
        c1.caption("without ACT")
        c1.code(b, language=None, wrap_lines=True)
        c2.caption("with ACT" + (" (changed)" if s != b else " (same)"))
        c2.code(s, language=None, wrap_lines=True)

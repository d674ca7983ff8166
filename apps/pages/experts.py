"""Experts: fTRI profile (per-class layer x expert maps, top-k), tokens routed to an expert, MoTE switching."""

from __future__ import annotations

from dataclasses import asdict

import pandas as pd
import streamlit as st

from steer.adapters import model_map
from steer.apps.explorer_common import (
    MODEL_LOCK,
    MOTE_KEY,
    LiveProgress,
    current_model,
    lines,
    parse_pairs,
    result_bytes,
    saved_result,
    show_figure,
    using_model,
)
from steer.ftri import Profile, ProfileCancelled, ProfileConfig, expert_tokens, profile
from steer.mote import ExpertSwitch
from steer.mote_eval import behaviour_labels
from steer.mote_section import MoTESection
from steer.options import PROFILE_SCORES, PROFILE_TOKENS, SWITCH_MODES
from steer.prompts import builtin

st.title("Experts: which experts a behaviour uses, and switching them")
lm = current_model()
spec = st.session_state["model_spec"]
mm = model_map(lm.model)
if not mm.moe_layers:
    st.warning(f"{lm.name} is a dense {mm.adapter.family} model: it has no routed experts to profile or switch. "
               "Pick an MoE model in the sidebar (e.g. the packaged smollm2-moe).")
    st.stop()

# ---- 1. the profile: live or saved -----------------------------------------------------------------
st.header("1. Expert profile (fTRI)")
source = st.radio("Profile source", ("run live", "load saved"), horizontal=True, key="prof_source")
prof: Profile | None = None
if source == "run live":
    fr, en = builtin("questions-fr").prompts[:6], builtin("questions-en").prompts[:6]
    c1, c2 = st.columns(2)
    name_a = c1.text_input("Target class", "french", key="cls_a")
    prompts_a = c1.text_area("Target prompts (one per line)", "\n".join(fr), height=160, key="prompts_a")
    name_b = c2.text_input("Baseline class", "english", key="cls_b")
    prompts_b = c2.text_area("Baseline prompts (one per line)", "\n".join(en), height=160, key="prompts_b")
    c1, c2, c3 = st.columns(3)
    score = c1.selectbox("Score", PROFILE_SCORES, key="prof_score")
    tokens = c2.selectbox("Tokens that count", PROFILE_TOKENS, key="prof_tokens",
                          help="response/both first generate the answers (slower)")
    n_boot = c3.number_input("Bootstrap replicates (CIs)", 0, 1000, 50, step=50, key="prof_boot")
    cfg = ProfileConfig(tokens=tokens, score=score, n_bootstrap=int(n_boot), max_new_tokens=24)
    run_key = (spec, name_a, prompts_a, name_b, prompts_b, tokens, score, int(n_boot))
    if st.button("Profile experts", type="primary", key="run_profile"):
        bar = LiveProgress("Profiling (Streamlit's Stop button keeps the prompts counted so far)…")
        try:
            with MODEL_LOCK:
                st.session_state["profile"] = (run_key, profile(
                    lm.model, lm.tokenizer, {name_a: lines(prompts_a), name_b: lines(prompts_b)}, cfg,
                    progress=bar, cancel=bar.cancel, weights_hash=lm.weights_hash))
        except (ValueError, ProfileCancelled) as exc:
            st.session_state.pop("profile", None)
            st.error(str(exc))
        bar.finish()
    saved = st.session_state.get("profile")
    if saved and saved[0][0] == spec:
        prof = saved[1]
        if saved[0] != run_key:
            st.caption("Showing the last profile; press *Profile experts* to rerun with the settings above.")
else:
    prof = saved_result("Expert profile", Profile.from_safetensors, key="prof_file", types=["safetensors"],
                        help="profile.safetensors from `steer profile --out DIR` or Profile.save")
    if prof is not None:
        try:
            prof.check_model(lm.model)
        except ValueError as exc:
            st.warning(f"This profile was made on another model; switching its experts here is refused. {exc}")

sel_layer, sel_expert = mm.moe_layers[0], 0
if prof is not None:
    st.caption(f"{prof.stats.get('prompts', '?')} prompts, {prof.stats.get('tokens', '?')} tokens, "
               f"{prof.stats.get('seconds', '?')} s; classes {prof.classes}")
    if prof.cancelled:
        st.warning(f"Partial profile: the run was stopped after {prof.stats['prompts']} of "
                   f"{prof.stats['prompts_requested']} prompts ({prof.stats['prompts_per_class']} per class). "
                   "Press *Profile experts* again for the full run.")
    score = st.selectbox("Score shown", PROFILE_SCORES, index=PROFILE_SCORES.index(prof.config.score),
                         key="view_score")
    tabs = st.tabs([f"{c} vs rest" for c in prof.classes])
    for c, tab in zip(prof.classes, tabs):
        with tab:
            view = prof.rescore(score, target=c)
            event = show_figure(view.figure(), key=f"map_{c}", on_select="rerun", selection_mode="points")
            points = (event.selection.points if event and hasattr(event, "selection") else []) or []
            if points:
                st.session_state["sel_layer"] = int(points[0]["y"])
                st.session_state["sel_expert"] = int(points[0]["x"])
    view = prof.rescore(score, target=st.session_state.get("top_target", prof.target))
    st.subheader("Top experts")
    c1, c2 = st.columns([1, 3])
    c1.selectbox("For class", prof.classes, key="top_target")
    k = c1.slider("k", 1, min(50, view.scores.numel()), min(10, view.scores.numel()), key="top_k")
    c1.download_button("Download profile (.safetensors)", data=result_bytes(prof.to_safetensors, "profile.safetensors"),
                       file_name="profile.safetensors", key="dl_profile")
    c2.dataframe(pd.DataFrame([asdict(t) for t in view.top(k)]), hide_index=True, width="stretch")
    show_figure(view.bar_figure(k), key="top_bar")

# ---- 2. tokens routed to one expert ----------------------------------------------------------------
st.header("2. Tokens routed to an expert")
st.caption("Click a cell of a heatmap above to pick its expert, or choose it here. Tokens are read from the "
           "router's own top-k output, on the sequences the profile counts (its chat template and token setting).")
c1, c2, c3 = st.columns([1, 1, 3])
layer = c1.selectbox("MoE layer", mm.moe_layers, key="sel_layer")
expert = c2.number_input("Expert", 0, mm.num_experts - 1, key="sel_expert")
default_prompts = "\n".join(lines(st.session_state.get("prompts_a", ""))[:3])  # the first target prompts
route_prompts = lines(c3.text_area("Prompts to route (one per line)", default_prompts or "Pourquoi le ciel est-il bleu ?",
                                   key="route_prompts", height=100))
if route_prompts:
    route_cfg = prof.config if prof is not None else None
    memo_key = (spec, tuple(route_prompts), int(layer), int(expert), repr(route_cfg))
    try:  # memoised: other widgets rerun the page, and with response tokens this generates answers
        memo = st.session_state.get("route_memo")
        if not memo or memo[0] != memo_key:
            with MODEL_LOCK:
                memo = (memo_key, expert_tokens(lm.model, lm.tokenizer, route_prompts, int(layer), int(expert),
                                                route_cfg, routed_only=False))
            st.session_state["route_memo"] = memo
        df = memo[1]
    except ValueError as exc:
        st.error(str(exc))
    else:
        routed = df[df.routed].assign(token=lambda d: d.token.map(lambda t: repr(t)[1:-1]))  # "\n" visible
        st.caption(f"{len(routed)} of {len(df)} tokens were routed to layer {layer}, expert {expert} "
                   f"({int(routed.counted.sum())} of them counted by the profile)")
        c1, c2 = st.columns([3, 1])
        c1.dataframe(routed.drop(columns=["routed"]), hide_index=True, width="stretch", height=240)
        c2.dataframe(routed.token.value_counts().rename_axis("token").reset_index(name="times"),
                     hide_index=True, width="stretch", height=240)

# ---- 3. switching ------------------------------------------------------------------------------------
st.header("3. Switch experts and generate (MoTE)")
default = ", ".join(f"{t.layer}:{t.expert}" for t in prof.top(8)) if prof is not None else f"{mm.moe_layers[0]}:0"
c1, c2 = st.columns([3, 1])
experts_text = c1.text_input("Experts (LAYER:EXPERT, ...)", default, key=f"switch_experts_{default}",
                             help="default: the profile's global top 8 for its target class")
mode = c2.selectbox("Mode", SWITCH_MODES, key="switch_mode",
                    help="off_mask: removed before top-k; off_zero: weight 0; on: forced into the top-k")
prompts = lines(st.text_area("Prompts (one per line)", "Pourquoi le ciel est-il bleu ?\nWhat is a good breakfast?",
                             key="switch_prompts"))
max_new = st.slider("New tokens", 4, 96, 24, key="switch_tokens")
if st.button("Generate baseline and switched", type="primary", key="run_switch"):
    try:
        switch = ExpertSwitch(parse_pairs(experts_text), mode, on_no_effect="warn")
        switch.validate(mm)
        if not prompts:
            raise ValueError("give at least one prompt")
    except (ValueError, IndexError) as exc:
        st.error(str(exc))
    else:
        with using_model("Generating baseline and switched answers…"):
            common = dict(max_new_tokens=max_new, batch_size=8)
            base, _ = behaviour_labels(lm.model, lm.tokenizer, prompts, lambda r: "", **common)
            steered, _ = behaviour_labels(lm.model, lm.tokenizer, prompts, lambda r: "", switch=switch, **common)
        st.session_state["switch_out"] = dict(spec=spec, prompts=prompts, base=base, steered=steered,
                                              touched=switch.total_touched, fraction=switch.touched_fraction(),
                                              repr=repr(switch))
        st.session_state[MOTE_KEY] = MoTESection.from_switch(switch, source="steer app")
out = st.session_state.get("switch_out")
if out and out["spec"] == spec:
    st.success(f"{out['repr']}: routing changed for {out['touched']} token-layers "
               f"({100 * out['fraction']:.1f}% of those routed through switched layers). "
               "Added to the Config page.")
    for p, b, s in (zip(out["prompts"], out["base"], out["steered"])):
        st.markdown(f"**{p}**")
        c1, c2 = st.columns(2)
        c1.caption("baseline")
        c1.code(b, language=None, wrap_lines=True)
        c2.caption("switched" + (" (changed)" if s != b else " (same)"))
        c2.code(s, language=None, wrap_lines=True)

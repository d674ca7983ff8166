"""Probes (LYNX): confidence over a generation at each cue, and where a probe calibrated at delta exits."""

from __future__ import annotations

import streamlit as st
import torch
from explorer_common import (
    LYNX_KEY,
    MODEL_LOCK,
    current_model,
    folder_zip,
    probe_trajectory_figure,
    result_bytes,
    saved_result,
    show_figure,
    using_model,
)

from probes import (
    CueSet,
    ExitConfig,
    LabelledCues,
    LynxProbe,
    NeverExit,
    ProbeConfig,
    arithmetic_problems,
    lynx,
)
from probes.data import chat_prompts
from probes.features import default_points
from probes.generate import generate_with_exit
from steer.config import LynxSection

st.title("Probes: LYNX confidence and online early exit")
lm = current_model()
spec = st.session_state["model_spec"]

st.header("1. A probe and its calibration cue events")
source = st.radio("Probe source", ("load saved", "train live (small)"), horizontal=True, key="probe_source")
probe: LynxProbe | None = None
cal_cues: LabelledCues | None = None
if source == "load saved":
    probe = saved_result("LYNX probe", LynxProbe.load, key="probe_dir", types=["json", "safetensors"],
                         multiple=True, help="probe.json + probe.safetensors from `steer probe train` "
                                             "(upload both, or give their folder)")
    cal_cues = saved_result("Calibration cue events (optional, to recalibrate at any delta)",
                            LabelledCues.from_safetensors, key="cal_cues", types=["safetensors"],
                            help="from `steer probe label --split calibration`")
    if probe is not None:
        try:
            probe.check_compatible(lm.model)
        except ValueError as exc:
            st.error(str(exc))
            probe = None
else:
    c1, c2, c3 = st.columns(3)
    n_train = c1.number_input("Training problems", 4, 200, 12, key="lynx_ntrain")
    n_cal = c2.number_input("Calibration problems", 4, 200, 12, key="lynx_ncal")
    budget = c3.number_input("Reasoning tokens", 8, 256, 48, key="lynx_budget")
    cues_text = st.text_input("Cues (words, structural cues, re:REGEX)", "newline,blank_line,sentence_end",
                              key="lynx_cues")
    exit_string = st.text_input("Exit string", "\n\nThe answer is ", key="lynx_exit")
    if st.button("Label, train and calibrate", type="primary", key="run_lynx_train"):
        try:
            cues = CueSet.parse(cues_text)
            cfg = ExitConfig(exit_string=exit_string, max_new_tokens=int(budget), answer_max_tokens=8)
            points = default_points(lm.model)
            bar = st.progress(0.0, "labelling cue events (Streamlit's Stop button cancels)…")
            with MODEL_LOCK:
                labs = []
                for i, (split, n) in enumerate((("train", n_train), ("calibration", n_cal))):
                    def step(done, total, i=i, split=split):
                        bar.progress((i + done / total) / 2, f"labelling {split} problems: {done}/{total}")
                    lab, _ = lynx.label(lm.model, lm.tokenizer, arithmetic_problems(int(n), split=split), points, cues,
                                        cfg, batch_size=4, model_name=lm.name, progress=step)
                    labs.append(lab)
                bar.progress(1.0, "training the probe…")
                trained = lynx.train(labs[0], ProbeConfig(max_epochs=100))
            st.session_state["lynx"] = (spec, trained, labs[1])
        except ValueError as exc:
            st.error(str(exc))
    saved = st.session_state.get("lynx")
    if saved and saved[0] == spec:
        probe, cal_cues = saved[1], saved[2]
        c1, c2 = st.columns(2)
        c1.download_button("Download probe (.zip)", folder_zip(probe.save), file_name="probe.zip", key="dl_probe")
        c2.download_button("Download calibration cue events", result_bytes(cal_cues.to_safetensors, "cal.safetensors"),
                           file_name="cues_calibration.safetensors", key="dl_cal")

if probe is not None:
    info = probe.info
    st.caption(f"Probe on {info.model or '?'}: points {info.points}, {info.n_train} training events, "
               f"validation AUC {info.val_auc:.3f}" if info else "Probe without training info")
    st.header("2. Confidence over a generation")
    if cal_cues is not None:
        delta = st.slider("delta (tolerated premature-exit rate)", 0.01, 0.5, 0.1, 0.01, key="lynx_delta")
        try:
            lynx.calibrate_probe(probe, cal_cues, delta, warn=False)
        except ValueError as exc:
            st.error(str(exc))
            st.stop()
    elif probe.calibration is None:
        st.error("This probe is not calibrated and no calibration cue events were given: add the calibration "
                 "file (steer probe label --split calibration) to choose delta.")
        st.stop()
    else:
        st.info(f"Using the probe's stored calibration (delta = {probe.calibration.delta}); add calibration cue "
                "events to choose another delta.")
    cal = probe.calibration
    c1, c2, c3 = st.columns(3)
    c1.metric("delta", f"{cal.delta:g}")
    c2.metric("q0 (exit needs p > q0)", f"{cal.q0:.3f}")
    c3.metric("calibration events (y=0 / y=1)", f"{cal.n0} / {cal.n1}")
    for note in cal.notes:
        st.warning(note)
    question = st.text_input("Question", arithmetic_problems(1, split="test")[0].question, key="lynx_q")
    budget = st.slider("Reasoning tokens", 8, 256, 64, key="lynx_gen_budget")
    if st.button("Generate", type="primary", key="run_lynx_gen"):
        cfg = ExitConfig(exit_string=info.exit_string if info and info.exit_string else ExitConfig().exit_string,
                         max_new_tokens=int(budget), answer_max_tokens=8)
        prompts = chat_prompts(lm.tokenizer, [question])
        with using_model("Generating (all cues scored), then with online exit…"):
            full = generate_with_exit(lm.model, lm.tokenizer, prompts, NeverExit(), cues=probe.cue_set, config=cfg,
                                      points=info.points, record_features=True)
            with torch.no_grad():
                scores = probe(full.features).tolist() if full.features.numel() else []
            exits = cal.should_exit(torch.tensor(scores)).tolist() if scores else []
            online = lynx.generate(lm.model, lm.tokenizer, prompts, probe, config=cfg)
        st.session_state["lynx_out"] = dict(spec=spec, delta=cal.delta, events=full.rows[0].events, scores=scores,
                                            exits=exits, full=full.rows[0], online=online.rows[0],
                                            exit_len=len(online.exit_ids))
        st.session_state[LYNX_KEY] = LynxSection.from_probe(probe)
    out = st.session_state.get("lynx_out")
    if out and out["spec"] == spec:
        if out["events"]:
            show_figure(probe_trajectory_figure(out["events"], out["scores"], out["exits"],
                                                f", delta = {out['delta']:g}"), key="lynx_traj")
        else:
            st.warning("The generation produced no cue: nothing was scored. Use cues this model emits.")
        row, on = out["full"], out["online"]
        c1, c2 = st.columns(2)
        c1.caption(f"full generation ({row.kept} tokens, stop: {row.stop})")
        c1.code(row.reasoning_text, language=None, wrap_lines=True)
        c2.caption(f"online exit ({on.n_tokens(out['exit_len'])} tokens, stop: {on.stop}); answer:")
        c2.code(on.reasoning_text + (f"\n→ {on.answer.answer_text}" if on.answer else ""), language=None,
                wrap_lines=True)
        st.caption("The calibrated probe was added to the Config page.")

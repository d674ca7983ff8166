"""Fingerprints (DiFR): verify a fingerprint file against the model; per-token distance plot."""

from __future__ import annotations

import streamlit as st

from steer.apps.explorer_common import (
    DIFR_KEY,
    current_model,
    lines,
    result_bytes,
    saved_result,
    show_figure,
    using_model,
)
from steer.difr import Calibration, DiFRConfig, Fingerprints, calibrate, fingerprint_prompts, verify
from steer.difr.section import DiFRSection
from steer.options import PROJECTIONS, VERIFY_METHODS

st.title("Fingerprints: verify that a provider ran this model (Activation-DiFR)")
lm = current_model()
spec = st.session_state["model_spec"]

st.header("1. Fingerprints to check")
source = st.radio("Fingerprint source", ("load a file", "make one here (provider side)"), horizontal=True,
                  key="fp_source")
fp: Fingerprints | None = None
cal: Calibration | None = None
if source == "load a file":
    fp = saved_result("Fingerprint file", Fingerprints.from_safetensors, key="fp_file", types=["safetensors"],
                      help="written by `steer fingerprint` (Fingerprints.save)")
    cal = saved_result("Calibration (optional: without it the report is 'uncalibrated')",
                       Calibration.from_safetensors, key="fp_cal", types=["safetensors"],
                       help="written by `steer calibrate-difr` / steer.difr.calibrate(...).save")
else:
    prompts = lines(st.text_area("Prompts (one per line)", "Tell me a fact about the sea.\nWhat is 12 + 30?\n"
                                 "Write a haiku about rain.\nName a prime number.", key="fp_prompts"))
    c1, c2, c3, c4, c5, c6 = st.columns(6)
    k = c1.number_input("k (fingerprint width)", 1, 128, 8, key="fp_k")
    seed = c2.number_input("projection seed", 0, 2**31 - 1, 0, key="fp_seed")
    projection = c3.selectbox("projection", PROJECTIONS, key="fp_proj")
    max_new = c4.number_input("new tokens", 1, 128, 16, key="fp_tokens")
    reruns = c5.number_input("benign reruns", 1, 64, 12, key="fp_reruns",
                             help="calibration: the prompts rerun in other orders and batch sizes (1-3)")
    fpr = c6.number_input("target FPR", 0.001, 0.5, 0.1, key="fp_fpr", format="%.3f",
                          help="per claim; each of its B sequences is tested at FPR/B, so a claim of T tokens "
                               "needs about T/FPR benign tokens")
    if st.button("Fingerprint, and calibrate on benign reruns", type="primary", key="run_fp"):
        try:
            config = DiFRConfig(k=int(k), seed=int(seed), projection=projection)
            with using_model(f"Generating with fingerprints (batch 4), then {int(reruns)} benign reruns…"):
                made = fingerprint_prompts(lm.model, lm.tokenizer, prompts, config=config, max_new_tokens=int(max_new),
                                           batch_size=4, model_id=lm.name)
                benign = [fingerprint_prompts(lm.model, lm.tokenizer, prompts[r % len(prompts):] + prompts[:r % len(prompts)],
                                              config=config, max_new_tokens=int(max_new), batch_size=1 + r % 3,
                                              model_id=lm.name) for r in range(int(reruns))]
                made_cal = calibrate(lm.model, benign, target_fpr=float(fpr), model_id=lm.name)
            st.session_state["fp_made"] = (spec, made, made_cal)
            st.session_state[DIFR_KEY] = DiFRSection(config.k, config.seed, config.projection)
        except ValueError as exc:
            st.error(str(exc))
    saved = st.session_state.get("fp_made")
    if saved and saved[0] == spec:
        fp, cal = saved[1], saved[2]
        c1, c2 = st.columns(2)
        c1.download_button("Download fingerprints", result_bytes(fp.save, "fp.safetensors"),
                           file_name="fingerprints.safetensors", key="dl_fp")
        c2.download_button("Download calibration", result_bytes(cal.save, "cal.safetensors"),
                           file_name="calibration.safetensors", key="dl_fpcal")
        st.caption("The DiFR settings were added to the Config page.")

if fp is not None:
    st.caption(f"{fp.n_sequences} sequences, {fp.n_tokens} tokens, k={fp.config.k}, claims model {fp.model_id!r}"
               + (f", intervention {fp.intervention}" if fp.intervention else ""))
    st.header("2. Verify against the loaded model")
    methods = VERIFY_METHODS if fp.sampling else tuple(m for m in VERIFY_METHODS if m != "token")
    method = st.radio("Method", methods, horizontal=True, key="fp_method",
                      help="Token-DiFR needs a sampled claim; greedy claims are checked by activations only")
    if cal is not None and cal.method != method:
        st.warning(f"The calibration is for {cal.method}-DiFR; verifying {method}-DiFR uncalibrated.")
    if st.button("Verify", type="primary", key="run_verify"):
        try:
            with using_model("Teacher-forcing the claim through the model…"):
                report = verify(lm.model, fp, cal if cal is not None and cal.method == method else None,
                                method=method)
            st.session_state["fp_report"] = (spec, report)
        except ValueError as exc:
            st.error(f"The claim does not fit this model: {exc}")
            st.session_state.pop("fp_report", None)
    saved = st.session_state.get("fp_report")
    if saved and saved[0] == spec:
        report = saved[1]
        s = report.summary()
        {"verified": st.success, "rejected": st.error, "insufficient": st.warning}.get(report.decision, st.info)(
            report.headline())
        if report.sequences:
            st.dataframe(report.sequences_dataframe(), hide_index=True, width="stretch")
        show_figure(report.figure(), key="fp_report_fig")
        with st.expander("Per-token table and summary"):
            st.json(s)
            st.dataframe(report.to_dataframe(), hide_index=True, width="stretch")

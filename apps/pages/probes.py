"""Probes (LYNX): confidence at each cue of live generations, and where a probe calibrated at delta exits.

The live probe is labelled, trained and calibrated here once per model and settings, then cached on
disk (labelling runs a forced-exit answer at every cue, minutes on a CPU). Exits happen for real: the
questions are generated twice, without exits (every cue scored, for the figure) and with the
calibrated probe deciding online (KV cache rolled back, exit string fed, answer decoded).
"""

from __future__ import annotations

import hashlib
import json

import streamlit as st

from steer.apps.explorer_common import (
    LYNX_KEY,
    MODEL_LOCK,
    LiveProgress,
    current_model,
    folder_zip,
    lines,
    result_bytes,
    saved_result,
    show_figure,
    using_model,
)
from steer.packages import cache_dir
from steer.probes import lynx
from steer.probes.answers import get_checker
from steer.probes.conformal import min_calibration_size
from steer.probes.cues import CueSet
from steer.probes.data import SPLITS, LabelledCues, arithmetic_problems, chat_prompts
from steer.probes.features import default_points
from steer.probes.generate import ExitConfig, NeverExit, generate_with_exit
from steer.probes.probe import LynxProbe, ProbeConfig
from steer.probes.section import LynxSection

# The demo's delta. A 135M model is right at few cue events (smollm2-moe, the defaults below: 7 of 83
# training and 4 of 83 calibration events), so its probe is rarely sure. Measured with those defaults
# on the 4 default questions: delta 0.1 exits on 1, 0.2 on 3 (q0 = 0.20). At 0.2 up to 20% of the cue
# events where exiting is wrong may exit (per event, marginally); LYNX's published settings are
# 0.05-0.1, and the slider goes there.
DEMO_DELTA = 0.2
DEMO_QUESTIONS = 4
CACHE_VERSION = 1


def probe_cache(lm, settings: dict):
    return cache_dir() / "app" / "lynx" / hashlib.sha256(
        json.dumps({"model": lm.weights_hash, "v": CACHE_VERSION, **settings}, sort_keys=True).encode()
    ).hexdigest()[:16]


def label_train_cached(lm, folder, n: dict[str, int], cues: CueSet, cfg: ExitConfig, bar: LiveProgress):
    """Each split's labelled cue events and the trained probe, from `folder` or made now and saved there."""
    points = default_points(lm.model)
    labs = {}
    for split, count in n.items():
        path = folder / f"cues_{split}.safetensors"
        if path.exists():
            labs[split] = LabelledCues.from_safetensors(path)
            continue
        bar.stage(f"labelling {split} problems (a forced-exit answer at every cue)")
        labs[split], _ = lynx.label(lm.model, lm.tokenizer, arithmetic_problems(count, split=split), points, cues,
                                    cfg, batch_size=8, model_name=lm.name, progress=bar)
        folder.mkdir(parents=True, exist_ok=True)
        labs[split].to_safetensors(path)
    if (folder / "probe" / "probe.json").exists():
        probe = LynxProbe.load(folder / "probe")
    else:
        bar.stage("training the probe")
        probe = lynx.train(labs["train"], ProbeConfig(max_epochs=100))
        probe.save(folder / "probe")
    return probe, labs["calibration"], labs["train"]


def known_answers() -> dict[str, int]:
    """Gold answers of the seeded problems (the default questions come from the test split)."""
    return {p.question: p.answer for split in SPLITS for p in arithmetic_problems(200, split=split)}


st.title("Probes: LYNX confidence and online early exit")
lm = current_model()
spec = st.session_state["model_spec"]

st.header("1. A probe and its calibration cue events")
source = st.radio("Probe source", ("train live (cached)", "load saved"), horizontal=True, key="probe_source")
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
    n_train = c1.number_input("Training problems", 4, 400, 32, key="lynx_ntrain")
    n_cal = c2.number_input("Calibration problems", 4, 400, 32, key="lynx_ncal")
    budget = c3.number_input("Reasoning tokens", 8, 256, 64, key="lynx_budget")
    cues_text = st.text_input("Cues (words, structural cues, re:REGEX)", "newline,blank_line,sentence_end",
                              key="lynx_cues")
    exit_string = st.text_input("Exit string", "\n\nThe answer is ", key="lynx_exit")
    settings = dict(train=int(n_train), calibration=int(n_cal), budget=int(budget), cues=cues_text,
                    exit=exit_string, answer_max_tokens=8)
    folder = probe_cache(lm, settings)
    cached = (folder / "probe" / "probe.json").exists()
    st.caption(("A probe for these settings is cached: pressing the button loads it. " if cached else
                "Labelling runs a forced-exit answer at every cue of every problem (minutes on a CPU). ")
               + f"Cache: `{folder}`.")
    if st.button("Label, train and calibrate", type="primary", key="run_lynx_train"):
        bar = LiveProgress("preparing", keep_partial=False)  # Stop ends the run; finished splits stay cached
        try:
            cues = CueSet.parse(cues_text)
            cfg = ExitConfig(exit_string=exit_string, max_new_tokens=int(budget), answer_max_tokens=8)
            with MODEL_LOCK:
                trained, cal, train = label_train_cached(
                    lm, folder, {"train": int(n_train), "calibration": int(n_cal)}, cues, cfg, bar)
            st.session_state["lynx"] = (spec, trained, cal, train)
        except ValueError as exc:
            st.error(str(exc))
        bar.finish()
    saved = st.session_state.get("lynx")
    if saved and saved[0] == spec:
        probe, cal_cues, train = saved[1], saved[2], saved[3]
        st.caption(f"Training: {len(train)} cue events, {int(train.labels.sum())} where exiting gives the right "
                   f"answer; calibration: {len(cal_cues)} cue events, {int(cal_cues.labels.sum())} right.")
        if int(train.labels.sum()) < 2:
            st.warning("Almost no training cue event is labelled correct, so the probe has nothing to learn from: "
                       "use more training problems or cues that fall after the model has computed its answer.")
        c1, c2 = st.columns(2)
        c1.download_button("Download probe (.zip)", folder_zip(probe.save), file_name="probe.zip", key="dl_probe")
        c2.download_button("Download calibration cue events", result_bytes(cal_cues.to_safetensors, "cal.safetensors"),
                           file_name="cues_calibration.safetensors", key="dl_cal")

if probe is not None:
    info = probe.info
    auc = f"validation AUC {info.val_auc:.3f}" if info and info.val_auc == info.val_auc else "no validation AUC"
    st.caption(f"Probe on {info.model or '?'}: points {info.points}, {info.n_train} training events, {auc}"
               if info else "Probe without training info")
    st.header("2. Confidence over generations, and online exits")
    if cal_cues is not None:
        delta = st.slider("delta (tolerated premature-exit rate per cue event)", 0.01, 0.5, DEMO_DELTA, 0.01,
                          key="lynx_delta", help=f"the demo starts at {DEMO_DELTA}: see the page's source for why")
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
    if not cal.can_exit:
        st.warning(f"No exit is possible at delta = {cal.delta:g}: a finite threshold needs at least "
                   f"{min_calibration_size(cal.delta)} negative calibration events, there are {cal.n0}. Raise delta "
                   f"to {1 / (cal.n0 + 1):.2f} or more, or label more calibration problems.")
    defaults = "\n".join(p.question for p in arithmetic_problems(DEMO_QUESTIONS, split="test"))
    questions = lines(st.text_area("Questions (one per line)", defaults, key="lynx_questions"))
    # calibration holds for cue events like the calibration ones: by default, the labelling budget
    budget = st.slider("Reasoning tokens", 8, 256, int(st.session_state.get("lynx_budget", 64)), key="lynx_gen_budget")
    if st.button("Generate", type="primary", key="run_lynx_gen"):
        if not questions:
            st.error("give at least one question")
            st.stop()
        cfg = ExitConfig(exit_string=info.exit_string if info and info.exit_string else ExitConfig().exit_string,
                         max_new_tokens=int(budget), answer_max_tokens=8)
        prompts = chat_prompts(lm.tokenizer, questions)
        with using_model(f"Generating {len(questions)} answers with every cue scored, then with online exits…"):
            full = generate_with_exit(lm.model, lm.tokenizer, prompts, NeverExit(), cues=probe.cue_set, config=cfg,
                                      points=info.points, record_features=True)
            online = lynx.generate(lm.model, lm.tokenizer, prompts, probe, config=cfg)
        st.session_state["lynx_out"] = dict(spec=spec, delta=cal.delta, questions=questions, full=full, online=online)
        st.session_state[LYNX_KEY] = LynxSection.from_probe(probe)
    out = st.session_state.get("lynx_out")
    if out and out["spec"] == spec:
        full, online, qs = out["full"], out["online"], out["questions"]
        gold, check = known_answers(), get_checker("numeric")
        exited = [r.stop == "exit" for r in online.rows]
        st.success(f"Online run at delta = {out['delta']:g}: {sum(exited)} of {len(qs)} generations exited early, "
                   f"{sum(full.n_tokens()) - sum(online.n_tokens())} output tokens saved in all."
                   + ("" if abs(out["delta"] - cal.delta) < 1e-12 else
                      f" The figures replay the probe at the slider's delta = {cal.delta:g}."))
        labels = []
        for i, r in enumerate(online.rows):
            cut = next((e.cue_token for e in r.events if e.exited), None)
            labels.append(f"Q{i + 1}: " + (f"exit at token {cut}" if cut is not None else f"no exit ({r.stop})"))
        for i, tab in enumerate(st.tabs(labels)):
            with tab:
                st.markdown(f"**{qs[i]}**")
                if full.rows[i].events:
                    show_figure(full.figure(i, probe=probe, calibration=cal), key=f"lynx_traj_{i}")
                else:
                    st.warning("This generation produced no cue: nothing was scored. Use cues this model emits.")
                row, on = full.rows[i], online.rows[i]
                right = gold.get(qs[i])
                c1, c2 = st.columns(2)
                for col, r, name in ((c1, row, "full generation"), (c2, on, "online exit")):
                    verdict = "" if right is None else \
                        (" — right" if check.check(r.final_text, right, forced=r.forced) else f" — wrong (gold {right})")
                    col.caption(f"{name} ({r.n_tokens(len(full.exit_ids))} tokens, stop: {r.stop}){verdict}")
                    col.code(r.reasoning_text + (f"\n→ {r.answer.answer_text}" if r.answer else ""), language=None,
                             wrap_lines=True)
        st.caption("The calibrated probe was added to the Config page.")

"""The LYNX workflow as four calls (what `steer probe ...` runs):

    lab = label(model, tok, problems, points, cues, config)      # forced-exit labels at cue events
    probe = train(lab_train)                                      # MLP probe (safetensors + JSON)
    cal = calibrate_probe(probe, lab_calibration, delta=0.1)      # conformal thresholds, stored on the probe
    res = generate(model, tok, prompts, probe)                    # online early exit
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steer.identity import COMPUTATION, check_same_model, scheme_of
from steer.probes.conformal import ConformalCalibration, calibrate, check_delta
from steer.probes.cues import CueSet
from steer.probes.data import LabelledCues, label_cue_events
from steer.probes.generate import ExitConfig, GenerationResult, LynxPolicy, generate_with_exit
from steer.probes.probe import LynxProbe, ProbeConfig, ProbeInfo, train_probe

label = label_cue_events


def train(lab: LabelledCues, config: ProbeConfig | None = None) -> LynxProbe:
    """Train a probe on labelled cue events; it remembers model shape, points, cues, exit string."""
    if len(lab) == 0:
        raise ValueError("no labelled cue events to train on: the generations produced no cue; use cues the "
                         "model actually produces (e.g. --cues newline,blank_line for small instruct models)")
    m = lab.meta
    info = ProbeInfo(model=m.get("model", ""), n_layers=int(m["n_layers"]), d_model=int(m["d_model"]),
                     points=list(m["points"]), cues=m.get("cues", {}), exit_string=m.get("exit_string", ""))
    probe = train_probe(lab.features, lab.labels, config, info, groups=lab.trajectory)
    probe.identity = lab.identity
    return probe


def check_cues_match(probe: LynxProbe, lab: LabelledCues) -> None:
    """Cue events labelled on another model or another layer set cannot calibrate this probe."""
    info, m = probe.info, lab.meta
    if probe.identity is not None and lab.identity is not None and scheme_of(probe.identity) == scheme_of(lab.identity):
        check_same_model(probe.identity, lab.identity, "the probe (vs the cue events' model)", COMPUTATION,
                         fix="calibrate with cue events labelled on the probe's own model")
    if info is None:
        return
    if info.model and m.get("model") and info.model != m["model"]:
        raise ValueError(f"cue events were labelled on model {m['model']!r} but the probe was trained on "
                         f"{info.model!r}: calibrate with cue events from the probe's own model")
    if (int(m.get("n_layers", -1)), int(m.get("d_model", -1))) != (info.n_layers, info.d_model):
        raise ValueError(f"cue events come from a model with {m.get('n_layers')} layers / d_model {m.get('d_model')}, "
                         f"but the probe was trained on {info.model!r} ({info.n_layers} layers / d_model "
                         f"{info.d_model}): label calibration data with the probe's model")
    if list(m.get("points", [])) != list(info.points):
        raise ValueError(f"cue events use feature points {m.get('points')} but the probe was trained on "
                         f"{info.points}: label with --points {','.join(info.points)}")


@torch.no_grad()
def calibrate_probe(probe: LynxProbe, lab: LabelledCues, delta: float, *, warn: bool = True) -> ConformalCalibration:
    """Class-conditional conformal thresholds on held-out cue events; stored as probe.calibration."""
    check_delta(delta)
    check_cues_match(probe, lab)
    cal = calibrate(probe(lab.features), lab.labels, delta, warn=warn)
    probe.calibration = cal
    return cal


def generate(model, tokenizer, prompts: Sequence[str], probe: LynxProbe, *, delta: float | None = None,
             calibration_cues: LabelledCues | None = None, cues: CueSet | None = None,
             config: ExitConfig | None = None, **kw) -> GenerationResult:
    """Online early exit with a calibrated probe (recalibrated at `delta` if cue events are given)."""
    if calibration_cues is not None:
        calibrate_probe(probe, calibration_cues, delta if delta is not None else 0.1)
    if probe.calibration is None:
        raise ValueError("the probe is not calibrated: run `steer probe calibrate` (calibrate_probe) first")
    if delta is not None and calibration_cues is None and abs(probe.calibration.delta - delta) > 1e-12:
        raise ValueError(f"the probe is calibrated at delta={probe.calibration.delta}, not {delta}: recalibrate "
                         f"with calibration cue events to change delta")
    if config is None:
        config = ExitConfig(exit_string=probe.info.exit_string) if probe.info and probe.info.exit_string else ExitConfig()
    return generate_with_exit(model, tokenizer, prompts, LynxPolicy(probe, probe.calibration),
                              cues=cues or probe.cue_set, config=config, **kw)

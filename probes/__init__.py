"""LYNX confidence probes and truly online early exit (see ALGORITHMS.md section 3).

    from probes import lynx
    lab = lynx.label(model, tok, problems, points, cues, config)   # forced-exit labels at cue events
    probe = lynx.train(lab)                                        # torch MLP, safetensors + JSON
    lynx.calibrate_probe(probe, lab_cal, delta=0.1)                # class-conditional split conformal
    res = lynx.generate(model, tok, prompts, probe)                # exits inside generation (KV rollback)
"""

from probes.answers import BoxedChecker, ChoiceChecker, NumericChecker, get_checker
from probes.conformal import ConformalCalibration, calibrate, min_calibration_size
from probes.cues import STRUCTURAL_CUES, CueSet, find_cues
from probes.data import LabelledCues, Problem, arithmetic_problems, chat_prompts
from probes.features import capture_features, default_points
from probes.generate import (
    DeerPolicy,
    ExitConfig,
    GenerationResult,
    LynxPolicy,
    NeverExit,
    UnsupportedCacheError,
    generate_with_exit,
    premature_exit_rates,
)
from probes.probe import LynxProbe, ProbeConfig, ProbeInfo, train_probe

__all__ = [
    "BoxedChecker", "ChoiceChecker", "ConformalCalibration", "CueSet", "DeerPolicy", "ExitConfig",
    "GenerationResult", "LabelledCues", "LynxPolicy", "LynxProbe", "NeverExit", "NumericChecker", "Problem",
    "ProbeConfig", "ProbeInfo", "STRUCTURAL_CUES", "UnsupportedCacheError", "arithmetic_problems", "calibrate", "capture_features",
    "chat_prompts", "default_points", "find_cues", "generate_with_exit", "get_checker", "min_calibration_size",
    "premature_exit_rates", "train_probe",
]

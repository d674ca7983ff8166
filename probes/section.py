"""The `lynx` section of an intervention config: a LYNX probe with its conformal thresholds.

    "lynx": {"n_features": 576, "hidden": [256, 64], "points": ["blocks.20.resid_post"],
             "info": {...}, "calibration": {"delta": 0.1, "q0": ..., "q1": ..., "n0": ..., "n1": ...},
             "tensors": ["lynx.mean", "lynx.std", "lynx.linears.0.weight", ...]}

The probe's weights are the section's tensors (`lynx.<state-dict key>` in config.safetensors). LYNX
is a monitor: it reads the forward pass (`section.probe()`), so the section applies no intervention.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from steer.probes.conformal import ConformalCalibration
from steer.probes.probe import LynxProbe, ProbeInfo
from steer.sections import Section, register_section

_POINT = re.compile(r"^(embed\.out|final_norm\.out|lm_head\.out|blocks\.\d+\.[a-z_.]+)$")


def _jsonable(x):
    """NaN/inf to strings (JSON has none), as steer.probes.conformal does for thresholds."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


@register_section
@dataclass
class LynxSection(Section):
    """A LYNX probe (weights as tensors `lynx.<key>`) with its conformal thresholds."""

    name = "lynx"
    schema = {"$ref": "#/$defs/lynx"}

    n_features: int
    hidden: list[int]
    points: list[str]
    info: dict | None = None
    calibration: dict | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # state-dict key -> tensor

    @classmethod
    def from_probe(cls, probe: LynxProbe) -> LynxSection:
        """From a trained steer.probes.probe.LynxProbe (its info names the feature points)."""
        if probe.info is None:
            raise ValueError("the probe has no info (feature points, model shape); train it with steer.probes.probe.train_probe")
        return cls(
            n_features=int(probe.n_features), hidden=[lin.out_features for lin in probe.linears[:-1]],
            points=list(probe.info.points), info=asdict(probe.info),
            calibration=probe.calibration.to_json() if probe.calibration is not None else None,
            weights={k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()},
        )

    def probe(self) -> LynxProbe:
        """The steer.probes.probe.LynxProbe this section holds (calibration attached)."""
        info = ProbeInfo(**self.info) if self.info else None
        probe = LynxProbe(self.n_features, self.hidden, info)
        probe.load_state_dict(self.weights)
        if self.calibration:
            probe.calibration = ConformalCalibration.from_json(self.calibration)
        return probe.eval()

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.weights)

    def to_json(self) -> dict:
        return {"n_features": self.n_features, "hidden": list(self.hidden), "points": list(self.points),
                "info": _jsonable(self.info), "calibration": _jsonable(self.calibration),
                "tensors": [f"{self.name}.{k}" for k in sorted(self.weights)]}

    @classmethod
    def from_json(cls, d: dict, tensors: Mapping[str, torch.Tensor] | None = None) -> LynxSection:
        tensors = tensors or {}
        keys = [name.removeprefix(f"{cls.name}.") for name in d["tensors"]]
        own = {k: tensors[k] for k in keys if k in tensors}
        return cls(int(d["n_features"]), list(d["hidden"]), list(d["points"]), d.get("info"), d.get("calibration"), own)

    @classmethod
    def json_problems(cls, d: dict, manifest: Mapping[str, dict] | None = None) -> list[str]:
        """Each tensor the section names is one of its own and in the manifest; points are canonical names."""
        problems = []
        for i, name in enumerate(d["tensors"]):
            if not name.startswith(f"{cls.name}."):
                problems.append(f"lynx.tensors[{i}]: {name!r} must start with 'lynx.'")
            elif name not in (manifest or {}):
                problems.append(f"lynx.tensors[{i}]: {name!r} is not listed under tensors")
        return problems + [f"lynx.points[{i}]: {p!r} is not a canonical point name (e.g. blocks.20.resid_post)"
                           for i, p in enumerate(d["points"]) if not _POINT.match(p)]

    def problems(self, shape: Any) -> list[str]:
        """The probe's points must resolve on the model (a ModelMap) and its width match."""
        problems = []
        if hasattr(shape, "resolve"):  # a loaded model: resolve each point (a checkpoint has no modules)
            for i, point in enumerate(self.points):
                try:
                    shape.resolve(point)
                except Exception as exc:  # UnknownPointError / IndexError: report its text
                    problems.append(f"lynx.points[{i}]: {exc}")
        d_model = (self.info or {}).get("d_model")
        if d_model not in (None, shape.d_model):
            problems.append(f"lynx.info.d_model: probe trained on d_model {d_model}, model has {shape.d_model}")
        return problems

    def summary(self) -> dict:
        out = {"points": list(self.points), "n_features": self.n_features, "hidden": list(self.hidden),
               "calibrated": self.calibration is not None}
        if self.calibration:
            out["delta"] = self.calibration.get("delta")
        return out

    def describe(self) -> list[str]:
        delta = (self.calibration or {}).get("delta")
        return [f"lynx: probe on {', '.join(self.points)}, hidden {list(self.hidden)}"
                + (f", calibrated at delta {delta}" if delta is not None else ", not calibrated")]

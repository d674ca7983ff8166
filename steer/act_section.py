"""The `act` section of an intervention config: ACT heads and parameters (steer.act.ACTConfig).

    "act": {"heads": [{"layer": 2, "head": 5}, ...], "params": {"beta": 0.4, "tau": 20.0}}

`params` are ACTConfig's parameter fields, passed by name; every value is checked by steer.act itself
(the checks ACT runs when the intervention is built), so a rule added to ACT holds for configs too.
steer.act is imported only when a check or the intervention is needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from steer.sections import Section, register_section

# ACTConfig fields that are not parameters: `heads` is the section's own list, the rest is provenance.
_NOT_PARAMS = ("heads", "model", "search", "identity")


def act_params() -> tuple[str, ...]:
    """The steer.act.ACTConfig parameters a config carries (beta, tau, alpha, min_queries, keep_first)."""
    from steer.act import ACTConfig

    return tuple(f.name for f in fields(ACTConfig) if f.name not in _NOT_PARAMS)


@register_section
@dataclass
class ACTSection(Section):
    """ACT heads and parameters (passed by name to steer.act.ACTConfig)."""

    name = "act"
    schema = {"$ref": "#/$defs/act"}
    intervenes = True

    heads: list[tuple[int, int]]
    params: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"heads": [{"layer": int(la), "head": int(h)} for la, h in self.heads], "params": dict(self.params)}

    @classmethod
    def from_json(cls, d: dict, tensors: Mapping[str, torch.Tensor] | None = None) -> ACTSection:
        return cls([(int(x["layer"]), int(x["head"])) for x in d["heads"]], dict(d.get("params", {})))

    @classmethod
    def from_act_config(cls, act) -> ACTSection:
        """From a steer.act.ACTConfig (what `steer calibrate` writes); its search log is not kept."""
        return cls(list(act.heads), {k: getattr(act, k) for k in act_params()})

    def act_config(self):
        """The steer.act.ACTConfig of this section."""
        from steer.act import ACTConfig

        return ACTConfig(heads=list(self.heads), **self.params)

    def interventions(self) -> list:
        return [self.act_config().intervention()]

    @classmethod
    def json_problems(cls, d: dict, manifest: Mapping[str, dict] | None = None) -> list[str]:
        """Duplicate heads, unknown parameters, and steer.act's own checks of the known ones (beta by
        `_check_beta` for its field path, the rest by building the ACT intervention)."""
        from steer.act import ACTConfig, _check_beta

        problems = []
        seen: dict[tuple[int, int], int] = {}
        for i, x in enumerate(d["heads"]):
            key = (x["layer"], x["head"])
            if key in seen:
                problems.append(f"act.heads[{i}]: duplicate of act.heads[{seen[key]}]")
            seen.setdefault(key, i)
        params, known = d.get("params", {}), act_params()
        problems += [f"act.params.{key}: unknown ACT parameter (known: {', '.join(known)})"
                     for key in params if key not in known]
        try:
            if "beta" in params:
                _check_beta(params["beta"])
        except ValueError as exc:
            return problems + [f"act.params.beta: {exc}"]
        try:  # every parameter as ACT itself checks it (tau/alpha, min_queries, ...)
            ACTConfig(heads=list(seen), **{k: v for k, v in params.items() if k in known}).intervention()
        except (TypeError, ValueError) as exc:
            problems.append(f"act.params: {exc}")
        return problems

    def problems(self, shape: Any) -> list[str]:
        """steer.act's head-range check for each head (a ModelMap or CheckpointShape)."""
        from steer.act import check_heads

        problems = []
        for i, head in enumerate(self.heads):
            try:
                check_heads(shape, [head])
            except ValueError as exc:
                problems.append(f"act.heads[{i}]: {exc}")
        return problems

    def summary(self) -> dict:
        return {"heads": [f"{la}:{h}" for la, h in self.heads], "params": dict(self.params)}

    def describe(self) -> list[str]:
        return [f"act: heads {', '.join(self.summary()['heads'])}; params {self.params}"]

"""The `mote` section of an intervention config: expert switches (steer.mote.ExpertSwitch).

    "mote": {"experts": [{"layer": 3, "expert": 7}, ...], "mode": "off_mask",   # off_mask|off_zero|on
             "renormalize": false, "force_weight": "gate", "source": "profile french vs english"}

Every check is steer.mote's own (`spec_problems` for the settings, `fit_problems` against a model or
a checkpoint, `router_edits` for what a server applies), so a rule added to the switch holds for
configs, exports and serving plugins too. steer.mote is imported only when a check or the switch is
needed: reading and writing a config stays light.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from steer.sections import Section, register_section

MoTEMode = Literal["off_mask", "off_zero", "on"]


@register_section
@dataclass
class MoTESection(Section):
    """Expert switches: which (layer, expert) pairs, and how (steer.kernels.router.RouterEdit semantics)."""

    name = "mote"
    schema = {"$ref": "#/$defs/mote"}
    intervenes = True

    experts: list[tuple[int, int]]
    mode: MoTEMode = "off_mask"
    renormalize: bool = False  # off_zero: rescale the kept weights to the original sum
    force_weight: Literal["gate", "max"] = "gate"  # on: weight of a forced expert
    source: str | None = None

    def to_json(self) -> dict:
        d = {"experts": [{"layer": int(la), "expert": int(e)} for la, e in self.experts], "mode": self.mode,
             "renormalize": bool(self.renormalize), "force_weight": self.force_weight}
        if self.source:
            d["source"] = self.source
        return d

    @classmethod
    def from_json(cls, d: dict, tensors: Mapping[str, torch.Tensor] | None = None) -> MoTESection:
        return cls([(int(x["layer"]), int(x["expert"])) for x in d["experts"]], d["mode"],
                   bool(d.get("renormalize", False)), d.get("force_weight", "gate"), d.get("source"))

    @classmethod
    def from_switch(cls, switch, source: str | None = None) -> MoTESection:
        """From a steer.mote.ExpertSwitch (e.g. `ExpertSwitch.from_profile(profile, k=10)`)."""
        return cls(list(switch.experts), switch.mode, switch.renormalize, switch.force_weight, source)

    def by_layer(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for layer, expert in self.experts:
            out.setdefault(int(layer), []).append(int(expert))
        return {la: sorted(set(es)) for la, es in sorted(out.items())}

    def switch(self):
        """The steer.mote.ExpertSwitch this section describes."""
        from steer.mote import ExpertSwitch

        return ExpertSwitch(experts=list(self.experts), mode=self.mode, renormalize=self.renormalize,
                            force_weight=self.force_weight)

    def interventions(self) -> list:
        return [self.switch()]

    def router_edits(self, num_experts: int) -> dict:
        """{layer: steer.kernels.router.RouterEdit}: the same edit steer's HF path and the vLLM plugin apply."""
        from steer.mote import router_edits

        return router_edits(self.experts, self.mode, self.renormalize, self.force_weight, num_experts)

    @classmethod
    def json_problems(cls, d: dict, manifest: Mapping[str, dict] | None = None) -> list[str]:
        """steer.mote's checks of the switch settings (duplicates, contradictions), as field paths."""
        from steer.mote import spec_problems

        experts = [(x["layer"], x["expert"]) for x in d["experts"]]
        return [str(p) for p in spec_problems(experts, d["mode"], d.get("renormalize", False),
                                              d.get("force_weight", "gate"), prefix="mote.")]

    def problems(self, shape: Any) -> list[str]:
        """steer.mote's check of this switch against a model (a ModelMap or CheckpointShape)."""
        from steer.mote import fit_problems

        return [str(p) for p in fit_problems(self.experts, self.mode, self.renormalize, self.force_weight, shape,
                                             prefix="mote.")]

    def summary(self) -> dict:
        out = {"mode": self.mode, "experts": len(self.experts), "by_layer": self.by_layer()}
        if self.mode == "off_zero":
            out["renormalize"] = self.renormalize
        if self.mode == "on":
            out["force_weight"] = self.force_weight
        if self.source:
            out["source"] = self.source
        return out

    def describe(self) -> list[str]:
        info = self.summary()
        extra = "".join(f", {k} {info[k]}" for k in ("renormalize", "force_weight", "source") if k in info)
        return [f"mote: {self.mode}, {len(self.experts)} experts{extra}"] + [
            f"  layer {layer}: {', '.join(map(str, experts))}" for layer, experts in self.by_layer().items()]

"""The `difr` section of an intervention config: the fingerprint settings a server must use.

    "difr": {"k": 8, "seed": 0, "projection": "gaussian"}

DiFR is a recorder: it reads the forward pass (`section.difr_config()` for steer.difr), so the
section applies no intervention, and a fingerprint fits any model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from steer.difr.fingerprint import DiFRConfig
from steer.sections import Section, register_section


@register_section
@dataclass
class DiFRSection(Section):
    """Fingerprint settings a server must use (steer.difr.DiFRConfig)."""

    name = "difr"
    schema = {"$ref": "#/$defs/difr"}

    k: int = 8
    seed: int = 0
    projection: str = "gaussian"

    def difr_config(self) -> DiFRConfig:
        return DiFRConfig(k=self.k, seed=self.seed, projection=self.projection)

    def to_json(self) -> dict:
        return {"k": int(self.k), "seed": int(self.seed), "projection": self.projection}

    def describe(self) -> list[str]:
        return [f"difr: k {self.k}, seed {self.seed}, {self.projection} projection"]

    @classmethod
    def from_json(cls, d: dict, tensors: Mapping[str, torch.Tensor] | None = None) -> DiFRSection:
        return cls(int(d["k"]), int(d["seed"]), d.get("projection", "gaussian"))

    @classmethod
    def json_problems(cls, d: dict, manifest: Mapping[str, dict] | None = None) -> list[str]:
        """DiFRConfig's own checks, so a rule added there holds for configs too."""
        try:
            DiFRConfig(k=d["k"], seed=d["seed"], projection=d.get("projection", "gaussian"))
        except (TypeError, ValueError) as exc:
            return [f"difr: {exc}"]
        return []

"""The sections of an intervention config, and the registry steer.config composes them from.

A section is one method's part of a config (steer.config.InterventionConfig): MoTE expert switches
(steer.mote_section), ACT heads (steer.act_section), a LYNX probe (steer.probes.section), DiFR
fingerprint settings (steer.difr.section). Each is a `Section` subclass that says, for its method,
how it reads and writes its JSON object, its JSON Schema, which of its settings are wrong on their
own, whether it fits a model, and which interventions it applies. `register_section` adds it to the
registry; InterventionConfig reads, writes, checks and applies every registered section the same
way, so a new method adds its section in its own module, with no edit to steer.config:

    @register_section
    @dataclass
    class VectorSection(Section):
        name = "vectors"                       # the key in config.json, and `config.vectors`
        schema = {"type": "object", "required": ["layer"], "properties": {"layer": {"type": "integer"}}}
        layer: int

        def to_json(self) -> dict: ...
        @classmethod
        def from_json(cls, d, tensors=None): ...

This module sits below steer.config and every method: it imports neither.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

# Keys of config.json that are not sections (and InterventionConfig's own field names).
RESERVED = ("format", "version", "description", "model", "tensors", "sections")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Section(ABC):
    """One method's section of an intervention config.

    Tensors: `tensors()` returns the section's own tensors by key; the config stores them as
    `<name>.<key>` in config.safetensors and hands them back, keys without the prefix, to `from_json`.
    """

    name: ClassVar[str]  # the section's key in config.json
    schema: ClassVar[dict]  # its JSON Schema node; "#/$defs/..." refers to steer/schema/intervention-config.v1.json
    intervenes: ClassVar[bool] = False  # changes the forward pass: `interventions()` returns what to apply

    @abstractmethod
    def to_json(self) -> dict:
        """The section's JSON object (what config.json holds under `name`)."""

    @classmethod
    @abstractmethod
    def from_json(cls, d: dict, tensors: Mapping[str, torch.Tensor] | None = None) -> Section:
        """The section from its JSON object (already checked against `schema` and `json_problems`)."""

    @classmethod
    def json_problems(cls, d: dict, manifest: Mapping[str, dict] | None = None) -> list[str]:
        """What the schema cannot say (duplicates, contradictions, parameter ranges), each problem starting
        with its field path; `manifest` is config.json's tensor manifest (full names)."""
        return []

    def problems(self, shape: Any) -> list[str]:
        """Why the section does not fit a model: `shape` is a steer.adapters.ModelMap, or a
        steer.config.CheckpointShape for a checkpoint a server loads (no modules to resolve)."""
        return []

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def interventions(self) -> list:
        """The steer Interventions this section applies (sections with `intervenes`); [] for a section
        that only reads the forward pass (a monitor, a recorder)."""
        return []

    def summary(self) -> dict:
        """The section in brief, for `steer config show --json` (default: its JSON without tensor names)."""
        return {k: v for k, v in self.to_json().items() if k != "tensors"}

    def describe(self) -> list[str]:
        """The section in lines of text, for `steer config show` (default: the summary, one line)."""
        return [f"{self.name}: {json.dumps(self.summary())}"]


_REGISTRY: dict[str, type[Section]] = {}


def register_section(cls: type[Section]) -> type[Section]:
    """Add a section type to the registry (a class decorator); returns the class.

    Registering the same class again (a module reloaded) replaces it; another class under a taken name
    is an error, as is a name config.json uses for something else."""
    name = getattr(cls, "name", None)
    if not (isinstance(cls, type) and issubclass(cls, Section)):
        raise TypeError(f"register_section takes a steer.sections.Section subclass, got {cls!r}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{cls.__qualname__}.name must be a lower-case identifier (the key in config.json), got {name!r}")
    if name in RESERVED:
        raise ValueError(f"{cls.__qualname__}.name {name!r} is a config.json field ({', '.join(RESERVED)}); pick another")
    if not isinstance(getattr(cls, "schema", None), dict):
        raise TypeError(f"{cls.__qualname__}.schema must be a JSON Schema object (a dict) for the {name!r} section")
    old = _REGISTRY.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"section {name!r} is already registered by {old.__module__}.{old.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def section_types() -> dict[str, type[Section]]:
    """{name: section class} of every registered section, in registration order."""
    return dict(_REGISTRY)

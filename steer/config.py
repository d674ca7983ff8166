"""One intervention config: everything needed to steer one model, in one versioned file.

A config is a directory (or a `config.json` path) holding

    config.json           the schema below (JSON Schema: steer/schema/intervention-config.v1.json)
    config.safetensors    its tensors (LYNX probe weights ...), listed in config.json["tensors"]

    {
      "format": "steer.intervention-config", "version": 1,
      "model": {"family": "qwen2_moe", "model_type": "qwen2_moe", "n_layers": 30, "d_model": 576,
                "moe_layers": [0, ..., 29], "num_experts": 16, "top_k": 12, "config_hash": "...",
                "params_hash": "...", "weights_hash": "..."},          # steer.identity.model_identity
      "mote": {"experts": [{"layer": 3, "expert": 7}, ...], "mode": "off_mask",   # off_mask|off_zero|on
               "renormalize": false, "force_weight": "gate"},
      "act":  {"heads": [{"layer": 2, "head": 5}, ...], "params": {"beta": 0.4, ...}},
      "lynx": {"n_features": 576, "hidden": [256, 64], "points": ["blocks.20.resid_post"],
               "calibration": {"delta": 0.1, "q0": ..., "q1": ..., "n0": ..., "n1": ...},
               "tensors": ["lynx.mean", "lynx.std", "lynx.linears.0.weight", ...]},
      "difr": {"k": 8, "seed": 0, "projection": "gaussian"},
      "tensors": {"lynx.mean": {"shape": [576], "dtype": "float32"}, ...}
    }

Why one file: the same config is applied in steer's HF path (`config.interventions(model)`), served
by vLLM (steer.serving.vllm_plugin), exported to EasySteer / SGLang (steer.export), and named in
DiFR fingerprints, so "which steering did the server run" has one answer. The model identity makes
applying it to another model an error instead of a silent no-op.

Errors (`ConfigError`) list every problem, each starting with the field path, e.g.
`mote.experts[3].expert: 19 out of range 0..15`.

Each method owns its section (steer.sections.Section: JSON in and out, schema, checks, what it
applies): steer.mote_section (MoTESection), steer.act_section (ACTSection), steer.probes.section
(LynxSection), steer.difr.section (DiFRSection). Their checks are their methods' own (steer.mote's
`spec_problems`/`fit_problems`, steer.act's `ACTConfig`/`check_heads`, ...), so a rule added to a
method holds for configs too. `InterventionConfig` composes every registered section the same way:
a new method registers its section (steer.sections.register_section) and needs no edit here.
`checkpoint_problems` is the one check of a config against a checkpoint a server loads (steer export
and every serving plugin).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

# The built-in sections register themselves (steer.sections.register_section) when imported; a section
# defined anywhere else registers the same way and needs no line here.
from steer.act_section import ACTSection
from steer.difr.section import DiFRSection
from steer.identity import SCHEME
from steer.io import INTERVENTION_CONFIG, FormatError, load_tensors, save_tensors
from steer.mote_section import MoTESection
from steer.probes.section import LynxSection
from steer.sections import Section, section_types

FORMAT = INTERVENTION_CONFIG.name
VERSION = INTERVENTION_CONFIG.version
SUPPORTED_VERSIONS = (1,)
CONFIG_FILE = "config.json"
TENSORS_FILE = "config.safetensors"
SCHEMA_FILE = Path(__file__).parent / "schema" / "intervention-config.v1.json"

_DTYPES = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
}


class ConfigError(ValueError):
    """An intervention config is malformed or does not fit the model; `.problems` lists each one."""

    def __init__(self, problems: list[str], where: str = "intervention config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{where} is invalid ({len(self.problems)} problem{'s' * (len(self.problems) > 1)}):\n{lines}")


# ---------------------------------------------------------------------------------------------
# JSON Schema (the subset the schema file uses), with field paths in the messages


@cache
def _schema_file() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def schema() -> dict:
    """The JSON Schema of version 1: steer/schema/intervention-config.v1.json, whose top-level properties
    name each registered section's schema (a section registered elsewhere brings its own node)."""
    root = _schema_file()
    props = {**root["properties"], **{name: cls.schema for name, cls in section_types().items()}}
    return root if props == root["properties"] else {**root, "properties": props}


_JSON_TYPES = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
    "integer": int, "number": (int, float),
}


def _is_type(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _JSON_TYPES[name])


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def schema_problems(doc: Any, node: dict | None = None, path: str = "") -> list[str]:
    """Problems of `doc` against the schema, one line each, starting with the field path."""
    root = schema()
    node = root if node is None else node
    if "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref {ref!r} in the schema")
        node = root["$defs"][ref.removeprefix("#/$defs/")]
    where = path or "(top level)"
    if "const" in node and doc != node["const"]:
        return [f"{where}: must be {node['const']!r}, got {doc!r}"]
    if "enum" in node and doc not in node["enum"]:
        return [f"{where}: {doc!r} is not one of {', '.join(map(repr, node['enum']))}"]
    if "type" in node:
        types = node["type"] if isinstance(node["type"], list) else [node["type"]]
        if not any(_is_type(doc, t) for t in types):
            return [f"{where}: expected {' or '.join(types)}, got {type(doc).__name__} {doc!r}"[:200]]
    problems: list[str] = []
    if isinstance(doc, (int, float)) and not isinstance(doc, bool):
        if "minimum" in node and doc < node["minimum"]:
            problems.append(f"{where}: {doc} is below the minimum {node['minimum']}")
        if "maximum" in node and doc > node["maximum"]:
            problems.append(f"{where}: {doc} is above the maximum {node['maximum']}")
        if "exclusiveMinimum" in node and doc <= node["exclusiveMinimum"]:
            problems.append(f"{where}: {doc} must be > {node['exclusiveMinimum']}")
        if "exclusiveMaximum" in node and doc >= node["exclusiveMaximum"]:
            problems.append(f"{where}: {doc} must be < {node['exclusiveMaximum']}")
    if isinstance(doc, dict):
        for key in node.get("required", []):
            if key not in doc:
                problems.append(f"{_join(path, key)}: required field is missing")
        props = node.get("properties", {})
        extra = node.get("additionalProperties", True)
        for key, value in doc.items():
            if key in props:
                problems += schema_problems(value, props[key], _join(path, key))
            elif extra is False:
                known = ", ".join(sorted(props))
                problems.append(f"{_join(path, key)}: unknown field (known fields: {known})")
            elif isinstance(extra, dict):
                problems += schema_problems(value, extra, _join(path, key))
    if isinstance(doc, list):
        if "minItems" in node and len(doc) < node["minItems"]:
            problems.append(f"{where}: needs at least {node['minItems']} item(s), got {len(doc)}")
        if "items" in node:
            for i, item in enumerate(doc):
                problems += schema_problems(item, node["items"], _join(path, i))
    return problems


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass
class ModelIdentity:
    """Which model a config was made for (the fields of steer.identity.model_identity)."""

    family: str
    model_type: str
    n_layers: int
    d_model: int
    num_experts: int
    config_hash: str
    params_hash: str
    moe_layers: list[int] = field(default_factory=list)
    top_k: int = 0
    architecture: str | None = None
    n_heads: int | None = None
    vocab_size: int | None = None
    weights_hash: str | None = None
    scheme: str = SCHEME  # steer.identity.SCHEME (configs saved before schemes existed read as it)

    @classmethod
    def from_model(cls, model: Any, weights_hash: str | None = None) -> ModelIdentity:
        """Identity of an HF model (or a steer.models.LoadedModel, whose weights_hash is used).

        When the model was loaded from a checkpoint directory the sha256 of its weight files is
        recorded too: that is what a server (which has no HF parameters) checks.
        """
        from steer.hooks import unwrap_model
        from steer.identity import model_identity

        ident = model_identity(model, weights_hash=weights_hash)
        hf = unwrap_model(model.model if hasattr(model, "tokenizer") and hasattr(model, "model") else model)
        cfg = hf.config
        if "weights_hash" not in ident:
            ident_hash = _checkpoint_hash(getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None))
            if ident_hash:
                ident["weights_hash"] = ident_hash
        return cls(
            **ident, architecture=(cfg.architectures or [type(hf).__name__])[0],
            n_heads=int(cfg.num_attention_heads), vocab_size=int(cfg.vocab_size),
        )

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: dict) -> ModelIdentity:
        return cls(**d)

    def identity_dict(self) -> dict:
        """The steer.identity dict (for check_same_model)."""
        keep = ("scheme", "family", "model_type", "n_layers", "d_model", "moe_layers", "num_experts", "top_k",
                "config_hash", "params_hash", "weights_hash")
        return {k: getattr(self, k) for k in keep if getattr(self, k) is not None}


def _checkpoint_hash(path: str | None) -> str | None:
    if not path or not Path(path).is_dir():
        return None
    from steer.models import ModelLoadError, weights_hash

    try:
        return weights_hash(path)
    except ModelLoadError:
        return None


# ---------------------------------------------------------------------------------------------
# The config: the registered sections (steer.sections), composed


def section_names() -> tuple[str, ...]:
    """The registered sections, in the order config.json writes them: the schema file's order (mote, act,
    lynx, difr), then sections registered elsewhere, in registration order."""
    order = list(_schema_file()["properties"])
    return tuple(sorted(section_types(), key=lambda name: order.index(name) if name in order else len(order)))


def _ordered(sections: dict) -> dict:
    """`sections` without None values, each checked against its registered type, in section_names() order."""
    types = section_types()
    unknown = sorted(set(sections) - set(types))
    if unknown:
        raise TypeError(f"unknown config section(s) {', '.join(unknown)}; registered sections: "
                        f"{', '.join(section_names())} (a new one registers with steer.sections.register_section)")
    for name, section in sections.items():
        if section is not None and not isinstance(section, types[name]):
            raise TypeError(f"{name}: expected a {types[name].__name__}, got {type(section).__name__}")
    return {name: sections[name] for name in section_names() if sections.get(name) is not None}


@dataclass(init=False)
class InterventionConfig:
    """A versioned intervention config for one model; see the module docstring for the format.

    Sections are keyword arguments and attributes by name (`InterventionConfig(ident, mote=MoTESection(...))`,
    `config.mote`, None when absent), for every registered section (steer.sections)."""

    model: ModelIdentity
    sections: dict[str, Section]  # name -> section, in section_names() order
    description: str = ""
    version: int = VERSION

    if TYPE_CHECKING:  # the built-in sections, as attributes; any registered name works the same way
        mote: MoTESection | None
        act: ACTSection | None
        lynx: LynxSection | None
        difr: DiFRSection | None

    def __init__(self, model: ModelIdentity, *, sections: dict[str, Section] | None = None, description: str = "",
                 version: int = VERSION, **named: Section | None):
        self.model, self.description, self.version = model, description, version
        self.sections = _ordered({**(sections or {}), **named})

    def __getattr__(self, name: str):
        if name in section_types():  # only reached for names that are not plain attributes
            return self.__dict__.get("sections", {}).get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in section_types():  # config.mote = ... replaces (or, with None, removes) that section
            self.sections = _ordered({**self.sections, name: value})
        else:
            super().__setattr__(name, value)

    def replace(self, **changes) -> InterventionConfig:
        """A copy with fields or sections changed (a section set to None is dropped)."""
        fields = {"model": self.model, "description": self.description, "version": self.version}
        return InterventionConfig(**{**fields, "sections": self.sections, **changes})

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def for_model(cls, model: Any, **sections) -> InterventionConfig:
        """A config bound to `model`'s identity; sections as keyword arguments."""
        return cls(ModelIdentity.from_model(model), **sections)

    # -- JSON -----------------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every section's tensors, named `<section>.<key>` (as in config.safetensors)."""
        return {f"{name}.{key}": t for name, section in self.sections.items() for key, t in section.tensors().items()}

    def to_json(self) -> dict:
        doc: dict[str, Any] = {"format": FORMAT, "version": self.version}
        if self.description:
            doc["description"] = self.description
        doc["model"] = self.model.to_json()
        for name, section in self.sections.items():
            doc[name] = section.to_json()
        tensors = self.tensors()
        if tensors:
            doc["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                              for k, v in sorted(tensors.items())}
        return doc

    @classmethod
    def from_json(cls, doc: Any, tensors: dict[str, torch.Tensor] | None = None,
                  where: str = "intervention config") -> InterventionConfig:
        """Parse and check a config document (schema, version, tensor manifest, each section's own checks)."""
        tensors = tensors or {}
        if not isinstance(doc, dict):
            raise ConfigError([f"(top level): expected a JSON object, got {type(doc).__name__}"], where)
        version = doc.get("version")
        if "version" in doc and version not in SUPPORTED_VERSIONS:
            raise ConfigError([
                f"version: unknown version {version!r}; this steer reads versions "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))} (upgrade steer, or re-export the config with this one)"
            ], where)
        problems = schema_problems(doc)
        if not problems:
            problems = _tensor_problems(doc, tensors) + _section_problems(doc)
        if problems:
            raise ConfigError(problems, where)
        types = section_types()
        sections = {name: types[name].from_json(doc[name], _own_tensors(tensors, name))
                    for name in section_names() if name in doc}
        return cls(ModelIdentity.from_json(doc["model"]), sections=sections, description=doc.get("description", ""),
                   version=int(version))

    def check(self) -> None:
        """Raise ConfigError if this config would not survive a save/load (schema and tensors)."""
        InterventionConfig.from_json(json.loads(json.dumps(self.to_json())), self.tensors())

    # -- files ----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write `path/config.json` (+ `path/config.safetensors` when there are tensors); returns the dir.

        `path` may also name the .json file itself; the tensors go beside it with the same stem.
        """
        self.check()
        json_path, st_path = _paths(Path(path))
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tensors = self.tensors()
        if tensors:
            save_tensors(st_path, INTERVENTION_CONFIG, tensors)  # tagged, versioned, checksummed (steer.io)
        elif st_path.exists():
            st_path.unlink()
        json_path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return json_path.parent

    @classmethod
    def load(cls, path: str | Path) -> InterventionConfig:
        """Read a config directory or its .json file; every problem is reported with its field path."""
        json_path, st_path = _paths(Path(path))
        if not json_path.is_file():
            raise FileNotFoundError(f"no intervention config at {json_path} (write one with InterventionConfig.save "
                                    f"or `steer export --target steer`)")
        try:
            doc = json.loads(json_path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError([f"(file): not valid JSON: {exc}"], str(json_path)) from None
        tensors: dict[str, torch.Tensor] = {}
        if st_path.is_file():
            try:  # older files: a bare format tag or none (version 1), no checksum
                tensors = load_tensors(st_path, INTERVENTION_CONFIG, untagged=1).tensors
            except FormatError as exc:
                raise ConfigError([f"tensors: {st_path.name}: {exc}"], str(json_path)) from None
        return cls.from_json(doc, tensors, where=str(json_path))

    # -- against a model ------------------------------------------------------------------------

    def problems(self, model: Any) -> list[str]:
        """Why this config does not fit `model` (identity and every id's range); [] if it does."""
        from steer.adapters import model_map
        from steer.hooks import unwrap_model
        from steer.identity import model_identity

        hf = unwrap_model(model.model if hasattr(model, "tokenizer") and hasattr(model, "model") else model)
        current = model_identity(hf, weights_hash=getattr(model, "weights_hash", None))
        if "weights_hash" not in current and self.model.weights_hash:
            cfg = hf.config
            found = _checkpoint_hash(getattr(cfg, "_name_or_path", None))
            if found:
                current["weights_hash"] = found
        problems = identity_problems(self.model.identity_dict(), current)
        if problems:
            return problems
        return self.fit_problems(model_map(hf))

    def fit_problems(self, shape) -> list[str]:
        """Each section's own check against a model's shape (a ModelMap, or a CheckpointShape for a
        checkpoint a server loads); the identity is checked by the callers."""
        return [p for section in self.sections.values() for p in section.problems(shape)]

    def validate(self, model: Any) -> InterventionConfig:
        """Raise ConfigError (listing each bad field) unless this config fits `model`; returns self."""
        problems = self.problems(model)
        if problems:
            raise ConfigError(problems, "intervention config does not fit this model")
        return self

    def interventions(self, model: Any) -> list:
        """steer Interventions of the sections that change the forward pass (MoTE, ACT), validated.

        A monitor (LYNX: `self.lynx.probe()`) or a recorder (DiFR: `self.difr.difr_config()`) reads the
        forward pass, so its section applies none.
        """
        self.validate(model)
        return [iv for section in self.sections.values() for iv in section.interventions()]

    def apply(self, model: Any):
        """Context manager: `with config.apply(model) as ivs: model.generate(...)`."""
        from steer.interventions import apply

        ivs = self.interventions(model)
        if not ivs:
            names = " or ".join(name for name in section_names() if section_types()[name].intervenes)
            raise ConfigError([f"(top level): the config has no section that changes the forward pass ({names}): "
                               f"nothing to apply"])
        return apply(model, *ivs)


def identity_problems(saved: dict, current: dict) -> list[str]:
    """`model.<field>` problems between a config's identity and a model's (steer.identity.differences)."""
    from steer.identity import IdentitySchemeError, differences

    try:
        diffs = differences(saved, current)
    except IdentitySchemeError as exc:
        return [f"model.scheme: {exc}"]
    hint = lambda key: " (different weights: re-create the config on this model)" if key.endswith("hash") else ""  # noqa: E731
    return [f"model.{key}: config was made for {a!r}, this model has {b!r}{hint(key)}" for key, a, b in diffs]


def _paths(path: Path) -> tuple[Path, Path]:
    if path.suffix == ".json":
        return path, path.with_suffix(".safetensors")
    return path / CONFIG_FILE, path / TENSORS_FILE


def _tensor_problems(doc: dict, tensors: dict[str, torch.Tensor]) -> list[str]:
    manifest = doc.get("tensors", {})
    problems = []
    for name, spec in manifest.items():
        if name not in tensors:
            problems.append(f"tensors.{name}: listed in config.json but missing from {TENSORS_FILE}")
            continue
        t = tensors[name]
        if list(t.shape) != list(spec["shape"]):
            problems.append(f"tensors.{name}: shape {list(t.shape)} in {TENSORS_FILE}, config.json says {spec['shape']}")
        if t.dtype != _DTYPES[spec["dtype"]]:
            problems.append(f"tensors.{name}: dtype {str(t.dtype).removeprefix('torch.')} in {TENSORS_FILE}, "
                            f"config.json says {spec['dtype']}")
    return problems


def _own_tensors(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors of section `name`, keys without the `<name>.` prefix."""
    return {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}


def _section_problems(doc: dict) -> list[str]:
    """Checks JSON Schema cannot express (duplicates, contradictions, parameter ranges, point syntax):
    each section asks its method."""
    types, manifest = section_types(), doc.get("tensors", {})
    return [p for name in section_names() if name in doc for p in types[name].json_problems(doc[name], manifest)]


# ---------------------------------------------------------------------------------------------
# A checkpoint a server loads: the one check export and every serving plugin make


@dataclass
class CheckpointShape:
    """A checkpoint's shape read from its config alone (no weights loaded): what steer.mote and
    steer.act check a section against when no model is loaded. Same fields as a ModelMap."""

    config: Any  # the (text) config of the checkpoint
    moe_layers: list[int]

    @property
    def adapter(self):
        from steer.adapters import adapter_for_model_type

        return adapter_for_model_type(self.config.model_type)

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_experts(self) -> int:
        return self.adapter.expert_count(self.config)

    @property
    def top_k(self) -> int:
        return int(getattr(self.config, "num_experts_per_tok", 0) or 0)

    def routing_rule(self):
        from steer.adapters import routing_rule

        return routing_rule(self.config)


def checkpoint_problems(config: InterventionConfig, model_path: str | Path, hf_config: Any = None,
                        moe_layers: list[int] | None = None) -> list[str]:
    """Why `config` must not be served on the checkpoint at `model_path` ([] if it may).

    Reads the checkpoint's config and hashes its weight files (no weights are loaded). `hf_config`:
    the checkpoint's config when the caller has it (a server); `moe_layers`: the layers a server found
    routers in (default: the config's own list). `steer export` and every serving plugin call this.
    """
    from steer.adapters import UnsupportedModelError, adapter_for_model_type
    from steer.models import weights_hash

    path = Path(model_path)
    if hf_config is None:
        if not path.is_dir():
            return [f"model: {path} is not a checkpoint directory"]
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(path)
    hf_config = getattr(hf_config, "text_config", None) or hf_config
    try:
        adapter_for_model_type(hf_config.model_type)
    except UnsupportedModelError as exc:
        return [f"model.family: {exc}"]
    shape = CheckpointShape(hf_config, list(config.model.moe_layers) if moe_layers is None else sorted(moe_layers))
    current = {"family": shape.adapter.family, "n_layers": shape.n_layers, "d_model": shape.d_model,
               "num_experts": shape.num_experts}
    if moe_layers is not None:
        current["moe_layers"] = shape.moe_layers
    problems = []
    if not config.model.weights_hash:
        problems.append("model.weights_hash: missing; a server can only check the weight files, so create the config "
                        "from a model loaded from its checkpoint directory (steer.models.load or from_pretrained(dir))")
    elif path.is_dir():
        current["weights_hash"] = weights_hash(path)
    else:
        problems.append(f"model.weights_hash: cannot hash {str(model_path)!r} (not a local checkpoint directory)")
    problems += identity_problems(config.model.identity_dict(), current)
    return problems or config.fit_problems(shape)

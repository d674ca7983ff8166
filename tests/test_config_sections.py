"""Config sections are the methods' own (steer.sections): a section type registered outside steer.config
is read, written, checked and applied by InterventionConfig like the built-in ones."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import steer.sections
from steer.cli import main
from steer.config import ConfigError, InterventionConfig, checkpoint_problems, schema, section_names
from steer.config_diff import diff, summary
from steer.export import export
from steer.interventions import AddVector
from steer.mote_section import MoTESection
from steer.sections import Section, register_section, section_types


@dataclass
class VectorSection(Section):
    """A steering vector added at one residual point: a method steer.config knows nothing about."""

    name = "vectors"
    schema = {"type": "object", "required": ["point", "scale"], "additionalProperties": False,
              "properties": {"point": {"type": "string"}, "scale": {"type": "number", "minimum": 0}}}
    intervenes = True

    point: str
    scale: float
    vector: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def to_json(self) -> dict:
        return {"point": self.point, "scale": float(self.scale)}

    @classmethod
    def from_json(cls, d: dict, tensors: Mapping[str, torch.Tensor] | None = None) -> VectorSection:
        return cls(d["point"], float(d["scale"]), (tensors or {})["vector"])

    @classmethod
    def json_problems(cls, d: dict, manifest: Mapping[str, dict] | None = None) -> list[str]:
        out = [] if "vectors.vector" in (manifest or {}) else ["vectors: its tensor vectors.vector is not in the manifest"]
        return out + ([] if d["point"].endswith("resid_post") else [f"vectors.point: {d['point']!r} is not a residual point"])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"vector": self.vector}

    def problems(self, shape: Any) -> list[str]:
        if self.vector.numel() != shape.d_model:
            return [f"vectors.vector: width {self.vector.numel()}, the model's d_model is {shape.d_model}"]
        return []

    def interventions(self) -> list:
        return [AddVector(self.point, self.vector, self.scale)]

    def summary(self) -> dict:
        return {"point": self.point, "scale": self.scale, "norm": round(float(self.vector.norm()), 4)}


@pytest.fixture
def registered(monkeypatch):
    """VectorSection registered for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(steer.sections, "_REGISTRY", dict(steer.sections._REGISTRY))
    return register_section(VectorSection)


def _vector(width: int) -> torch.Tensor:
    return torch.randn(width, generator=torch.Generator().manual_seed(0))


def test_builtin_sections_are_registered_in_file_order():
    assert section_names() == ("mote", "act", "lynx", "difr")
    assert {name: cls.__module__ for name, cls in section_types().items()} == {
        "mote": "steer.mote_section", "act": "steer.act_section", "lynx": "steer.probes.section",
        "difr": "steer.difr.section"}
    assert schema() is schema()  # no section from elsewhere: the schema file as it is


def test_registered_section_round_trips(registered, tiny_moe, tiny_moe_dir, tmp_path, capsys):
    d = tiny_moe.config.hidden_size
    cfg = InterventionConfig.for_model(tiny_moe, vectors=VectorSection("blocks.1.resid_post", 2.0, _vector(d)),
                                       mote=MoTESection([(1, 3)]))
    assert section_names()[-1] == "vectors" and isinstance(cfg.vectors, VectorSection)
    out = cfg.save(tmp_path / "cfg")
    doc = json.loads((out / "config.json").read_text())
    assert list(doc) == ["format", "version", "model", "mote", "vectors", "tensors"]  # after the built-ins
    assert doc["vectors"] == {"point": "blocks.1.resid_post", "scale": 2.0}
    assert doc["tensors"] == {"vectors.vector": {"shape": [d], "dtype": "float32"}}
    back = InterventionConfig.load(out)
    assert back.to_json() == doc and back.mote == cfg.mote
    assert torch.equal(back.vectors.vector, cfg.vectors.vector)
    assert back.problems(tiny_moe) == [] and checkpoint_problems(back, tiny_moe_dir) == []
    assert summary(back)["sections"] == ["mote", "vectors"] and summary(back)["vectors"]["point"] == "blocks.1.resid_post"
    assert diff(cfg, back) == []
    assert main(["config", "show", str(out)]) == 0  # the text view says every section, the new one included
    shown = capsys.readouterr().out
    assert "  mote: off_mask, 1 experts" in shown and '  vectors: {"point": "blocks.1.resid_post", "scale": 2.0' in shown
    jsonschema = pytest.importorskip("jsonschema")  # the composed schema names the new section
    jsonschema.validate(doc, schema())


def test_registered_section_is_validated(registered, tiny_moe, tiny_moe_dir, tmp_path):
    cfg = InterventionConfig.for_model(tiny_moe, vectors=VectorSection("blocks.1.resid_post", 1.0, _vector(5)))
    expected = [f"vectors.vector: width 5, the model's d_model is {tiny_moe.config.hidden_size}"]
    assert cfg.problems(tiny_moe) == expected and checkpoint_problems(cfg, tiny_moe_dir) == expected
    with pytest.raises(ConfigError, match="vectors.vector: width 5"):
        cfg.apply(tiny_moe)
    with pytest.raises(ConfigError, match="vectors: steer's vLLM plugin does not apply vectors sections; export "
                                          "without the vectors section"):  # refused, never served without it
        export(cfg.replace(mote=MoTESection([(1, 3)])), "vllm", tmp_path / "vllm")
    d = cfg.save(tmp_path / "cfg")
    doc = json.loads((d / "config.json").read_text())
    doc["vectors"].update(scale=-1, colour="red")  # the section's own schema
    (d / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        InterventionConfig.load(d)
    assert err.value.problems == ["vectors.scale: -1 is below the minimum 0",
                                  "vectors.colour: unknown field (known fields: point, scale)"]
    doc["vectors"] = {"point": "blocks.1.attn.pattern", "scale": 1}  # the section's own json_problems
    (d / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        InterventionConfig.load(d)
    assert err.value.problems == ["vectors.point: 'blocks.1.attn.pattern' is not a residual point"]


def test_registered_section_applies(registered, tiny_moe):
    v = _vector(tiny_moe.config.hidden_size)
    cfg = InterventionConfig.for_model(tiny_moe, vectors=VectorSection("blocks.1.resid_post", 3.0, v))
    x = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = tiny_moe(x).logits
        with cfg.apply(tiny_moe) as (iv,):
            steered = tiny_moe(x).logits
        with AddVector("blocks.1.resid_post", v, 3.0).apply(tiny_moe):
            reference = tiny_moe(x).logits
    assert isinstance(iv, AddVector) and iv.total_touched == 20
    assert torch.equal(steered, reference) and not torch.equal(steered, plain)


def test_unregistered_section_is_an_unknown_field(monkeypatch, tiny_moe, tmp_path):
    monkeypatch.setattr(steer.sections, "_REGISTRY", dict(steer.sections._REGISTRY))
    register_section(VectorSection)
    d = InterventionConfig.for_model(tiny_moe, vectors=VectorSection("blocks.1.resid_post", 1.0, _vector(64))).save(
        tmp_path / "cfg")
    monkeypatch.undo()  # a reader without the section's module
    with pytest.raises(ConfigError, match=r"vectors: unknown field \(known fields: act, description, difr, format, "):
        InterventionConfig.load(d)
    with pytest.raises(TypeError, match="unknown config section.s. vectors; registered sections: mote, act, lynx, difr"):
        InterventionConfig.for_model(tiny_moe, vectors=VectorSection("blocks.1.resid_post", 1.0))


def test_register_section_refuses_bad_sections(registered):
    taken = f"'vectors' is already registered by {VectorSection.__module__}.VectorSection"
    with pytest.raises(ValueError, match=re.escape(taken)):
        register_section(type("VectorSection2", (VectorSection,), {}))
    with pytest.raises(ValueError, match="'model' is a config.json field"):
        register_section(type("ModelSection", (VectorSection,), {"name": "model"}))
    with pytest.raises(TypeError, match="Section subclass"):
        register_section(dict)
    assert register_section(VectorSection) is VectorSection  # the same class again (a reload) is fine


def test_sections_are_attributes(registered, tiny_moe):
    cfg = InterventionConfig.for_model(tiny_moe, mote=MoTESection([(1, 3)]))
    assert cfg.vectors is None and cfg.act is None
    cfg.vectors = VectorSection("blocks.1.resid_post", 1.0, _vector(64))
    assert list(cfg.sections) == ["mote", "vectors"]
    cfg.mote = None
    assert list(cfg.sections) == ["vectors"] and cfg.replace(vectors=None).sections == {}
    with pytest.raises(TypeError, match="mote: expected a MoTESection, got VectorSection"):
        cfg.mote = cfg.vectors
    with pytest.raises(AttributeError):
        cfg.colour  # noqa: B018


@dataclass
class NoteSection(Section):
    """A section that reads nothing and changes nothing: `steer generate` has no step for it."""

    name = "notes"
    schema = {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}
    text: str

    def to_json(self) -> dict:
        return {"text": self.text}

    @classmethod
    def from_json(cls, d: dict, tensors: Mapping[str, torch.Tensor] | None = None) -> NoteSection:
        return cls(d["text"])


def test_steer_generate_runs_a_registered_section(registered, tiny_moe, tiny_moe_dir, tmp_path, capsys):
    register_section(NoteSection)
    v = _vector(tiny_moe.config.hidden_size)
    cfg = InterventionConfig.for_model(tiny_moe, vectors=VectorSection("blocks.1.resid_post", 3.0, v))
    argv = ["--model", str(tiny_moe_dir), "--prompt", "hello there", "--no-chat-template", "--max-new-tokens", "3",
            "--json", "--quiet"]
    assert main(["generate", "--config", str(cfg.save(tmp_path / "cfg")), *argv]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["applied"] == ["vectors"] and res["touched"]["AddVector"] > 0  # the new section was applied
    cfg.notes = NoteSection("made for a test")
    assert main(["generate", "--config", str(cfg.save(tmp_path / "cfg2")), *argv]) == 2  # never skipped silently
    assert "does not know how to run the notes section(s)" in capsys.readouterr().err
    assert main(["generate", "--config", str(tmp_path / "cfg2"), "--skip", "notes", *argv]) == 0


def test_v1_file_written_before_the_split_resaves_byte_identical(tmp_path):
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "intervention_config_v1"
    cfg = InterventionConfig.load(fixture)
    assert list(cfg.sections) == ["mote", "act", "lynx", "difr"] and cfg.mote.mode == "off_zero"
    assert cfg.lynx.probe().calibration.q1 == float("inf") and cfg.act.act_config().alpha == 1.0
    out = cfg.save(tmp_path / "again")
    from safetensors import safe_open

    from steer.io import checksum

    old_t, new_t = ({k: f.get_tensor(k) for k in f.keys()} for f in
                    (safe_open(str(d / "config.safetensors"), framework="pt") for d in (fixture, out)))
    assert old_t.keys() == new_t.keys() and all(torch.equal(old_t[k], new_t[k]) for k in old_t)
    with safe_open(str(out / "config.safetensors"), framework="pt") as f:  # now tagged through steer.io
        header = f.metadata()
    assert header["format"] == "steer.intervention-config" and header["version"] == "1"
    assert header["checksum"] == checksum(new_t)
    # the JSON is the same document except that the identity now names its scheme (steer.identity): a file
    # written before schemes reads as the first one, and saving it again writes that name out
    old, new = (json.loads((d / "config.json").read_text()) for d in (fixture, out))
    assert new["model"].pop("scheme") == "steer.identity/1"
    assert new == old

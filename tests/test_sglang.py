"""steer's SGLang export, loaded by SGLang's own code (the sglang 0.5.23 wheel, unmodified).

SGLang's package __init__ starts its serving stack (CUDA kernels, FlashInfer), which does not import
here, so the test loads the two files the export goes through straight from the installed wheel:
`srt/model_executor/hook_manager.py` (register_forward_hooks, what `--forward-hooks` runs) and
`srt/utils/server_args_config_parser.py` (what `--config FILE.yaml` runs). `.ci/sglang.sh` installs the
wheel without dependencies into .venv-sglang; elsewhere the test is skipped with the reason.

The model is a tiny HF MoE of each family rebuilt with SGLang's module tree around HF's weights: each
MoE block is `model.layers.N.<SGLang's gate name>` (a ReplicatedLinear returning (logits, bias)), then
the family's top-k on those logits, then HF's experts. Without hooks it computes exactly what HF does;
with the exported hooks attached by SGLang's register_forward_hooks it must route (and, where steer's
semantics allow, answer) like steer's ExpertSwitch on the HF model.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from steer.adapters import ADAPTERS, model_map
from steer.config import ConfigError, InterventionConfig, MoTESection
from steer.export import export, sglang_problems, to_sglang
from steer.hooks import capture
from steer.kernels.router import RoutingRule, route_reference
from steer.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def sglang_file(relative: str) -> Path:
    """A file of the installed sglang package, found without importing it (its __init__ needs CUDA)."""
    spec = importlib.util.find_spec("sglang")
    roots = (
        [Path(p) for p in spec.submodule_search_locations] if spec and spec.submodule_search_locations else []
    )
    venv = Path(os.environ.get("STEER_SGLANG_VENV", ROOT / ".venv-sglang"))
    roots += sorted(venv.glob("lib/python*/site-packages/sglang"))
    for root in roots:
        if (root / relative).is_file():
            return root / relative
    pytest.skip(
        f"sglang is not installed (looked for sglang/{relative} in the env and {venv}); "
        "run .ci/sglang.sh (pip install --no-deps sglang==0.5.23 into .venv-sglang)"
    )


def load_sglang_module(relative: str, name: str):
    spec = importlib.util.spec_from_file_location(name, sglang_file(relative))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hook_manager():
    return load_sglang_module("srt/model_executor/hook_manager.py", "sglang.srt.model_executor.hook_manager")


# ---------------------------------------------------------------------------------------------
# A tiny HF MoE with SGLang's module names


class ReplicatedLinear(nn.Module):
    """SGLang's router module contract: forward(x) -> (logits, bias). The logits are the HF router's own."""

    def __init__(self, hf_router: nn.Module):
        super().__init__()
        self.hf = hf_router
        self.last = None

    def forward(self, x):
        self.last = self.hf(x)
        return self.last[0], None


class Answer(nn.Module):
    """Stands in for the HF router inside the HF block: answers the routing the SGLang block computed."""

    value: tuple = ()

    def forward(self, _hidden):
        return self.value


class SGLangMoE(nn.Module):
    """SGLang's MoE block: `router_logits, _ = self.<gate>(h)`, then the family's top-k on those logits
    (steer's reference of the rule, as SGLang's TopK for these families), then the experts (HF's)."""

    def __init__(self, hf_block: nn.Module, router_attr: str, gate_attr: str, rule: RoutingRule):
        super().__init__()
        self.gate_attr, self.router_attr, self.rule = gate_attr, router_attr, rule
        setattr(self, gate_attr, ReplicatedLinear(getattr(hf_block, router_attr)))
        setattr(hf_block, router_attr, Answer())
        self.hf_block = hf_block
        self.indices = []

    def forward(self, hidden, *args, **kwargs):
        gate = getattr(self, self.gate_attr)
        logits, _ = gate(hidden.reshape(-1, hidden.shape[-1]))
        _, weights, indices = gate.last[:3]
        res = route_reference(logits, self.rule)
        self.indices.append(res.indices)
        getattr(self.hf_block, self.router_attr).value = (
            logits,
            res.weights.to(weights.dtype),
            res.indices.to(indices.dtype),
        )
        return self.hf_block(hidden, *args, **kwargs)


def sglang_named(model: nn.Module) -> tuple[nn.Module, dict[int, SGLangMoE]]:
    """A copy of `model` whose MoE layers carry SGLang's names (model.layers.N.<Adapter.sglang_gate>)."""
    mm = model_map(model)
    adapter, rule = mm.adapter, mm.routing_rule()
    twin = copy.deepcopy(model)
    twin_map = model_map(twin)
    block_name, gate_attr = adapter.sglang_gate.rsplit(".", 1)
    router_attr = adapter.router.removeprefix(adapter.mlp + ".")
    blocks = {}
    for i in mm.moe_layers:
        layer = twin_map.layer(i)
        block = SGLangMoE(getattr(layer, adapter.mlp), router_attr, gate_attr, rule)
        delattr(layer, adapter.mlp)
        setattr(layer, block_name, block)
        if block_name != adapter.mlp:  # HF's layer calls self.<mlp>; SGLang's name is the only registered one
            layer.__dict__[adapter.mlp] = block
        blocks[i] = block
    return twin, blocks


# ---------------------------------------------------------------------------------------------

FAMILIES = [f for f, a in ADAPTERS.items() if a.sglang_gate]
IDS = torch.tensor([[5, 17, 99, 3, 42, 8, 120, 64, 7, 33, 250, 1]])


def _most_used_experts(model) -> list[tuple[int, int]]:
    """Per MoE layer the expert these tokens use most, so switching it off surely changes routing."""
    with capture(model, ["blocks.*.mlp.router.indices"]) as cap, torch.no_grad():
        model(IDS)
    return [(int(p.split(".")[1]), int(torch.bincount(cap[p][0].flatten()).argmax())) for p in cap]


def _hf_run(model, cfg):
    layers = model_map(model).moe_layers
    with (
        cfg.apply(model),
        capture(model, [f"blocks.{la}.mlp.router.indices" for la in layers]) as cap,
        torch.no_grad(),
    ):
        logits = model(IDS).logits
    return logits, {la: cap[f"blocks.{la}.mlp.router.indices"][0].sort(-1).values for la in layers}


def _twin_run(twin, blocks):
    for b in blocks.values():
        b.indices.clear()
    with torch.no_grad():
        logits = twin(IDS).logits
    return logits, {la: b.indices[0].sort(-1).values for la, b in blocks.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["off_mask", "on"])
def test_export_loaded_by_sglang_hook_manager(family, mode, hook_manager, tmp_path, caplog):
    torch.set_num_threads(1)
    model = tiny_model(family)
    twin, blocks = sglang_named(model)
    with torch.no_grad():  # the SGLang-named twin is the HF model, unhooked
        assert torch.equal(twin(IDS).logits, model(IDS).logits)

    experts = _most_used_experts(model)
    cfg = InterventionConfig.for_model(model, mote=MoTESection(experts, mode))
    norm = getattr(model.config, "norm_topk_prob", None)
    res = export(cfg, "sglang", tmp_path / "hooks.json", norm_topk_prob=norm)
    specs = json.loads(res.path.read_text())  # the file is what --forward-hooks takes: a JSON list
    assert isinstance(specs, list) and sglang_problems(specs) == []
    gate = ADAPTERS[family].sglang_gate
    assert [s["target_modules"] for s in specs] == [[f"model.layers.{la}.{gate}"] for la, _ in experts]

    with caplog.at_level(logging.INFO):
        hook_manager.register_forward_hooks(twin, specs)  # SGLang's own loader, unmodified
    registered = [r.getMessage() for r in caplog.records if "Registered forward hook" in r.getMessage()]
    assert len(registered) == len(experts) and not any(
        "No modules matched" in r.getMessage() for r in caplog.records
    )

    hf_logits, hf_routing = _hf_run(model, cfg)
    twin_logits, twin_routing = _twin_run(twin, blocks)
    assert sorted(twin_routing) == sorted(hf_routing)
    # Where steer's weights and the hook's agree (off_mask on a model that renormalises its top-k weights,
    # or whose top-k softmax is over the selected experts only) the whole forward must match; otherwise the
    # first switched layer (same input) selects the same experts, and later layers see slightly different
    # hidden states (the weight difference the export's notes describe).
    exact = mode == "off_mask" and (ADAPTERS[family].routing == "topk_softmax" or norm is not False)
    first = min(hf_routing)
    for la in (
        hf_routing if exact else [first]
    ):  # SGLang + steer's hooks select what steer's ExpertSwitch selects
        assert torch.equal(twin_routing[la], hf_routing[la]), (family, mode, la)
    off = dict(experts)
    for la, idx in twin_routing.items():  # switched experts never (off_mask) / always (on) selected
        hit = (idx == off[la]).any(-1)
        assert hit.all() if mode == "on" else not hit.any(), (family, mode, la)
    if exact:
        torch.testing.assert_close(twin_logits, hf_logits, rtol=1e-5, atol=1e-5)


def test_huggingface_names_match_nothing_in_sglang(hook_manager, tmp_path, caplog):
    """The old export hard-coded HF-style `model.layers.N.mlp.gate`; SGLang's Mixtral names the gate
    `block_sparse_moe.gate`, so SGLang matched nothing and served unsteered. The table's name matches."""
    model = tiny_model("mixtral")
    twin, _ = sglang_named(model)
    cfg = InterventionConfig.for_model(model, mote=MoTESection([(1, 3)], "off_mask"))
    specs, _ = to_sglang(cfg)
    old = [{**specs[0], "target_modules": ["model.layers.1.mlp.gate"]}]
    with caplog.at_level(logging.INFO):
        hook_manager.register_forward_hooks(twin, old)
    assert any("No modules matched" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        hook_manager.register_forward_hooks(twin, specs)
    assert [r.getMessage() for r in caplog.records if "Registered" in r.getMessage()] == [
        "Registered forward hook 'steer-mote-layer-1' on model.layers.1.block_sparse_moe.gate"
    ]


def test_yaml_config_through_sglang_parser(hook_manager, tmp_path):
    """The .yaml export is an SGLang `--config` file: SGLang's ConfigArgumentMerger turns it into the
    arguments `--forward-hooks JSON --cuda-graph-backend-decode disabled --cuda-graph-backend-prefill
    disabled`, and the hooks it carries attach and steer."""
    merger_mod = load_sglang_module(
        "srt/utils/server_args_config_parser.py", "sglang.srt.utils.server_args_config_parser"
    )
    model = tiny_model("qwen2_moe")
    experts = _most_used_experts(model)
    cfg = InterventionConfig.for_model(model, mote=MoTESection(experts, "off_mask"))
    res = export(cfg, "sglang", tmp_path / "out")  # a directory: forward_hooks.json and sglang.yaml
    assert (
        res.path == tmp_path / "out" / "forward_hooks.json" and (tmp_path / "out" / "sglang.yaml").is_file()
    )
    assert any("--disable-cuda-graph" in n and "--config" in n for n in res.notes)
    assert any("decode is served UNSTEERED" in n for n in res.notes)

    # the subset of SGLang 0.5.23's ServerArgs parser the file uses (same flags, types and choices)
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path")
    parser.add_argument("--config")
    parser.add_argument("--forward-hooks", type=json.loads)  # SGLang: json_list_type (orjson.loads)
    for phase in ("decode", "prefill"):
        parser.add_argument(f"--cuda-graph-backend-{phase}", choices=["full", "breakable", "disabled"])
    argv = merger_mod.ConfigArgumentMerger(parser).merge_config_with_args(
        ["--model-path", "m", "--config", str(tmp_path / "out" / "sglang.yaml")]
    )
    args = parser.parse_args(argv)
    assert args.cuda_graph_backend_decode == "disabled" and args.cuda_graph_backend_prefill == "disabled"
    assert args.forward_hooks == json.loads(res.path.read_text())

    twin, blocks = sglang_named(model)
    hook_manager.register_forward_hooks(twin, args.forward_hooks)
    hf_logits, hf_routing = _hf_run(model, cfg)
    twin_logits, twin_routing = _twin_run(twin, blocks)
    assert all(torch.equal(twin_routing[la], hf_routing[la]) for la in hf_routing)
    torch.testing.assert_close(twin_logits, hf_logits, rtol=1e-5, atol=1e-5)  # norm_topk_prob=True: exact


def test_refusals_and_old_format():
    deepseek = tiny_model("deepseek_v3")
    cfg = InterventionConfig.for_model(deepseek, mote=MoTESection([(1, 0)], "off_mask"))
    with pytest.raises(
        ConfigError,
        match=r"model.family: 'deepseek_v3' cannot be exported for SGLang: .*"
        r"e_score_correction_bias.*--target vllm",
    ):
        to_sglang(cfg)
    dense = tiny_model("llama")
    with pytest.raises(ConfigError, match="'llama' cannot be exported for SGLang: it is a dense family"):
        to_sglang(InterventionConfig.for_model(dense, mote=MoTESection([(1, 0)], "off_mask")))
    # the previous export's file: an object around the list, which SGLang's --forward-hooks cannot use
    problems = sglang_problems({"forward_hooks": []})
    assert problems and "takes the JSON list itself" in problems[0]
    assert (
        "unknown fields ['hook_type']"
        in sglang_problems(
            [
                {
                    "target_modules": ["a"],
                    "hook_factory": "steer.serving.sglang_hooks:router_logits_hook",
                    "hook_type": "forward",
                }
            ]
        )[0]
    )


def test_cli_prints_the_cuda_graph_flag(tmp_path, capsys):
    from steer.cli import main

    model = tiny_model("gpt_oss")
    src = InterventionConfig.for_model(model, mote=MoTESection([(1, 3)], "off_mask")).save(tmp_path / "cfg")
    assert main(["export", "--target", "sglang", str(src), "-o", str(tmp_path / "s.yaml")]) == 0
    out = capsys.readouterr().out
    assert "--config" in out and "UNSTEERED" in out
    text = (tmp_path / "s.yaml").read_text()
    assert "model.layers.1.mlp.router" in text and "cuda-graph-backend-decode: disabled" in text

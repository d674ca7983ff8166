"""Every kind of hook point (steer.adapters.PointKind) attaches through `attach` and sees the rows it
should; and no module registers a torch hook except through steer.hooks."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from steer.adapters import PointKind, model_map
from steer.hooks import attach
from steer.interventions import AddVector
from steer.tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
LAYER = 1


def _scale_real_rows(x: torch.Tensor, mask: torch.Tensor | None, factor: float) -> torch.Tensor:
    """x with the rows of real tokens scaled (mask: Bool over x's leading dimensions, None = all)."""
    if mask is None:
        return x * factor
    m = mask.to(x.device).reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    return torch.where(m, x * factor, x)


def _kind_hooks(touched: dict):
    """One hook per kind on layer LAYER: each counts the real-token rows it saw (attention patterns:
    query rows of every head) and, where the kind may write, changes them."""

    def tensor(x, ctx):
        touched[ctx.point] = int(ctx.token_mask.sum())
        return _scale_real_rows(x, ctx.token_mask, 1.5)

    def router(out, ctx):
        logits, weights, indices = out
        touched[ctx.point] = int(ctx.flat_token_mask.sum())
        return type(out)((logits, _scale_real_rows(weights, ctx.flat_token_mask, 0.5), indices))

    def router_item(weights, ctx):
        touched[ctx.point] = int(ctx.flat_token_mask.sum())
        return _scale_real_rows(weights, ctx.flat_token_mask, 0.5)

    def pattern(probs, ctx):  # a reader: sees probabilities [B, H, Tq, Tk], returns nothing
        touched[ctx.point] = int(ctx.token_mask.sum()) * probs.shape[1]

    def impl(call, ctx):  # an override: computes the attention output itself
        out, weights = call.base()
        touched[ctx.point] = int(ctx.token_mask.sum())
        return _scale_real_rows(out, ctx.token_mask, 0.5), weights

    return {
        PointKind.INPUT: (f"blocks.{LAYER}.resid_pre", tensor),
        PointKind.OUTPUT: (f"blocks.{LAYER}.mlp.out", tensor),
        PointKind.ROUTER: (f"blocks.{LAYER}.mlp.router", router),
        PointKind.ROUTER_ITEM: (f"blocks.{LAYER}.mlp.router.weights", router_item),
        PointKind.ATTN_PATTERN: (f"blocks.{LAYER}.attn.pattern", pattern),
        PointKind.ATTN_IMPL: (f"blocks.{LAYER}.attn.impl", impl),
    }


@pytest.fixture(scope="module")
def mixtral_and_batch():
    tok = tiny_tokenizer()
    batch = tok(["hello world", "hi"], return_tensors="pt", padding=True)
    return tiny_model("mixtral"), batch


def test_every_kind_is_a_point_of_a_moe_model(mixtral_and_batch):
    model, _ = mixtral_and_batch
    mm = model_map(model)
    assert {mm.resolve(p).kind for p in mm.all_points(overrides=True)} == set(PointKind)
    assert not any(mm.resolve(p).kind is PointKind.ATTN_IMPL for p in mm.all_points())  # not a tensor


@pytest.mark.parametrize("kind", list(PointKind), ids=lambda k: k.name)
def test_every_kind_attaches_and_counts_real_rows(kind, mixtral_and_batch):
    model, batch = mixtral_and_batch
    touched: dict[str, int] = {}
    point, fn = _kind_hooks(touched)[kind]
    assert model_map(model).resolve(point).kind is kind
    real = int(batch.attention_mask.sum())  # 11 + 2 real tokens, 9 left-padding ones
    with torch.no_grad():
        base = model(**batch).logits
        with attach(model, {point: fn}):
            hooked = model(**batch).logits
    rows = real * model.config.num_attention_heads if kind is PointKind.ATTN_PATTERN else real
    assert touched == {point: rows}
    real_rows = batch.attention_mask.bool()
    if kind is PointKind.ATTN_PATTERN:  # a reader leaves the real tokens alone (that layer runs the
        # family's eager attention instead of SDPA: same numbers up to rounding)
        torch.testing.assert_close(hooked[real_rows], base[real_rows], rtol=1e-5, atol=1e-5)
    else:  # the hook's return value replaced the tensor: the real tokens' logits moved
        assert (hooked - base).abs()[real_rows].amax(-1).min() > 0


def test_addvector_refuses_points_that_are_not_one_tensor():
    mm = model_map(tiny_model("mixtral"))
    v = torch.zeros(mm.d_model)
    for point in ("blocks.0.attn.pattern", "blocks.0.attn.impl", "blocks.0.mlp.router", "blocks.0.mlp.router.logits"):
        with pytest.raises(ValueError, match="residual-like point"):
            AddVector(point, v).validate(mm)


RAW_HOOK = re.compile(r"^register_\w*hook$")  # register_forward_hook, register_forward_pre_hook, ...


def _raw_hook_calls() -> list[str]:
    found = []
    for folder in ("steer", "kernels", "probes", "apps"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "steer" / "hooks.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and RAW_HOOK.match(node.func.attr)):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.attr}")
    return found


@pytest.mark.skipif(not (ROOT / "steer" / "hooks.py").is_file(), reason="reads the source checkout")
def test_no_raw_torch_hook_outside_steer_hooks():
    assert RAW_HOOK.match("register_forward_pre_hook") and not RAW_HOOK.match("register_forward_hooks")
    assert _raw_hook_calls() == [], "register torch hooks through steer.hooks.attach (or module_hook)"

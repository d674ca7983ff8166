"""Every Triton kernel compiles for the GPU (sm_90, H100/H200) without a GPU: ahead-of-time to cubin.

The launch wrappers run on CPU tensors with the launch intercepted; the recorded arguments give the
signature and constexprs of each specialisation, which triton.compile builds with the ptxas bundled
in the triton wheel. This catches what the interpreter cannot: GPU-only type or layout errors,
unsupported ops, and register spills of the fixed launch configs (reported in the test output).
"""

from __future__ import annotations

import time

import pytest
import torch

import steer.kernels._triton as kt
from steer.kernels.fingerprint import projection_matrix
from steer.kernels.router import RouterEdit, RoutingRule

pytestmark = [pytest.mark.slow, pytest.mark.skipif(kt.interpreting() or not kt.HAVE_TRITON,
                                reason="AOT compilation needs the compiling (non-interpreter) Triton")]

_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8", torch.int32: "i32",
       torch.int64: "i64", torch.bool: "i1"}


class _Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _compile(fn, args, kwargs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    options = {k: v for k, v in kwargs.items() if k not in names}
    const_names = {p.name for p in fn.params if p.is_constexpr}
    sig, consts = {}, {}
    for name in names:
        v = values[name]
        if name in const_names:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TY[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i64" if abs(v) >= 2**31 else "i32"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(v)}")
    src = ASTSource(fn, sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _record(module_name: str, kernel_names: list[str], run) -> list:
    mod = kt.load(module_name)
    saved = {n: getattr(mod, n) for n in kernel_names}
    recs = {n: _Recorder(k) for n, k in saved.items()}
    try:
        for n, r in recs.items():
            setattr(mod, n, r)
        run()
    finally:
        for n, k in saved.items():
            setattr(mod, n, k)
    return [(n, r.fn, a, kw) for n, r in recs.items() for a, kw in r.calls]


def _ptxas_usage(k) -> str:
    """Registers and spills of a compiled kernel, from the bundled ptxas (-v)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(k.asm["ptx"])
        f.flush()
        out = subprocess.run([get_ptxas(90).path, "-v", "-arch=sm_90a", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return f"regs={regs.group(1) if regs else '?'} spill_stores={spill.group(1) if spill else '?'}B"


def _mask(E, ids):
    m = torch.zeros(E, dtype=torch.bool)
    m[list(ids)] = True
    return m


def _router_launches():
    mod = kt.load("_router_triton")
    edit = RouterEdit(off_mask=_mask(256, [3]), off_zero=_mask(256, [4]), force_on=_mask(256, [5]), renormalize=True,
                      force_weight="max")

    def run():
        for rule, E, dtype in [
            (RoutingRule("softmax_topk", 8, norm_topk_prob=True), 128, torch.bfloat16),
            (RoutingRule("softmax_topk", 8, norm_topk_prob=False), 64, torch.bfloat16),  # off_mask re-softmax
            (RoutingRule("topk_softmax", 4), 128, torch.bfloat16),
            (RoutingRule("sigmoid_group", 8, True, 8, 4, 2.5, torch.float32), 256, torch.float32),
        ]:
            logits = torch.randn(100, E, dtype=dtype)
            bias = torch.zeros(E) if rule.kind == "sigmoid_group" else None
            e = RouterEdit(off_mask=edit.off_mask[:E], off_zero=edit.off_zero[:E], force_on=edit.force_on[:E],
                           renormalize=True, force_weight="max")
            mod.route_triton(logits, rule, None, bias=bias)
            mod.route_triton(logits, rule, e, bias=bias, token_mask=torch.ones(100, dtype=torch.bool))
    return _record("_router_triton", ["_router_kernel"], run)


def _act_launches():
    mod = kt.load("_act_triton")

    def run():
        for dtype, D in ((torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 128)):
            q, k, v = torch.randn(1, 4, 70, D, dtype=dtype), torch.randn(1, 2, 70, D, dtype=dtype), torch.randn(1, 2, 70, D, dtype=dtype)
            sinks = torch.zeros(1, 4, 70, dtype=torch.bool)
            heads = torch.ones(4, dtype=torch.bool)
            mod.act_attention_triton(q, k, v, scale=0.1, sink_mask=sinks, head_mask=heads, beta=0.4)
            mod.sink_stats_triton(q, k, scale=0.1)
            if dtype == torch.bfloat16:
                mask = torch.ones(1, 1, 70, 70, dtype=torch.bool)
                mod.act_attention_triton(q, k, v, scale=0.1, sink_mask=sinks, head_mask=heads, beta=0.4, mask=mask,
                                         sliding_window=16)
                mod.sink_stats_triton(q, k, scale=0.1, mask=mask, sliding_window=16)
    return _record("_act_triton", ["_act_fwd", "_lse_fwd", "_colsum_fwd"], run)


def _small_launches():
    f = _record("_fingerprint_triton", ["_fingerprint_kernel"], lambda: [
        kt.load("_fingerprint_triton").fingerprint_triton(torch.randn(40, 4096, dtype=dt), projection_matrix(0, 4096, 8))
        for dt in (torch.bfloat16, torch.float32)])

    def probe():
        hidden = [torch.randn(3, 9, 4096, dtype=torch.bfloat16) for _ in range(4)]
        F = 4 * 4096
        layers = [(torch.randn(256, F), torch.randn(256)), (torch.randn(64, 256), torch.randn(64)),
                  (torch.randn(1, 64), torch.randn(1))]
        kt.load("_probe_triton").probe_score_triton(hidden, torch.tensor([1, 2, 3]), torch.zeros(F), torch.ones(F), layers)
    return f + _record("_probe_triton", ["_probe_layer1", "_probe_head"], probe)


@pytest.mark.parametrize("group", ["router", "act", "fingerprint+probe"])
def test_kernels_compile_for_sm90(group, capsys):
    launches = {"router": _router_launches, "act": _act_launches, "fingerprint+probe": _small_launches}[group]()
    assert launches
    report = []
    for name, fn, args, kwargs in launches:
        t = time.perf_counter()
        k = _compile(fn, args, kwargs)
        assert "cubin" in k.asm and len(k.asm["cubin"]) > 0
        report.append(f"{name} {k.metadata.num_warps} warps: {_ptxas_usage(k)} ({time.perf_counter() - t:.1f} s)")
    with capsys.disabled():
        print("\n  " + "\n  ".join(report))

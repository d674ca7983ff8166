"""Which path a kernel call takes, and loading the Triton modules in the right mode.

The Triton kernels live in private modules (`steer.kernels._*_triton`) that are imported only when the
Triton path is taken. `@triton.jit` decides at decoration time whether it compiles for the GPU or
runs under the interpreter (env TRITON_INTERPRET=1), so `load()` re-imports a kernel module when
the environment changed since it was first imported: tests can switch the interpreter on even if
another test imported `kernels` first.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from typing import Literal

import torch

# triton is Linux/x86-only in our dependency list. Found, not imported: importing it costs ~0.4 s, and
# steer.config (via the DiFR section) reaches this module; the kernel modules import triton when loaded.
HAVE_TRITON = importlib.util.find_spec("triton") is not None

Backend = Literal["triton", "torch"]


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def backend_for(tensor: torch.Tensor, backend: str | None = None) -> Backend:
    """The path a kernel call on `tensor` takes: "triton" on CUDA tensors, "torch" otherwise.

    `backend` (per call) or env STEER_KERNELS (process-wide) force "torch" or "triton"; forcing
    Triton on CPU tensors works only under the interpreter (TRITON_INTERPRET=1).
    """
    choice = (backend or os.environ.get("STEER_KERNELS") or "auto").lower()
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel backend {choice!r} is not one of auto, torch, triton (argument or env STEER_KERNELS)")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not HAVE_TRITON:
            raise RuntimeError("the Triton kernel path was requested but triton is not installed; use backend='torch'")
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError(
                "the Triton kernel path needs CUDA tensors, or TRITON_INTERPRET=1 set before the kernels are "
                "loaded to run them on CPU under the interpreter; or use backend='torch'"
            )
        return "triton"
    return "triton" if (HAVE_TRITON and tensor.is_cuda) else "torch"


def load(name: str):
    """Import `kernels.<name>` with its jit functions in the mode the environment asks for now."""
    module = importlib.import_module(f"steer.kernels.{name}")
    if getattr(module, "INTERPRETED", None) != interpreting():
        module = importlib.reload(module)
    return module


POISON = False  # tests set this: outputs start as NaN / -1 so unwritten elements show up


def empty(*shape: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Output allocation for the Triton paths (poisoned when `POISON` is set)."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def interpreter_ready() -> bool:
    """True when Triton kernels can run on CPU tensors in this process.

    Triton's own library functions (tl.max, tl.sigmoid, ...) are jit-decorated when `triton` is first
    imported, so TRITON_INTERPRET=1 must be in the environment before that import (before torch
    compile, transformers or anything else pulls triton in). Setting it later is not enough.
    """
    if not (HAVE_TRITON and interpreting()):
        return False
    import triton.language as tl

    return type(tl.standard.max).__name__ == "InterpretedFunction"


@contextlib.contextmanager
def interpreter(poison: bool = True):
    """Poisoned outputs (NaN / -1 before each launch) for Triton runs on CPU under the interpreter.

    Needs `interpreter_ready()` (TRITON_INTERPRET=1 set before triton was imported).
    """
    global POISON
    if not interpreter_ready():
        raise RuntimeError(
            "Triton's interpreter is not active in this process: set TRITON_INTERPRET=1 in the environment "
            "before anything imports triton (e.g. `TRITON_INTERPRET=1 pytest ...`)")
    old_poison = POISON
    POISON = poison
    try:
        yield
    finally:
        POISON = old_poison

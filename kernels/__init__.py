"""Fused Triton hook kernels, each with an exact PyTorch reference in the same module.

Every public function picks its path per call with `backend_for(tensor)`: Triton on CUDA tensors,
the PyTorch reference otherwise (env STEER_KERNELS=torch|triton, or `backend=`, forces one).
Both paths give the same result (the reference is also what the tests compare against).

- `route(logits, rule, edit)` (router.py): MoE routing of every family + MoTE/SteerMoE expert edits.
- `act_attention(q, k, v, ...)`, `sink_stats(q, k, ...)` (act.py): ACT calibrated attention without the
  N x N map; attention-sink column sums.
- `fingerprint(h, P)`, `projection_matrix(seed, d, k)` (fingerprint.py): Activation-DiFR.
- `probe_score(hidden, positions, mean, std, layers)` (probe_score.py): LYNX probe at a cue token.
Triton kernels: fixed launch configs (no autotune), no host sync, CUDA-graph safe; GPU timings come
from experiments/bench_kernels.py (run by experiments/device_check.sh).

Note: this top-level package shadows Hugging Face's `kernels` package; it deliberately defines
no `get_kernel` and no `__version__`, so transformers treats the hub kernels as unavailable.
"""

from kernels._triton import backend_for
from kernels.act import act_attention, act_probs_reference, sink_stats
from kernels.fingerprint import fingerprint, projection_matrix
from kernels.probe_score import probe_score
from kernels.router import RouterEdit, RouteResult, RoutingRule, route, route_reference

__all__ = [
    "backend_for", "act_attention", "act_probs_reference", "sink_stats", "fingerprint", "projection_matrix", "probe_score", "RoutingRule", "RouterEdit", "RouteResult", "route", "route_reference",
]

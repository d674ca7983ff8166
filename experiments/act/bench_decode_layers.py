"""Gemma-3-270m decode, 2,048-token cache: where ACT's decode overhead goes (issue 16, RESULTS section 8).

    MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/act/bench_decode_layers.py

Two modes, interleaved step by step over 32 steps on their own caches of the same prompt: `act` (ACT path "lse"
on the 10 heads of bench_attention) and `route` (the same 10 layers routed through steer with a handler that
runs the layer's own attention, `call.base()`). Process CPU time, inside real steps, of: the whole step, the
10 layers' attention calls together (per step), each layer's call, and the two lse kernels ACT's decode calls
(`attention_head_lse`, `act_decode_from_lse`). Medians over steps (per call: means). One JSON line to stdout.
"""

import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_attention import act_heads, measure

import steer.kernels.lse as lse
from steer.act import ACT
from steer.adapters import model_map
from steer.hooks import attach
from steer.models import load
from steer.sinks import book_inputs

torch.set_num_threads(1)
lm = load("gemma3-270m", progress=False)
model, tok = lm.model, lm.tokenizer
ids = torch.tensor(book_inputs(tok, n=1, length=2048 + 32))
prompt, new = ids[:, :2048], ids[:, 2048:]
per_call, calls = defaultdict(float), defaultdict(int)  # key -> CPU s, calls (while `on`)
in_layers = {"act": 0.0, "route": 0.0}  # this step's CPU s inside the 10 layers' calls
on = [False]


def timed(key, fn, mode=None):
    """fn, timed; key(*args) names the entry; mode: also add to that mode's per-step layer total."""

    def wrapped(*args, **kwargs):
        c = time.process_time()
        out = fn(*args, **kwargs)
        if on[0]:
            dt = time.process_time() - c
            k = key(*args)
            per_call[k] += dt
            calls[k] += 1
            if mode is not None:
                in_layers[mode] += dt
        return out

    return wrapped


act = ACT(act_heads(model), on_no_effect="ignore")
act.path = "lse"
route_hooks = {f"blocks.{layer}.attn.impl": timed(lambda call, ctx: f"route L{ctx.layer}",
                                                  lambda call, ctx: call.base(), "route")
               for layer, _ in act_heads(model)}
with torch.no_grad():
    with attach(model, route_hooks):
        rc = model.model(input_ids=prompt, use_cache=True).past_key_values
    with act.apply(model):
        ac = model.model(input_ids=prompt, use_cache=True).past_key_values
    state = act._state
    for name in ("attention_head_lse", "act_decode_from_lse"):
        setattr(lse, name, timed(lambda *a, name=name: name, getattr(lse, name)))
    act_hooks = {p: timed(lambda call, ctx: f"act L{ctx.layer}", fn, "act") for p, fn in act.hooks(model_map(model)).items()}
    rows = {"act": [], "route": []}
    load0 = os.getloadavg()[0]
    on[0] = True
    for j in range(32):
        t = new[:, j : j + 1]
        for name in ["act", "route"] if j % 2 == 0 else ["route", "act"]:
            in_layers[name] = 0.0
            if name == "act":
                act._state = state
                with attach(model, act_hooks):
                    _, c, _ = measure(lambda t=t: model.model(input_ids=t, cache=ac, use_cache=True))
            else:
                with attach(model, route_hooks):
                    _, c, _ = measure(lambda t=t: model.model(input_ids=t, cache=rc, use_cache=True))
            rows[name].append((c, in_layers[name]))
res = {n: {"step_cpu_ms": round(1e3 * statistics.median(r[0] for r in rs), 2),
           "in_10_layers_cpu_ms": round(1e3 * statistics.median(r[1] for r in rs), 3)} for n, rs in rows.items()}
print(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "model": "gemma3-270m", "cache": 2048,
                  "steps": 32, "load_avg_1min": [load0, os.getloadavg()[0]], **res,
                  "us_per_call": {k: round(1e6 * per_call[k] / calls[k], 1) for k in sorted(per_call)},
                  "calls_per_step": {k: calls[k] / 32 for k in sorted(calls)}}))

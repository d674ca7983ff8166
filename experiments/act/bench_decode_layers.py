"""Gemma-3-270m decode, 2,048-token cache: CPU time inside the 10 ACT layers' attention calls per step,
ACT (path lse) vs the same layers' own attention through steer (pass-through: call.base()), interleaved
step by step over 32 steps; medians. Prints one JSON line (RESULTS section 8 appends it to
out/bench_decode_layers_run9_gemma3-270m.jsonl).

    MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/act/bench_decode_layers.py
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_attention import act_heads, measure

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
inside = {"act": 0.0, "route": 0.0}
def timed(name, fn):
    def wrapped(call, ctx):
        c = time.process_time()
        out = fn(call, ctx)
        inside[name] += time.process_time() - c
        return out
    return wrapped
act = ACT(act_heads(model), on_no_effect="ignore")
act.path = "lse"
mm = model_map(model)
route_hooks = {f"blocks.{layer}.attn.impl": timed("route", lambda call, ctx: call.base())
               for layer, _ in act_heads(model)}
with torch.no_grad():
    with attach(model, route_hooks):
        rc = model.model(input_ids=prompt, use_cache=True).past_key_values
    with act.apply(model):
        ac = model.model(input_ids=prompt, use_cache=True).past_key_values
    state = act._state
    act_hooks = {p: timed("act", fn) for p, fn in act.hooks(mm).items()}
    rows = {"act": [], "route": []}
    load0 = os.getloadavg()[0]
    for j in range(32):
        t = new[:, j:j+1]
        for name in (["act", "route"] if j % 2 == 0 else ["route", "act"]):
            inside[name] = 0.0
            if name == "act":
                act._state = state
                with attach(model, act_hooks):
                    w, c, _ = measure(lambda t=t: model.model(input_ids=t, cache=ac, use_cache=True))
            else:
                with attach(model, route_hooks):
                    w, c, _ = measure(lambda t=t: model.model(input_ids=t, cache=rc, use_cache=True))
            rows[name].append((c, inside[name]))
res = {n: {"step_cpu_ms": round(1e3 * statistics.median(r[0] for r in rs), 2),
           "in_10_layers_cpu_ms": round(1e3 * statistics.median(r[1] for r in rs), 3)} for n, rs in rows.items()}
print(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "model": "gemma3-270m", "cache": 2048,
                  "steps": 32, "load_avg_1min": [load0, os.getloadavg()[0]], **res}))

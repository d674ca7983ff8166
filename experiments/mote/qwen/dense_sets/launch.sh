#!/bin/bash
# Issue 18, 2026-12-08 (AMD EPYC VM, 2 cores, one thread): the dense Qwen2.5-Coder's refusal rate on the held-out
# requests of each benchmark the MoTE runs use (AdvBench split 0, 128 prompts; HarmBench and Do-Not-Answer, 128 prompts
# each drawn with the same seed as run_refusal --heldout-set), the baselines the MoE builds' rates are read against.
set -e
B="--model qwen2.5-coder --baseline-only --heldout 128 --heldout-harmless 32 --max-new-tokens 16 --ppl-texts 4 --batch-size 32 --threads 1"
D=experiments/mote/qwen/dense_sets
for s in advbench harmbench donotanswer; do
  python experiments/mote/run_refusal.py $B --heldout-set $s --out $D/$s.json
done

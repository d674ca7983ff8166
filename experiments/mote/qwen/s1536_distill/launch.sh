#!/bin/bash
# Issue 18, 2026-12-08 (AMD EPYC VM, 2 cores, one thread per process): does router + norm distillation bring refusal
# back to the sparser fine-grained Qwen build (64 experts x 52 neurons + 1,536 shared, top-8: 60% of the MLP skipped),
# which refused 14/64 held-out AdvBench prompts against the dense model's 47/64?
# 1. the build (seed 0), 2. KL distillation to the dense model on the build's calibration chunks (norms + routers,
# batch 8 x 128 tokens): 80 steps at an Adam step of 1e-3 of each tensor's RMS (a checkpoint every 20), then 20 steps
# at 1e-2 from the build again (a checkpoint every 10), 3. the quality table and the refusal baseline (128 held-out
# AdvBench prompts, 32 harmless) of the build and of each checkpoint. Usage: launch.sh [build|distill|distill2|eval|DIR]
set -e
B=/root/qwen-moe-build/e64k8s1536-refit
D=experiments/mote/qwen/s1536_distill
step=${1:-all}
if [ "$step" = build ] || [ "$step" = all ]; then
  python experiments/moe_build/qwen_build.py build --out $B --experts 64 --top-k 8 --shared-neurons 1536 --refit --threads 1
fi
if [ "$step" = distill ] || [ "$step" = all ]; then
  python experiments/moe_build/qwen_build.py distill --out $B --dest $B-distill --steps 80 --lr 1e-3 --save-every 20 --threads 1
fi
if [ "$step" = distill2 ] || [ "$step" = all ]; then
  python experiments/moe_build/qwen_build.py distill --out $B --dest $B-distill-lr1e-2 --steps 20 --lr 1e-2 --save-every 10 --threads 1
fi
R="--runtime-top-k 8 --baseline-only --heldout 128 --heldout-harmless 32 --max-new-tokens 16 --ppl-texts 4 --batch-size 32 --threads 1"
for m in $B $B-distill/step20 $B-distill/step40 $B-distill/step60 $B-distill/step80 $B-distill-lr1e-2/step10 $B-distill-lr1e-2/step20; do
  if [ "$step" = eval ] || [ "$step" = all ] || [ "$step" = "$m" ]; then
    name=$(basename $m)
    case $m in *-lr1e-2/*) name=lr1e-2_$name ;; esac
    python experiments/moe_build/qwen_build.py eval --out $m --ks 8 --threads 1 \
      --dense-report experiments/moe_build/qwen_e64k8s512.json --report $D/quality_$name.json
    python experiments/mote/run_refusal.py --model $m $R --out $D/refusal_$name.json
  fi
done

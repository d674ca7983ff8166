#!/bin/bash
# Issue 18, 2026-12-07 (AMD EPYC VM, 2 cores): MoTE's refusal switch on a second, independent build of the
# fine-grained recipe (seed 1: other calibration passages and clustering init), then on HarmBench requests with the
# AdvBench-profiled experts. Build:
#   python experiments/moe_build/qwen_build.py build --out /root/qwen-moe-build/e64k8s3264-refit-seed1 --experts 64 \
#       --top-k 8 --shared-neurons 3264 --refit --threads 1 --seed 1
set -e
M="--model /root/qwen-moe-build/e64k8s3264-refit-seed1 --runtime-top-k 8 --ks 64 --seeds 3 --max-new-tokens 16 --ppl-texts 4 --batch-size 32 --threads 1 --profile-tokens response --only \" off \""
D=experiments/mote/qwen/e64k8_seed1
eval python experiments/mote/run_refusal.py $M --heldout 128 --heldout-harmless 32 --profile-dir $D/profile --out $D/advbench_response.json
eval python experiments/mote/run_refusal.py $M --heldout 128 --heldout-harmless 16 --heldout-set harmbench --reuse-profile --profile-dir $D/profile --out $D/harmbench_response.json

#!/bin/bash
# Issue 18, 2026-12-08 (AMD EPYC VM, one thread): the seed-1 build's experts profiled on harmful prompts only, those it
# refused against those it answered (--profile-contrast answer: harm held fixed, 64 AdvBench profiling prompts), then
# the top-64 off against random-64 on the same 128 held-out AdvBench prompts as advbench_response.json (its baseline).
set -e
D=experiments/mote/qwen/e64k8_seed1
python experiments/mote/run_refusal.py --model /root/qwen-moe-build/e64k8s3264-refit-seed1 --runtime-top-k 8 --ks 64 \
  --seeds 3 --max-new-tokens 16 --ppl-texts 4 --batch-size 32 --threads 1 --profile-tokens response --only " off " \
  --profile-contrast answer --profile-n 64 --heldout 128 --heldout-harmless 32 \
  --baseline-from $D/advbench_response.json --profile-dir $D/profile_answer --out $D/advbench_answer_contrast.json

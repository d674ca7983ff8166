#!/bin/bash
# MoTE refusal run on the fine-grained Qwen build e64k8s3264-refit (64 experts x 25 neurons + 3,264 shared, top-8),
# 2026-12-07: baseline first, then one process per profile (prompt tokens as MoTE, response tokens as SteerMoE),
# joined with --merge. Builds: experiments/moe_build/qwen_build.py build --out /root/qwen-moe-build/e64k8s{1536,3264}-refit
#   --experts 64 --top-k 8 --shared-neurons {1536,3264} --refit --threads 1
B="--heldout 64 --heldout-harmless 32 --max-new-tokens 16 --ppl-texts 4 --batch-size 32 --threads 1"
python experiments/mote/run_refusal.py --model qwen2.5-coder --baseline-only $B --out experiments/mote/qwen/e64k8/dense_baseline.json
python experiments/mote/run_refusal.py --model /root/qwen-moe-build/e64k8s1536-refit --runtime-top-k 8 --baseline-only $B --out experiments/mote/qwen/e64k8/s1536_baseline.json
python experiments/mote/run_refusal.py --model /root/qwen-moe-build/e64k8s3264-refit --runtime-top-k 8 --baseline-only $B --out experiments/mote/qwen/e64k8/s3264_baseline.json
C="--model /root/qwen-moe-build/e64k8s3264-refit --runtime-top-k 8 --ks 16 64 --seeds 3 --on-seeds 2 $B --baseline-from experiments/mote/qwen/e64k8/s3264_baseline.json"
python experiments/mote/run_refusal.py $C --profile-tokens prompt --profile-dir experiments/mote/qwen/e64k8/s3264_profile --out experiments/mote/qwen/e64k8/s3264_prompt.json &
python experiments/mote/run_refusal.py $C --profile-tokens response --profile-dir experiments/mote/qwen/e64k8/s3264_profile --out experiments/mote/qwen/e64k8/s3264_response.json &
wait
python experiments/mote/run_refusal.py --merge experiments/mote/qwen/e64k8/s3264_prompt.json experiments/mote/qwen/e64k8/s3264_response.json --out experiments/mote/qwen/e64k8/s3264.json
# Replication on another prompt split (split seed 1: other profiling and held-out prompts), response tokens, k = 64, off only:
python experiments/mote/run_refusal.py --model /root/qwen-moe-build/e64k8s3264-refit --runtime-top-k 8 --ks 64 --seeds 3 $B --split-seed 1 --profile-tokens response --only " off " --profile-dir experiments/mote/qwen/e64k8/s3264_split1_profile --out experiments/mote/qwen/e64k8/s3264_split1_response.json
# The split-0 response-token k = 64 contrast on 160 held-out harmful prompts (the first 64 are those above), the same profile:
python experiments/mote/run_refusal.py --model /root/qwen-moe-build/e64k8s3264-refit --runtime-top-k 8 --ks 64 --seeds 3 --heldout 160 --heldout-harmless 32 --max-new-tokens 16 --ppl-texts 4 --batch-size 32 --threads 1 --profile-tokens response --only " off " --reuse-profile --profile-dir experiments/mote/qwen/e64k8/s3264_profile --out experiments/mote/qwen/e64k8/s3264_n160_response.json

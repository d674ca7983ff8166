#!/bin/bash
# MoTE refusal run on the near-dense Qwen build (16 experts x 100 + 3,264 shared, top-12), rebuilt 2026-12-07 on an
# Intel Xeon (sha256 1c3401b5...6a56f; the AMD build of 2026-12-06 was ea23643e...ac085), at the prompt counts of
# the fine-grained run (experiments/mote/qwen/e64k8): k = 16 experts switched = 1,600 neurons, as k = 64 there.
#   python experiments/moe_build/qwen_build.py build --out /root/qwen-moe-build/e16k12s3264c6k --experts 16 --top-k 12 --shared-neurons 3264 --calib-tokens 6144 --threads 1
B="--heldout 64 --heldout-harmless 32 --max-new-tokens 16 --ppl-texts 4 --batch-size 32 --threads 1"
python experiments/mote/run_refusal.py --model /root/qwen-moe-build/e16k12s3264c6k --runtime-top-k 12 --baseline-only $B --out experiments/mote/qwen/e16k12_n64/baseline.json
C="--model /root/qwen-moe-build/e16k12s3264c6k --runtime-top-k 12 --ks 16 --seeds 3 --on-seeds 2 $B --baseline-from experiments/mote/qwen/e16k12_n64/baseline.json"
python experiments/mote/run_refusal.py $C --profile-tokens response --profile-dir experiments/mote/qwen/e16k12_n64/profile --out experiments/mote/qwen/e16k12_n64/response.json &
python experiments/mote/run_refusal.py $C --profile-tokens prompt --profile-dir experiments/mote/qwen/e16k12_n64/profile --out experiments/mote/qwen/e16k12_n64/prompt.json &
wait
python experiments/mote/run_refusal.py --merge experiments/mote/qwen/e16k12_n64/prompt.json experiments/mote/qwen/e16k12_n64/response.json --out experiments/mote/qwen/e16k12_n64/e16k12_n64.json

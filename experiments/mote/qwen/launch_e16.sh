#!/bin/bash
# MoTE refusal run on the near-dense Qwen build, split over 3 processes (joined with --merge)
cd /work/wt/fidelity-mote
M=/root/qwen-moe-build/e16k12s3264c6k
O=experiments/mote/qwen
C="--model $M --runtime-top-k 12 --ks 16 --seeds 3 --heldout 24 --heldout-harmless 12 --max-new-tokens 16 --ppl-texts 4 --batch-size 24"
L=/root/qwen-moe-build/logs
OMP_NUM_THREADS=1 nohup timeout 3000 nice -n 10 .venv/bin/python experiments/mote/run_refusal.py $C --profile-tokens prompt --only "^top-" --profile-dir $O/e16k12_profile --out $O/e16k12_a.json > $L/e16k12_a.log 2>&1 &
sleep 3
OMP_NUM_THREADS=1 nohup timeout 3000 nice -n 10 .venv/bin/python experiments/mote/run_refusal.py $C --profile-tokens prompt --only "^random-" --profile-dir $O/e16k12_profile_b --baseline-from $O/e16k12_a.json --out $O/e16k12_b.json > $L/e16k12_b.log 2>&1 &
sleep 3
OMP_NUM_THREADS=1 nohup timeout 3000 nice -n 10 .venv/bin/python experiments/mote/run_refusal.py $C --profile-tokens response --seeds 1 --profile-dir $O/e16k12_profile --baseline-from $O/e16k12_a.json --out $O/e16k12_c.json > $L/e16k12_c.log 2>&1 &

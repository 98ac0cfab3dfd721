#!/usr/bin/env bash
# What a session with a GPU runs, in one command (about 10 minutes on one H100/H200-class GPU):
#   bash tools/gpu_check.sh
# 1. The demo model on CUDA, unquantized and quantized, against the CPU's answers (bf16 may
#    change a few). 2. 7B-shaped random weights, compiled decode step: bf16, int8, int4, batch 1
#    (compare with gpt-fast's A100 figures: 104.9 / 155.6 / 196.8 tok/s). Results in gpu-check.jsonl.
set -euo pipefail
out=${OUT:-.}
for scheme in none int8 int4; do
    python -m tools.evaluate_demo_model --device cuda --questions 50 --quiet --quantize "$scheme"
done
python -m llama.bench --shape 7B --device cuda --compile --quantize none,int8,int4 --json_path "$out/gpu-check.jsonl"

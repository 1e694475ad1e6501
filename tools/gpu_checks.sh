#!/usr/bin/env bash
# The checks that need a GPU, as one script for a short lease of a CUDA machine (issue 17 and the CUDA tests):
#
#   DEVICE=cuda tools/gpu_checks.sh [DIR]      # from the repository root; DEVICE=cpu tries the script here
#
# 1. the CUDA tests (`pytest -m cuda`: the losses, heads and metrics on the GPU against the CPU), named by file:
#    collecting the whole suite there fails on what the machine's image lacks (fastapi, faiss, ...);
# 2. `torchrun --nproc-per-node 2 -m logitsep train ... --shard-head` against one process on the same data, on
#    digits (10 classes, the test suite's CPU comparison) and on 10^5 synthetic classes; with one GPU the two
#    processes share it over gloo (logitsep.distributed.cuda_placement). tools/compare_weights.py writes the
#    largest differences of the two runs' model.safetensors.
# Everything lands in DIR (default results/gpu): machine.txt, pytest_cuda.txt, <case>-{one,two}.json and .err,
# <case>-compare.json. Uses the python3 on the PATH (the machine's own torch) with src/ on PYTHONPATH.
set -u
out=${1:-results/gpu}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
work=$(mktemp -d)

{ date -u; nvidia-smi -L 2>/dev/null; lscpu | grep -m1 "Model name"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  'devices', torch.cuda.device_count())"; } > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

if [ "$device" = cuda ]; then
  timeout 300 python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_classifier.py tests/test_cosine.py \
    tests/test_heads.py tests/test_losses_reference.py tests/test_metrics.py tests/test_metrics_blocks.py \
    tests/test_topk.py > "$out/pytest_cuda.txt" 2>&1
  echo "pytest -m cuda: exit $?; $(tail -1 "$out/pytest_cuda.txt")"
fi

timeout 120 python3 tools/synthetic_arrays.py --classes 100000 --dim 64 --per-class-train 2 --eval 2000 \
  --out "$work/k100000" > /dev/null

# case name, then the training arguments shared by the one- and two-process runs
run_case() {
  local name=$1; shift
  local t0 t1 t2
  t0=$(date +%s%N)
  timeout 240 python3 -m logitsep train "$@" --device "$device" --out "$work/$name-one" --json \
    > "$out/$name-one.json" 2> "$out/$name-one.err"
  echo "$name one process: exit $?"
  t1=$(date +%s%N)
  timeout 240 python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m logitsep train "$@" --shard-head \
    --device "$device" --out "$work/$name-two" --json > "$out/$name-two.json" 2> "$out/$name-two.err"
  echo "$name two processes --shard-head: exit $?"
  t2=$(date +%s%N)
  python3 tools/compare_weights.py "$work/$name-one/model.safetensors" "$work/$name-two/model.safetensors" \
    --note "wall ms (process start, training, evaluation): one $(((t1 - t0) / 1000000)), two $(((t2 - t1) / 1000000))" | tee "$out/$name-compare.json"
}

run_case digits --dataset digits --loss batch_ce --steps 6 --batch-size 32 --lr 0.1 --seed 5 --weight-decay 1e-3
run_case k100000 --data "$work/k100000" --model linear --loss ce --steps 50 --batch-size 512 --lr 0.5 --seed 1
rm -rf "$work"

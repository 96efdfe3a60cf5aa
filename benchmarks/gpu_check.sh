#!/usr/bin/env bash
# The GPU check, one prepared run of at most ~8 minutes on a machine with one CUDA GPU:
#   1. the CUDA tests (pytest -m cuda: batches on the GPU equal CPU batches, NCCL distributed steps);
#   2. one epoch of the CIFAR DNA at the paper's batch 1250 on the CIFAR-10 subset under bf16, against a
#      bare loop, with host synchronisations per step counted by CUDA (benchmarks/dna_epoch.py);
#   3. the correlation-loss benchmark on the GPU (benchmarks/correlation_loss.py --device cuda);
#   4. the transfer-evaluation benchmark on the GPU (benchmarks/transfer_eval_foreign.py --device cuda).
# Each step's JSON goes to $RESULTS (default benchmarks/results; on the device tool's machine pass
# RESULTS=$OUT), named *_gpu.json, and a summary line per step to $RESULTS/gpu_check.log. A step that fails
# is reported and the next one still runs; the exit status is the number of failed steps.
#
#   PYTHON=python3 DATA=path/to/cifar10_subset.npz RESULTS=$OUT bash benchmarks/gpu_check.sh
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU at tiny sizes (tests/test_gpu_check.py), to check
# the script itself where no GPU is lent.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
DATA=${DATA:-../shared/data/cifar10-subset/cifar10_subset.npz}
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$RESULTS/gpu_check.log"
: > "$LOG"
failed=0

if [ "$DEVICE" = cpu ]; then  # tiny sizes: the script's plumbing, not its timings
  DNA_ARGS="--train-subset 920 --test-subset 20 --batch-size 460 --mixed-precision no --repeats 1"
  CORR_ARGS="--repeats 1"
  TRANSFER_ARGS="--num-samples 8 --steps 1 --batch-size 8 --repeats 1"
  PYTEST_ARGS="-m cuda tests/test_data.py"
else
  DNA_ARGS="--mixed-precision bf16 --repeats 2"
  CORR_ARGS="--repeats 7"
  TRANSFER_ARGS="--num-samples 1000 --steps 10 --batch-size 500 --repeats 2"
  PYTEST_ARGS="-m cuda tests"
fi

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name: $*" >&2
  if timeout "$limit" "$@" > "$RESULTS/$name.out" 2>&1; then
    echo "ok   $name $((SECONDS - start)) s" | tee -a "$LOG"
  else
    echo "FAIL $name (exit $?) $((SECONDS - start)) s; last lines:" | tee -a "$LOG"
    tail -n 15 "$RESULTS/$name.out" | tee -a "$LOG"
    failed=$((failed + 1))
  fi
}

"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee -a "$LOG"
step cuda_tests 240 "$PYTHON" -m pytest -q -p no:cacheprovider $PYTEST_ARGS
step dna_epoch_gpu 240 "$PYTHON" benchmarks/dna_epoch.py --dataset "$DATA" --device "$DEVICE" $DNA_ARGS \
  --json "$RESULTS/dna_epoch_gpu.json"
step correlation_loss_gpu 120 "$PYTHON" benchmarks/correlation_loss.py --device "$DEVICE" $CORR_ARGS \
  --json "$RESULTS/correlation_loss_gpu.json"
step transfer_eval_gpu 180 "$PYTHON" benchmarks/transfer_eval_foreign.py --dataset "$DATA" --device "$DEVICE" \
  $TRANSFER_ARGS --json "$RESULTS/transfer_eval_gpu.json"
echo "failed steps: $failed" | tee -a "$LOG"
exit "$failed"

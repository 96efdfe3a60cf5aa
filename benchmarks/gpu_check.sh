#!/usr/bin/env bash
# The GPU check, one prepared run of at most ~8 minutes on a machine with one CUDA GPU:
#   1. the CUDA tests (pytest -m cuda: batches on the GPU equal CPU batches, NCCL distributed steps);
#   2. one epoch of the CIFAR DNA at the paper's batch 1250 on the CIFAR-10 subset under bf16, against a
#      bare loop, with host synchronisations per step counted by CUDA (benchmarks/dna_epoch.py);
#   3. the correlation-loss benchmark on the GPU (benchmarks/correlation_loss.py --device cuda);
#   4. the transfer-evaluation benchmark on the GPU (benchmarks/transfer_eval_foreign.py --device cuda);
#   5. an fp16 run of the CIFAR ResNet-20 classifier, then --resume: the GradScaler's state must be in the
#      checkpoint and come back (resume_fp16.out says what was found);
#   6. evaluation at scale (benchmarks/gpu_scale.py): a transfer matrix on 1 process against one process per
#      GPU (results equal, the speed-up), and an ensemble spread over the GPUs (or GPU 0 and the CPU on a
#      one-GPU machine) against the same ensemble in one place.
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
  SCALE_ARGS="--num-samples 16 --batch-size 4 --steps 1 --members 2"
  PYTEST_ARGS="-m cuda tests/test_data.py"
  PRECISION=no
else
  DNA_ARGS="--mixed-precision bf16 --repeats 2"
  CORR_ARGS="--repeats 7"
  TRANSFER_ARGS="--num-samples 1000 --steps 10 --batch-size 500 --repeats 2"
  SCALE_ARGS="--num-samples 1000 --batch-size 250 --steps 10 --members 4"
  PYTEST_ARGS="-m cuda tests"
  PRECISION=fp16
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
RUN="$RESULTS/resume_run"
rm -rf "$RUN"
TRAIN="train/classifier.py --arch resnet20 --dataset $DATA --train-subset 512 --test-subset 256 --batch-size 128"
TRAIN="$TRAIN --mixed-precision $PRECISION --no-tensorboard --run-dir $RUN"
step resume_fp16 240 bash -c "$PYTHON $TRAIN --epochs 1 && $PYTHON $TRAIN --epochs 2 --resume && $PYTHON -c '
import json, sys
c = json.load(open(sys.argv[1]))
print(\"precision\", c[\"precision\"], \"epoch\", c[\"epoch\"], \"resumes\", len(c.get(\"resumes\", [])), \"grad_scaler\", c.get(\"grad_scaler\"))
assert c[\"epoch\"] == 2 and len(c[\"resumes\"]) == 1
assert (c[\"precision\"] != \"fp16\") or c.get(\"grad_scaler\"), \"fp16 run without GradScaler state\"
' $RUN/checkpoint/config.json"
rm -rf "$RUN"
step gpu_scale 240 "$PYTHON" benchmarks/gpu_scale.py --device "$DEVICE" --dataset "$DATA" $SCALE_ARGS \
  --json "$RESULTS/gpu_scale.json"
echo "failed steps: $failed" | tee -a "$LOG"
exit "$failed"

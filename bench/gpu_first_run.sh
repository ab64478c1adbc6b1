#!/usr/bin/env bash
# The first run of xbt on a GPU (issue 30): one command, under 10 minutes on one GPU once set up, everything
# written under one folder. From the repository root of a fresh checkout:
#
#   bash bench/gpu_first_run.sh OUTDIR
#
# Steps, each with its own time limit, log (OUTDIR/<step>.log) and exit status (OUTDIR/steps.tsv); a step
# that fails does not stop the next:
#   setup      ./run.sh setup (the Python environment and the offline data; minutes on a fresh machine, not
#              counted in the 10)
#   detect     nvidia-smi and torch's view of CUDA; without a GPU the run says so, writes the GPU check's
#              "not measured" figure and stops (exit 0: nothing was measured, nothing is made up)
#   gpu-check  bench/gpu_check.py (ViT-B-32 at fp32 / bf16 / fp16: images/s, texts/s, GPU vs CPU cosine; XBT
#              training steps/s) -> OUTDIR/gpu.json, written after every step
#   tests      the GPU-marked tests (XBT_TEST_GPU=1: encoders vs the CPU by cosine, a compatible model on the
#              GPU, training, the two-process DDP refusal on one GPU, `xbt upgrade --device cuda` on tiny local
#              open_clip and HF CLIP checkpoints -> OUTDIR/upgrade-local-checkpoints), then the device and
#              compatible-model tests with the GPU visible -> OUTDIR/*.xml
#   ddp        `xbt train --nproc 2 --device cuda` (two processes, one GPU each): on one GPU the expected refusal,
#              before any data is read
# Then copy OUTDIR/gpu.json to bench/results/gpu.json to commit the figures.
set -uo pipefail

usage() { echo "usage: bash bench/gpu_first_run.sh OUTDIR   (from the repository root; OUTDIR is created)" >&2; exit 2; }
[ $# -eq 1 ] && [ -n "$1" ] && [ "${1#-}" = "$1" ] || usage
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -x "$repo/run.sh" ] || { echo "gpu_first_run: $repo/run.sh not found: run this from an xbt checkout" >&2; exit 2; }
mkdir -p "$1" || { echo "gpu_first_run: cannot create $1" >&2; exit 2; }
out="$(cd "$1" && pwd)"
cd "$repo"
export XBT_HOME="${XBT_HOME:-$HOME/.cache/xbt}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
printf 'step\texit\tseconds\n' >"$out/steps.tsv"
say() { printf '\033[1;32m[gpu first run]\033[0m %s\n' "$*" | tee -a "$out/run.log" >&2; }

step() {  # step NAME LIMIT_S COMMAND...: run it with a time limit, its output in OUTDIR/NAME.log
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  say "$name (at most ${limit} s): $*"
  timeout --kill-after=20 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$out/steps.tsv"
  [ "$rc" -eq 0 ] && say "$name: done in $((SECONDS - t0)) s" || say "$name: exit $rc after $((SECONDS - t0)) s (see $out/$name.log)"
  return "$rc"
}

step setup 1800 ./run.sh setup
py="$(bash bench/python.sh 2>>"$out/setup.log")" || { say "no Python environment: see $out/setup.log"; exit 1; }
started=$SECONDS

# ----- detect ---------------------------------------------------------------------------------------------------
{ command -v nvidia-smi >/dev/null && nvidia-smi; } >"$out/nvidia-smi.txt" 2>&1
PYTHONPATH="$repo/src" "$py" - >"$out/detect.json" 2>>"$out/run.log" <<'PY'
import json, torch
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": cuda,
                  "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []}))
PY
if ! grep -q '"cuda_available": true' "$out/detect.json"; then
  say "no CUDA GPU on this machine (torch: $(cat "$out/detect.json" 2>/dev/null || echo 'did not start')): nothing to measure"
  step gpu-check 120 "$py" bench/gpu_check.py --out "$out/gpu.json"
  say "wrote $out/gpu.json (not measured); run this script on a machine with a CUDA GPU"
  exit 0
fi
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
say "CUDA GPU(s): $gpus ($(grep -o '"gpus": \[[^]]*\]' "$out/detect.json"))"

# ----- measure and test ----------------------------------------------------------------------------------------------
step gpu-check 180 "$py" bench/gpu_check.py --out "$out/gpu.json" --models ViT-B-32 --images 512 --texts 2048 --workers 4
step gpu-tests 210 env XBT_TEST_GPU=1 XBT_GPU_OUT="$out" ./run.sh test tests/test_gpu_device.py -rs -p no:cacheprovider \
  --junitxml="$out/gpu-tests.xml"
step device-tests 120 env XBT_TEST_GPU=1 ./run.sh test tests/test_devices.py tests/test_compatible_models.py \
  tests/test_meta_device.py tests/test_gpu_path.py -m "not slow" -rs -p no:cacheprovider --junitxml="$out/device-tests.xml"

# ----- the two-process DDP run: one GPU each, so on one GPU the refusal is the expected outcome -----------------------
if [ "$gpus" -lt 2 ]; then
  step ddp 60 ./run.sh xbt train --config xbt-testbed --out "$out/ddp" --nproc 2 --device cuda
  ddp_rc=$(awk -F'\t' '$1 == "ddp" { print $2 }' "$out/steps.tsv")
  if [ "$ddp_rc" -ne 0 ] && grep -q "training processes on this machine but" "$out/ddp.log"; then
    say "ddp: refused on $gpus GPU, as expected"
  else
    say "ddp: NOT refused as expected on $gpus GPU (exit $ddp_rc): see $out/ddp.log"
  fi
else
  say "ddp: $gpus GPUs: train on two processes with tests/test_train_distributed.py (its --device cpu -> cuda)"
fi

# The limits above add up to 570 s: the whole run after set-up stays under 10 minutes on one GPU.
say "done in $((SECONDS - started)) s after set-up; results under $out (steps.tsv, gpu.json, *.log, *.xml)"
say "to commit the figures: cp $out/gpu.json bench/results/gpu.json"

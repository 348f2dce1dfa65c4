#!/usr/bin/env bash
# The prepared GPU check (see bench/gpu_check.py): attention kernels (flash3, flash,
# torch_varlen, sdpa) vs reference, the LM-head GEMMs' dtypes in the chunked loss, 1b
# throughput with MFU under both conventions (per-document and whole-window causal), a 20-step
# ZeRO-2 pretrain and the same with model.compile=true (the compiled row: tokens/s against it,
# compile time apart). Needs one CUDA GPU and PyTorch; nothing is downloaded.
#
#   bash bench/gpu_check.sh [--skip-pretrain] [--out DIR] [--cpu-dry-run]
#
# WHEELS_DIR=/path/with/*.whl installs handed-over wheels first (flash-attn, deepspeed, ...)
# from that folder only. GPU_CHECK_TIMEOUT (default 470 s) bounds the whole run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"

if [ -n "${WHEELS_DIR:-}" ] && compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
  "$PY" -m pip install --no-index --find-links "$WHEELS_DIR" "$WHEELS_DIR"/*.whl \
    || echo "gpu_check: some wheels in $WHEELS_DIR did not install; continuing" >&2
fi

# longtrain maps its top-level folders onto longtrain.<room>; without `pip install -e .` (no
# network, no dependencies here) a folder of symlinks gives the same import names.
if ! "$PY" -c "import longtrain.model.config" 2>/dev/null; then
  SHIM="$(mktemp -d)"
  mkdir -p "$SHIM/longtrain"
  for room in model data train launch; do ln -s "$ROOT/$room" "$SHIM/longtrain/$room"; done
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi

exec timeout --kill-after=10 "${GPU_CHECK_TIMEOUT:-470}" "$PY" bench/gpu_check.py "$@"

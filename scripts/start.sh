#!/usr/bin/env bash
# Set up (first time only) and open the dashboard on http://localhost:8501 with the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_EVALUATE_OFFLINE="${HF_EVALUATE_OFFLINE:-1}"
# Convert the bundled GGUF model to its safetensors cache now, so the first training starts fast.
.venv/bin/python -c "from core.models import default_model_folder; print('default model:', default_model_folder())"
exec .venv/bin/streamlit run app/main.py --server.address "${RANK_STUDIO_ADDRESS:-localhost}" --server.port "${RANK_STUDIO_PORT:-8501}" "$@"

#!/usr/bin/env bash
# Set up (if needed) and predict the band gaps of the example crystals with the shipped BaLoRA
# model next to the shipped LoRA ensemble (5 members). Works offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
matbalora predict data/examples --ensemble "$@"

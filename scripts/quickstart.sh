#!/usr/bin/env bash
# The main job on the default model: set up, profile + allocate + export at budget 0.3, generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
baklava-export --model smollm2-135m --budget 0.3 --out build/smol --force
baklava-run build/smol --prompt "Give three tips for writing clear documentation."

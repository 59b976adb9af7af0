#!/usr/bin/env bash
# The CUDA checks, as one prepared device run (the `device` tool's `run`, from the repo
# root, no install: the device image has torch, transformers and peft; the engine bench needs
# neither trl nor msgspec). Writes everything under $OUT:
#   env.txt          torch / GPU versions
#   smoke.json       the engine against model.generate on CUDA (fp32 exact, bf16 agreement)
#   engine-cuda.*    `mace bench engine` on a ~1B random Llama in bf16, with both peers
# Budget: about 5-8 minutes on an H200 (building the 1B model on the CPU is most of it).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
python3 scripts/cuda_smoke.py --device cuda --out "$OUT/smoke.json" 2>&1 | tail -8
# The engine bench is driven through its own parser, so nothing but its module is imported.
python3 -c "from engine.demo_model import build_demo_model; print(build_demo_model('/tmp/demo-1b', '1b'))" 2>&1 | tail -1
python3 - "$OUT" <<'PY' 2>&1 | tail -20
import argparse, sys
from bench import engine
out = sys.argv[1]
sys.argv = ["mace", "bench", "engine", "--model", "/tmp/demo-1b", "--device", "cuda", "--dtype", "bfloat16",
            "--rounds", "1", "--kv-cache-bytes", str(8 << 30), "--out", f"{out}/engine-cuda.json"]
parser = argparse.ArgumentParser()
engine.add_arguments(parser)
engine.main(parser.parse_args(sys.argv[3:]))
PY

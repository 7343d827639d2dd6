#!/usr/bin/env bash
# GPU check of the trainer, run as is from the repository root on a machine with one GPU (offline is fine), in under
# 8 minutes:
#   1. a small FLAIR-HUB dataset in its real layout (maestro-data demo-data) built into shards on local disk;
#   2. MAESTRO-B bf16 pretrain and finetune optimizer steps: samples/s and MFU (peak by GPU name), fed by the stream
#      loader from those shards vs by synthetic batches on the GPU (benchmarks/gpu_check.py);
#   3. a short real `maestro-train` run (pretrain + finetune, one epoch each, train.deterministic) on the shards.
# The last line printed is one JSON object with every figure.
#
# Python: $PYTHON if set, else .venv/bin/python (from `bash scripts/setup.sh`), else `python` on PATH; it needs torch
# and the project's requirements (the project itself need not be installed: it is put on PYTHONPATH).
# Options (environment): MAESTRO_GPU_CHECK_TINY=1 (or the argument --tiny): tiny model on the CPU, few tiles, to
# test this script without a GPU (minutes on 2 cores); MAESTRO_GPU_CHECK_DIR: work folder (default: a fresh temp
# folder, removed at the end); MAESTRO_GPU_CHECK_TILES, _BATCH, _WORKERS: dataset size, batch size, loader workers.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TINY=${MAESTRO_GPU_CHECK_TINY:-0}
[ "${1:-}" = "--tiny" ] && TINY=1

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python
elif command -v python >/dev/null 2>&1; then PY=python
else PY=python3
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "gpu_check: '$PY' cannot import torch: run 'bash scripts/setup.sh' (needs the network once) or set" \
       "PYTHON to a Python with torch and this project's requirements (pyproject.toml)" >&2
  exit 2
fi

if [ -n "${MAESTRO_GPU_CHECK_DIR:-}" ]; then
  WORK=$MAESTRO_GPU_CHECK_DIR; mkdir -p "$WORK"
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/maestro-gpu-check.XXXXXX"); trap 'rm -rf "$WORK"' EXIT
fi
# the project importable without installing it: its packages from the tree (maestro_cli lives in cli/)
mkdir -p "$WORK/pyshim"
ln -sfn "$ROOT/cli" "$WORK/pyshim/maestro_cli"
export PYTHONPATH="$ROOT:$WORK/pyshim${PYTHONPATH:+:$PYTHONPATH}"
if ! missing=$("$PY" -c "import maestro_cli.data, maestro_model.train" 2>&1); then
  echo "gpu_check: '$PY' lacks a requirement of the project: $(echo "$missing" | tail -n 1)" >&2
  exit 2
fi
CPUS=$("$PY" -c "import os; print(len(os.sched_getaffinity(0)))")

if [ "$TINY" = 1 ]; then
  TILES=${MAESTRO_GPU_CHECK_TILES:-12}; BATCH=${MAESTRO_GPU_CHECK_BATCH:-2}; WORKERS=${MAESTRO_GPU_CHECK_WORKERS:-1}
  CHECK=(--tiny --warmup 1 --steps 1)
  TRAIN=(--config configs/demo.toml --cpu --precision no)
else
  TILES=${MAESTRO_GPU_CHECK_TILES:-64}; BATCH=${MAESTRO_GPU_CHECK_BATCH:-16}
  WORKERS=${MAESTRO_GPU_CHECK_WORKERS:-$(( CPUS > 9 ? 8 : (CPUS > 2 ? CPUS - 1 : 1) ))}
  CHECK=(--size base --warmup 3 --steps 10)
  TRAIN=(--size base --precision bf16)
fi
now() { "$PY" -c "import time; print(time.time())"; }
echo "gpu_check: python $PY, work folder $WORK, $TILES tiles, batch $BATCH, $WORKERS loader workers" >&2

t0=$(now)
"$PY" -m maestro_cli.data demo-data flair-hub --out "$WORK/raw" --tiles "$TILES" >/dev/null
"$PY" -m maestro_cli.data build flair-hub --src "$WORK/raw/flair-hub" --out "$WORK/built" \
  --workers "$(( CPUS > 8 ? 8 : CPUS ))" --quiet >/dev/null
t1=$(now)

"$PY" benchmarks/gpu_check.py --shards "$WORK/built/shards" --batch "$BATCH" --workers "$WORKERS" "${CHECK[@]}" \
  | tee "$WORK/steps.log"
t2=$(now)

# the trainer itself: one epoch of pretraining and of fine-tuning (probing skipped), deterministic algorithms on
"$PY" -m maestro_model.train run "${TRAIN[@]}" --manifest flair-hub --index "$WORK/built/shards" \
  --output-dir "$WORK/train" --batch-size "$(( BATCH > 8 ? 8 : BATCH ))" --workers "$WORKERS" --quiet \
  --deterministic --set pretrain.epochs=1 --set probe.epochs=0 --set finetune.epochs=1 >/dev/null
t3=$(now)

"$PY" - "$WORK" "$t0" "$t1" "$t2" "$t3" "$TILES" <<'EOF'
import json, sys
from pathlib import Path
work, t0, t1, t2, t3, tiles = Path(sys.argv[1]), *map(float, sys.argv[2:6]), int(sys.argv[6])
result = json.loads((work / "steps.log").read_text().splitlines()[-1])
summary = json.loads((work / "train" / "summary.json").read_text())
result["trainer"] = {p: {"steps": s["steps"], "global_batch": s["global_batch"], "samples_per_s": s["samples_per_s"],
                         **{k: v for k, v in s.get("test", {}).items() if "loss" in k}} for p, s in summary.items()}
result.update(tiles=tiles, data_s=round(t1 - t0, 1), steps_s=round(t2 - t1, 1), trainer_s=round(t3 - t2, 1),
              total_s=round(t3 - t0, 1))
print(json.dumps(result))
EOF

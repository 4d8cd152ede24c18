"""CAFace style statistics from any ONNX recognition model, by graph surgery on a copy of its ONNX.

    card = add_style_taps(ModelCard.load("models/mine"))             # taps chosen from the graph
    card = add_style_taps(card, taps=["stage2_out", "stage3_out"])  # or named

CAFace reads, beside each face's embedding, its "style": the per-channel mean and standard deviation
of a few intermediate feature maps (`training.export.style_statistics`). A model we did not train
has no such output, so we add one to a copy of its graph. The taps are 4-D tensors (N, C_i, h_i, w_i):
by default, for each spatial resolution the graph computes (shape inference at the card's input size),
the output of the last node producing that resolution, shallowest first, the deepest MAX_TAPS kept;
maps of a single position are skipped (their standard deviation is undefined). Per tap:

    mean_i = GlobalAveragePool(x)                                    (N, C, 1, 1)
    std_i  = sqrt(GlobalAveragePool((x − mean_i)²) · n/(n − 1))      n = h·w, torch.std's divisor
    Concat([mean_i, std_i], axis 2) -> (N, C, 2, 1), Flatten -> (N, 2C) = (mean_1, std_1, mean_2, …)

and the taps are concatenated into the output "style" (N, 2·Σ C_i): exactly the layout of the card's
`outputs.style` and `style_channels`. Only operators unchanged since opset 9 are used, so the copy keeps
the model's opset. The user's file is only read: the copy is written beside the card (temp file,
fsync, os.replace) and the card is pointed at it after the check that the copy's embedding equals
the original's on the same inputs. Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, shape_inference

from engines.atomic import atomic_write_bytes, sha256_file
from engines.base import preprocess
from engines.model_card import CARD_FILENAME, ModelCard, ModelCardError

MAX_TAPS = 5
STYLE_OUTPUT = "style"
CHECK_FACES = 8
MAX_ABS_DIFF = 1e-4  # the copy computes the same embedding: only the kernels ORT picks may differ


class StyleTapError(ModelCardError):
    """No usable taps, a named tap that is not a feature map, or a copy that changed the embedding."""


@dataclass(frozen=True)
class FeatureMap:
    name: str
    channels: int
    height: int
    width: int
    node: int  # position of its producing node in the graph (topological order)


def _input(graph: onnx.GraphProto) -> onnx.ValueInfoProto:
    initialisers = {i.name for i in graph.initializer}
    (graph_input,) = [i for i in graph.input if i.name not in initialisers]
    return graph_input


def feature_maps(model: onnx.ModelProto, size: int) -> list[FeatureMap]:
    """Every float (N, C, h, w) node output with known C, h, w when the input is (1, 3, size, size)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for dim, value in zip(_input(probe.graph).type.tensor_type.shape.dim, (1, 3, size, size)):
        dim.Clear()
        dim.dim_value = value
    del probe.graph.value_info[:]
    inferred = shape_inference.infer_shapes(probe).graph
    shapes = {v.name: v.type.tensor_type for v in [*inferred.value_info, *inferred.output]}
    maps = []
    for k, node in enumerate(model.graph.node):
        for out in node.output:
            t = shapes.get(out)
            if t is None or t.elem_type != TensorProto.FLOAT or len(t.shape.dim) != 4:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
            if all(dims[1:]):
                maps.append(FeatureMap(out, *dims[1:], k))
    return maps


def choose_taps(maps: list[FeatureMap], taps: list[str] | None = None, limit: int = MAX_TAPS) -> list[FeatureMap]:
    """The named maps (graph order), or the last map of each resolution, shallowest first, the deepest `limit`."""
    usable = [m for m in maps if m.height * m.width >= 2]
    if taps:
        by_name = {m.name: m for m in usable}
        missing = [t for t in taps if t not in by_name]
        if missing:
            raise StyleTapError(f"taps {missing} are not float (N, C, h, w) maps of more than one position; "
                                f"candidates: {', '.join(m.name for m in usable[-20:])}")
        return sorted((by_name[t] for t in dict.fromkeys(taps)), key=lambda m: m.node)
    last: dict[tuple[int, int], FeatureMap] = {}
    for m in usable:
        last[(m.height, m.width)] = m
    chosen = sorted(last.values(), key=lambda m: m.node)[-limit:]
    if not chosen:
        raise StyleTapError("the graph has no 4-D feature map of known shape to tap")
    return chosen


def _tap_nodes(m: FeatureMap, k: int) -> tuple[list[onnx.NodeProto], str]:
    p = f"faceset_style/{k}/"
    n = m.height * m.width
    scale = numpy_helper.from_array(np.array(n / (n - 1), np.float32))
    nodes = [
        helper.make_node("Constant", [], [p + "unbiased"], value=scale),  # a node, not an initialiser: IR 3 needs
        # every initialiser listed as a graph input
        helper.make_node("GlobalAveragePool", [m.name], [p + "mean"]),  # (N, C, 1, 1)
        helper.make_node("Sub", [m.name, p + "mean"], [p + "centred"]),
        helper.make_node("Mul", [p + "centred", p + "centred"], [p + "squared"]),
        helper.make_node("GlobalAveragePool", [p + "squared"], [p + "var_biased"]),
        helper.make_node("Mul", [p + "var_biased", p + "unbiased"], [p + "var"]),
        helper.make_node("Sqrt", [p + "var"], [p + "std"]),
        helper.make_node("Concat", [p + "mean", p + "std"], [p + "pair"], axis=2),  # (N, C, 2, 1)
        helper.make_node("Flatten", [p + "pair"], [p + "stats"], axis=1),  # (N, 2C): mean_c, std_c interleaved
    ]
    return nodes, p + "stats"


def with_style_output(model: onnx.ModelProto, taps: list[FeatureMap], name: str = STYLE_OUTPUT) -> onnx.ModelProto:
    """A copy of `model` with the output `name` (N, 2·Σ C_i) holding the taps' per-channel mean and std."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    graph = tapped.graph
    stats = []
    for k, m in enumerate(taps):
        nodes, out = _tap_nodes(m, k)
        graph.node.extend(nodes)
        stats.append(out)
    graph.node.append(helper.make_node("Concat", stats, [name], axis=1))  # (N, 2·Σ C_i), shallowest first
    batch = _input(graph).type.tensor_type.shape.dim[0]
    graph.output.append(helper.make_tensor_value_info(
        name, TensorProto.FLOAT, [batch.dim_value if batch.HasField("dim_value") else (batch.dim_param or "N"),
                                  2 * sum(m.channels for m in taps)]))
    onnx.checker.check_model(tapped)
    return tapped


def embedding_difference(card: ModelCard, other: ModelCard, faces: np.ndarray) -> float:
    """Largest |Δ| between the two cards' raw embeddings (no TTA) of aligned uint8 RGB faces (N, S, S, 3)."""
    x = preprocess(faces, card)
    a, b = (_embeddings(c, x) for c in (card, other))
    return float(np.abs(a.astype(np.float64) - b).max())


def _embeddings(card: ModelCard, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(card.onnx_path), options, providers=["CPUExecutionProvider"])
    graph_input = session.get_inputs()[0]
    step = graph_input.shape[0] if isinstance(graph_input.shape[0], int) else len(x)  # a fixed batch is padded up
    out = []
    for start in range(0, len(x), step):
        chunk = x[start : start + step]
        padded = np.concatenate([chunk, np.zeros((step - len(chunk), *x.shape[1:]), np.float32)])
        out.append(session.run([card.outputs.embedding], {graph_input.name: padded})[0][: len(chunk)])
    return np.concatenate(out)


def add_style_taps(card: ModelCard, out_dir: str | Path | None = None, taps: list[str] | None = None,
                     faces: np.ndarray | None = None) -> ModelCard:
    """The card, its ONNX copied with a style output into out_dir (default: the card's folder), saved there.

    The card's other sections are kept: the embedding is the same function, checked on `faces` (aligned
    uint8 RGB, (N, S, S, 3)) and CHECK_FACES random ones; StyleTapError past MAX_ABS_DIFF, and nothing is kept.
    """
    if card.outputs.style is not None:
        raise StyleTapError(f"model {card.name} {card.version} already has the style output {card.outputs.style!r}")
    out_dir = Path(out_dir) if out_dir is not None else card.root
    source = onnx.load(str(card.onnx_path))
    names = {o.name for o in source.graph.output} | {o for n in source.graph.node for o in n.output}
    chosen = choose_taps(feature_maps(source, card.input.size), taps)
    output = STYLE_OUTPUT if STYLE_OUTPUT not in names else "faceset_style"
    onnx_path = out_dir / f"{card.onnx_path.stem}-style.onnx"
    atomic_write_bytes(onnx_path, with_style_output(source, chosen, output).SerializeToString())
    data = card.model_dump(mode="python")
    data["files"]["onnx"] = {"path": onnx_path.name, "sha256": sha256_file(onnx_path)}
    data["outputs"].update(style=output, style_channels=[m.channels for m in chosen])
    new = ModelCard.model_validate(data).set_root(out_dir)
    rng = np.random.default_rng(0)
    random = rng.integers(0, 256, size=(CHECK_FACES, card.input.size, card.input.size, 3), dtype=np.uint8)
    checked = random if faces is None else np.concatenate([faces, random])
    diff = embedding_difference(card, new, checked)
    if not diff <= MAX_ABS_DIFF:  # NaN fails too
        onnx_path.unlink()
        raise StyleTapError(f"the tapped copy's embedding differs from {card.onnx_path.name}'s by {diff:.2e} "
                            f"(max |Δ| allowed {MAX_ABS_DIFF:.0e})")
    taps_text = ", ".join(f"{m.name} ({m.channels}×{m.height}×{m.width})" for m in chosen)
    note = (f"style output {output!r} added by engines.style_taps to a copy of {card.files.onnx.path} (sha256 "
            f"{card.files.onnx.sha256}): per-channel mean and std of {taps_text}; the embedding is unchanged "
            f"(max |Δ| {diff:.1e} on {len(checked)} faces), so every measured section still holds.")
    new.provenance.notes = f"{new.provenance.notes.rstrip('. ')}. {note}" if new.provenance.notes else note
    new.save(out_dir / CARD_FILENAME)
    return new

"""Bring your own recognition model: a model card for someone else's ONNX, and a check of its input conventions.

    card = card_for_onnx("w600k_r50.onnx", Conventions("RGB", (127.5,) * 3, (127.5,) * 3), name="w600k-r50")
    crops, labels = check_faces(pipeline_for(card), "photos/")         # a folder per person, raw photos
    rows = check_conventions(build_engine("onnxruntime", card=card), card, crops, labels)
    refusal(rows)                                                       # None, or why the conventions are wrong
    publish_onnx(card, "models/w600k-r50")                              # a copy of the ONNX + card.yaml

The card takes the input size and the embedding size from the graph itself; what a graph does not
say (channel order, scaling, alignment, flip TTA) the user states, and a wrong statement does not
fail: the model runs and quietly loses accuracy. The check measures it instead. It detects and
aligns each photo once (MTCNN and the card's reference landmarks), then runs only the engine once per
candidate convention — the chosen one, RGB/BGR × the usual scalings, and the other flip-TTA setting —
and compares genuine/impostor separation over every pair of the check photos (`Separation`).

Nothing here imports torch. Checkpoints (.pth/.pt) need faceset-train's export (`service.model_cli`).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort

from engines.atomic import atomic_write, sha256_file
from engines.base import Engine, embed_aligned
from engines.error_rates import threshold_at_far
from engines.holdout import list_identities
from engines.model_card import CARD_FILENAME, ModelCard, ModelCardError
from engines.pipeline import FacePipeline
from engines.reference_landmarks import reference_names

NOT_STATED = "not stated by the user"
CHECK_FAR = 1e-2  # the check's TAR is read here: a few hundred impostor pairs cannot measure a stricter FAR
# "clearly worse": another channel order or scaling has a d′ above the chosen one's by more than this share of it.
# Measured on the anchors (4 groups of 6 lfw-dev people, 5 photos each): equivalent scalings (std 127.5 vs 128)
# differ by at most 0.3 %, a swapped channel order costs the right conventions 3.5-15 %. The default model (dlib's
# ResNet, nearly colour-blind) reads BGR with a d′ 1.2 % higher (10 CelebA-299 people). TAR at FAR 1e-2 moves in
# steps of one genuine pair (3 % with 30) and is often 100 %: it is reported, d′ decides.
REFUSE_MARGIN = 0.02
# (mean, std) of the usual scalings: insightface's (p − 127.5)/127.5, (p − 127.5)/128, and [0, 1]
SCALINGS = {"127.5/127.5": (127.5, 127.5), "127.5/128": (127.5, 128.0), "[0,1]": (0.0, 255.0)}


@dataclass(frozen=True)
class Conventions:
    """How the network reads an aligned face: x = (p − mean)/std per channel, channels in `channel_order`."""

    channel_order: str = "RGB"
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)
    flip_tta: bool = False

    @property
    def label(self) -> str:
        same = len(set(self.mean)) == 1 and len(set(self.std)) == 1
        scale = f"{self.mean[0]:g}/{self.std[0]:g}" if same else f"{list(self.mean)}/{list(self.std)}"
        return f"{self.channel_order} {'[0,1]' if scale == '0/255' else scale}{' flip' if self.flip_tta else ''}"

    def applied(self, card: ModelCard) -> ModelCard:
        """A copy of the card with these conventions (attached to the same folder)."""
        data = card.model_dump()
        data["input"].update(channel_order=self.channel_order, mean=list(self.mean), std=list(self.std))
        data["flip_tta"] = self.flip_tta
        return ModelCard.model_validate(data).set_root(card.root)

    @classmethod
    def of(cls, card: ModelCard) -> Conventions:
        return cls(card.input.channel_order, tuple(card.input.mean), tuple(card.input.std), card.flip_tta)


# ---- the card -----------------------------------------------------------------------------


def _dims(value_info) -> list[int | str]:
    """A graph tensor's shape: ints where fixed, the symbol (or '?') where not."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def graph_signature(onnx_path: Path, output: str | None = None) -> tuple[str, list, str, list]:
    """(input name, input shape, output name, output shape) of a one-input graph; `output` picks among several."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initialisers = {i.name for i in graph.initializer}
    # older exporters also list the weights as graph inputs: the real input is the one without data
    inputs = [i for i in graph.input if i.name not in initialisers]
    outputs = {o.name: o for o in graph.output}
    if len(inputs) != 1:
        raise ModelCardError(f"{onnx_path}: expected one input, found {[i.name for i in inputs]}")
    if output is None and len(outputs) != 1:
        raise ModelCardError(f"{onnx_path}: several outputs {sorted(outputs)}; name the embedding (--output)")
    out = outputs.get(output) if output else graph.output[0]
    if out is None:
        raise ModelCardError(f"{onnx_path}: no output {output!r}; the graph has {sorted(outputs)}")
    return inputs[0].name, _dims(inputs[0]), out.name, _dims(out)


def _embedding_size(onnx_path: Path, size: int, output: str, shape: list) -> int:
    """D from the graph, or from one inference on a zero face where the graph leaves it symbolic."""
    if len(shape) != 2:
        raise ModelCardError(f"{onnx_path}: output {output!r} has shape {shape}, expected (N, D)")
    if isinstance(shape[1], int) and shape[1] > 0:
        return shape[1]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    zero = np.zeros((1, 3, size, size), np.float32)
    return int(session.run([output], {session.get_inputs()[0].name: zero})[0].shape[1])


def card_for_onnx(onnx_path: str | Path, conventions: Conventions, name: str, version: str = "1",
                  input_size: int | None = None, template: str = "arcface_112", licence: str = NOT_STATED,
                  source: str | None = None, output: str | None = None, architecture: str | None = None,
                  notes: str | None = None) -> ModelCard:
    """A card for a recognition ONNX taking (N, 3, S, S) float and returning (N, D), attached to the ONNX's folder.

    S comes from the graph (input_size must agree, or give it where the graph leaves it open); D too.
    licence: the weights' terms as the user states them; none is claimed otherwise.
    source: where the weights come from, as the user gives it (a URL); default the path as given.
    """
    onnx_path = Path(onnx_path)
    if template not in reference_names():
        raise ModelCardError(f"unknown alignment template {template!r}; known: {', '.join(reference_names())}")
    input_name, input_shape, output_name, output_shape = graph_signature(onnx_path, output)
    sides = input_shape[2:] if len(input_shape) == 4 else []
    if len(input_shape) != 4 or input_shape[1] != 3:
        raise ModelCardError(f"{onnx_path}: input {input_name!r} has shape {input_shape}; a face model takes "
                             "(N, 3, S, S) (NCHW)")
    fixed = {s for s in sides if isinstance(s, int) and s > 0}
    if len(fixed) > 1 or (fixed and input_size and input_size not in fixed):
        raise ModelCardError(f"{onnx_path}: input {input_name!r} has shape {input_shape}, "
                             f"not square{f' of side {input_size}' if input_size else ''}")
    size = input_size or (fixed.pop() if fixed else None)
    if size is None:
        raise ModelCardError(f"{onnx_path}: the graph leaves the input size open ({input_shape}); give it (--input-size)")
    card = ModelCard.model_validate({
        "name": name, "version": version, "architecture": architecture or f"imported ONNX ({onnx_path.stem})",
        "files": {"onnx": {"path": onnx_path.name, "sha256": sha256_file(onnx_path)}},
        "input": {"size": size, "template": template, "channel_order": conventions.channel_order,
                  "mean": list(conventions.mean), "std": list(conventions.std), "layout": "NCHW"},
        "outputs": {"embedding": output_name},
        "embedding_size": _embedding_size(onnx_path, size, output_name, output_shape),
        "flip_tta": conventions.flip_tta,
        "licence": licence,
        "provenance": {"source": source or str(onnx_path), "source_sha256": sha256_file(onnx_path),
                       "notes": "; ".join(filter(None, [
                           f"imported by faceset model import: graph input {input_name!r} {input_shape}, "
                           f"output {output_name!r} {output_shape}; input conventions as stated by the user",
                           "no quality: the embedding norm of a model not trained with MagFace is not a quality",
                           notes]))},
    })
    return card.set_root(onnx_path.parent)


def publish_onnx(card: ModelCard, out_dir: str | Path) -> Path:
    """Copy the card's ONNX into out_dir as NAME.onnx, then write the card beside it (each atomically)."""
    out_dir = Path(out_dir)
    target = out_dir / f"{card.name}.onnx"
    with open(card.onnx_path, "rb") as src:
        atomic_write(target, lambda f: shutil.copyfileobj(src, f))
    data = card.model_dump()
    data["files"]["onnx"]["path"] = target.name
    published = ModelCard.model_validate(data).set_root(out_dir)
    published.verify_files()  # the copy is the file the card describes
    published.save(out_dir / CARD_FILENAME)
    return out_dir / CARD_FILENAME


# ---- the check ----------------------------------------------------------------------------


def check_photos(folder: str | Path, people: int, per_person: int) -> tuple[list[Path], np.ndarray]:
    """Up to `per_person` photos of each of the first `people` sub-folders holding at least two (sorted by name)."""
    chosen = [photos[:per_person] for photos in list_identities(Path(folder)).values() if len(photos) >= 2][:people]
    if len(chosen) < 2:
        raise ModelCardError(f"{folder}: the check needs at least two people (sub-folders) of two photos or more")
    return [p for photos in chosen for p in photos], np.repeat(np.arange(len(chosen)), [len(p) for p in chosen])


def check_faces(pipeline: FacePipeline, paths: list[Path], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Aligned crops (N, S, S, 3) of the largest face of each photo, their labels, and the photos without a face."""
    crops, kept = [], []
    for path, label in zip(paths, labels):
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ModelCardError(f"cannot read the check photo {path}")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        found = pipeline.detect(rgb, max_faces=1)
        if found:
            crops.append(pipeline.align(rgb, found)[0])
            kept.append(label)
    s = pipeline.card.input.size
    return (np.stack(crops) if crops else np.zeros((0, s, s, 3), np.uint8)), np.asarray(kept), len(paths) - len(kept)


@dataclass(frozen=True)
class Separation:
    """Genuine/impostor separation of cosine scores over every pair of the check faces.

    d′ = (μ_genuine − μ_impostor) / √((σ²_genuine + σ²_impostor)/2); TAR at FAR CHECK_FAR.
    """

    conventions: Conventions
    d_prime: float
    tar: float
    genuine: int
    impostor: int


def separation(raw: np.ndarray, labels: np.ndarray, conventions: Conventions, far: float = CHECK_FAR) -> Separation:
    unit = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)  # (N, D)
    i, j = np.triu_indices(len(unit), k=1)
    scores = np.einsum("pd,pd->p", unit[i], unit[j])  # (pairs,)
    same = labels[i] == labels[j]
    genuine, impostor = scores[same], scores[~same]
    if len(genuine) == 0 or len(impostor) == 0:
        raise ModelCardError("the check needs genuine and impostor pairs: two people, two faces each at least")
    d = (genuine.mean() - impostor.mean()) / np.sqrt((genuine.var() + impostor.var()) / 2 + 1e-12)
    tar = (genuine >= threshold_at_far(impostor, far)).mean()
    return Separation(conventions, float(d), float(tar), len(genuine), len(impostor))


def candidates(chosen: Conventions) -> list[Conventions]:
    """The chosen conventions first, then RGB/BGR × the usual scalings, then the chosen ones with the other flip TTA."""
    out = [chosen]
    for order in ("RGB", "BGR"):
        for mean, std in SCALINGS.values():
            out.append(Conventions(order, (mean,) * 3, (std,) * 3, chosen.flip_tta))
    out.append(replace(chosen, flip_tta=not chosen.flip_tta))
    return list(dict.fromkeys(out))  # the chosen one may be among the usual ones


def check_conventions(engine: Engine, card: ModelCard, crops: np.ndarray, labels: np.ndarray) -> list[Separation]:
    """Separation for each candidate convention, the chosen (the card's) first; the crops are embedded once each."""
    return [separation(embed_aligned(engine, c.applied(card), crops), labels, c) for c in candidates(Conventions.of(card))]


def refusal(rows: list[Separation], margin: float = REFUSE_MARGIN) -> str | None:
    """Why the chosen conventions (rows[0]) are clearly worse than another's (a d′ more than `margin`, a share,
    above the chosen one's), or None.

    Flip TTA is a choice of cost against accuracy, not a convention that can be wrong: rows that
    differ from the chosen one only by it are reported, never a reason to refuse.
    """
    chosen = rows[0]
    rivals = [r for r in rows[1:] if replace(r.conventions, flip_tta=chosen.conventions.flip_tta) != chosen.conventions]
    best = max(rivals, key=lambda r: r.d_prime, default=None)
    if best is None or best.d_prime <= chosen.d_prime + margin * abs(chosen.d_prime):
        return None
    return (f"the chosen conventions ({chosen.conventions.label}: d′ {chosen.d_prime:.2f}) separate genuine from "
            f"impostor pairs clearly worse than {best.conventions.label} (d′ {best.d_prime:.2f}; more than "
            f"{100 * margin:g} % higher)")


def table(rows: list[Separation], missing: int) -> str:
    """The check's report: one line per convention, the chosen one marked."""
    first = rows[0]
    lines = [f"check: {first.genuine} genuine / {first.impostor} impostor pairs"
             f"{f', {missing} photos without a face left out' if missing else ''}",
             f"  {'conventions':28s} {'d′':>6s} {f'TAR@FAR={CHECK_FAR:g}':>13s}"]
    for k, r in enumerate(rows):
        lines.append(f"{'*' if k == 0 else ' '} {r.conventions.label:28s} {r.d_prime:6.2f} {100 * r.tar:12.1f}%")
    return "\n".join(lines)

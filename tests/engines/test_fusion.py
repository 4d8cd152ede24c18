"""engines.fusion with the shipped CAFace graphs (models/caface): per-frame assignment, an additive memory whose
fused template does not depend on the order or batching of frames, the card, and real frames when the data is here."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines.base import build_engine, run_aligned
from engines.detection import build_detector
from engines.fusion import EmptyTemplateError, FusionModel
from engines.model_card import ModelCard, ModelCardError
from engines.pipeline import FacePipeline
from training.eval.degrade import degrade
from training.settings import get_settings

MODELS = Path(__file__).resolve().parents[2] / "models"
PEOPLE = ("Hugo_Chavez", "Jennifer_Garner")  # 10+ photos each in lfw-dev


@pytest.fixture(scope="module")
def fusion() -> FusionModel:
    return FusionModel.load(MODELS / "caface")


def _real_frames(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Two people's LFW photos, each clean and blurred, small, occluded, noisy: (raw (N, D), style (N, S))."""
    card = ModelCard.load(MODELS / "default")
    engine = build_engine("onnxruntime", card=card, intra_op_threads=1)
    pipeline = FacePipeline(build_detector("mtcnn"), engine, card)
    crops = []
    for person in PEOPLE:
        for n, path in enumerate(sorted((data_dir / "lfw-dev" / "images").glob(f"{person}_*.jpg"))[:4]):
            photo = np.asarray(Image.open(path).convert("RGB"))
            crop = pipeline.align(photo, pipeline.detect(photo, max_faces=1))[0]
            crops += [crop] + [degrade(crop, kind, s, seed=n) for kind, s in
                               (("blur", 4), ("lowres", 6), ("occlude", 0.3), ("noise", 35))]
    out = run_aligned(engine, card, np.stack(crops))
    return out["embedding"], out["style"]


@pytest.fixture(scope="module")
def frames(fusion) -> tuple[np.ndarray, np.ndarray, str]:
    """Real frames where FACESET_DATA_DIR has the data, else random vectors scaled like the model's."""
    data_dir = get_settings().data_dir
    if (data_dir / "lfw-dev" / "pairs.txt").exists():
        return (*_real_frames(data_dir), "real")
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(40, fusion.embedding_size)).astype(np.float32) * 3.9  # norms ≈ 44
    return raw, rng.normal(size=(40, fusion.card.style_size)).astype(np.float32), "random"


def test_card_names_the_recognition_model_it_was_trained_on(fusion):
    recognition = ModelCard.load(MODELS / "default")
    card = fusion.card
    assert card.recognition.onnx_sha256 == recognition.files.onnx.sha256
    assert card.style_size == 2 * sum(recognition.outputs.style_channels) == 2 * sum(card.recognition.style_channels)
    assert card.embedding_size == recognition.embedding_size and card.magnitude_index == card.stored_style_size - 1
    assert card.frame_quality_index == card.stored_style_size - 2
    assert (card.quality.low, card.quality.high) == (recognition.quality.low, recognition.quality.high)
    assert "non-commercial" in card.licence and card.parity.aggregate_min_cosine >= 0.99999


def test_a_frames_assignment_does_not_change_when_others_join_its_batch(fusion, frames):
    raw, style, _ = frames
    together = fusion.assign(raw, style)
    np.testing.assert_allclose(together.assignment.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(together.style[:, -1], np.linalg.norm(raw, axis=1), rtol=1e-5)
    for i in (0, 7, len(raw) - 1):
        alone = fusion.assign(raw[i : i + 1], style[i : i + 1])
        np.testing.assert_allclose(alone.assignment[0], together.assignment[i], atol=1e-6)
        np.testing.assert_allclose(alone.unit_embedding[0], together.unit_embedding[i], atol=1e-6)
        np.testing.assert_allclose(alone.style[0], together.style[i], rtol=1e-5, atol=1e-5)


def test_order_and_batching_do_not_change_the_template(fusion, frames):
    raw, style, _ = frames
    all_at_once = fusion.memory_delta(fusion.assign(raw, style))
    reference = fusion.aggregate(*all_at_once)
    rng = np.random.default_rng(0)
    for trial in range(3):
        order = rng.permutation(len(raw))
        vector = np.zeros(fusion.memory_size)
        for chunk in np.array_split(order, rng.integers(2, 9)):  # random batch sizes, random order
            vector += fusion.memory_delta(fusion.assign(raw[chunk], style[chunk])).to_vector()  # as a store adds
        memory = fusion.memory_from_vector(vector)
        for got, want in zip(memory, all_at_once):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
        assert memory.counts.sum() == pytest.approx(len(raw))  # each frame's assignment sums to 1
        fused = fusion.aggregate(*memory)
        assert float(fused.embedding @ reference.embedding) >= 0.99999
        assert fused.quality == pytest.approx(reference.quality, abs=1e-5)


def test_frame_deltas_sum_to_the_batch_delta(fusion, frames):
    raw, style, _ = frames
    contribution = fusion.assign(raw, style)
    per_frame = [fusion.memory_delta(contribution.frame(i)) for i in range(len(raw))]
    for k, whole in enumerate(fusion.memory_delta(contribution)):
        np.testing.assert_allclose(sum(d[k] for d in per_frame), whole, rtol=1e-12, atol=1e-12)


def test_a_memory_round_trips_through_its_flat_vector(fusion, frames):
    raw, style, _ = frames
    halves = [fusion.memory_delta(fusion.assign(raw[k::2], style[k::2])) for k in (0, 1)]
    vector = halves[0].to_vector() + halves[1].to_vector()  # what a store adds, entry by entry
    assert vector.shape == (fusion.memory_size,) == (fusion.clusters * (128 + fusion.card.stored_style_size + 1),)
    memory = fusion.memory_from_vector(vector)
    whole = fusion.memory_delta(fusion.assign(raw, style))
    for got, want in zip(memory, whole):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="entries"):
        fusion.memory_from_vector(vector[:-1])


def test_template_is_a_unit_vector_with_weights_over_clusters_and_a_quality(fusion, frames):
    raw, style, _ = frames
    template = fusion.fuse(raw, style)
    assert template.embedding.shape == (fusion.embedding_size,) and template.embedding.dtype == np.float32
    assert np.linalg.norm(template.embedding) == pytest.approx(1.0, abs=1e-5)
    assert template.weights.shape == (fusion.clusters, fusion.embedding_size)
    np.testing.assert_allclose(template.weights.sum(0), 1.0, atol=1e-5)
    r = fusion.assign(raw, style).frame_quality  # the quality is the evidence of the frames: 1 − exp(−Σ r_i / τ)
    assert ((r >= 0) & (r <= 1)).all()
    assert template.quality == pytest.approx(1 - np.exp(-r.astype(np.float64).sum() / fusion.card.quality.evidence_frames),
                                             abs=1e-5)


def test_empty_memory_and_wrong_shapes_are_refused(fusion):
    with pytest.raises(EmptyTemplateError):
        fusion.aggregate(*fusion.memory_from_vector(np.zeros(fusion.memory_size)))
    with pytest.raises(ValueError, match="raw embeddings"):
        fusion.assign(np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32))
    assert fusion.assign(np.zeros((0, fusion.embedding_size)), np.zeros((0, fusion.card.style_size))).assignment.shape \
        == (0, fusion.clusters)


def test_an_altered_graph_is_refused(tmp_path):
    import shutil

    shutil.copytree(MODELS / "caface", tmp_path / "caface")
    with open(tmp_path / "caface" / "aggregate.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelCardError, match="sha256"):
        FusionModel.load(tmp_path / "caface")


@pytest.mark.data
def test_poor_frames_weigh_less_than_good_ones_on_real_faces(fusion, frames):
    """One person's 4 photos, each clean and blurred, small, occluded, noisy: the fused template lands nearer the clean
    frames' mean than the plain average of all frames (the point of CAFace); clean frames get a higher frame quality
    than their degraded copies; every clean frame raises the template's quality; occluded frames alone make a template
    of lower quality than the clean ones."""
    raw, style, kind = frames
    if kind != "real":
        pytest.skip("needs the real face data in FACESET_DATA_DIR (lfw-dev)")
    person = np.arange(20)  # 4 photos × (clean, blur, lowres, occlude, noise)
    clean, occluded = person[0::5], person[3::5]
    unit = raw[person] / np.linalg.norm(raw[person], axis=1, keepdims=True)
    target = unit[clean].mean(0) / np.linalg.norm(unit[clean].mean(0))
    plain = unit.mean(0) / np.linalg.norm(unit.mean(0))
    assert float(fusion.fuse(raw[person], style[person]).embedding @ target) > float(plain @ target)
    r = fusion.assign(raw[person], style[person]).frame_quality.reshape(4, 5)  # (photo, variant)
    assert r[:, 0].mean() > r[:, 1:].mean()
    qualities = [fusion.fuse(raw[clean[:k]], style[clean[:k]]).quality for k in (1, 2, 3, 4)]
    assert all(a < b for a, b in itertools.pairwise(qualities))
    assert fusion.fuse(raw[occluded], style[occluded]).quality < qualities[-1]

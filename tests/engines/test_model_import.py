"""Bring your own model: `faceset model import` of ONNX and checkpoints, the convention check, serving the result.

The models a user brings are the anchors in FACESET_ANCHORS_DIR (../shared/anchors), read from there.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from engines.base import embed_aligned
from engines.model_card import ModelCard, ModelCardError, sha256_file
from engines.model_import import (
    NOT_STATED,
    REFUSE_MARGIN,
    Conventions,
    Separation,
    candidates,
    card_for_onnx,
    refusal,
    separation,
)
from engines.onnx_runtime import OnnxRuntimeEngine
from service.app import create_app
from service.cli import build_app
from tests.helpers import REPO, drop_keys, lfw_pairs, make_settings, photo

D = 16
CHECK_PEOPLE = ["Hugo_Chavez", "Jennifer_Garner", "Jeremy_Greenstock", "Lance_Armstrong", "Pervez_Musharraf",
                "Trent_Lott"]  # lfw-dev people with 9+ photos
A_CONVENTIONS = ["--channel-order", "BGR", "--mean", "127.5", "--std", "128"]  # anchors/README.md
B_CONVENTIONS = ["--channel-order", "RGB", "--mean", "127.5", "--std", "128"]


def linear_onnx(path: Path, size: int | str = 112, weights_as_inputs: bool = True, width: int | str = D) -> np.ndarray:
    """A graph with insightface's recognition signature: input 'input.1' (None, 3, S, S) -> '683' (None, D).

    It computes f = mean over pixels of x (per channel) @ W + b; returns W stacked over b, (4, D).
    Like graphs from older insightface exporters, it can list its weights as graph inputs too.
    """
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, D)).astype(np.float32)
    b = rng.normal(size=(D,)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["input.1"], ["pooled"]),  # (N, 3, 1, 1)
             helper.make_node("Flatten", ["pooled"], ["flat"]),  # (N, 3)
             helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["683"])]  # (N, D)
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, size, size])
    y = helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", width])
    initialisers = [numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(b, "fc.bias")]
    extra = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in initialisers]
    graph = helper.make_graph(nodes, "insightface-like", [x] + (extra if weights_as_inputs else []), [y], initialisers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return np.concatenate([w, b[None]])


def faceset(*args: str):
    return CliRunner().invoke(build_app(), ["model", "import", *map(str, args)])


# ---- the card ---------------------------------------------------------------------------


def test_the_card_states_the_given_conventions_and_the_graph_computes_with_them(tmp_path):
    wb = linear_onnx(tmp_path / "w600k_r50.onnx")
    conventions = Conventions("BGR", (127.5,) * 3, (128.0,) * 3)
    card = card_for_onnx(tmp_path / "w600k_r50.onnx", conventions, name="w600k-r50")
    assert card.outputs.embedding == "683" and card.embedding_size == D and card.input.size == 112
    assert (card.input.template, card.licence, card.quality, card.calibration) == ("arcface_112", NOT_STATED, None, None)
    assert card.provenance.source_sha256 == card.files.onnx.sha256 == sha256_file(tmp_path / "w600k_r50.onnx")
    engine = OnnxRuntimeEngine(card, intra_op_threads=1)
    faces = np.random.default_rng(2).integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)
    x = (faces[..., ::-1].astype(np.float64) - 127.5) / 128.0  # BGR, (p − 127.5)/128, by hand
    expected = x.mean(axis=(1, 2)) @ wb[:3].astype(np.float64) + wb[3]
    np.testing.assert_allclose(embed_aligned(engine, card, faces), expected, rtol=1e-4, atol=1e-5)


def test_graphs_without_weights_as_inputs_and_open_sizes(tmp_path):
    linear_onnx(tmp_path / "m.onnx", weights_as_inputs=False)
    assert card_for_onnx(tmp_path / "m.onnx", Conventions(), name="m").embedding_size == D
    linear_onnx(tmp_path / "open.onnx", size="S", width="D")  # sizes left symbolic: S given, D found by a run
    with pytest.raises(ModelCardError, match="--input-size"):
        card_for_onnx(tmp_path / "open.onnx", Conventions(), name="open")
    card = card_for_onnx(tmp_path / "open.onnx", Conventions(), name="open", input_size=96)
    assert (card.input.size, card.embedding_size) == (96, D)
    faces = np.zeros((2, 96, 96, 3), np.uint8)
    assert embed_aligned(OnnxRuntimeEngine(card, intra_op_threads=1), card, faces).shape == (2, D)


def test_a_graph_of_another_size_or_an_unknown_template_is_refused(tmp_path):
    linear_onnx(tmp_path / "big.onnx", size=160)
    card_for_onnx(tmp_path / "big.onnx", Conventions(), name="big")  # its own size, from the graph
    with pytest.raises(ModelCardError, match="of side 112"):
        card_for_onnx(tmp_path / "big.onnx", Conventions(), name="big", input_size=112)
    with pytest.raises(ModelCardError, match="unknown alignment template"):
        card_for_onnx(tmp_path / "big.onnx", Conventions(), name="big", template="arcface_113")


def test_importing_an_onnx_loads_no_torch(tmp_path):
    linear_onnx(tmp_path / "m.onnx")
    code = ("import sys; from service.cli import build_app; from typer.testing import CliRunner; "
            f"r = CliRunner().invoke(build_app(), ['model', 'import', {str(tmp_path / 'm.onnx')!r}, '--out', "
            f"{str(tmp_path / 'out')!r}]); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]
    assert ModelCard.load(tmp_path / "out").input.channel_order == "RGB"  # insightface's zoo, the ONNX default


def test_the_card_records_the_import_command_as_run_without_secrets(tmp_path):
    linear_onnx(tmp_path / "m.onnx")
    url = "https://alice:s3cret@example.org/m.onnx?token=abc"
    done = faceset(tmp_path / "m.onnx", "--out", tmp_path / "out", "--std", "128", "--source", url, "--no-flip-tta")
    assert done.exit_code == 0, done.output
    provenance = ModelCard.load(tmp_path / "out").provenance
    assert provenance.command == (f"faceset model import {tmp_path / 'm.onnx'} --out {tmp_path / 'out'} --std 128 "
                                  "--no-flip-tta --source 'https://***@example.org/m.onnx?token=***'")
    assert "s3cret" not in provenance.source and "abc" not in provenance.source


# ---- the check's arithmetic ---------------------------------------------------------------


def test_separation_against_a_hand_computation():
    # four faces, two people: genuine cosines 1 and 0.8, impostor cosines 0, 0, 0.6 and 0 (below)
    raw = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0.8, 0.6]], np.float32) * 3  # norms do not matter
    row = separation(raw, np.array([0, 0, 1, 1]), Conventions(), far=0.25)
    genuine, impostor = np.array([1.0, 0.8]), np.array([0.0, 0.0, 0.0, 0.0])
    assert (row.genuine, row.impostor) == (2, 4)
    assert math.isclose(row.d_prime, (0.9 - 0) / math.sqrt((genuine.var() + impostor.var()) / 2), rel_tol=1e-5)
    # FAR 0.25 of 4 impostors: one may pass, the threshold lies just above the second highest (0): both genuine pass
    assert row.tar == 1.0


def test_candidates_and_the_refusal_rule():
    chosen = Conventions("BGR", (127.5,) * 3, (128.0,) * 3)
    rows = candidates(chosen)
    assert rows[0] == chosen and len(rows) == 7 and len(set(rows)) == 7  # chosen is among RGB/BGR × 3 scalings
    assert rows[-1] == Conventions("BGR", (127.5,) * 3, (128.0,) * 3, flip_tta=True)

    def table(*d_primes):
        return [Separation(c, d, 0.9, 30, 160) for c, d in zip(rows, d_primes)]

    just_within, beyond = 3.0 * (1 + REFUSE_MARGIN) - 1e-6, 3.0 * (1 + REFUSE_MARGIN) + 0.01
    assert refusal(table(3.0, just_within, 2.0, 1.0, 2.9, 1.0, 5.0)) is None  # the flip row never refuses
    why = refusal(table(3.0, beyond, 2.0, 1.0, 2.9, 1.0, 3.0))
    assert why and "RGB 127.5/127.5" in why and "BGR 127.5/128" in why


# ---- the anchors, through the command --------------------------------------------------------


@pytest.fixture(scope="session")
def check_people(data_dir, tmp_path_factory) -> Path:
    """A folder per person of lfw-dev photos (links), what a user gives --check-with."""
    root = tmp_path_factory.mktemp("check-with")
    for name in CHECK_PEOPLE:
        (root / name).mkdir()
        for image in sorted((data_dir / "lfw-dev" / "images").glob(f"{name}_[0-9][0-9][0-9][0-9].jpg")):
            (root / name / image.name).symlink_to(image)
    return root


def check_args(folder: Path) -> list[str]:
    return ["--check-with", folder, "--check-people", len(CHECK_PEOPLE), "--check-per-person", 5]


@pytest.fixture(scope="session")
def imported_a(anchors_dir, check_people, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("imported") / "mobilefacenet-a"
    result = faceset(anchors_dir / "mobilefacenet-a.onnx", "--out", out, *A_CONVENTIONS, *check_args(check_people))
    assert result.exit_code == 0, result.output
    return out, result.output


def test_mobilefacenet_a_imports_with_its_conventions(imported_a, anchors_dir):
    out, output = imported_a
    assert "* BGR 127.5/128" in output and "RGB [0,1]" in output  # the check's table, the chosen row first
    card = ModelCard.load(out)  # validates, and the copy's sha256 is the card's
    source = anchors_dir / "mobilefacenet-a.onnx"
    assert card.files.onnx.path == "mobilefacenet-a.onnx" and card.files.onnx.sha256 == sha256_file(source)
    assert (card.input.channel_order, card.input.mean, card.input.std) == ("BGR", [127.5] * 3, [128.0] * 3)
    assert (card.embedding_size, card.input.size, card.flip_tta, card.quality) == (128, 112, False, None)
    assert card.licence == NOT_STATED and card.provenance.source == str(source)


def test_mobilefacenet_b_a_batch_of_one_graph_imports_and_runs_row_by_row(anchors_dir, check_people, tmp_path):
    result = faceset(anchors_dir / "mobilefacenet-b.onnx", "--out", tmp_path / "b", "--name", "mbf-b",
                     "--licence", "MIT (the repository's; weights' origin not documented)", *B_CONVENTIONS,
                     *check_args(check_people))
    assert result.exit_code == 0, result.output
    card = ModelCard.load(tmp_path / "b")
    assert (card.name, card.input.channel_order, card.licence) == ("mbf-b", "RGB", "MIT (the repository's; weights' origin not documented)")
    engine = OnnxRuntimeEngine(card, intra_op_threads=1)
    assert engine.max_batch_size == 1
    faces = np.random.default_rng(3).integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)
    together = embed_aligned(engine, card, faces)
    alone = np.concatenate([embed_aligned(engine, card, faces[i : i + 1]) for i in range(3)])
    np.testing.assert_array_equal(together, alone)


def test_wrong_conventions_are_refused_and_nothing_is_written(anchors_dir, check_people, tmp_path):
    out = tmp_path / "wrong"
    result = faceset(anchors_dir / "mobilefacenet-a.onnx", "--out", out, "--channel-order", "RGB", "--mean", "127.5",
                     "--std", "128", *check_args(check_people))
    assert result.exit_code == 1, result.output
    assert "clearly worse than BGR" in result.output and "no card written" in result.output
    assert not out.exists()
    forced = faceset(anchors_dir / "mobilefacenet-a.onnx", "--out", out, "--channel-order", "RGB", "--std", "128",
                     "--force", *check_args(check_people))
    assert forced.exit_code == 0 and "written anyway" in forced.output
    assert ModelCard.load(out).input.channel_order == "RGB"


def test_an_imported_card_is_served(imported_a, data_dir):
    settings = make_settings(model_card=imported_a[0])
    lfw = data_dir / "lfw-dev" / "images"
    (same,), (different,) = lfw_pairs(data_dir, True, 1), lfw_pairs(data_dir, False, 1)
    try:
        with TestClient(create_app(settings)) as client:

            def cosine(a, i, b, j) -> float:
                body = client.post("/embed", files=[("images", photo(lfw, a, i)), ("images", photo(lfw, b, j))]).json()
                (fa,), (fb,) = (r["faces"][:1] for r in body["results"])
                assert fa["quality"] is None and len(fa["embedding"]) == 128
                return float(np.dot(fa["embedding"], fb["embedding"]))

            assert client.get("/readyz").status_code == 200
            assert cosine(*same) > 0.5 > 0.2 > cosine(*different)
    finally:
        drop_keys(settings)


# ---- checkpoints ------------------------------------------------------------------------------


def test_a_faceset_checkpoint_imports_through_faceset_train(tiny_model, check_people, tmp_path):
    backbone = tiny_model.parent.parent / "backbone.pt"
    result = faceset(backbone, "--out", tmp_path / "tiny", "--name", "tiny", "--version", "2",
                     *check_args(check_people), "--force")  # random weights: the check may well prefer others
    assert result.exit_code == 0, result.output
    card = ModelCard.load(tmp_path / "tiny")
    assert (card.name, card.version, card.licence) == ("tiny", "2", NOT_STATED)
    assert card.parity.min_cosine >= 0.9999 and card.provenance.source_sha256 == sha256_file(backbone)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # the staging folder is gone


def test_an_official_magface_checkpoint_imports_with_its_arch_read_off_the_keys(tmp_path):
    torch = pytest.importorskip("torch")  # faceset-train's dependency, installed with the dev tools
    from training.models import build_backbone

    torch.manual_seed(0)
    # MagFace's trainer's layout: the backbone under `features.module.`, its classifier beside it, all in state_dict
    state = {f"features.module.{k}": v for k, v in build_backbone("iresnet18", embedding_size=32).state_dict().items()}
    torch.save({"epoch": 25, "state_dict": {**state, "fc.weight": torch.randn(10, 32)}}, tmp_path / "magface.pth")
    result = faceset(tmp_path / "magface.pth", "--out", tmp_path / "mag", "--licence", "MS1MV2: research only")
    assert result.exit_code == 0, result.output
    card = ModelCard.load(tmp_path / "mag")
    assert (card.architecture, card.embedding_size, card.licence) == ("iresnet18", 32, "MS1MV2: research only")
    assert (card.input.channel_order, card.input.mean, card.input.std) == ("BGR", [0.0] * 3, [255.0] * 3)
    assert card.magnitude is not None and card.name == "magface"


def test_a_checkpoint_without_faceset_train_says_what_to_install(tiny_model, monkeypatch, tmp_path):
    app = build_app()  # with faceset-train's plugins, before it goes
    monkeypatch.setitem(sys.modules, "training", None)  # as on a base install: `import training` fails
    result = CliRunner().invoke(app, ["model", "import", str(tiny_model.parent.parent / "backbone.pt"),
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "install faceset-train" in result.output.replace("\n", " ")
    assert not (tmp_path / "x").exists()

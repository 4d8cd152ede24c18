"""`faceset model …`: bring your own recognition model (base install, no torch).

    faceset model import w600k_r50.onnx --out models/w600k --channel-order RGB --mean 127.5 --std 127.5 \\
        --check-with photos/ --licence "insightface model zoo: non-commercial research only"

`model_app` holds the base install's commands; `service.cli.build_app` adds those of every
`typer.Typer` in the `faceset.model` entry-point group (faceset-train's, which need torch).
Checkpoints (.pth, .pt) are exported by faceset-train's `training.export`, imported only when one is given.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer
import yaml

from engines.model_card import deep_merge
from service.command_line import command_as_run, masked
from service.model_calibrate import calibrate

model_app = typer.Typer(no_args_is_help=True, help="Bring your own recognition model: import it with a check of "
                        "its input conventions, then calibrate, fuse and serve it (FACESET_MODEL_CARD).")

CHECKPOINT_SUFFIXES = (".pth", ".pt")
# official MagFace iResNets by their number of third-stage blocks (training/models/iresnet.py)
MAGFACE_ARCH_BY_LAYER3 = {2: "iresnet18", 14: "iresnet50", 30: "iresnet100"}


def _per_channel(value: str | None, option: str) -> list[float] | None:
    """'127.5' or '127.5,127.5,127.5' -> three floats."""
    if value is None:
        return None
    try:
        parts = [float(v) for v in value.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{value!r}: one number or three separated by commas", param_hint=option) from None
    if len(parts) not in (1, 3):
        raise typer.BadParameter(f"{value!r}: one number or three separated by commas", param_hint=option)
    return parts * 3 if len(parts) == 1 else parts


def _stated(card_yaml: Path | None, **given) -> dict:
    """Card fields the user stated: the YAML's, then the options given (None: not stated) on top."""
    stated = yaml.safe_load(card_yaml.read_text()) if card_yaml else {}
    fields = {"input": {k: given[k] for k in ("template", "channel_order", "mean", "std")},
              "flip_tta": given["flip_tta"], "licence": given["licence"], "architecture": given["architecture"],
              "provenance": {"source": given["source"]}, "training": {"licence": given["data_licence"]}}
    for key, value in fields.items():
        value = {k: v for k, v in value.items() if v is not None} if isinstance(value, dict) else value
        if value not in (None, {}):
            stated = deep_merge(stated, {key: value})
    if "files" in stated:
        raise typer.BadParameter("files are written by the import, not stated", param_hint="--card")
    return stated


def _fail(message: str) -> typer.Exit:
    typer.echo(f"faceset model import: {message}", err=True)
    return typer.Exit(1)


@model_app.command("import")
def import_model(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(
        exists=True, dir_okay=False, help="an ONNX recognition model (N, 3, S, S) -> (N, D); or a PyTorch checkpoint "
        "(needs faceset-train): an official MagFace iResNet .pth, a faceset backbone.pt or a converted dlib checkpoint")],
    out: Annotated[Path, typer.Option(help="folder for NAME.onnx (a copy) and card.yaml")],
    name: Annotated[str | None, typer.Option(help="model name reported by the service (default: the file's name)")] = None,
    version: Annotated[str, typer.Option(help="model version reported by the service")] = "1",
    input_size: Annotated[int | None, typer.Option(help="side of the aligned face (default: the graph's)")] = None,
    channel_order: Annotated[str | None, typer.Option(help="RGB or BGR, as the network reads (ONNX default RGB, "
                                                           "insightface's zoo; checkpoints: the checkpoint's)")] = None,
    mean: Annotated[str | None, typer.Option(help="x = (p − mean)/std on pixels 0..255: one value or three "
                                                  "(ONNX default 127.5)")] = None,
    std: Annotated[str | None, typer.Option(help="the divisor, one value or three (ONNX default 127.5; "
                                                 "e.g. 128; 255 with mean 0 for [0, 1])")] = None,
    template: Annotated[str | None, typer.Option(help="reference landmarks the faces are aligned to "
                                                      "(engines/reference_landmarks.py; ONNX default arcface_112)")] = None,
    flip_tta: Annotated[bool | None, typer.Option("--flip-tta/--no-flip-tta", help="add the mirrored face's "
                                                  "embedding: twice the engine work (default off)")] = None,
    output: Annotated[str | None, typer.Option(help="ONNX output holding the embedding, where the graph has several")] = None,
    architecture: Annotated[str | None, typer.Option(help="card field architecture (default: what the file says)")] = None,
    licence: Annotated[str | None, typer.Option(help="terms of the weights as you know them (default: none claimed, "
                                                     "the card says 'not stated by the user')")] = None,
    source: Annotated[str | None, typer.Option(help="where the weights come from, e.g. a URL (default: PATH as given)")] = None,
    card: Annotated[Path | None, typer.Option(help="YAML of further card fields (accuracy, training …)")] = None,
    check_with: Annotated[Path | None, typer.Option(
        exists=True, file_okay=False, help="raw photos, a folder per person: compare the chosen conventions with "
        "the usual alternatives on them")] = None,
    check_people: Annotated[int, typer.Option(help="people the check reads (the first, by folder name)")] = 10,
    check_per_person: Annotated[int, typer.Option(help="photos per person the check reads")] = 5,
    force: Annotated[bool, typer.Option(help="write the card even where the check finds better conventions")] = False,
    arch: Annotated[str | None, typer.Option(help="MagFace .pth: the iResNet (default: read off the checkpoint)")] = None,
    parity_dir: Annotated[Path | None, typer.Option(
        exists=True, file_okay=False, help="checkpoints: aligned faces for the export's parity check "
        "(default random pixels)")] = None,
    style: Annotated[bool, typer.Option(help="checkpoints: add the CAFace style output")] = False,
    data_licence: Annotated[str | None, typer.Option(help="checkpoints: terms of the training data (training.licence)")] = None,
) -> None:
    """Import a recognition model: a model card beside a copy of the ONNX, checked on real faces where asked.

    With --check-with the photos run through faceset's pipeline (MTCNN, alignment, the engine) once per
    candidate convention; a card whose conventions are clearly worse than another's is refused (exit 1,
    nothing written) unless --force.
    """
    name = name or re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("._-") or "model"
    conventions = {"template": template, "channel_order": channel_order, "mean": _per_channel(mean, "--mean"),
                   "std": _per_channel(std, "--std"), "flip_tta": flip_tta}
    if channel_order not in (None, "RGB", "BGR"):
        raise typer.BadParameter(f"{channel_order!r}: RGB or BGR", param_hint="--channel-order")
    stated = _stated(card, **conventions, licence=licence, source=source and masked(source), architecture=architecture,
                     data_licence=data_licence)
    stated = deep_merge(stated, {"provenance": {"command": command_as_run(ctx)}})  # as run, never a --card's
    try:
        if path.suffix.lower() in CHECKPOINT_SUFFIXES:
            _import_checkpoint(path, out, name, version, stated, arch, parity_dir, style, check_with,
                               (check_people, check_per_person), force)
        else:
            _import_onnx(path, out, name, version, input_size, output, stated, check_with,
                         (check_people, check_per_person), force)
    except ValueError as exc:  # a card, a graph or a checkpoint that cannot be imported: its message, no traceback
        raise _fail(str(exc)) from None
    typer.echo(f"wrote {out / 'card.yaml'} and {out / (name + '.onnx')}")


def _import_onnx(path: Path, out: Path, name: str, version: str, input_size: int | None, output: str | None,
                 stated: dict, check_with: Path | None, check_size: tuple[int, int], force: bool) -> None:
    from engines.model_card import ModelCard
    from engines.model_import import Conventions, card_for_onnx, publish_onnx

    chosen = stated.get("input", {})
    conventions = Conventions(chosen.get("channel_order", "RGB"), tuple(chosen.get("mean", [127.5] * 3)),
                              tuple(chosen.get("std", [127.5] * 3)), bool(stated.get("flip_tta", False)))
    made = card_for_onnx(path, conventions, name, version, input_size, chosen.get("template", "arcface_112"),
                         source=str(path), output=output)
    made = ModelCard.model_validate(deep_merge(made.model_dump(), stated)).set_root(made.root)
    if check_with is not None:
        _check(made, check_with, check_size, force)
    publish_onnx(made, out)


def _import_checkpoint(path: Path, out: Path, name: str, version: str, stated: dict, arch: str | None,
                       parity_dir: Path | None, style: bool, check_with: Path | None, check_size: tuple[int, int],
                       force: bool) -> None:
    """Export with faceset-train into a folder beside `out`, check, then move the two files into `out`."""
    try:
        from training import export
        from training.checkpoint import load_state
    except ImportError as exc:
        raise _fail(f"{path} is a PyTorch checkpoint: exporting it needs torch, which the base install does not "
                    f"have ({exc}); install faceset-train (pip install ./training), or import an ONNX export of it") from None
    ck = load_state(path)
    state = ck.get("state_dict") if isinstance(ck.get("state_dict"), dict) else {}
    if any(k.startswith("features.module.") for k in state):  # MagFace's trainer wraps its backbone so
        layer3 = {k.split(".")[3] for k in state if k.startswith("features.module.layer3.")}
        arch = arch or MAGFACE_ARCH_BY_LAYER3.get(len(layer3))
        if arch is None:
            raise _fail(f"{path}: a MagFace checkpoint of an iResNet this import does not know; give --arch")
        loaded = export.load_magface_backbone(path, arch, int(state["features.module.fc.weight"].shape[0]))
    else:
        loaded = export.load_backbone(path)
    if "licence" not in stated and "licence" not in loaded.card_defaults:
        from engines.model_import import NOT_STATED

        stated = {**stated, "licence": NOT_STATED}
    faces = export.read_faces(parity_dir, loaded.input_size) if parity_dir else None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.import-"))  # same file system: os.replace
    try:
        made = export.export_onnx(loaded, staging, name, version, stated, faces, style_outputs=style)
        if check_with is not None:
            _check(made, check_with, check_size, force)
        onnx_name = made.files.onnx.path
        out.mkdir(exist_ok=True)
        os.replace(staging / onnx_name, out / onnx_name)  # the ONNX first: a card never names a missing file
        os.replace(staging / "card.yaml", out / "card.yaml")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check(card, photos: Path, size: tuple[int, int], force: bool) -> None:
    """Run the convention check, print its table; refuse (typer.Exit(1)) unless the chosen conventions hold or force."""
    from engines.base import build_engine
    from engines.detection import build_detector
    from engines.model_import import check_conventions, check_faces, check_photos, refusal, table
    from engines.pipeline import FacePipeline

    engine = build_engine("onnxruntime", card=card)
    paths, labels = check_photos(photos, *size)
    crops, labels, missing = check_faces(FacePipeline(build_detector("mtcnn"), engine, card), paths, labels)
    rows = check_conventions(engine, card, crops, labels)
    typer.echo(table(rows, missing))
    why = refusal(rows)
    if why and not force:
        raise _fail(f"{why}; no card written (state the conventions the model was trained with, or --force)")
    if why:
        typer.echo(f"warning: {why}; written anyway (--force)", err=True)


model_app.command("calibrate")(calibrate)  # service/model_calibrate.py

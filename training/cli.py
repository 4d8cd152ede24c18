"""The training commands of `faceset`: faceset-train registers `app` in the `faceset.commands` entry points.

Every command imports the module it runs inside its body, so `faceset --help` and `faceset serve`
never load torch. The modules keep their library functions; this file only parses and calls them.
"""
from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer()
data = typer.Typer(no_args_is_help=True, help="Prepare face data: align photos, split identities, write RecordIO.")
convert = typer.Typer(no_args_is_help=True, help="Convert upstream weights (MTCNN, dlib's face ResNet) with parity checks.")
caface = typer.Typer(no_args_is_help=True, help="CAFace template fusion: features, training, export, evaluation.")
app.add_typer(data, name="data")
app.add_typer(convert, name="convert")
app.add_typer(caface, name="caface")

Threads = Annotated[int, typer.Option(help="threads per process (0 = every core)")]


def _log() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _under(root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def _retyped(ctx: typer.Context) -> str:
    """This command as a user would retype it, every parameter spelled out: a card's provenance."""
    words = ["faceset", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params[param.name]
        if value is None:
            continue
        if param.param_type_name == "argument":
            words += map(str, value if param.nargs != 1 else [value])
        elif param.is_flag:
            words.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            for v in value if param.multiple else [value]:
                words += [param.opts[0], *map(str, v if param.nargs != 1 else [v])]
    return shlex.join(words)


# ---------------------------------------------------------------- backbones


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="YAML config path, or the name of a shipped config (training/configs/)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a config key, e.g. --set optim.lr=0.01")] = None,
    run_dir: Annotated[str | None, typer.Option(help="output folder (default FACESET_RUNS_DIR/<config name>); resumes if it holds a checkpoint")] = None,
    nproc: Annotated[int, typer.Option(help="processes on this machine (DDP via torchrun; gloo on CPU, nccl on GPU)")] = 1,
) -> None:
    """Train (or resume training) a backbone with a margin loss."""
    if nproc > 1:  # each torchrun worker runs this command again with --nproc 1
        from torch.distributed.run import main as torchrun

        args = [config, *(f"--set={s}" for s in set_ or []), *([f"--run-dir={run_dir}"] if run_dir else [])]
        torchrun([f"--nproc_per_node={nproc}", "--standalone", "-m", "service.cli", "train", *args])
        return
    from training.train import run

    _log()
    run(config, set_ or [], run_dir)


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="a backbone.pt written by training, or untrained:<arch>[:<dim>]")],
    pairs: Annotated[str, typer.Option(help="LFW-style pairs file, or an insightface .bin verification set (relative to FACESET_DATA_DIR unless absolute)")] = "lfw-dev/pairs.txt",
    images: Annotated[str, typer.Option(help="folder of the pairs' images (relative to FACESET_DATA_DIR unless absolute)")] = "lfw-dev/images",
    crop: Annotated[str | None, typer.Option(help="fixed relative crop l,t,r,b applied before resizing (pre-aligned photos)")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for eval.json, roc.png and erc.png")] = None,
    flip: Annotated[bool, typer.Option(help="add the embedding of the mirrored image")] = False,
    degradations: Annotated[bool, typer.Option(help="also report magnitude against blur/low-res/occlusion/noise")] = True,
    record: Annotated[bool, typer.Option(help="write the accuracy into the model card (card MODELs only)")] = False,
) -> None:
    """Verification accuracy (10-fold), TAR@FAR and MagFace quality (error-versus-reject).

    MODEL is a model card (card.yaml or its folder): raw photos go through the serving pipeline
    (detect, align, ONNX engine). Or a torch checkpoint, fed pre-aligned or fixed-crop images.
    """
    from training.settings import get_settings

    root = get_settings().data_dir
    card = Path(model) / "card.yaml" if Path(model).is_dir() else Path(model)
    if card.suffix in (".yaml", ".yml"):
        from training.evaluate_pipeline import main as pipeline_eval

        result = pipeline_eval(card, _under(root, pairs), _under(root, images), out, record)
    else:
        import torch

        from training.evaluate import evaluate_checkpoint

        box = tuple(float(v) for v in crop.split(",")) if crop else None
        result = evaluate_checkpoint(model, _under(root, pairs), _under(root, images), box, out, torch.device("cpu"),
                                     flip, degradations)
    typer.echo(json.dumps(result, indent=1))


@app.command()
def export(
    ctx: typer.Context,
    backbone_pt: Annotated[Path, typer.Argument(help="backbone.pt (Trainer.export_final) or a converted dlib checkpoint")],
    out: Annotated[Path, typer.Option(help="folder for NAME.onnx and card.yaml")],
    name: Annotated[str, typer.Option(help="model name (card field name, ONNX file name)")],
    version: Annotated[str, typer.Option(help="model version (card field version)")],
    template: Annotated[str | None, typer.Option(help="5-point template the model's faces are aligned with (default: the training crops' (align_tool's _align.json), dlib_150 for a converted dlib checkpoint, else arcface_112)")] = None,
    parity_dir: Annotated[Path | None, typer.Option(help="aligned face images for the parity check (default: random pixels)")] = None,
    card: Annotated[Path | None, typer.Option(help="YAML of card fields to set (calibration, accuracy, training …)")] = None,
    licence: Annotated[str | None, typer.Option(help="terms of the weights (card field licence)")] = None,
    data_licence: Annotated[str | None, typer.Option(help="terms of the training data (card field training.licence)")] = None,
    style: Annotated[bool, typer.Option(help="add the CAFace style output")] = False,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default training.export.OPSET)")] = None,
    threads: Annotated[int, typer.Option(help="torch threads (the export is not worth more)")] = 1,
) -> None:
    """Backbone checkpoint -> ONNX + model card, kept only after a torch vs ONNX Runtime parity check."""
    import torch

    from training.export import CARD_FILENAME, OPSET, card_overrides, export_onnx, load_backbone, read_faces

    torch.set_num_threads(threads)
    loaded = load_backbone(backbone_pt)
    faces = read_faces(parity_dir, loaded.input_size) if parity_dir else None
    result = export_onnx(loaded, out, name, version, card_overrides(card, template, licence, data_licence), faces,
                         opset or OPSET, style, _retyped(ctx))
    typer.echo(f"wrote {result.onnx_path} and {out / CARD_FILENAME}: parity min cosine {result.parity.min_cosine:.6f} "
               f"on {result.parity.images} faces ({result.parity.inputs})")


@app.command()
def add_style_output(
    ctx: typer.Context,
    model: Annotated[Path, typer.Option(help="the shipped model card folder, re-exported in place")] = Path("models/default"),
    dlib: Annotated[Path, typer.Option(help="dlib's converted trunk (faceset convert dlib)")] = Path("runs/dlib_resnet34.pt"),
    faces: Annotated[Path, typer.Option(help="aligned faces for the proof and the parity check")] = Path("runs/aligned/lfw-dev-dlib150"),
    backbone_out: Annotated[Path, typer.Option(help="where the rebuilt backbone.pt goes")] = Path("runs/celeba-dlib-magface/backbone.pt"),
    version: Annotated[str, typer.Option(help="version of the re-exported model")] = "1.1",
    limit: Annotated[int, typer.Option(help="aligned faces used for the proof and parity")] = 64,
) -> None:
    """Give the shipped default model its CAFace style output without retraining (training/recipes/add_style_output.py)."""
    import torch

    from training.recipes.add_style_output import add_style_output as rebuild

    torch.set_num_threads(1)
    rebuild(model, dlib, faces, backbone_out, version, limit, _retyped(ctx))


# ---------------------------------------------------------------- data


@data.command()
def align(
    src: Annotated[Path, typer.Argument(help="folder-per-identity tree or flat folder of photos")],
    dst: Annotated[Path, typer.Argument(help="where the aligned JPEGs, _report.jsonl and _align.json go")],
    template: Annotated[str, typer.Option(help="5-point reference landmarks (engines.reference_landmarks)")] = "arcface_112",
    size: Annotated[int | None, typer.Option(help="crop side (default: the template's)")] = None,
    min_face_size: Annotated[float, typer.Option(help="smallest face searched, pixels")] = 20,
    pick: Annotated[str, typer.Option(help="which face of a photo with several: largest or central")] = "largest",
    workers: Annotated[int, typer.Option(help="processes, each with its own detector")] = 1,
    threads: Annotated[int, typer.Option(help="ONNX Runtime and OpenCV threads per process")] = 1,
) -> None:
    """Detect and align every photo with the shipped MTCNN (resumable: aligned photos are skipped)."""
    import cv2

    from training.data.align_tool import align_folder, summarise_report

    _log()
    cv2.setNumThreads(threads)
    log = logging.getLogger("faceset.align")
    report = align_folder(src, dst, template, size, None, min_face_size, workers, pick, threads,
                          progress=lambda n, total: log.info("%d / %d", n, total))
    typer.echo(json.dumps({
        "images": report.images, "skipped": report.skipped, "aligned": report.aligned, "no_face": report.no_face,
        "unreadable": report.unreadable, "seconds": round(report.seconds, 1),
        "detection_rate": round(report.detection_rate, 4) if report.processed else None,
        "all_runs": summarise_report(report.report_path)}))


@data.command()
def split(
    sources: Annotated[list[Path], typer.Argument(help="aligned folder-per-identity trees, merged by identity name")],
    train: Annotated[Path, typer.Option(help="symlink tree of the training identities")],
    holdout: Annotated[Path, typer.Option(help="symlink tree of the held-out identities")],
    every: Annotated[int, typer.Option(help="every N-th eligible identity is held out")] = 3,
    keep_in_train: Annotated[list[Path] | None, typer.Option(help="a tree whose identities are never held out (repeatable)")] = None,
) -> None:
    """Identity-disjoint train / hold-out symlink trees (training.data.split)."""
    from training.data.split import split as split_trees

    n_train, n_hold = split_trees(sources, train, holdout, every, keep_in_train=keep_in_train or [])
    typer.echo(f"{n_train} training identities in {train}, {n_hold} hold-out identities in {holdout}")


@data.command()
def recordio(
    src: Annotated[Path, typer.Argument(help="folder with one sub-folder of images per identity")],
    dst: Annotated[Path, typer.Argument(help="output prefix: writes DST.rec and DST.idx")],
    size: Annotated[int | None, typer.Option(help="resize to SIZE×SIZE (default: keep, JPEGs copied as-is)")] = None,
    crop: Annotated[tuple[float, float, float, float] | None, typer.Option(help="relative crop box L T R B")] = None,
    quality: Annotated[int, typer.Option(help="JPEG quality of re-encoded images")] = 95,
    min_images_per_class: Annotated[int, typer.Option(help="leave out identities with fewer images")] = 1,
    max_classes: Annotated[int | None, typer.Option(help="keep at most this many identities")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="identity folder name to leave out (repeatable)")] = None,
) -> None:
    """Convert a folder-per-identity dataset to insightface RecordIO (train.rec / train.idx)."""
    from training.data.recordio import folder_to_recordio

    rec, idx = folder_to_recordio(src, dst, size, crop, quality, min_images_per_class=min_images_per_class,
                                  max_classes=max_classes, exclude=exclude or ())
    typer.echo(f"wrote {rec} and {idx}")


# ---------------------------------------------------------------- convert


@convert.command()
def mtcnn(
    wheel: Annotated[Path, typer.Option(help="the facenet-pytorch 2.6.0 wheel (read, never installed)")],
    out: Annotated[Path, typer.Option(help="output folder")] = Path("models/detector"),
    parity_image: Annotated[list[Path] | None, typer.Option(help="photo for the real-input parity check (repeatable; default: a few LFW images from FACESET_DATA_DIR)")] = None,
) -> None:
    """facenet-pytorch's MTCNN -> three ONNX nets + card, after a torch vs ONNX Runtime parity check."""
    import torch
    import yaml

    from training.convert.mtcnn import convert as convert_mtcnn
    from training.convert.mtcnn import default_parity_images

    torch.set_num_threads(1)
    card = convert_mtcnn(wheel, out, default_parity_images() if parity_image is None else parity_image)
    typer.echo(yaml.safe_dump(card["parity"], sort_keys=False))


@convert.command()
def dlib(
    dat: Annotated[Path, typer.Option(help="dlib_face_recognition_resnet_model_v1.dat")],
    out: Annotated[Path, typer.Option(help="torch checkpoint to write (atomically)")],
) -> None:
    """dlib's face ResNet (.dat) -> a faceset dlib_resnet34 checkpoint, by our own reader of dlib's format."""
    from training.convert.dlib_resnet import convert as convert_dlib

    meta = convert_dlib(dat, out)
    typer.echo(f"wrote {out}: {meta['arch']}, input mean {meta['dlib_input_mean_rgb']}, sha256 {meta['source']['sha256']}")


# ---------------------------------------------------------------- caface


@caface.command()
def features(
    root: Annotated[Path, typer.Argument(help="aligned folder-per-identity tree (the card's template and size)")],
    out: Annotated[Path, typer.Argument(help=".npz to write")],
    card: Annotated[Path, typer.Option(help="recognition model card")] = Path("models/default"),
    chunk: Annotated[int, typer.Option(help="images per resumable chunk")] = 256,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads")] = 1,
) -> None:
    """Per image and degradation: raw embedding and style statistics of the recognition model (resumable)."""
    from training.caface.features import precompute

    _log()
    typer.echo(f"wrote {precompute(root, out, card, chunk, threads)}")


@caface.command("train")
def caface_train(
    config: Annotated[str, typer.Argument(help="a shipped config name (training/configs/caface/) or a YAML path")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a config key, e.g. --set steps=200")] = None,
) -> None:
    """Train the CAFace fusion network on precomputed features (the recognition model stays frozen)."""
    from training.caface.config import load_caface_config
    from training.caface.train import train as train_fusion

    _log()
    typer.echo(f"wrote {train_fusion(load_caface_config(config, set_ or []))}")


@caface.command("export")
def caface_export(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="runs/NAME/caface.pt")],
    out: Annotated[Path, typer.Option(help="fusion model folder to write")] = Path("models/caface"),
    recognition_card: Annotated[Path, typer.Option(help="the recognition model the fusion was trained on")] = Path("models/default"),
    name: Annotated[str, typer.Option(help="model name")] = "faceset-caface",
    version: Annotated[str, typer.Option(help="model version")] = "1",
    parity_features: Annotated[Path | None, typer.Option(help="a features .npz (real frames for the parity check)")] = None,
) -> None:
    """caface.pt -> assign.onnx + aggregate.onnx + card, after a torch vs ONNX Runtime parity check."""
    import torch

    from training.caface.export import export_fusion

    torch.set_num_threads(1)
    card = export_fusion(checkpoint, out, recognition_card, name, version, parity_features, _retyped(ctx))
    typer.echo(f"wrote {out}: parity {card.parity}")


@caface.command("evaluate")
def caface_evaluate(
    fusion: Annotated[Path, typer.Argument(help="fusion model folder (card.yaml, assign.onnx, aggregate.onnx)")],
    features: Annotated[list[Path] | None, typer.Option(help="features .npz, every identity (repeatable)")] = None,
    subset: Annotated[list[str] | None, typer.Option(help="FEATURES.npz:IDENTITIES.txt, only the identities listed (repeatable)")] = None,
    condition: Annotated[list[str] | None, typer.Option(help="clean, mixed, one_good or mixed_KIND (repeatable; default clean, mixed, one_good)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report here as JSON")] = None,
) -> None:
    """Template-to-template verification: CAFace fusion vs mean vs magnitude-weighted mean."""
    from training.caface.evaluate import evaluate_sets, markdown

    sets = [(p, None) for p in features or []] + [_subset(s) for s in subset or []]
    report = {}
    for name, feats, rows in evaluate_sets(fusion, sets, condition or ["clean", "mixed", "one_good"]):
        report[name] = rows
        typer.echo(markdown(f"{name}: {len(feats.identities)} identities, {len(feats.labels)} images", rows) + "\n")
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))


def _subset(value: str) -> tuple[Path, Path]:
    features, colon, identities = value.rpartition(":")
    if not colon:
        raise typer.BadParameter(f"{value!r} is not FEATURES.npz:IDENTITIES.txt", param_hint="--subset")
    return Path(features), Path(identities)


# ---------------------------------------------------------------- faceset model (fusion for any model)

# joins the base install's `faceset model` group through the faceset.model entry points (training/pyproject.toml)
model_fuse_app = typer.Typer()


def _taps(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


Taps = Annotated[str | None, typer.Option(help="tensors to tap, comma-separated (name1,name2); default: the last "
                                                "feature map of each resolution, up to 5 (engines.style_taps)")]


@model_fuse_app.command("style")
def model_style(
    model: Annotated[Path, typer.Argument(help="model card folder; its ONNX is copied, never changed")],
    taps: Taps = None,
    out: Annotated[Path | None, typer.Option(help="folder for the copy and its card (default: the card's own)")] = None,
) -> None:
    """Give a recognition model the CAFace style output: its intermediate maps tapped in a copy of its ONNX."""
    from engines.model_card import ModelCard
    from engines.style_taps import add_style_taps

    card = add_style_taps(ModelCard.load(model), out, _taps(taps))
    typer.echo(f"wrote {card.onnx_path}: style channels {card.outputs.style_channels}")


@model_fuse_app.command("fuse")
def model_fuse(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="model card folder (e.g. from faceset model import)")],
    data: Annotated[Path, typer.Option(help="raw photos, a folder per person, to train the fusion on")],
    out: Annotated[Path | None, typer.Option(help="fusion model folder to write (default MODEL/fusion)")] = None,
    work: Annotated[Path | None, typer.Option(help="aligned crops, features and checkpoints (default FACESET_RUNS_DIR/fuse-NAME); reruns resume from them")] = None,
    taps: Taps = None,
    steps: Annotated[int, typer.Option(help="training steps (the default model's fusion: 3000)")] = 3000,
    batch_sets: Annotated[int, typer.Option(help="sets per step")] = 64,
    eval_every: Annotated[int, typer.Option(help="every N-th identity with 2+ photos is kept out, for validation")] = 8,
    licence: Annotated[str | None, typer.Option(help="terms of the fusion model (default: not stated, the model's and data's apply)")] = None,
    quality_head: Annotated[bool, typer.Option(help="also train the model's learned quality head on the same "
                                                    "features (a candidate faceset model calibrate checks)")] = True,
    threads: Threads = 1,
) -> None:
    """Train and export the CAFace fusion model for a recognition model (the default model's trainer)."""
    import os

    from engines.model_card import ModelCard
    from training.caface.fuse import fuse
    from training.settings import get_settings

    _log()
    work = work or get_settings().runs_dir / f"fuse-{ModelCard.load(model).name}"
    card = fuse(model, data, work, out, _taps(taps), steps, batch_sets, eval_every, licence,
                threads or os.cpu_count() or 1, _retyped(ctx), quality_head)
    typer.echo(f"wrote {out or model / 'fusion'}: {card.name}, parity {card.parity}")


@model_fuse_app.command("quality-head")
def model_quality_head(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="model card folder (with a style output, or one is tapped)")],
    data: Annotated[Path, typer.Option(help="raw photos of training identities, a folder per person (never the "
                                            "calibration hold-out or an evaluation set)")],
    work: Annotated[Path | None, typer.Option(help="aligned crops and features (default FACESET_RUNS_DIR/fuse-NAME, "
                                                   "shared with faceset model fuse)")] = None,
    taps: Taps = None,
    steps: Annotated[int, typer.Option(help="training steps of the head")] = 1500,
    eval_every: Annotated[int, typer.Option(help="every N-th identity with 2+ photos is kept out, for its check")] = 8,
    threads: Threads = 1,
) -> None:
    """Train a learned per-face quality for a recognition model (training.caface.quality_head); faceset model
    calibrate then checks it and uses it only if it lowers FNMR."""
    import os

    from engines.model_card import ModelCard
    from training.caface.fuse import quality_head
    from training.settings import get_settings

    _log()
    work = work or get_settings().runs_dir / f"fuse-{ModelCard.load(model).name}"
    card = quality_head(model, data, work, _taps(taps), steps, eval_every, threads or os.cpu_count() or 1,
                        _retyped(ctx))
    typer.echo(f"wrote {card.root / card.quality_head.onnx.path}: {card.quality_head.validation}; "
               "run faceset model calibrate to check it")

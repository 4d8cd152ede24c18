"""`faceset model calibrate`: a card's thresholds, open-set tail model and (validated) quality, on a hold-out.

    faceset model calibrate models/w600k --holdout photos/holdout --dataset "our hold-out, 300 people"

Base install, no torch: the shipped MTCNN, alignment and ONNX Runtime (engines.calibration). Registered on
`faceset model` (service.model_cli.model_app).
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def calibrate(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="model card folder (or its card.yaml): rewritten atomically with the "
                                               "calibration")],
    holdout: Annotated[Path | None, typer.Option(help="held-out identities, a folder per person (never trained on): "
                                                      "raw photos, or aligned crops with --aligned")] = None,
    embeddings: Annotated[Path | None, typer.Option(help="or the hold-out's raw embeddings, computed through the "
                                                         "pipeline (.npz: embedding (N, D), identity (N,); "
                                                         "benchmarks/open_set.py embed)")] = None,
    aligned: Annotated[bool, typer.Option(help="the hold-out holds crops already aligned to the card's template and "
                                               "size (no detection)")] = False,
    dataset: Annotated[str | None, typer.Option(help="name of the hold-out, written to the card (default: its "
                                                     "folder)")] = None,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads (0 = every core)")] = 0,
    set_quality: Annotated[bool, typer.Option(help="replace the card's quality mapping with the hold-out's magnitude "
                                                   "percentiles (changes stored qualities; a fusion model trained "
                                                   "on the old mapping no longer matches)")] = False,
) -> None:
    """FAR thresholds (overall and per quality band), the open-set FPIR(t, N) tail model and the quality floors of a
    model card, on held-out identities. The card keeps a quality only where an error-versus-reject check validates
    it (a MagFace-trained model's magnitude, or the card's learned quality head); otherwise its quality is null and
    the service gates nothing on it."""
    from engines.calibration import calibrate_embeddings, calibrate_folder
    from service.command_line import command_as_run

    command = command_as_run(ctx)

    if (holdout is None) == (embeddings is None):
        raise typer.BadParameter("give exactly one of --holdout or --embeddings")
    if embeddings is not None:
        card = calibrate_embeddings(model, embeddings, dataset or str(embeddings), set_quality, command)
    elif not holdout.is_dir():
        raise typer.BadParameter(f"{holdout}: not a folder", param_hint="--holdout")
    else:
        card = calibrate_folder(model, holdout, dataset or str(holdout), aligned, threads, set_quality, command)
    c = card.calibration
    typer.echo(f"{c.positive_pairs} genuine / {c.negative_pairs} impostor pairs; thresholds "
               + ", ".join(f"FAR {far:g}: {t:.4f}" for far, t in sorted(c.thresholds.items())))
    if card.quality_head is not None and not any(k.source == "learned_head" for k in c.quality_checks):
        typer.echo("the learned quality head was not checked: cached embeddings carry no style statistics "
                   "(calibrate on --holdout photos or crops)")
    for check in c.quality_checks:
        curve = ", ".join(f"{r:.0%} rejected {f:.4f}" for r, f in zip(check.reject, check.fnmr))
        typer.echo(f"quality source {check.source}: FNMR at FMR {check.fmr:g} {curve} -> "
                   f"{'used' if check.used else 'not used'}")
    typer.echo(f"quality: {card.quality.method} {card.quality.low:.3f}..{card.quality.high:.3f}" if card.quality else
               "quality: null (no validated source): quality gating is off for this model")

"""A learned quality for an imported model (issue 13.3, second source): import, tap, train the head, calibrate, serve.

For mobilefacenet-a (an anchor: other people's, read from ../shared/anchors, never copied into the project), as a
user runs it:

    faceset model import mobilefacenet-a.onnx --out runs/byo_quality/mobilefacenet-a --channel-order BGR --std 128
    faceset model style runs/byo_quality/mobilefacenet-a
    faceset model quality-head runs/byo_quality/mobilefacenet-a --data TRAIN
    faceset model calibrate runs/byo_quality/mobilefacenet-a --holdout HOLDOUT
    FACESET_MODEL_CARD=runs/byo_quality/mobilefacenet-a FACESET_FUSION_CARD=none faceset serve   -> POST /embed

TRAIN: the first --train identities (sorted by name) of celeba-10k-aligned with two photos or more that are neither
in the CelebA calibration hold-out (engines.holdout, CelebA-299's people protected) nor in CelebA-299. HOLDOUT: the
first --identities people of that hold-out after the check's ten (benchmarks/byo_models.py's tree). The head never
sees lfw-dev, cfp-dev, CelebA-299 or the hold-out.

Printed: the head's validation, the calibration's error-versus-reject check (FNMR at FMR 1e-3 with 0/10/20 % of the
lowest-quality pairs rejected) and whether the card uses it, then /embed's quality of held-out photos clean and
degraded (blur, 1/8 resolution, occlusion, noise): the service's answer either way (null when refused).

    python benchmarks/byo_quality_head.py [--train 600] [--identities 300] [--probes 20]
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from byo_models import celeba_holdout, faceset, serving, symlink_tree  # noqa: E402
from lfw_anchors import ANCHORS  # noqa: E402

from engines.holdout import holdout_names, list_identities  # noqa: E402
from engines.model_card import ModelCard  # noqa: E402
from training.eval.degrade import degrade  # noqa: E402
from training.settings import get_settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "byo_quality"
NAME = "mobilefacenet-a"
DEGRADED = {"blur": 4.0, "lowres": 8.0, "occlude": 0.35, "noise": 35.0}


def training_tree(data: Path, identities: int) -> Path:
    ids = list_identities(data / "celeba-10k-aligned")
    protected = list_identities(data / "celeba-299")
    held = holdout_names(ids, protected=protected, every=3, min_images=2)
    names = [n for n in sorted(ids) if n not in held and n not in protected and len(ids[n]) >= 2][:identities]
    return symlink_tree(WORK / f"train-{identities}", {n: ids[n] for n in names})


def jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=95)
    return out.getvalue()


def embed_quality(base: str, photos: list[Path]) -> dict[str, list[float | None]]:
    """/embed's quality of the largest face of each photo, clean and per degradation (None: no face or null)."""
    out: dict[str, list[float | None]] = {"clean": [], **{k: [] for k in DEGRADED}}
    with httpx.Client(timeout=60) as http:
        for k, path in enumerate(photos):
            rgb = np.asarray(Image.open(path).convert("RGB"))
            variants = {"clean": rgb, **{kind: degrade(rgb, kind, s, seed=k) for kind, s in DEGRADED.items()}}
            for kind, image in variants.items():
                faces = http.post(f"{base}/embed?max_faces=1", files={"images": jpeg(image)}).json()["results"][0]["faces"]
                out[kind].append(faces[0]["quality"] if faces else None)
    return out


def norm_comparison(model: Path, holdout: Path) -> None:
    """The same error-versus-reject check of the plain embedding norm on the same hold-out pairs: never a candidate
    (the model was not trained with MagFace), printed to show what the head adds over it."""
    from engines.base import EMBEDDING, STYLE
    from engines.calibration import check_quality, embed_photo_tree, pair_scores
    from engines.quality_sources import QUALITY_SOURCES

    card = ModelCard.load(model)
    emb, labels, _, style = embed_photo_tree(card, holdout, threads=2)
    head = QUALITY_SOURCES.build("learned_head", card=card).scores({EMBEDDING: emb, STYLE: style})
    for label, scores in (("plain norm (not a candidate)", np.linalg.norm(emb, axis=1)), ("learned head", head)):
        genuine, impostor, gs, is_ = pair_scores(emb, labels, scores)
        c = check_quality("magnitude", genuine, impostor, gs, is_)
        print(f"{label:30s} FNMR at FMR 1e-3: " + ", ".join(f"{r:.0%} rejected {100 * f:.2f} %"
                                                             for r, f in zip(c.reject, c.fnmr)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=600, help="training identities of the head")
    ap.add_argument("--identities", type=int, default=300, help="calibration hold-out identities")
    ap.add_argument("--probes", type=int, default=20, help="hold-out photos sent to /embed, clean and degraded")
    ap.add_argument("--anchors", type=Path, default=None)
    ap.add_argument("--compare-norm", action="store_true", help="also the plain norm's check on the same pairs")
    ap.add_argument("--reuse", action="store_true", help="keep the model folder of an earlier run (imported, tapped, "
                    "head trained, calibrated): only print its checks and serve it")
    args = ap.parse_args()
    data = get_settings().data_dir
    anchors = args.anchors or data.parent / "anchors"
    t0 = time.time()
    _, holdout, photos = celeba_holdout(data, args.identities)
    train = training_tree(data, args.train)
    model = WORK / NAME
    c = ANCHORS[NAME]
    steps = [("model", "import", str(anchors / f"{NAME}.onnx"), "--out", str(model), "--channel-order", c.channel_order,
              "--mean", f"{c.mean[0]:g}", "--std", f"{c.std[0]:g}"),
             ("model", "style", str(model)),
             ("model", "quality-head", str(model), "--data", str(train), "--work", str(WORK / f"work-{args.train}"), "--threads", "2"),
             ("model", "calibrate", str(model), "--holdout", str(holdout), "--dataset",
              f"CelebA calibration hold-out, {args.identities} identities ({photos} photos)", "--threads", "2")]
    for words in [] if args.reuse else steps:
        print(f"$ faceset {' '.join(words)}")
        print(faceset(*words), end="", flush=True)
    card = ModelCard.load(model)
    print(f"head: {card.quality_head.data}; {card.quality_head.validation}; parity {card.quality_head.parity_max_abs_diff:.1e}")
    for check in card.calibration.quality_checks:
        print(f"check {check.source}: FNMR at FMR {check.fmr:g} " + ", ".join(
            f"{r:.0%} rejected {100 * f:.2f} %" for r, f in zip(check.reject, check.fnmr))
            + f" ({check.genuine_pairs} genuine / {check.impostor_pairs} impostor pairs) -> used: {check.used}")
    print(f"card quality: {card.quality}")
    if args.compare_norm:
        norm_comparison(model, holdout)
    probes = [ps[0] for ps in list_identities(holdout).values()][: args.probes]
    with serving(model) as base:
        qualities = embed_quality(base, probes)
    print(f"/embed quality of {len(probes)} hold-out photos (largest face), mean [min, max]:")
    for kind, qs in qualities.items():
        found = [q for q in qs if q is not None]
        print(f"  {kind:8s} " + (f"{np.mean(found):.3f} [{min(found):.3f}, {max(found):.3f}] of {len(found)}"
                                  if found else f"null ({len(qs)} answers)"))
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

"""Open-set identification and quality-banded verification through the serving pipeline: embeddings and calibration.

    python benchmarks/open_set.py embed            # once: photos -> detect -> align -> embed, cached under runs/open_set/
    python benchmarks/open_set.py calibrate        # the card's FPIR tail model, quality floors and bands (hold-out only)

Sets (raw photos, the largest face of each, the card's flip TTA):
  celeba-holdout     the CelebA calibration hold-out (training.data.split's rule: every 3rd CelebA-10k-only
                     identity with 2+ photos): the ONLY data the calibration reads
  celeba-distractors one photo of each other CelebA-10k-only identity (trained on: used only to grow galleries)
  lfw-dev, cfp-dev   evaluation people; celeba-299-kept: every 8th CelebA-299 identity (the recognition
                     model's embedding layer was fine-tuned on CelebA-299, so these are reported apart)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FACESET_DATA_DIR", REPO.parent / "shared" / "data"))
CACHE = REPO / "runs" / "open_set"
CARD = REPO / "models" / "default"


# ---- the sets -------------------------------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(p for p in d.iterdir() if p.is_file()) for d in sorted(root.iterdir()) if d.is_dir()}


def celeba_split() -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """(hold-out, other CelebA-10k-only identities), by training.data.split's rule (sorted names, every 3rd with 2+)."""
    ids = _tree(DATA / "celeba-10k-aligned")
    protected = set(_tree(DATA / "celeba-299"))
    candidates = [n for n in sorted(ids) if n not in protected and len(ids[n]) >= 2]
    holdout = set(candidates[::3])
    return ({n: ids[n] for n in sorted(holdout)},
            {n: p for n, p in ids.items() if n not in holdout and n not in protected})


def photos(name: str) -> list[tuple[Path, str]]:
    """(photo, identity) of a set."""
    if name == "celeba-holdout":
        return [(p, n) for n, ps in celeba_split()[0].items() for p in ps]
    if name == "celeba-distractors":
        return [(ps[0], n) for n, ps in celeba_split()[1].items()]
    if name == "celeba-299-kept":
        ids = _tree(DATA / "celeba-299")
        return [(p, n) for n in sorted(ids)[::8] for p in ids[n]]
    if name == "lfw-dev":
        return [(p, p.stem.rsplit("_", 1)[0]) for p in sorted((DATA / "lfw-dev" / "images").iterdir())]
    if name == "cfp-dev":
        return sorted((p, p.parent.parent.name) for p in (DATA / "cfp-dev" / "Images").glob("*/*/*.jpg"))
    raise ValueError(name)


SETS = ("celeba-holdout", "lfw-dev", "cfp-dev", "celeba-299-kept", "celeba-distractors")


# ---- embedding, once ------------------------------------------------------------------------------------------------


def embed_set(name: str, threads: int = 1) -> Path:
    """runs/open_set/NAME.npz: raw embeddings (N, D) (NaN rows: no face found), identities, paths."""
    from engines.base import build_engine
    from engines.detection import build_detector
    from engines.model_card import ModelCard
    from engines.pipeline import FacePipeline

    out = CACHE / f"{name}.npz"
    if out.exists():
        return out
    card = ModelCard.load(CARD)
    pipeline = FacePipeline(build_detector("mtcnn"), build_engine("onnxruntime", card=card, intra_op_threads=threads),
                            card, detect_max_side=1280)  # the service's default
    items = photos(name)
    emb = np.full((len(items), card.embedding_size), np.nan, np.float32)
    started = time.time()
    for i, (path, _) in enumerate(items):
        faces = pipeline.run([np.asarray(Image.open(path).convert("RGB"))], max_faces=1)[0]
        if faces:
            emb[i] = faces[0].embedding * faces[0].magnitude
        if i % 500 == 0:
            print(f"{name}: {i}/{len(items)} ({time.time() - started:.0f} s)", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, embedding=emb, identity=np.array([n for _, n in items]),
             path=np.array([str(p.relative_to(DATA)) for p, _ in items]))
    os.replace(tmp, out)
    return out


def load_set(name: str) -> dict[str, np.ndarray]:
    data = np.load(CACHE / f"{name}.npz")
    return {k: data[k] for k in data.files}


def faces(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw embeddings, integer identity labels, photo paths) of a set's photos in which a face was found."""
    d = load_set(name)
    found = ~np.isnan(d["embedding"][:, 0])
    _, labels = np.unique(d["identity"][found], return_inverse=True)
    return d["embedding"][found], labels, d["path"][found]


def calibrate_card() -> None:
    """Recalibrate the shipped card on the hold-out (the same as `faceset calibrate --embeddings`)."""
    from engines.model_card import ModelCard
    from training.calibrate import calibrate

    emb, labels, _ = faces("celeba-holdout")
    card = calibrate(ModelCard.load(CARD), emb, labels, "CelebA-10k hold-out identities (raw photos, our MTCNN)",
                     method="raw hold-out photos through the serving pipeline (MTCNN, alignment, the card's engine "
                            "with flip TTA), the largest face of each")
    card.save(CARD)
    print(card.calibration.model_dump_json(indent=1, exclude={"thresholds"}))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("embed", "calibrate"))
    ap.add_argument("--sets", nargs="*", default=list(SETS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.step == "embed":
        for name in args.sets:
            print(embed_set(name, args.threads), flush=True)
    elif args.step == "calibrate":
        calibrate_card()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()

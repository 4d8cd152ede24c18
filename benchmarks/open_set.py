"""Open-set identification and quality-banded verification through the serving pipeline: embeddings, calibration, evaluation.

    python benchmarks/open_set.py embed            # once: photos -> detect -> align -> embed, cached under runs/open_set/
    python benchmarks/open_set.py calibrate        # the card's FPIR tail model, quality floors and bands (hold-out only)
    python benchmarks/open_set.py holdout-check    # the FPIR method fitted on half the hold-out, checked on the other
    python benchmarks/open_set.py holdout-quality  # wrong identifications by probe quality on the hold-out
    python benchmarks/open_set.py holdout-gating   # ... and with the probe floor against without, at equal FPIR
    python benchmarks/open_set.py within-set       # probes and galleries from one set (one site's photos)
    python benchmarks/open_set.py evaluate         # lfw-dev, cfp-dev, celeba-299-kept: FPIR/FNIR, DET, negatives, /verify bands

Sets (raw photos, the largest face of each, the card's flip TTA):
  celeba-holdout     the CelebA calibration hold-out (training.data.split's rule: every 3rd CelebA-10k-only
                     identity with 2+ photos): the ONLY data the calibration reads
  celeba-distractors one photo of each other CelebA-10k-only identity (trained on: used only to grow galleries)
  celeba-299-other   one photo of each CelebA-299 identity not kept out (trained on: distractors too)
  lfw-dev, cfp-dev   evaluation people; celeba-299-kept: every 8th CelebA-299 identity (the recognition
                     model's embedding layer was fine-tuned on CelebA-299, so these are reported apart)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
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
    """(hold-out, other CelebA-10k-only identities), by the training split's rule (engines.holdout: sorted names,
    every 3rd with 2+)."""
    from engines.holdout import holdout_names

    ids = _tree(DATA / "celeba-10k-aligned")
    protected = set(_tree(DATA / "celeba-299"))
    holdout = holdout_names(ids, protected, every=3, min_images=2)
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
    if name == "celeba-299-other":  # one photo of every other CelebA-299 identity (trained on: distractors only)
        ids = _tree(DATA / "celeba-299")
        kept = set(sorted(ids)[::8])
        return [(ids[n][0], n) for n in sorted(ids) if n not in kept]
    if name == "lfw-dev":
        return [(p, p.stem.rsplit("_", 1)[0]) for p in sorted((DATA / "lfw-dev" / "images").iterdir())]
    if name == "cfp-dev":
        return sorted((p, p.parent.parent.name) for p in (DATA / "cfp-dev" / "Images").glob("*/*/*.jpg"))
    raise ValueError(name)


SETS = ("celeba-holdout", "lfw-dev", "cfp-dev", "celeba-299-kept", "celeba-distractors", "celeba-299-other")


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
    """Recalibrate the shipped card on the hold-out (engines.calibration, as `faceset model calibrate` does on photos)."""
    from engines.calibration import calibrate
    from engines.model_card import ModelCard

    emb, labels, _ = faces("celeba-holdout")
    card = calibrate(ModelCard.load(CARD), emb, labels, "CelebA-10k hold-out identities (raw photos, our MTCNN)",
                     method="raw hold-out photos through the serving pipeline (MTCNN, alignment, the card's engine "
                            "with flip TTA), the largest face of each")
    card.save(CARD)
    print(card.calibration.model_dump_json(indent=1, exclude={"thresholds"}))



# ---- evaluation: people no model was calibrated on ------------------------------------------------------------------
# Every decision below is the service's own: service.decisions.search_rule / decide / far_threshold and
# service.gallery.veto, on the cached pipeline embeddings; cosines by numpy inner product (what the exact index computes).

EVAL_SETS = ("lfw-dev", "cfp-dev", "celeba-299-kept")
DISTRACTOR_SETS = ("celeba-distractors", "celeba-299-other")
DRAWS = {100: 40, 1000: 10, 5000: 3}  # gallery size -> random galleries drawn
FPIRS = (0.1, 0.01, 0.001)
VERIFY_FARS = (1e-2, 1e-3)
TOP_K = 5  # the search's default shortlist
# decision codes of one probe
IDENTIFIED, WRONG, UNKNOWN, LOW_QUALITY = 0, 1, 2, 3


@dataclass
class Pool:
    """Probes: every evaluation photo (P); gallery candidates: each evaluation person's first photo, then one photo
    of each distractor identity (G); scores (P, G)."""

    probe_person: np.ndarray  # (P,) index of the probe's person (a gallery column)
    probe_source: np.ndarray  # (P,) set name
    probe_quality: np.ndarray  # (P,)
    probe_unit: np.ndarray  # (P, D)
    enrolment: np.ndarray  # (people,) index of each person's enrolment photo among the probes
    gallery_unit: np.ndarray  # (G, D)
    scores: np.ndarray  # (P, G)
    same: np.ndarray  # (people, G) the candidates taken for each person: their enrolment and, cleaned, duplicates


def same_person(card, person: np.ndarray, scores: np.ndarray, enrolment: np.ndarray) -> np.ndarray:
    """(people, G): gallery candidates taken for each evaluation person. Public sets of celebrities share people
    (a cfp-dev or CelebA-299 person can also be a CelebA-10k distractor under another id), and a search that finds
    them is not a stranger identified. The rule is the calibration's duplicate rule (engines.open_set): a person
    with 2+ photos whose photos are on average closer to a candidate than the hold-out's median genuine pair is
    (the threshold comes from the hold-out, not from these sets). A person with one photo cannot be told from a
    lookalike, so their duplicates stay in (the safe side: they count as strangers identified)."""
    from engines.calibration import pair_scores

    hold, hold_labels, _ = faces("celeba-holdout")
    median_genuine = float(np.median(pair_scores(hold.astype(np.float64), hold_labels)[0]))
    people = len(enrolment)
    onehot = np.zeros((len(person), people))
    onehot[np.arange(len(person)), person] = 1
    count = onehot.sum(0)
    mean = (onehot.T @ scores) / count[:, None]
    same = (mean > median_genuine) & (count[:, None] >= 2)
    same[np.arange(people), np.arange(people)] = True  # each person's own enrolment (gallery column k)
    return same


def _unit_quality(card, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from engines.model_card import quality_from_magnitude

    norms = np.linalg.norm(emb, axis=1)
    return (emb / norms[:, None]).astype(np.float32), quality_from_magnitude(card, norms)


def build_pool(card, clean: bool = True) -> Pool:
    persons, sources, embs = [], [], []
    offset = 0
    for name in EVAL_SETS:
        emb, labels, _ = faces(name)
        persons.append(labels + offset)
        offset += labels.max() + 1
        sources += [name] * len(labels)
        embs.append(emb)
    person = np.concatenate(persons)
    unit, quality = _unit_quality(card, np.concatenate(embs))
    enrolment = np.array([np.flatnonzero(person == k)[0] for k in range(offset)])
    distractors = _unit_quality(card, np.concatenate([faces(n)[0] for n in DISTRACTOR_SETS]))[0]
    gallery = np.concatenate([unit[enrolment], distractors])
    scores = unit @ gallery.T
    same = same_person(card, person, scores, enrolment) if clean else np.eye(offset, len(gallery), dtype=bool)
    return Pool(person, np.array(sources), quality, unit, enrolment, gallery, scores, same)


def _decide_all(rule_at, ids, scores, qualities, gated: bool) -> np.ndarray:
    """Each probe's decision code by service.decisions.decide; `rule_at(n)` is the search rule at gallery size n,
    ids (P, 2): [top candidate, the probe's own column or -1 for a non-mated search], scores (P,), sizes in ids."""
    from service.decisions import decide

    out = np.empty(len(scores), np.int8)
    for k, ((top, own, n), score, q) in enumerate(zip(ids, scores, qualities)):
        rule = rule_at(int(n), gated)
        decision, who = decide(rule, [(int(top), float(score))], float(q))
        out[k] = (LOW_QUALITY if decision == "low_quality" else UNKNOWN if decision == "unknown"
                  else IDENTIFIED if who == own else WRONG)
    return out


def _rules(card, fpir: float):
    from functools import cache

    from service.decisions import search_rule

    @cache
    def rule_at(n: int, gated: bool):
        rule = search_rule(card, n, None, fpir, 1e-3, fpir)
        return rule if gated else replace(rule, probe_floor=None)
    return rule_at


def searches(pool: Pool, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One random gallery of n candidates: every probe's mated search (where its person is enrolled, other than
    the enrolment photo) and non-mated search (against the gallery less its own person: n − 1 then)."""
    cols = rng.choice(pool.scores.shape[1], n, replace=False)
    sub = pool.scores[:, cols]  # (P, n)
    position = np.full(pool.scores.shape[1], -1)
    position[cols] = np.arange(n)
    own = position[pool.probe_person]  # (P,) the person's column in this gallery, -1 if not enrolled
    rows = np.arange(len(sub))
    mated = (own >= 0) & ~np.isin(rows, pool.enrolment)
    taken = pool.same[pool.probe_person][:, cols]  # (P, n) candidates taken for the probe's person
    others = np.where(taken, -np.inf, sub)  # the gallery as a stranger to this person sees it
    with_own = others.copy()
    with_own[rows[own >= 0], own[own >= 0]] = sub[rows[own >= 0], own[own >= 0]]
    top = with_own.argmax(1)
    best = others.argmax(1)
    return dict(
        mated_ids=np.stack([cols[top], pool.probe_person, n - taken.sum(1) + (own >= 0)], 1)[mated],
        mated_score=with_own[rows, top][mated], mated_rows=rows[mated],
        nonmated_ids=np.stack([cols[best], np.full(len(rows), -1), n - taken.sum(1)], 1),
        nonmated_score=others[rows, best], nonmated_rows=rows, cols=cols)


def evaluate_search(card, pool: Pool, seed: int = 0) -> tuple[list[dict], dict]:
    """Rows of (N, requested FPIR, gated): measured FPIR, FNIR and their counts by probe source; and the DET curves
    (threshold sweeps) per (N, gated)."""
    rng = np.random.default_rng(seed)
    rows, det = [], {}
    for n, draws in DRAWS.items():
        runs = [searches(pool, n, rng) for _ in range(draws)]
        cat = {k: np.concatenate([r[k] for r in runs]) for k in runs[0]}
        mq, nq = pool.probe_quality[cat["mated_rows"]], pool.probe_quality[cat["nonmated_rows"]]
        msrc, nsrc = pool.probe_source[cat["mated_rows"]], pool.probe_source[cat["nonmated_rows"]]
        for fpir in FPIRS:
            rule_at = _rules(card, fpir)
            for gated in (True, False):
                m = _decide_all(rule_at, cat["mated_ids"], cat["mated_score"], mq, gated)
                nm = _decide_all(rule_at, cat["nonmated_ids"], cat["nonmated_score"], nq, gated)
                for source in ("all", *EVAL_SETS):
                    ms, ns = (m, nm) if source == "all" else (m[msrc == source], nm[nsrc == source])
                    rows.append(dict(
                        n=n, fpir=fpir, gated=gated, source=source, draws=draws, threshold=rule_at(n, gated).threshold,
                        mated=ms.size, nonmated=ns.size, measured_fpir=float(np.mean(ns == WRONG)),
                        fnir=float(np.mean(ms != IDENTIFIED)), mated_wrong=float(np.mean(ms == WRONG)),
                        mated_low_quality=float(np.mean(ms == LOW_QUALITY)),
                        nonmated_low_quality=float(np.mean(ns == LOW_QUALITY))))
        for gated in (True, False):  # the sweep: who is identified at t = -inf (decide), then score >= t
            rule_at = _rules(card, FPIRS[0])
            anything = (lambda n, g: replace(rule_at(n, g), threshold=-np.inf))
            m = _decide_all(anything, cat["mated_ids"], cat["mated_score"], mq, gated)
            nm = _decide_all(anything, cat["nonmated_ids"], cat["nonmated_score"], nq, gated)
            grid = np.quantile(cat["nonmated_score"], 1 - np.geomspace(0.5, 2e-4, 60))
            det[(n, gated)] = dict(
                threshold=grid,
                fpir=np.array([np.mean((nm == WRONG) & (cat["nonmated_score"] >= t)) for t in grid]),
                fnir=np.array([1 - np.mean((m == IDENTIFIED) & (cat["mated_score"] >= t)) for t in grid]),
                wrong=np.array([np.mean((m == WRONG) & (cat["mated_score"] >= t)) for t in grid]))
        print(f"N={n}: {draws} galleries, {cat['mated_score'].size} mated and {cat['nonmated_score'].size} "
              f"non-mated searches", flush=True)
    return rows, det


def gallery_model(card, pool: Pool, cols: np.ndarray):
    """The FPIR model the service decides a gallery of these candidates by (service.gallery.GalleryService.open_set):
    the card's tail moved to the gallery's own vectors from GALLERY_MIN_IDS identities on, else the card's."""
    from engines.open_set import GALLERY_MIN_IDS, GALLERY_SAMPLE_IDS, adapt_to_gallery

    if len(cols) < GALLERY_MIN_IDS:
        return None
    pick = np.random.default_rng(0).choice(len(cols), min(len(cols), GALLERY_SAMPLE_IDS), replace=False)
    return adapt_to_gallery(card.calibration.open_set, pool.gallery_unit[cols[np.sort(pick)]])


def evaluate_gallery_calibrated(card, pool: Pool, seed: int = 0) -> list[dict]:
    """evaluate_search's galleries (the same draws) decided as the service decides them with its default
    FACESET_GALLERY_CALIBRATION_MIN: each gallery of 200+ identities by its own calibration (floor on)."""
    from functools import cache

    from service.decisions import search_rule

    rng = np.random.default_rng(seed)
    rows = []
    for n, draws in DRAWS.items():
        runs = [searches(pool, n, rng) for _ in range(draws)]
        models = [gallery_model(card, pool, r["cols"]) for r in runs]
        for fpir in FPIRS:
            m, nm, msrc, nsrc = [], [], [], []
            for r, model in zip(runs, models):
                rule_at = cache(lambda k, gated, model=model: search_rule(card, k, None, fpir, 1e-3, fpir, model))
                mq, nq = pool.probe_quality[r["mated_rows"]], pool.probe_quality[r["nonmated_rows"]]
                m.append(_decide_all(rule_at, r["mated_ids"], r["mated_score"], mq, True))
                nm.append(_decide_all(rule_at, r["nonmated_ids"], r["nonmated_score"], nq, True))
                msrc.append(pool.probe_source[r["mated_rows"]])
                nsrc.append(pool.probe_source[r["nonmated_rows"]])
            m, nm, msrc, nsrc = map(np.concatenate, (m, nm, msrc, nsrc))
            for source in ("all", *EVAL_SETS):
                ms, ns = (m, nm) if source == "all" else (m[msrc == source], nm[nsrc == source])
                rows.append(dict(n=n, fpir=fpir, source=source, calibration="gallery" if models[0] else "model",
                                 measured_fpir=float(np.mean(ns == WRONG)), fnir=float(np.mean(ms != IDENTIFIED)),
                                 mated_wrong=float(np.mean(ms == WRONG))))
    return rows


def at_equal_fpir(det: dict, target: float) -> dict:
    """FNIR and mated wrong identifications of each curve at the lowest threshold whose FPIR is at most `target`."""
    out = {}
    for key, c in det.items():
        k = int(np.argmax(c["fpir"] <= target))
        out[key] = dict(threshold=float(c["threshold"][k]), fpir=float(c["fpir"][k]), fnir=float(c["fnir"][k]),
                        wrong=float(c["wrong"][k]))
    return out


def evaluate_negatives(card, pool: Pool, n: int = 1000, draws: int = 10, fpir: float = 0.1, seed: int = 1) -> dict:
    """'Not this person': in galleries of n, each person not enrolled with 3+ photos searches with their first photo;
    where it is identified (at `fpir`, gated, as the service does) their second photo becomes a negative of the
    identity hit; their other photos (fresh) and every mated probe search before and after (service.gallery.veto)."""
    from service.decisions import decide
    from service.gallery import veto

    rng, rule_at = np.random.default_rng(seed), _rules(card, fpir)
    enrolment_rows = set(pool.enrolment.tolist())
    counts = dict(hit_people=0, fresh_hit=0, fresh_hit_before=0, fresh_hit_after=0, fresh=0, fresh_before=0,
                  fresh_after=0, mated=0, mated_before=0, mated_after=0)
    for _ in range(draws):
        cols = rng.choice(pool.scores.shape[1], n, replace=False)
        enrolled = set(cols.tolist())
        rule = rule_at(n, True)

        def search(row: int, negatives: dict) -> int | None:
            sims = pool.scores[row, cols]
            order = np.argsort(-sims)[:TOP_K]
            shortlist = [(int(cols[j]), float(sims[j])) for j in order]
            vetoed = veto(pool.probe_unit[row], shortlist, negatives)
            return decide(rule, [m for m in shortlist if m[0] not in vetoed], float(pool.probe_quality[row]))[1]

        strangers = [np.flatnonzero(pool.probe_person == k) for k in range(len(pool.enrolment)) if k not in enrolled]
        strangers = [r for r in strangers if len(r) >= 3]
        negatives: dict[int, list] = {}
        hit = set()
        for r in strangers:
            who = search(int(r[0]), {})
            if who is not None:
                negatives.setdefault(who, []).append(pool.probe_unit[r[1]])
                hit.add(int(r[0]))
        negatives = {k: np.stack(v) for k, v in negatives.items()}
        for r in strangers:
            for row in r[2:]:
                before, after = search(int(row), {}) is not None, search(int(row), negatives) is not None
                for prefix in ("fresh", "fresh_hit") if int(r[0]) in hit else ("fresh",):
                    counts[prefix] += 1
                    counts[f"{prefix}_before"] += before
                    counts[f"{prefix}_after"] += after
        counts["hit_people"] += len(hit)
        mated = [row for row in range(len(pool.probe_person))
                 if pool.probe_person[row] in enrolled and row not in enrolment_rows]
        for row in mated:
            person = int(pool.probe_person[row])
            counts["mated"] += 1
            counts["mated_before"] += search(row, {}) != person
            counts["mated_after"] += search(row, negatives) != person
    return counts


def evaluate_verify(card) -> list[dict]:
    """All-vs-all pairs of lfw-dev and cfp-dev: measured FAR and TAR at the requested FAR, per band of the pair's
    lower quality and overall, with the card's single threshold and with its band thresholds (far_threshold)."""
    from service.decisions import far_threshold
    from engines.calibration import pair_scores

    rows = []
    for name in ("lfw-dev", "cfp-dev"):
        emb, labels, _ = faces(name)
        unit, quality = _unit_quality(card, emb)
        genuine, impostor, gq, iq = pair_scores(unit.astype(np.float64), labels, quality)
        for far in VERIFY_FARS:
            single = far_threshold(card, far)[1]
            banded = {}
            for kind, lower in (("genuine", gq), ("impostor", iq)):
                banded[kind] = [far_threshold(card, far, float(q)) for q in lower]
            for b, band in enumerate([None, *card.calibration.quality_bands]):
                sel = {kind: np.array([band is None or (x[2].low, x[2].high) == (band.low, band.high)
                                       for x in banded[kind]]) for kind in banded}
                g, i = genuine[sel["genuine"]], impostor[sel["impostor"]]
                tg = np.array([x[1] for x in banded["genuine"]])[sel["genuine"]]
                ti = np.array([x[1] for x in banded["impostor"]])[sel["impostor"]]
                rows.append(dict(set=name, far=far, band="all" if band is None else f"{band.low:.2f}-{band.high:.2f}",
                                 genuine=g.size, impostor=i.size,
                                 far_single=float(np.mean(i >= single)) if i.size else float("nan"),
                                 tar_single=float(np.mean(g >= single)) if g.size else float("nan"),
                                 far_band=float(np.mean(i >= ti)) if i.size else float("nan"),
                                 tar_band=float(np.mean(g >= tg)) if g.size else float("nan")))
    return rows


def plot_det(det: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for (n, gated), c in sorted(det.items()):
        ok = c["fpir"] > 0
        ax.plot(c["fpir"][ok], c["fnir"][ok], ("-" if gated else "--"), color={100: "C0", 1000: "C1", 5000: "C2"}[n],
                label=f"N = {n:,}, {'quality floor' if gated else 'no floor'}")
    ax.set(xscale="log", yscale="log", xlabel="FPIR (non-mated searches identified)",
           ylabel="FNIR (mated searches not identified as themselves)",
           title="Open-set identification: lfw-dev + cfp-dev + celeba-299-kept probes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def evaluate(out_dir: Path) -> None:
    import json

    from engines.model_card import ModelCard

    card = ModelCard.load(CARD)
    started = time.time()
    pool = build_pool(card)
    below = {s: float(np.mean(pool.probe_quality[pool.probe_source == s] < card.calibration.floors.probe))
             for s in EVAL_SETS}
    enrol_below = float(np.mean(pool.probe_quality[pool.enrolment] < card.calibration.floors.enrolment))
    print(f"pool: {len(pool.probe_person)} probe photos of {len(pool.enrolment)} people, {pool.scores.shape[1]} "
          f"gallery candidates; below the probe floor {below}; enrolment photos below the enrolment floor "
          f"{enrol_below:.3f}", flush=True)
    overlap = {s: int(pool.same[np.unique(pool.probe_person[pool.probe_source == s])].sum()
                      - len(np.unique(pool.probe_person[pool.probe_source == s]))) for s in EVAL_SETS}
    print(f"candidates taken for the same person as an evaluation person (besides their enrolment): {overlap}")
    rows, det = evaluate_search(card, pool)
    rows_uncleaned, _ = evaluate_search(card, build_pool(card, clean=False))
    rows_gallery = evaluate_gallery_calibrated(card, pool)
    summary(rows, rows_uncleaned, rows_gallery)
    equal = {t: at_equal_fpir(det, t) for t in (0.1, 0.01)}
    negatives = evaluate_negatives(card, pool)
    verify = evaluate_verify(card)
    plot_det(det, out_dir / "open_set_det.png")
    result = dict(seconds=round(time.time() - started, 1), below_probe_floor=below, enrolment_below_floor=enrol_below,
                  same_person_candidates=overlap, search=rows, search_uncleaned=rows_uncleaned,
                  search_gallery_calibrated=rows_gallery, equal_fpir={str(t): {f"{n}/{'gated' if g else 'ungated'}": v for (n, g), v in e.items()}
                                           for t, e in equal.items()},
                  negatives=negatives, verify=verify)
    (out_dir / "open_set_results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("search", "verify")}, indent=1))

def summary(rows: list[dict], uncleaned: list[dict], gallery: list[dict]) -> None:
    """Measured / requested FPIR and FNIR (all sets, floor on): by the card's calibration (cleaned of shared people
    and not), and as the service decides with gallery calibration."""
    print("| N | requested FPIR | card: measured FPIR (ratio) | FNIR | shared people kept: FPIR (ratio) | "
          "as served (gallery calibration from 200): FPIR (ratio) | FNIR |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    pick = lambda rs: {(r["n"], r["fpir"]): r for r in rs if r.get("gated", True) and r["source"] == "all"}
    a, b, c = pick(rows), pick(uncleaned), pick(gallery)
    for key in sorted(a):
        r, u, g = a[key], b[key], c[key]
        print(f"| {key[0]:,} | {key[1]:g} | {100 * r['measured_fpir']:.2f} % ({r['measured_fpir'] / key[1]:.2f}) | "
              f"{100 * r['fnir']:.1f} % | {100 * u['measured_fpir']:.2f} % ({u['measured_fpir'] / key[1]:.2f}) | "
              f"{100 * g['measured_fpir']:.2f} % ({g['measured_fpir'] / key[1]:.2f}, {g['calibration']}) | "
              f"{100 * g['fnir']:.1f} % |")


def holdout_check(splits: int = 3, sizes=(10, 30, 100, 300), reps: int = 20) -> list[dict]:
    """The calibration method on people it was not fitted on: engines.open_set fitted on half the hold-out's
    identities, requested FPIR against measured on non-mated searches of galleries drawn from the other half
    (its duplicate identities left out by the same rule), for several random halvings."""
    from engines.model_card import tail_threshold
    from engines.open_set import CHECK_FPIRS, calibrate_open_set, impostor_matrix, nonmated_maxima

    emb, labels, _ = faces("celeba-holdout")
    out = []
    for split in range(splits):
        ids = np.random.default_rng(split).permutation(labels.max() + 1)
        fit = np.isin(labels, ids[: len(ids) // 2])
        model = calibrate_open_set(emb[fit], np.unique(labels[fit], return_inverse=True)[1])
        test_labels = np.unique(labels[~fit], return_inverse=True)[1]
        unit = emb[~fit] / np.linalg.norm(emb[~fit], axis=1, keepdims=True)
        imp, _ = impostor_matrix(unit, test_labels)
        for n in (*sizes, int(test_labels.max())):
            best = nonmated_maxima(imp, test_labels, n, reps, np.random.default_rng(100 + split))
            for f in CHECK_FPIRS:
                out.append(dict(split=split, n=n, fpir=f, searches=int(best.size), theta=model.theta,
                                exponent=model.exponent,
                                measured=float(np.mean(best >= tail_threshold(model, f, n)))))
        print(f"split {split}: theta {model.theta:.3f}, exponent {model.exponent:.3f}", flush=True)
    print("| N | searches | " + " | ".join(f"FPIR {f:g}: measured / requested" for f in CHECK_FPIRS) + " |")
    for split in range(splits):
        for n in sorted({r["n"] for r in out if r["split"] == split}):
            cells = [r for r in out if r["split"] == split and r["n"] == n]
            print(f"| {n} (half {split}) | {cells[0]['searches']:,} | "
                  + " | ".join(f"{r['measured'] / r['fpir']:.2f}" if r["fpir"] * r["searches"] >= 5 else "–"
                               for r in cells) + " |")  # under 5 expected events: no measurement
    return out


def holdout_searches(card, n: int, draws: int, rng: np.random.Generator):
    """(per-photo quality, then per draw (own, mated, scores, with_own)): galleries of n hold-out identities (one
    random photo each), every other photo searching. own (P,) the photo's gallery column or -1; mated (P,) its person
    is enrolled and it is not the enrolment photo; scores (P, n) impostor cosines only (its own person, and duplicate
    identities, at -inf); with_own: scores with the mated photos' own column filled in."""
    from engines.model_card import quality_from_magnitude
    from engines.open_set import impostor_matrix

    emb, labels, _ = faces("celeba-holdout")
    quality = quality_from_magnitude(card, np.linalg.norm(emb, axis=1))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    imp, _ = impostor_matrix(unit, labels)  # NaN: same identity or a duplicate identity
    sim = unit @ unit.T
    rows = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]

    def each():
        for _ in range(draws):
            chosen = rng.choice(len(rows), n, replace=False)
            photo = np.array([rng.choice(rows[c]) for c in chosen])
            column = np.full(len(rows), -1)
            column[chosen] = np.arange(n)
            own = column[labels]
            scores = np.where(np.isnan(imp[:, photo]), -np.inf, imp[:, photo])
            mated = (own >= 0) & ~np.isin(np.arange(len(labels)), photo)
            with_own = scores.copy()
            with_own[mated, own[mated]] = sim[mated, photo[own[mated]]]
            yield own, mated, scores, with_own
    return quality, each()


def holdout_quality(n: int = 300, draws: int = 30, bins: int = 10) -> list[dict]:
    """Do low-quality probes make wrong identifications on the hold-out (the calibration's own people)? Galleries of
    n hold-out identities (one random photo each), every other photo searching at the card's FPIR thresholds: by
    probe-quality decile, mated probes identified as someone else, mated probes missed, non-mated probes identified."""
    from engines.model_card import ModelCard, tail_threshold

    card = ModelCard.load(CARD)
    out = []
    for fpir in (0.1, 0.01):
        t = tail_threshold(card.calibration.open_set, fpir, n)
        quality, draws_ = holdout_searches(card, n, draws, np.random.default_rng(0))
        kept = {k: [] for k in ("wrong", "miss", "q_mated", "stranger", "q_nonmated")}
        for own, mated, scores, with_own in draws_:
            top, best = with_own.argmax(1), with_own.max(1)
            kept["wrong"].append(((best >= t) & (top != own))[mated])
            kept["miss"].append(~((best >= t) & (top == own))[mated])
            kept["q_mated"].append(quality[mated])
            kept["stranger"].append((scores.max(1) >= t)[own < 0])
            kept["q_nonmated"].append(quality[own < 0])
        k = {name: np.concatenate(v) for name, v in kept.items()}
        edges = np.quantile(quality, np.linspace(0, 1, bins + 1))
        edges[-1] += 1e-9
        for lo, hi in zip(edges[:-1], edges[1:]):
            m, s = (k["q_mated"] >= lo) & (k["q_mated"] < hi), (k["q_nonmated"] >= lo) & (k["q_nonmated"] < hi)
            out.append(dict(fpir=fpir, n=n, low=float(lo), high=float(hi), mated=int(m.sum()), nonmated=int(s.sum()),
                            mated_wrong=float(k["wrong"][m].mean()), mated_missed=float(k["miss"][m].mean()),
                            nonmated_identified=float(k["stranger"][s].mean())))
    print("| FPIR | probe quality | mated identified as someone else | mated missed | non-mated identified |")
    print("| --- | --- | --- | --- | --- |")
    for r in out:
        print(f"| {r['fpir']:g} | [{r['low']:.2f}, {min(r['high'], 1):.2f}) | {100 * r['mated_wrong']:.2f} % | "
              f"{100 * r['mated_missed']:.1f} % | {100 * r['nonmated_identified']:.2f} % |")
    return out


def within_set(sizes=(30, 100, 200, 400), draws: int = 100) -> list[dict]:
    """FPIR when probes and gallery come from one set (as at one site: one kind of camera and photo): each
    evaluation set's non-mated probes against galleries of its own people's enrolment photos only."""
    from engines.model_card import ModelCard, tail_threshold

    card = ModelCard.load(CARD)
    pool = build_pool(card)
    people = len(pool.enrolment)
    source = np.array([pool.probe_source[pool.probe_person == k][0] for k in range(people)])
    out = []
    for name in EVAL_SETS:
        candidates, probes = np.flatnonzero(source == name), pool.probe_source == name
        rng = np.random.default_rng(0)
        for n in (n for n in sizes if n < len(candidates)):
            hits, own = {f: 0 for f in FPIRS}, {f: 0 for f in FPIRS}
            searches = 0
            for _ in range(draws):
                cols = rng.choice(candidates, n, replace=False)
                taken = pool.same[pool.probe_person[probes]][:, cols]
                best = np.where(taken, -np.inf, pool.scores[probes][:, cols]).max(1)
                size = n - taken.sum(1)
                searches += best.size
                site = gallery_model(card, pool, cols) or card.calibration.open_set
                for f in FPIRS:
                    hits[f] += int(np.sum(best >= np.array([tail_threshold(card.calibration.open_set, f, int(k))
                                                            for k in size])))
                    own[f] += int(np.sum(best >= np.array([tail_threshold(site, f, int(k)) for k in size])))
            out += [dict(set=name, n=n, fpir=f, searches=searches, identified=h, identified_gallery_calibrated=own[f])
                    for f, h in hits.items()]
    print("| set | N | " + " | ".join(f"FPIR {f:g}: measured (ratio) by the card / by the gallery" for f in FPIRS) + " |")
    for name, n in dict.fromkeys((r["set"], r["n"]) for r in out):
        cells = [r for r in out if (r["set"], r["n"]) == (name, n)]
        print(f"| {name} | {n} | " + " | ".join(
            f"{100 * r['identified'] / r['searches']:.2f} % ({r['identified'] / r['searches'] / r['fpir']:.2f}) / "
            + (f"{r['identified_gallery_calibrated'] / r['searches'] / r['fpir']:.2f}" if n >= 200 else "–")
            for r in cells) + " |")
    return out


def holdout_gating(n: int = 300, draws: int = 30, targets=(0.1, 0.03, 0.01)) -> list[dict]:
    """Does the probe floor lower wrong identifications at equal FPIR on held-out people? Galleries of n hold-out
    identities (one random photo each), every other photo searching; the threshold swept separately with the
    floor (probes below it answer low_quality: never identified) and without, each taken at the lowest threshold
    whose measured FPIR is at most the target; mated probes identified as someone else, and FNIR, at that point."""
    from engines.model_card import ModelCard

    card = ModelCard.load(CARD)
    floor = card.calibration.floors.probe
    quality, draws_ = holdout_searches(card, n, draws, np.random.default_rng(0))
    kept = {k: [] for k in ("m_best", "m_right", "m_q", "n_best", "n_q")}
    for own, mated, scores, with_own in draws_:
        kept["m_best"].append(with_own.max(1)[mated])
        kept["m_right"].append((with_own.argmax(1) == own)[mated])
        kept["m_q"].append(quality[mated])
        kept["n_best"].append(scores.max(1)[own < 0])
        kept["n_q"].append(quality[own < 0])
    k = {name: np.concatenate(v) for name, v in kept.items()}
    grid = np.quantile(k["n_best"], 1 - np.geomspace(0.5, 1e-3, 400))
    out = []
    for gated in (True, False):
        m_on = (k["m_q"] >= floor) if gated else np.ones(k["m_q"].size, bool)
        n_on = (k["n_q"] >= floor) if gated else np.ones(k["n_q"].size, bool)
        for target in targets:
            t = next(t for t in grid if np.mean(n_on & (k["n_best"] >= t)) <= target)
            hit = m_on & (k["m_best"] >= t)
            out.append(dict(gated=gated, target=target, threshold=float(t), floor=floor, n=n,
                            fpir=float(np.mean(n_on & (k["n_best"] >= t))),
                            mated_wrong=float(np.mean(hit & ~k["m_right"])), fnir=float(np.mean(~(hit & k["m_right"]))),
                            low_quality=float(np.mean(~m_on))))
    print(f"| target FPIR | floor ({floor:.3f}) | threshold | FPIR | mated identified as someone else | FNIR |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in sorted(out, key=lambda r: (-r["target"], not r["gated"])):
        print(f"| {r['target']:g} | {'on' if r['gated'] else 'off'} | {r['threshold']:.4f} | {100 * r['fpir']:.2f} % | "
              f"{100 * r['mated_wrong']:.2f} % | {100 * r['fnir']:.1f} % |")
    return out


# the analysis steps: each prints its table and writes its rows to OUT/open_set_<name>.json
TABLES = {"holdout-check": holdout_check, "holdout-quality": holdout_quality, "holdout-gating": holdout_gating,
          "within-set": within_set}


def main(argv=None) -> None:
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=("embed", "calibrate", *TABLES, "evaluate"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks", help="where the JSON (and evaluate's PNG) go")
    ap.add_argument("--sets", nargs="*", default=list(SETS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.step == "embed":
        for name in args.sets:
            print(embed_set(name, args.threads), flush=True)
    elif args.step == "calibrate":
        calibrate_card()
    elif args.step in TABLES:
        rows = TABLES[args.step]()
        (args.out / f"open_set_{args.step.replace('-', '_')}.json").write_text(json.dumps(rows, indent=1))
    else:
        evaluate(args.out)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()

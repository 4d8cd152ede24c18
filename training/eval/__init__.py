"""Evaluation on embeddings from any engine: pairs (LFW View 2), set-to-set verification (IJB TAR@FAR), quality (MagFace ERC), plots.

numpy only, never torch, so training and the service-side ``faceset eval`` share it; the plots
import matplotlib when called.
"""
from training.eval.pairs import (
    DEFAULT_FARS,
    KFoldResult,
    Pair,
    PairsReport,
    TarAtFar,
    accuracy_at,
    balanced_folds,
    best_threshold,
    cosine_similarity,
    evaluate_pairs,
    kfold_accuracy,
    read_pairs,
    roc_curve,
    tar_at_far,
    threshold_at_far,
)
from training.eval.plots import plot_erc, plot_roc
from training.eval.quality import (
    REJECT_FRACTIONS,
    ERCResult,
    area_under_erc,
    erc_from_embeddings,
    error_versus_reject,
    magnitudes,
    pair_quality,
)
from training.eval.set_verification import FUSIONS, IJB_FARS, fuse, template_scores, template_tar_at_far

__all__ = [
    "DEFAULT_FARS",
    "ERCResult",
    "FUSIONS",
    "IJB_FARS",
    "KFoldResult",
    "Pair",
    "PairsReport",
    "REJECT_FRACTIONS",
    "TarAtFar",
    "accuracy_at",
    "area_under_erc",
    "balanced_folds",
    "best_threshold",
    "cosine_similarity",
    "erc_from_embeddings",
    "error_versus_reject",
    "evaluate_pairs",
    "fuse",
    "kfold_accuracy",
    "magnitudes",
    "pair_quality",
    "plot_erc",
    "plot_roc",
    "read_pairs",
    "roc_curve",
    "tar_at_far",
    "template_scores",
    "template_tar_at_far",
    "threshold_at_far",
]

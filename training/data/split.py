"""Identity-disjoint train / hold-out splits: the logic is torch-free in engines.holdout (calibration reads
the same rule without training's datasets); `faceset data split` and the recipes reach it here."""
from engines.holdout import holdout_names, merged_identities, split  # noqa: F401 (re-exported)

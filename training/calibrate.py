"""`faceset calibrate` (training's command, aligned crops or cached pipeline embeddings) reaches the torch-free
calibration here; the logic, and `faceset model calibrate` of the base install, are engines.calibration."""
from engines.calibration import calibrate  # noqa: F401 (re-exported)
from engines.calibration import embed_aligned_tree as embed_tree  # noqa: F401 (re-exported)

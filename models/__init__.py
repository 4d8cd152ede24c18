"""The committed models, installed as the package `faceset_models` (pyproject.toml maps it onto this folder),
so that the service's default model paths resolve in a wheel as in a checkout (service/settings.py)."""

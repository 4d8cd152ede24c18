"""faceset training library: backbones, margin losses, Partial FC, data, evaluation, DDP training.

Its own distribution, faceset-train (training/pyproject.toml: it needs torch), which adds the
training commands to `faceset`; the service never imports it.
"""

"""faceset training library: backbones, margin losses, Partial FC, data, evaluation, DDP training.

Installed with the ``train`` extra (it needs torch); the service never imports it.
"""

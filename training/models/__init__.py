"""Backbones, registered by name.

Contract every backbone keeps (the trainer, CoReFace and export rely on it):
  forward_features(x: (B, 3, H, W)) -> (B, C, h, w)   the last feature map
  forward_head(feat, dropout: float | None = None) -> (B, D)
      dropout (if given) overrides the head's dropout probability, applied to the flattened map
      before the embedding layer (CoReFace draws two such embeddings from one feature map)
  forward(x) = forward_head(forward_features(x))
  embedding_size: int
"""
from engines.registry import Registry

BACKBONES: Registry = Registry("backbone")


def build_backbone(name: str, **kwargs):
    _import_all()
    return BACKBONES.build(name, **kwargs)


def _import_all() -> None:
    # modules register themselves on import; imported lazily so `import training.models` stays cheap
    from training.models import dlib_resnet, iresnet, mobilefacenet  # noqa: F401


def settle_batchnorm(model, batches) -> None:
    """BatchNorm statistics from `batches` (an iterable of input tensors): their plain average, no gradients.

    A randomly initialised backbone shrinks its activations ~10× per stage (embeddings of norm ~1e-4, so every
    comparison is trivially "close"); statistics from a few random batches give an untrained network a trained
    one's scale, for exports whose parity or speed is measured rather than their accuracy."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)

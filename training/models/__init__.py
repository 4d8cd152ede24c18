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

"""CAFace (Cluster and Aggregate, Kim et al. NeurIPS 2022) template fusion on a frozen recognition model.

    features  precompute, per aligned image and degradation: raw embedding, style statistics (ONNX Runtime)
    model     the fusion network (Style Input Maker, per-frame Cluster Network, Aggregation Network), torch
    loss      L = mean(1 − cos(f_fused, W_y)) + (1 − cos(f_sequential, f_all_at_once))
    sets      training sets and evaluation templates drawn from the precomputed features
    train     `faceset caface train CONFIG`
    export    the two ONNX graphs (assign, aggregate) + card that `engines.fusion` runs without torch
    evaluate  template-to-template TAR@FAR: CAFace vs mean vs magnitude-weighted mean, clean and mixed sets
"""

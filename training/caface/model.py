"""The CAFace fusion network (Kim et al., NeurIPS 2022) over a frozen recognition model, in the additive form.

Per frame i the recognition model gives the raw embedding f_i (D,) and style statistics σ_i (S,)
(per-channel mean and std of its intermediate maps, `training.export.style_statistics`).

Style Input Maker (SIM)
    u_i  = W_u · (σ_i − μ_σ) / s_σ                          (d_u,)  μ_σ, s_σ: training-set statistics
    ñ_i  = (‖f_i‖ − low) / (high − low)                      the recognition card's quality range
    pe_i = [sin(π 2^k ñ_i), cos(π 2^k ñ_i)]_{k<d_pe/2}        (d_pe,)
    x_i  = W_x [u_i; pe_i]                                    (d,)

Cluster Network (CN), per frame
    tokens [G_1 … G_M, x_i] → `depth` pre-norm transformer blocks → [G'_{i,1} … G'_{i,M}, x'_i]
    A_{m,i} = softmax_m ⟨W_q G'_{i,m}, W_k x'_i⟩ / √d          (M,) per frame, Σ_m A_{m,i} = 1
    r_i     = sigmoid(MLP(x'_i))                              the frame's quality in [0, 1] (x'_i detached)
    s_i     = [W_s x'_i; r_i; ‖f_i‖]                          (K,) the stored style; r_i at K−2, ‖f_i‖ at K−1

Memory (what a template keeps, whatever the number of frames)
    S_m = Σ_i A_{m,i} f̂_i  (M, D)     T_m = Σ_i A_{m,i} s_i  (M, K)     c_m = Σ_i A_{m,i}  (M,)

Aggregation Network (AGN), on the memory alone
    F_m  = S_m / max(1, c_m)                       cluster feature (REFERENCE.md)
    s̄_m  = T_m / max(c_m, ε)                       count-weighted mean stored style; s̄_m[K−1] = mean ‖f‖ in m
    p_m  = c_m / Σ_m' c_m'                          the cluster's share of the frames
    a_m  = ‖S_m‖ / max(c_m, ε)                      agreement of the cluster's frames, in [0, 1]
    z_m  = MLP([s̄_m (magnitude as ñ); p_m; a_m]) + E_m, then one transformer block over the M tokens
    w_m  = softmax_m(log(p_m + ε) + W_o z_m)        (M, D) per-channel weights
    f    = Σ_m w_m ⊙ F_m, returned L2-normalised
    q    = 1 − exp(−Σ_m T_m[K−2] / τ) = 1 − exp(−Σ_i r_i / τ)   the template quality: the evidence of its good
           frames; every frame raises it by its own r_i, so it grows with each good frame and barely with poor ones

With W_o z = 0 the weights are the shares and f is the plain mean of f̂ (for c_m ≥ 1): the network
starts at the averaging baseline and learns where to depart from it.

Deliberate deviation from the official code: there the frame tokens attend to each other and to
the cluster tokens in one sequence, so a frame's assignment depends on the other frames of its
batch. Here every frame attends only to the M learned cluster tokens and itself, so A_{·,i}
depends on frame i alone. Then the memory is an exact, commutative sum over frames: the service
adds each frame's A_{m,i} f̂_i, A_{m,i} s_i and A_{m,i} atomically (a Redis hash increment), any
order and batching gives the same memory (up to float rounding of the sum), and the template is a
function of the memory only. The paper's sequential-equals-all-at-once loss is therefore 0 up to
rounding by construction; it is still computed as a check. What it costs: a frame cannot be
assigned relative to the other frames of its set (the official CN can, e.g. "the sharpest of these");
comparison between frames happens only in the AGN, over the M cluster summaries.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

EPS = 1e-6


class FusionArch(BaseModel):
    """Sizes of the fusion network (they go into the fusion card)."""

    model_config = ConfigDict(extra="forbid")

    embedding_size: int = Field(128, gt=0, description="D, the recognition model's embedding length.")
    style_size: int = Field(1472, gt=0, description="S, the length of the recognition model's style output.")
    clusters: int = Field(4, gt=1, description="M, learned cluster tokens.")
    style_dim: int = Field(64, gt=0, description="d_u, the SIM's style vector u_i.")
    norm_dim: int = Field(16, gt=0, description="d_pe, the sinusoidal encoding of the normalised norm (even).")
    width: int = Field(64, gt=0, description="d, token width in the cluster and aggregation networks.")
    heads: int = Field(4, gt=0, description="attention heads (divide width).")
    depth: int = Field(2, gt=0, description="transformer blocks in the cluster network.")
    stored_style: int = Field(14, gt=0, description="K − 2: learned components of the stored style s_i (then r_i, ‖f_i‖).")
    frame_quality_range: tuple[float, float] = Field((0.88, 0.97), description="(a, b): the frame quality r_i is "
                                                     "trained towards clip((cos(f̂_i, W_y^(−i)) − a)/(b − a), 0, 1).")
    evidence_frames: float = Field(2.0, gt=0, description="τ: template quality q = 1 − exp(−Σ_i r_i / τ).")


class Block(nn.Module):
    """Pre-norm transformer block over (B, L, d) tokens: x + MHA(LN x), then x + MLP(LN x)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        h = self.heads
        q, k, v = self.qkv(x).view(b, length, 3, h, d // h).permute(2, 0, 3, 1, 4)  # 3 × (B, h, L, d/h)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)  # (B, h, L, L)
        return self.proj((att @ v).transpose(1, 2).reshape(b, length, d))  # (B, h, L, d/h) -> (B, L, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def norm_encoding(n_tilde: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) -> (N, dim): [sin(π 2^k ñ), cos(π 2^k ñ)] for k < dim/2."""
    freqs = math.pi * 2.0 ** torch.arange(dim // 2, dtype=n_tilde.dtype, device=n_tilde.device)  # (dim/2,)
    angles = n_tilde[:, None] * freqs[None, :]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class StyleInputMaker(nn.Module):
    """(f (N, D), σ (N, S)) -> frame tokens x (N, d); see the module docstring."""

    def __init__(self, arch: FusionArch, quality_low: float, quality_high: float) -> None:
        super().__init__()
        self.norm_dim = arch.norm_dim
        self.register_buffer("style_mean", torch.zeros(arch.style_size))
        self.register_buffer("style_std", torch.ones(arch.style_size))
        self.register_buffer("quality_range", torch.tensor([quality_low, quality_high]))
        self.style = nn.Linear(arch.style_size, arch.style_dim)
        self.token = nn.Linear(arch.style_dim + arch.norm_dim, arch.width)

    def normalised_norm(self, norms: torch.Tensor) -> torch.Tensor:
        low, high = self.quality_range[0], self.quality_range[1]
        return (norms - low) / (high - low)

    def forward(self, norms: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        u = self.style((style - self.style_mean) / self.style_std)  # (N, d_u)
        pe = norm_encoding(self.normalised_norm(norms), self.norm_dim)  # (N, d_pe)
        return self.token(torch.cat([u, pe], dim=1))  # (N, d)


class ClusterNetwork(nn.Module):
    """Frame tokens x (N, d) -> assignment A (N, M), learned stored-style part (N, K − 2), quality r (N,), frame by frame."""

    def __init__(self, arch: FusionArch) -> None:
        super().__init__()
        self.clusters = nn.Parameter(torch.randn(arch.clusters, arch.width) * 0.02)  # G (M, d)
        self.blocks = nn.ModuleList(Block(arch.width, arch.heads) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(arch.width)
        self.query, self.key = nn.Linear(arch.width, arch.width), nn.Linear(arch.width, arch.width)
        self.stored = nn.Linear(arch.width, arch.stored_style)
        self.frame_quality = nn.Sequential(nn.Linear(arch.width, arch.width), nn.GELU(), nn.Linear(arch.width, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, d = x.shape
        tokens = torch.cat([self.clusters.unsqueeze(0).expand(n, -1, -1), x.unsqueeze(1)], dim=1)  # (N, M + 1, d)
        for block in self.blocks:  # attention within each frame's own M + 1 tokens: frames never meet
            tokens = block(tokens)
        tokens = self.norm(tokens)
        g, xi = tokens[:, :-1], tokens[:, -1]  # (N, M, d), (N, d)
        logits = torch.einsum("nmd,nd->nm", self.query(g), self.key(xi)) / math.sqrt(d)  # (N, M)
        quality = torch.sigmoid(self.frame_quality(xi.detach()))[:, 0]  # (N,); its loss leaves the tokens alone
        return torch.softmax(logits, dim=1), self.stored(xi), quality


class AggregationNetwork(nn.Module):
    """Memory (S (B, M, D), T (B, M, K), c (B, M)) -> fused unit embedding (B, D), weights (B, M, D), quality (B,)."""

    def __init__(self, arch: FusionArch, quality_low: float, quality_high: float) -> None:
        super().__init__()
        k = arch.stored_style + 2
        self.register_buffer("quality_range", torch.tensor([quality_low, quality_high]))
        self.evidence_frames = arch.evidence_frames
        self.embed = nn.Sequential(nn.Linear(k + 2, arch.width), nn.GELU(), nn.Linear(arch.width, arch.width))
        self.cluster_embedding = nn.Parameter(torch.randn(arch.clusters, arch.width) * 0.02)  # E (M, d)
        self.mixer = Block(arch.width, arch.heads)
        self.norm = nn.LayerNorm(arch.width)
        self.out = nn.Linear(arch.width, arch.embedding_size)
        nn.init.zeros_(self.out.weight)  # start at the plain mean: w_m = p_m
        nn.init.zeros_(self.out.bias)

    def normalised_magnitude(self, magnitude: torch.Tensor) -> torch.Tensor:
        low, high = self.quality_range[0], self.quality_range[1]
        return (magnitude - low) / (high - low)

    def forward(self, sums: torch.Tensor, style_sums: torch.Tensor, counts: torch.Tensor):
        c = counts.unsqueeze(-1)  # (B, M, 1)
        cluster = sums / c.clamp(min=1.0)  # F_m (B, M, D)
        mean_style = style_sums / c.clamp(min=EPS)  # s̄_m (B, M, K)
        share = counts / counts.sum(dim=1, keepdim=True).clamp(min=EPS)  # p_m (B, M)
        agreement = sums.norm(dim=-1) / counts.clamp(min=EPS)  # a_m (B, M)
        magnitude = mean_style[..., -1]  # (B, M) count-weighted mean ‖f‖ per cluster
        features = torch.cat([mean_style[..., :-2], mean_style[..., -2:-1].detach(),  # r̄_m read, not trained here
                              self.normalised_magnitude(magnitude).unsqueeze(-1), share.unsqueeze(-1),
                              agreement.unsqueeze(-1)], dim=-1)  # (B, M, K + 2)
        z = self.norm(self.mixer(self.embed(features) + self.cluster_embedding))  # (B, M, d)
        weights = torch.softmax(torch.log(share + EPS).unsqueeze(-1) + self.out(z), dim=1)  # (B, M, D), Σ_m = 1
        fused = F.normalize((weights * cluster).sum(dim=1), dim=-1)  # (B, D)
        return fused, weights, self.quality(style_sums)

    def quality(self, style_sums: torch.Tensor) -> torch.Tensor:
        """q = 1 − exp(−Σ_m T_m[K−2] / τ) = 1 − exp(−Σ_i r_i / τ) (B,): the evidence of the template's good frames."""
        return 1.0 - torch.exp(-style_sums[..., -2].sum(dim=1) / self.evidence_frames)


class CAFace(nn.Module):
    """SIM + CN (per frame) and AGN (per memory); `forward` fuses sets given as flat frames with set indices."""

    def __init__(self, arch: FusionArch, quality_low: float, quality_high: float) -> None:
        super().__init__()
        self.arch = arch
        self.sim = StyleInputMaker(arch, quality_low, quality_high)
        self.cluster = ClusterNetwork(arch)
        self.aggregate = AggregationNetwork(arch, quality_low, quality_high)

    def set_style_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.sim.style_mean.copy_(mean)
        self.sim.style_std.copy_(std.clamp(min=EPS))

    def assign(self, raw: torch.Tensor, style: torch.Tensor):
        """Frames (raw (N, D), σ (N, S)) -> A (N, M), f̂ (N, D), stored style s (N, K); each row from its own frame only."""
        norms = raw.norm(dim=1)  # (N,)
        assignment, learned, quality = self.cluster(self.sim(norms, style))
        unit = raw / norms.clamp(min=EPS).unsqueeze(1)
        return assignment, unit, torch.cat([learned, quality.unsqueeze(1), norms.unsqueeze(1)], dim=1)  # (N, K)

    @staticmethod
    def memory(assignment, unit, stored, set_index: torch.Tensor, num_sets: int):
        """Σ over each set's frames: S (B, M, D), T (B, M, K), c (B, M)."""
        m = assignment.shape[1]
        sums = unit.new_zeros(num_sets, m, unit.shape[1]).index_add_(0, set_index, assignment[:, :, None] * unit[:, None])
        style_sums = unit.new_zeros(num_sets, m, stored.shape[1]).index_add_(
            0, set_index, assignment[:, :, None] * stored[:, None])
        counts = unit.new_zeros(num_sets, m).index_add_(0, set_index, assignment)
        return sums, style_sums, counts

    def forward(self, raw: torch.Tensor, style: torch.Tensor, set_index: torch.Tensor, num_sets: int):
        """Flat frames of `num_sets` sets -> fused unit embeddings (B, D), weights (B, M, D), quality (B,)."""
        return self.aggregate(*self.memory(*self.assign(raw, style), set_index, num_sets))

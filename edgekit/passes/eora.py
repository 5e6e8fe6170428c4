"""EoRA: training-free low-rank compensation of a compressed linear layer, in its inputs' eigenspace.

Compression leaves an error ΔW = W − Ŵ. What matters is not ΔW itself but what it does to the layer's
outputs on real inputs, ‖ΔW X‖² = tr(ΔW H ΔWᵀ) with H = X Xᵀ. Writing H = Q Λ Qᵀ, that is the plain
Frobenius norm of ΔW Q Λ^½, so the best rank-r correction for real inputs is the truncated SVD of the
projected error, mapped back: B = U_r Σ_r, A = V_rᵀ Λ^-½ Qᵀ, and the layer computes Ŵx + B(Ax).
A plain SVD of ΔW spends its rank on directions the inputs never take.
"""

from __future__ import annotations

import torch

from edgekit.passes.weightonly import block_size, rtn

EIGEN_FLOOR = 1e-6  # eigenvalues below this fraction of the largest are clamped: directions the data never took


def eigen_projection(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Q Λ^½, Λ^-½ Qᵀ)`: into the inputs' eigenspace, scaled by how much each direction carries, and back."""
    values, vectors = torch.linalg.eigh(covariance.double())
    root = values.clamp(min=values.max() * EIGEN_FLOOR).sqrt()
    return vectors * root, (vectors / root).T


def eora(delta: torch.Tensor, covariance: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors `B [out, r]`, `A [r, in]` with B·A the best approximation of `delta` on inputs whose
    second moment is `covariance` (`[in, in]`, e.g. the GPTQ statistics of the same layer)."""
    into, back = eigen_projection(covariance)
    u, s, vh = torch.linalg.svd(delta.double() @ into, full_matrices=False)
    rank = min(rank, s.numel())
    return (u[:, :rank] * s[:rank]).float(), (vh[:rank] @ back).float()


def output_error(delta: torch.Tensor, covariance: torch.Tensor) -> float:
    """‖ΔW X‖² = tr(ΔW H ΔWᵀ): how much an error in the weights moves the layer's outputs on the data (products in
    float32, twice as fast as float64 on a wide layer; summed in float64)."""
    delta = delta.float()
    return float(((delta @ covariance.float()) * delta).sum(dtype=torch.float64))


class Compensated(torch.nn.Module):
    """A compressed linear layer with its EoRA residual path: `base(x) + B(A x)`.

    With `factor_bits`, each factor is quantized like a weight (symmetric, groups of up to `group_size` inputs: B's
    are its r columns); the module then computes with the dequantized factors, so torch and the exported graph
    agree.
    """

    def __init__(self, base: torch.nn.Linear, b: torch.Tensor, a: torch.Tensor, factor_bits: int | None,
                 group_size: int) -> None:
        super().__init__()
        self.base = base
        self.a = torch.nn.Linear(a.shape[1], a.shape[0], bias=False)
        self.b = torch.nn.Linear(b.shape[1], b.shape[0], bias=False)
        for layer, factor in ((self.a, a), (self.b, b)):
            if factor_bits:
                quantized = rtn(factor, factor_bits, block_size(factor.shape[1], group_size), symmetric=True)
                layer.edgekit_quantized = quantized
                factor = quantized.dequantize()
            layer.weight.data = factor.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.b(self.a(x))

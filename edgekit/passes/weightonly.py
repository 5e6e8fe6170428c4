"""Weight-only quantization of linear layers: round-to-nearest and GPTQ, int4/int8, groups along the input.

The stored form is what onnxruntime's `MatMulNBits` takes: unsigned codes with a zero point per group of
`group_size` input columns, `w ≈ (code − zero) · scale`. Scales are chosen on the float16 grid, so the
artifact stores them in half the bytes and loses nothing (the graph casts them back once, at load).
Symmetric quantization fixes the zero point at the middle code (8 for 4 bits: MatMulNBits' default, so
none is stored), asymmetric fits it to each group's range.

GPTQ (Frantar et al., 2022) quantizes one input column at a time and spreads each column's rounding error
over the columns not yet quantized, weighted by the inverse Hessian `H = Σ x xᵀ` of the layer's inputs,
so the layer's output on the calibration data moves as little as possible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SHRINKS = tuple(1 - i / 40 for i in range(13))  # GPTQ's grid candidates: the group's range down to 70% of it
SLICE_WEIGHTS = 1 << 26  # weights quantized (or dequantized) at once: 256 MB in float32


@dataclass
class QuantizedWeight:
    """Codes `[out, in]` (uint8, one code per weight), and per group `[out, groups]` scales (float16 values) and
    zero points."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        group = torch.arange(self.codes.shape[1]) // self.group_size
        weight = torch.empty(self.codes.shape)
        for rows in row_slices(*self.codes.shape):  # a vocabulary-sized table a slice at a time
            weight[rows] = (self.codes[rows].float() - self.zeros[rows][:, group]) * self.scales[rows][:, group]
        return weight

    @property
    def symmetric(self) -> bool:
        return bool((self.zeros == 2 ** (self.bits - 1)).all())

    @property
    def nbytes(self) -> int:
        """Bytes as stored: packed codes, float16 scales, packed zero points (asymmetric only)."""
        out, columns = self.codes.shape
        groups = math.ceil(columns / self.group_size)
        codes = out * groups * (self.group_size * self.bits // 8)
        return codes + out * groups * 2 + (0 if self.symmetric else out * math.ceil(groups * self.bits / 8))


def row_slices(rows: int, columns: int) -> list[slice]:
    """Slices of about `SLICE_WEIGHTS` weights: rows are quantized independently of one another, so a matrix with a
    vocabulary's rows (a head, an embedding table) is worked on a slice at a time, with the same codes."""
    step = max(1, SLICE_WEIGHTS // columns)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def by_rows(quantize: Callable[[torch.Tensor], QuantizedWeight], weight: torch.Tensor) -> QuantizedWeight:
    """`quantize(weight)`, a slice of rows at a time (`row_slices`)."""
    parts = [quantize(weight[rows]) for rows in row_slices(*weight.shape)]
    if len(parts) == 1:
        return parts[0]
    return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                           torch.cat([p.zeros for p in parts]), parts[0].bits, parts[0].group_size)


def block_size(columns: int, group_size: int) -> int:
    """The group size for a matrix this many columns wide: MatMulNBits pads the columns to whole groups (powers of
    two, at least 16), so a narrow matrix (an EoRA factor of rank r) takes the smallest group that covers it."""
    while group_size > 16 and group_size // 2 >= columns:
        group_size //= 2
    return group_size


def _half(scale: torch.Tensor) -> torch.Tensor:
    """The nearest float16 value, kept within float16's normal range (the sign is kept)."""
    magnitude = scale.abs().clamp(min=2.0**-14, max=65504.0)
    return (torch.where(scale < 0, -magnitude, magnitude)).half().float()


def _grid(weights: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point `[rows, 1]` for each row of a group of columns.

    Symmetric grids put the group's largest-magnitude weight exactly on the grid's far end, −2^(b−1)·scale (the
    scale takes that weight's sign), so all 2^b codes are usable and the weight that matters most is exact."""
    top = 2**bits - 1
    if symmetric:
        extreme = weights.gather(1, weights.abs().argmax(dim=1, keepdim=True))
        scale = _half(extreme / -(2 ** (bits - 1)))
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    low = weights.amin(dim=1, keepdim=True).clamp(max=0)
    high = weights.amax(dim=1, keepdim=True).clamp(min=0)
    scale = _half((high - low) / top)
    return scale, torch.round(-low / scale)


def _searched_grid(weights: torch.Tensor, importance: torch.Tensor, bits: int,
                   symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid, among ones narrowed to `SHRINKS` of the group's range, that rounds the group with the least
    error weighted by each input's energy (`importance`, the Hessian's diagonal): clipping a rare outlier
    can buy finer steps for the inputs that carry the signal."""
    best_error = torch.full((weights.shape[0], 1), float("inf"))
    best_scale, best_zero = _grid(weights, bits, symmetric)
    for shrink in SHRINKS:
        scale, zero = _grid(weights * shrink, bits, symmetric)
        error = (((_round(weights, scale, zero, bits) - zero) * scale - weights) ** 2 * importance).sum(1, True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _round(weights: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(weights / scale) + zero, 0, 2**bits - 1)


def rtn(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedWeight:
    """Round each weight to the nearest code of its group's grid."""
    out, columns = weight.shape
    weight = weight.float()
    codes = torch.empty(out, columns, dtype=torch.uint8)
    scales, zeros = [], []
    for start in range(0, columns, group_size):
        part = weight[:, start : start + group_size]
        scale, zero = _grid(part, bits, symmetric)
        codes[:, start : start + group_size] = _round(part, scale, zero, bits).to(torch.uint8)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(codes, torch.cat(scales, 1), torch.cat(zeros, 1), bits, group_size)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool,
         damp: float = 0.01, block: int = 128, act_order: bool = False) -> QuantizedWeight:
    """GPTQ: quantize columns one at a time, each error compensated on the columns not yet quantized through the
    inverse Hessian's Cholesky factor.

    In natural order a group takes its grid from the weights as updated when the group begins. With
    `act_order`, columns go in order of decreasing input energy (the Hessian's diagonal), so the inputs that
    matter most are rounded while the most freedom is left to compensate; groups keep their grids fixed from
    the original weights (static groups), since their columns are no longer visited together."""
    weight = weight.detach().float().clone()
    out, columns = weight.shape
    hessian = hessian.double().clone()
    dead = torch.diag(hessian) == 0  # inputs that never fire: their weights cannot matter
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    groups = math.ceil(columns / group_size)
    scales, zeros = torch.empty(out, groups), torch.empty(out, groups)
    order = torch.arange(columns)
    energy = torch.diag(hessian).float()  # each input's weight in the grid search
    if act_order:
        for g in range(groups):
            part = slice(g * group_size, (g + 1) * group_size)
            scale, zero = _searched_grid(weight[:, part], energy[part], bits, symmetric)
            scales[:, g], zeros[:, g] = scale[:, 0], zero[:, 0]
        order = torch.argsort(energy, descending=True)
        weight, hessian, energy = weight[:, order], hessian[order][:, order], energy[order]
    hessian += torch.eye(columns, dtype=hessian.dtype) * damp * torch.diag(hessian).mean()
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True).float()

    codes = torch.empty(out, columns, dtype=torch.uint8)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        chunk = weight[:, start:end].clone()
        errors = torch.zeros_like(chunk)
        factor = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            g = int(order[column]) // group_size
            if not act_order and column % group_size == 0:
                weight[:, start:end] = chunk  # the group's grid sees the weights compensated so far
                scale, zero = _searched_grid(weight[:, column : column + group_size],
                                             energy[column : column + group_size], bits, symmetric)
                scales[:, g], zeros[:, g] = scale[:, 0], zero[:, 0]
            code = _round(chunk[:, i : i + 1], scales[:, g : g + 1], zeros[:, g : g + 1], bits)
            codes[:, order[column]] = code[:, 0].to(torch.uint8)
            quantized = (code[:, 0] - zeros[:, g]) * scales[:, g]
            error = (chunk[:, i] - quantized) / factor[i, i]
            chunk[:, i:] -= error[:, None] * factor[i, i:][None]
            errors[:, i] = error
        weight[:, start:end] = chunk
        weight[:, end:] -= errors @ inverse[start:end, end:]
    return QuantizedWeight(codes, scales, zeros, bits, group_size)

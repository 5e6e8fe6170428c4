"""GGUF files for llama.cpp: edgekit's weight-only codes written as the block types that hold them exactly.

Q4_0 and Q8_0 blocks are 32 weights along a row sharing one float16 scale `d`: Q4_0 stores q in 0…15 and means
d·(q − 8), Q8_0 stores q as int8 and means d·q. edgekit's symmetric grid in groups of 32 is that grid (scales
chosen on the float16 grid, zero point 8 or 128, the group's largest-magnitude weight at code 0, as llama.cpp's
own quantizer puts it), so the codes GPTQ chose are copied into the blocks, never requantized.

An EoRA residual B·A is what llama.cpp calls a LoRA adapter: a second GGUF file of `<tensor>.lora_a` (A, `[r, in]`)
and `<tensor>.lora_b` (B, `[out, r]`) that llama.cpp adds to the tensor's product at run time. Its
`adapter.lora.alpha` is 0, which llama.cpp reads as scale 1 whatever each layer's rank.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter

    from edgekit.passes.weightonly import QuantizedWeight

BLOCK = 32  # weights per Q4_0 / Q8_0 block
BLOCK_TYPES = {4: "Q4_0", 8: "Q8_0"}  # bits -> the llama.cpp block type that holds edgekit's symmetric codes
BLOCK_BYTES = {"Q4_0": 2 + BLOCK // 2, "Q8_0": 2 + BLOCK}  # a float16 scale and the block's codes
ALIGNMENT = 32  # GGUF's default: the tensor data, and each tensor in it, start on a multiple of this


@dataclass
class GGUFTensor:
    """One tensor as the file holds it: its float values as torch computes with them (`[rows, columns]`, rows
    already in llama.cpp's order), and the codes behind them where the weight was quantized."""

    name: str
    values: torch.Tensor
    quantized: QuantizedWeight | None = None


def unexact(quantized: QuantizedWeight) -> str | None:
    """Why the codes cannot be copied into Q4_0 / Q8_0 blocks as they are, or None when they can."""
    if quantized.bits not in BLOCK_TYPES:
        return f"{quantized.bits}-bit codes have no llama.cpp block type here (4: Q4_0, 8: Q8_0)"
    if quantized.group_size != BLOCK or quantized.codes.shape[1] % BLOCK:
        return (f"groups of {quantized.group_size} over rows of {quantized.codes.shape[1]} weights are not whole "
                f"blocks of {BLOCK}")
    if not quantized.symmetric:
        return "asymmetric groups (a zero point per group) do not fit Q4_0 / Q8_0, whose zero point is fixed"
    return None


def blocks(quantized: QuantizedWeight) -> tuple[np.ndarray, str]:
    """The codes as llama.cpp blocks, `[rows, bytes per row]` uint8, and the block type's name: per block the
    float16 scale, then Q4_0's 16 bytes (weight j in the low nibble of byte j, weight j + 16 in its high nibble)
    or Q8_0's 32 int8 values."""
    reason = unexact(quantized)
    if reason is not None:
        raise ValueError(reason)
    rows, columns = quantized.codes.shape
    codes = quantized.codes.numpy().reshape(rows, columns // BLOCK, BLOCK)
    scales = quantized.scales.numpy().astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
    if quantized.bits == 4:
        packed = codes[..., : BLOCK // 2] | (codes[..., BLOCK // 2 :] << 4)
    else:
        packed = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    return np.concatenate([scales, packed], axis=-1).reshape(rows, -1), BLOCK_TYPES[quantized.bits]


def type_name(tensor: GGUFTensor) -> str:
    """The tensor's type in the file: its codes' block type where they fit one, else F32 (exactly the values torch
    computes with)."""
    quantized = tensor.quantized
    return BLOCK_TYPES[quantized.bits] if quantized is not None and unexact(quantized) is None else "F32"


def entry_bytes(tensor: GGUFTensor) -> int:
    """What one tensor adds to a GGUF file: its info record (name, dimensions, type, data offset) and its data,
    padded to the alignment. A file is these plus a fixed part (header, metadata) and at most `ALIGNMENT - 1`
    bytes of padding before the data."""
    kind = type_name(tensor)
    values = tensor.values.numel()
    data = values * 4 if kind == "F32" else values // BLOCK * BLOCK_BYTES[kind]
    info = 8 + len(tensor.name.encode()) + 4 + 8 * tensor.values.dim() + 4 + 8
    return info + -(-data // ALIGNMENT) * ALIGNMENT


def stored(tensor: GGUFTensor) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """The array the file holds, and its block type (None: float32)."""
    from gguf import GGMLQuantizationType

    if tensor.quantized is not None and type_name(tensor) != "F32":
        data, kind = blocks(tensor.quantized)
        return data, GGMLQuantizationType[kind]
    return tensor.values.detach().float().contiguous().numpy(), None


def gguf_bytes(arch: str, describe: Callable[[GGUFWriter], None], tensors: Iterable[GGUFTensor]) -> bytes:
    """A GGUF file of `tensors` with the metadata `describe` adds (architecture, hyperparameters, tokenizer)."""
    from gguf import GGUFWriter

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.gguf"
        writer = GGUFWriter(path, arch)
        describe(writer)
        for tensor in tensors:
            data, kind = stored(tensor)
            writer.add_tensor(tensor.name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def lora_tensors(name: str, a: GGUFTensor, b: GGUFTensor) -> list[GGUFTensor]:
    """One layer's EoRA factors under the names llama.cpp pairs with the model tensor `name`."""
    return [GGUFTensor(f"{name}.lora_a", a.values, a.quantized), GGUFTensor(f"{name}.lora_b", b.values, b.quantized)]


def rank_entry(name: str, rank: int) -> str:
    """A compensated layer's entry in the adapter's `edgekit.adapter.ranks` list."""
    return f"{name}={rank}"


def describe_adapter(ranks: dict[str, int]) -> Callable[[GGUFWriter], None]:
    """The metadata of an EoRA adapter: llama.cpp's LoRA keys, alpha 0 (scale 1), and each layer's rank."""

    def describe(writer: GGUFWriter) -> None:
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", 0.0)
        writer.add_string("edgekit.adapter", "EoRA: rank-r residual of each quantized layer's error, fitted in the "
                          "eigenspace of its calibration inputs")
        writer.add_array("edgekit.adapter.ranks", [rank_entry(name, rank) for name, rank in ranks.items()])

    return describe


def dequantization_check(files: dict[str, bytes], expected: Mapping[str, Iterable[GGUFTensor]]) -> dict[str, Any]:
    """Each file read back with gguf's reader, each tensor dequantized by gguf's reference code and compared with
    the float weights edgekit computes with: they must agree to float16 rounding (in practice, bit for bit)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    worst, tensors, exact, failed = 0.0, 0, 0, []
    with tempfile.TemporaryDirectory() as folder:
        for file, data in files.items():
            path = Path(folder) / file
            path.write_bytes(data)
            wanted = {t.name: t.values.detach().float().numpy() for t in expected[file]}
            reader = GGUFReader(path)
            if sorted(t.name for t in reader.tensors) != sorted(wanted):
                failed.append(f"{file}: tensors {sorted(t.name for t in reader.tensors)} != {sorted(wanted)}")
                continue
            for tensor in reader.tensors:
                values = dequantize(tensor.data, tensor.tensor_type).reshape(wanted[tensor.name].shape)
                difference = np.abs(values - wanted[tensor.name])
                tensors += 1
                exact += int(not difference.any())
                worst = max(worst, float(difference.max(initial=0.0)))
                if (difference > np.abs(wanted[tensor.name]) * 2.0**-11 + 1e-12).any():
                    failed.append(f"{file}: {tensor.name} ({tensor.tensor_type.name}) differs by up to "
                                  f"{float(difference.max()):.3g}")
            del reader
    return {"method": "each tensor read back with gguf.GGUFReader and dequantized by gguf.quants.dequantize, against "
                      "the weights edgekit computes with", "tensors": tensors, "bit_exact": exact,
            "max_abs_difference": worst, "passed": not failed, "failures": failed[:5]}

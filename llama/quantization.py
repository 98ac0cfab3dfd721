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
few rows (a decode step) on a CPU with bf16 instructions, a column-parallel layer's product is
torch's fused int8 or int4 kernel, which takes its activations in bf16 (see prepare_kernels).
Otherwise the product uses the dequantized weight: inside the compiled decode step
llama.compile writes it row by row and Inductor fuses the dequantization into that loop,
reading the integers once (on CPUs without bf16 instructions, packed in 32-bit words: see
pack_words); eagerly (prefill) the weight is dequantized a tile of rows at a time, each
tile multiplied while it is still in the cache.

`python -m llama.quantize` writes a quantized checkpoint; Llama.build(quantize=...) quantizes
while loading, one weight at a time.
"""

import math
import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from llama.compile import CPU_BF16, FEW_ROWS, row_by_row, row_by_row_product
from llama.parallel import ColumnParallel, RowParallel, Split, part_size

# Divides every width of Llama 2's shapes on the process counts Meta ships them for (7B on 1, 13B
# on 2, 70B on 8), and 7B's and 13B's on up to 4 processes.
DEFAULT_GROUP = 64
CHUNK = 1 << 20  # values quantized, or dequantized for a product, at a time
# The int8 kernel reads input features 16 at a time: other widths give wrong numbers or a crash.
INT8_KERNEL_WIDTHS = 16
# The int4 kernel's layout packs 64 output features at a time; it takes these group sizes.
INT4_KERNEL_ROWS = 64
INT4_KERNEL_GROUPS = (32, 64, 128, 256)


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

    def weight_bytes(self, rows: int, columns: int, scale_itemsize: int) -> int:
        """Bytes of one quantized weight: the integers and their scales."""
        return rows * self.packed_width(columns) + math.prod(self.scale_shape(rows, columns)) * scale_itemsize


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
    return torch.cat([weight[s : s + step].float().abs().amax(-1) for s in range(0, rows, step)])


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
            q[block] = torch.round(weight[block].float() / scales[block, None]).clamp(-127, 127)
        else:
            q[block], scales[block] = quantize_int4(weight[block], scheme.group_size)
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, columns = weight.shape
    groups = weight.float().view(rows, columns // group_size, group_size)
    # int4 has one more level below zero than above: a group whose largest value is negative uses it.
    scales = torch.maximum(groups.amax(-1) / 7, groups.amin(-1) / -8).clamp(min=1e-10)
    nibbles = (torch.round(groups / scales.unsqueeze(-1)).clamp(-8, 7) + 8).to(torch.uint8)
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


class Quantized:
    """What a quantized layer adds to its parallel layer: products with the quantized weight."""

    scheme: Scheme
    kernel: str | None = None  # "int8" or "int4": its decode products run in torch's CPU kernel
    words: int | None = None  # integers packed in words, in blocks of this many columns (see pack_words)

    def dequantized(self, start: int, stop: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, stop) of the weight, in `dtype`."""
        q = self.qweight[start:stop]
        if self.kernel == "int4":
            scales = self.kernel_scales[:, start:stop, 0].t()
            return from_nibbles(unpack_int4_kernel_layout(q), scales.to(dtype))
        scales = self.scales[start:stop].to(dtype)
        if self.words is None:
            return dequantize(q, scales, self.scheme)
        integers = unpack_words(q, self.scheme.bits, self.words)
        return dequantize(integers, scales, self.scheme) if self.scheme.bits == 8 else from_nibbles(integers, scales)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        rows, columns = x.shape[:-1].numel(), x.shape[-1]
        if self.kernel is not None and rows <= FEW_ROWS:
            x_bf16 = x.reshape(rows, columns).bfloat16()
            if self.kernel == "int8":
                out = torch.ops.aten._weight_int8pack_mm(x_bf16, self.qweight, self.kernel_scales)
            else:
                group = self.scheme.group_size
                out = torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16, self.qweight, group, self.kernel_scales)
            return out.to(x.dtype).view(*x.shape[:-1], -1)
        if torch.compiler.is_compiling():
            by_rows = row_by_row(rows, self.qweight.device, self.scheme.integer_dtype)
            if self.words is not None and by_rows:
                return words_product(x, self.qweight, self.scales, self.scheme.bits)
            weight = self.dequantized(0, None, x.dtype)
            return row_by_row_product(x, weight) if by_rows else F.linear(x, weight)
        step = tile_rows(columns)
        rows_out = self.qweight.shape[0]
        tiles = [F.linear(x, self.dequantized(s, s + step, x.dtype)) for s in range(0, rows_out, step)]
        return torch.cat(tiles, dim=-1)


def pack_words(values: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Integers (rows, columns) of `bits` bits each (int8's, or int4's 0..15) packed 32 // bits to
    a 32-bit word: in each block of `block` columns (int8: the row; int4: a group), field k of word
    j holds the block's column k * block / n + j, so that each field meets a contiguous part of
    the input.

    Why: Inductor's loop over a row reads its integers a vector of floats' width at a time; on a
    CPU without AVX-512 torch reads so few 8- or 32-bit integers through a copy on the stack,
    which made that loop slower than fp32's. Words stored as float32 bits are read as plain float
    vectors, and shifts take the fields out of them (so the model must not be cast with .to(dtype)
    after loading, which would convert those bits as numbers).
    """
    rows, columns = values.shape
    n = 32 // bits
    fields = values.view(rows, columns // block, n, block // n).transpose(2, 3)  # (rows, blocks, word, field)
    if bits == 4:  # two fields to a byte, the first in the low nibble
        fields = fields[..., 0::2] | (fields[..., 1::2] << 4)
    return fields.contiguous().view(torch.float32).view(rows, -1)


def field(words: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Field k of int32 words: int8's sign-extended, int4's 0..15."""
    if bits == 8:
        return (words << (24 - 8 * k)) >> 24
    return (words >> (4 * k)) & 15


def unpack_words(words: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """The integers (rows, columns) that pack_words packed: int8, or int4's 0..15 as uint8."""
    rows, n = words.shape[0], 32 // bits
    fields = words.view(torch.int8 if bits == 8 else torch.uint8).view(rows, -1, block // n, 4)
    if bits == 4:
        fields = torch.stack((fields & 15, fields >> 4), dim=-1).view(rows, -1, block // n, 8)
    return fields.transpose(2, 3).reshape(rows, -1)


def words_product(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """F.linear(x, weight) for a weight packed by pack_words, one product and sum per row of x:
    each block of the row is cut in 32 // bits parts, part k meeting field k of the words."""
    rows, out = x.shape[:-1].numel(), words.shape[0]
    scales = scales.view(out, -1).to(x.dtype)  # (out, blocks): int8's one block is the row
    w = words.view(torch.int32).view(out, scales.shape[1], -1)
    per_row = []
    for row in x.reshape(rows, scales.shape[1], 32 // bits, -1):
        parts = [
            row[:, k] * (field(w, k, bits) if bits == 8 else field(w, k, bits) - 8).to(x.dtype)
            for k in range(32 // bits)
        ]
        per_row.append((sum(parts[1:], parts[0]).sum(-1) * scales).sum(-1))
    return torch.stack(per_row).view(*x.shape[:-1], -1)


def tile_rows(columns: int) -> int:
    """Rows of a weight dequantized (or repacked) at a time: about CHUNK values, in whole blocks
    of the int4 kernel's layout."""
    return max(INT4_KERNEL_ROWS, CHUNK // columns // INT4_KERNEL_ROWS * INT4_KERNEL_ROWS)


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
    """Once the weights are loaded, hand the decode products of a CPU with bf16 instructions to
    torch's fused kernels, which take their activations in bf16:

    - int8: the kernel takes its scales in bf16, so the layer keeps a bf16 copy of them (one
      number per row) beside the fp32 ones that prefill uses.
    - int4: the integers are repacked into the kernel's layout and the scales replaced by its
      bf16 scales and zero points (zeros: ours are symmetric), which prefill then reads too.

    Column-parallel layers only: the kernels round their results to bf16, and a row-parallel
    layer's ranks would each round their part of the sum, so that 2 processes would not compute
    what 1 does. Done here rather than in each product, where Inductor could not hand the kernel
    a converted tensor. On other CPUs, the integers are packed in words (pack_words).
    """
    for layer in quantized_layers(model):
        rows, columns = layer.qweight.shape[0], layer.in_features  # column-parallel: all of them
        if layer.qweight.device.type != "cpu":
            continue
        if not CPU_BF16:
            pack_layer_words(layer)
        if not (CPU_BF16 and isinstance(layer, ColumnParallel)):
            continue
        if layer.scheme.bits == 8 and columns % INT8_KERNEL_WIDTHS == 0:
            layer.register_buffer("kernel_scales", layer.scales.to(torch.bfloat16), persistent=False)
            layer.kernel = "int8"
        elif layer.scheme.bits == 4 and rows % INT4_KERNEL_ROWS == 0 and layer.scheme.group_size in INT4_KERNEL_GROUPS:
            packed = torch.empty_like(layer.qweight)
            step = tile_rows(columns)
            for s in range(0, rows, step):
                nibbles = unpack_int4(layer.qweight[s : s + step], layer.scheme.group_size)
                packed[s : s + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles.int(), 1)
            scales_and_zeros = torch.stack((layer.scales.t(), torch.zeros_like(layer.scales.t())), dim=-1)
            del layer.scales
            layer.register_buffer("qweight", packed)
            layer.register_buffer("kernel_scales", scales_and_zeros.bfloat16().contiguous())
            layer.kernel = "int4"


def pack_layer_words(layer: Quantized) -> None:
    """A layer's integers in words (pack_words), where its blocks hold whole words."""
    bits = layer.scheme.bits
    block = layer.qweight.shape[1] if bits == 8 else layer.scheme.group_size
    q = layer.qweight
    if block % (32 // bits) or not q.is_contiguous():
        return
    # Where the integers lie, row by row: a row's words take its bytes, and a mapped checkpoint's
    # pages are private to this process, so the file stays as it was.
    words = q.view(torch.float32)
    step = tile_rows(q.shape[1])
    for s in range(0, q.shape[0], step):
        values = q[s : s + step] if bits == 8 else unpack_int4(q[s : s + step], block)
        words[s : s + step] = pack_words(values, bits, block)
    layer.register_buffer("qweight", words)
    layer.words = block


def unpack_int4_kernel_layout(packed: torch.Tensor) -> torch.Tensor:
    """The int4 values (rows, columns), 0..15, of weights in the layout of torch's CPU int4
    kernel: blocks of 64 rows, in which byte k * 32 + i holds row i (low nibble) and row 32 + i
    (high nibble) of column k."""
    rows, columns = packed.shape[0], packed.shape[1] * 2
    blocks = packed.reshape(rows // INT4_KERNEL_ROWS, columns, INT4_KERNEL_ROWS // 2).transpose(1, 2)
    return torch.cat((blocks & 0xF, blocks >> 4), dim=1).reshape(rows, columns)


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


def quantized_bytes(
    layout: dict[str, Split], scheme: Scheme, world: int, itemsize: int, scale_itemsize: int | None = None
) -> int:
    """One rank's bytes of a quantized model's weights: the integers, their scales (`itemsize`
    bytes each unless said) and the weights kept in floating point (`itemsize` bytes each)."""
    total = 0
    for key, split in layout.items():
        shape = split.part_shape(world)
        if quantizable(key, split):
            total += scheme.weight_bytes(*shape, scale_itemsize or itemsize)
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

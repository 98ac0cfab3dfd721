"""What one rank needs on its device, what the device has, and what would fit when it is short."""

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from llama.model import ModelArgs, rotary_table, weight_layout
from llama.parallel import model_parallel_sizes
from llama.quantization import Scheme, quantized_bytes
from llama.runtime import Runtime


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs on its device; activations come on top but are small when decoding."""

    weights: int  # its share of the weights, in the runtime dtype
    kv_cache: int  # its KV cache for max_batch_size sequences of max_seq_len tokens
    rotary_table: int  # cos and sin of every position's angles, in fp32

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.rotary_table


def estimate_memory(args: ModelArgs, world: int, dtype: torch.dtype, scheme: Scheme | None = None) -> MemoryEstimate:
    """Every rank of `world` holds an equal part of the weights (quantized by `scheme`, if any) and
    of the KV heads."""
    layout = weight_layout(args)
    if scheme is None:
        weights = sum(math.prod(split.part_shape(world)) for split in layout.values()) * dtype.itemsize
    else:
        weights = quantized_bytes(layout, scheme, world, dtype.itemsize)
    kv_width = layout["layers.0.attention.wk.weight"].part_shape(world)[0]  # the KV heads it holds
    kv_cache = 2 * args.n_layers * args.max_batch_size * args.max_seq_len * kv_width
    with torch.device("meta"):
        rotary = rotary_table(args)  # as Transformer.setup_caches allocates it
    return MemoryEstimate(weights, kv_cache * dtype.itemsize, rotary.numel() * rotary.element_size())


def available_memory(device: torch.device) -> int | None:
    """Bytes this process may still fill on its device, or None where the platform does not say.

    On a GPU, its free memory. On the CPU, Linux's MemAvailable (free RAM plus page cache it can
    reclaim), shared evenly by the processes torchrun started on this machine.
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return None


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def largest(limit: int, fits) -> int:
    """The largest n in 1..limit for which fits(n) holds (fits is monotone), or 0 if none."""
    low, high = 0, limit
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def check_memory(
    args: ModelArgs, world: int, runtime: Runtime, available: int | None, scheme: Scheme | None = None
) -> None:
    """Refuse, before anything is allocated, a model whose share will not fit this rank's device.

    `available` is what the device has free (None: unknown, so nothing is checked). The message
    gives the numbers and the largest limits, or the smallest process count, that would fit.
    """
    need = estimate_memory(args, world, runtime.dtype, scheme)
    if available is None or need.total <= available:
        return

    def fits(**limits: int) -> bool:
        return estimate_memory(replace(args, **limits), world, runtime.dtype, scheme).total <= available

    advice = []
    batch = largest(args.max_batch_size - 1, lambda b: fits(max_batch_size=b))
    if batch:
        advice.append(f"max_batch_size {batch}")
    elif seq_len := largest(args.max_seq_len - 1, lambda n: fits(max_batch_size=1, max_seq_len=n)):
        advice.append(f"max_batch_size 1 with max_seq_len {seq_len}")
    more = (
        w
        for w in model_parallel_sizes(args)
        if w > world and estimate_memory(args, w, runtime.dtype, scheme).total <= available
    )
    processes = next(more, None)
    if processes is not None:
        advice.append(f"{processes} model-parallel processes (on more GPUs or machines)")
    stored_as = scheme.name if scheme else str(runtime.dtype).removeprefix("torch.")
    raise ValueError(
        f"this process needs about {format_bytes(need.total)} on {runtime.device} but only "
        f"{format_bytes(available)} is available: {format_bytes(need.weights)} for its share of the weights "
        f"in {stored_as} and {format_bytes(need.kv_cache)} for the KV cache of "
        f"max_batch_size {args.max_batch_size} x max_seq_len {args.max_seq_len}. "
        + (f"What would fit: {', or '.join(advice)}" if advice else "Use a device with more memory")
    )

"""A decode step's matrix-vector products and attention on an x86 CPU, in C++ (llama/kernels.cpp).

A decode step multiplies every weight by one row per sequence. For so few rows torch's CPU BLAS
streams a weight at a fraction of memory speed, and torch has no int8 or int4 product that keeps
fp32 activations. These kernels read each weight once, in the layout it is stored in (fp32,
bf16, fp16, or the integers of llama.quantization), with activations in fp32; and for prefill's
matrix products with the integers, each thread turns a few rows back into floats in its own
cache. A decode step's attention, one query per sequence, reads each key-value head's cached keys
and values once, for all the query heads that share it; torch's fused attention, built for many
queries, took several times as long for it (in bf16 most of all).

They are compiled on first use by the C++ compiler torch.compile needs too (`c++`, or $CXX),
for this CPU's AVX2 or AVX-512, and kept in ~/.cache/llama. Where they cannot be built, or with
LLAMA_CPU_KERNELS=0, products run as before: torch's BLAS, Inductor's row-by-row loops in a
compiled step, and dequantized tiles for quantized weights.
"""

import functools
import hashlib
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llama.model import Attention, FeedForward
from llama.parallel import ColumnParallel, RowParallel
from llama.runtime import is_main_process

SOURCE = Path(__file__).with_name("kernels.cpp")
ENABLE_ENV = "LLAMA_CPU_KERNELS"  # "0" turns the kernels off
FEW_ROWS = 8  # up to this many rows, a product on a CPU is a decode step's: the kernels take it
WIDTH = 8  # floats to a vector in kernels.cpp: input widths (and int4 half-groups) are multiples
# What the compiler may use on each of torch's CPU capabilities.
TARGETS = {
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512vl"],
}
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama"


def build_command(target: list[str], output: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    return [
        os.environ.get("CXX", "c++"),
        *("-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w", *target),
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{torch_dir / 'include'}",
        str(SOURCE),
        "-o",
        str(output),
        f"-L{torch_dir / 'lib'}",
        "-lc10",
        "-ltorch_cpu",
    ]


def build(target: list[str]) -> Path:
    """The compiled library for this source, torch and target: from the cache, or built now.

    Written under a name of its own and renamed into place, so processes building at once (one
    per rank) never load a half-written file.
    """
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(" ".join([torch.__version__, *build_command(target, Path("out"))]).encode())
    library = cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        print("llama: compiling the CPU kernels (once, about 10 s)", file=sys.stderr, flush=True)
    partial = library.with_name(f".{library.name}.{os.getpid()}")
    try:
        subprocess.run(build_command(target, partial), check=True, capture_output=True, text=True)
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)
    return library


@functools.cache
def available() -> bool:
    """Whether the kernels run here: an x86 CPU with AVX2, and the library built (once) and loaded."""
    target = TARGETS.get(torch.backends.cpu.get_cpu_capability())
    if os.environ.get(ENABLE_ENV) == "0" or target is None:
        return False
    try:
        torch.ops.load_library(build(target))
    except subprocess.CalledProcessError as err:  # the compiler's first error, if it named one
        errors = [line for line in err.stderr.splitlines() if "error" in line]
        why = errors[0] if errors else f"{err.cmd[0]} exited with status {err.returncode}"
    except OSError as err:  # no compiler, or a cache folder that cannot be written
        why = str(err)
    else:
        why = None
    if why is not None:
        warnings.warn(
            f"llama's CPU kernels could not be compiled ({why}): decoding runs slower without them. "
            f"Install a C++ compiler (g++), or set {ENABLE_ENV}=0 to skip them",
            stacklevel=2,
        )
        return False
    for name in ("matvec", "int8_matvec", "int4_matvec"):
        torch.library.register_fake(f"llama::{name}")(product_shape)
    torch.library.register_fake("llama::dequantize")(weight_shape)
    torch.library.register_fake("llama::attend")(lambda q, k, v, visible: torch.empty_like(q))
    return True


def product_shape(x: torch.Tensor, weights: list[torch.Tensor], *scales_and_group) -> torch.Tensor:
    """What a product returns, for torch.compile's tracing: each weight's products, side by side."""
    return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))


def weight_shape(q: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """What dequantize returns: int4's bytes hold two columns each."""
    return scales.new_empty(q.shape[0], q.shape[1] * (2 if q.dtype == torch.uint8 else 1), dtype=dtype)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def shaped(x: torch.Tensor, products: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each weight's products, shaped as x, from the kernels' one tensor of them side by side: an
    operator that returns one tensor, Inductor's C++ wrapper calls directly (a list crashed it)."""
    parts = products.to(x.dtype).split([w.shape[0] for w in weights], dim=-1)
    return [p.view(*x.shape[:-1], -1) for p in parts]


# Each takes several weights with the same input, which a decode step multiplies in one call.
def matvec(x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """F.linear(x, weight) for each weight, in fp32, returned in x's dtype."""
    return shaped(x, torch.ops.llama.matvec(as_rows(x), weights), weights)


def int8_matvec(x: torch.Tensor, q: list[torch.Tensor], scales: list[torch.Tensor]) -> list[torch.Tensor]:
    """x times each weight q * scales (one scale per row), in fp32, returned in x's dtype."""
    return shaped(x, torch.ops.llama.int8_matvec(as_rows(x), q, scales), q)


def int4_matvec(
    x: torch.Tensor, q: list[torch.Tensor], scales: list[torch.Tensor], group_size: int
) -> list[torch.Tensor]:
    """x times each int4 weight in llama.quantization's layout, in fp32, returned in x's dtype."""
    return shaped(x, torch.ops.llama.int4_matvec(as_rows(x), q, scales, group_size), q)


class KernelCall(NamedTuple):
    """How the kernels multiply a layer's weight: op(x, [tensors[0]], [tensors[1]], ..., *args),
    or several layers' alike in one call, with a list of each of their tensors (see products)."""

    op: Callable[..., list[torch.Tensor]]
    tensors: tuple[torch.Tensor, ...]
    args: tuple = ()


class KernelLayer:
    """A linear layer whose decode products the kernels may run: float weights (KernelProducts)
    or quantized ones (llama.quantization)."""

    def kernel_call(self) -> KernelCall | None:
        raise NotImplementedError


def products(x: torch.Tensor, layers: list[nn.Module]) -> list[torch.Tensor]:
    """Each layer's output for x: with a decode step's few rows and weights the kernels take alike
    (see KernelLayer), in one call of the kernels; else layer by layer."""
    if x.shape[:-1].numel() <= FEW_ROWS:
        # isinstance, not hasattr: dynamo guards a type once, but an attribute lookup on every call
        calls = [layer.kernel_call() if isinstance(layer, KernelLayer) else None for layer in layers]
        first = calls[0]
        if first is not None and all(c is not None and c.op is first.op and c.args == first.args for c in calls):
            return first.op(x, *[list(t) for t in zip(*(c.tensors for c in calls))], *first.args)
    return [layer(x) for layer in layers]


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, group_size: int | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight that int8 (group_size None) or int4 values in llama.quantization's layout stand
    for: computed in fp32 and rounded to `dtype` (fp32, bf16 or fp16), as .to(dtype) would."""
    return torch.ops.llama.dequantize(q, scales, group_size or 0, dtype)


def dequantized_product(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """F.linear(x, dequantize(q, scales, group_size, x.dtype)) for a prefill's many rows, without the
    whole weight in floats: each thread converts a few rows at a time and multiplies them while its
    cache holds them."""
    products = torch.ops.llama.dequantized_product(x.reshape(-1, x.shape[-1]).contiguous(), q, scales, group_size or 0)
    return products.view(*x.shape[:-1], -1)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of one query per sequence, q (batch, heads, 1, head_dim), over keys and
    values (batch, kv_heads, positions, head_dim); mask (batch or 1, 1, 1, positions) True where visible."""
    visible = None if mask is None else mask.expand(q.shape[0], 1, 1, keys.shape[2]).reshape(q.shape[0], -1)
    return torch.ops.llama.attend(q.contiguous(), keys, values, visible)


class KernelAttention(Attention):
    """Attention whose decode steps run in the kernels: its three products in one call, and its
    attention of one query per sequence (torch's fused attention is built for many queries)."""

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = products(x, [self.wq, self.wk, self.wv])
        return q, k, v

    def attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if q.shape[2] == 1:
            return attend(q, keys, values, mask)
        return super().attend(q, keys, values, mask)


class KernelFeedForward(FeedForward):
    """A feed-forward block whose two decode products of its input run in one call of the kernels."""

    def gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = products(x, [self.w1, self.w3])
        return gate, up


class KernelProducts(KernelLayer):
    """What a linear layer of floats gains on a CPU: its decode products run in the kernels."""

    def kernel_call(self) -> KernelCall:
        return KernelCall(matvec, (self.weight,))

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() <= FEW_ROWS:
            return matvec(x, [self.weight])[0]
        return F.linear(x, self.weight)


class KernelColumnParallel(KernelProducts, ColumnParallel):
    pass


class KernelRowParallel(KernelProducts, RowParallel):
    pass


def use_kernels(model: nn.Module) -> None:
    """Once the weights are loaded, give a model on a CPU the kernels' decode steps: for its
    attention and feed-forward blocks, and for each linear layer of floats whose width suits them
    (quantized layers decide for themselves)."""
    kernel_layers = {
        ColumnParallel: KernelColumnParallel,
        RowParallel: KernelRowParallel,
        Attention: KernelAttention,
        FeedForward: KernelFeedForward,
    }
    for layer in model.modules():
        if type(layer) not in kernel_layers or any(t.device.type != "cpu" for t in layer.state_dict().values()):
            continue
        if type(layer) is Attention:
            suits = layer.head_dim % WIDTH == 0
        elif type(layer) is FeedForward:
            suits = True  # its products go to the kernels where its layers' do
        else:
            suits = layer.weight.dtype in FLOATS and layer.weight.shape[1] % WIDTH == 0 and layer.weight.is_contiguous()
        if suits and available():
            layer.__class__ = kernel_layers[type(layer)]

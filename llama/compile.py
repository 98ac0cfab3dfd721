"""torch.compile for the decode step, applied from outside the model.

The decode step repeats for every token. Compiled, each layer becomes a few fused loops, which
pays back the compile time (tens of seconds) on long generations. On a CPU a decode step's
products run in llama.kernels where those could be built; where not, one more change matters: a
decode step multiplies each weight by one row per sequence, too few rows for the CPU's BLAS to
stream the weight at memory speed. Written as one product and sum per row, the products become
a single Inductor loop that reads the weight once, on every core. The model keeps calling
F.linear; a torch function mode, active only inside the compiled step, rewrites it. On a CPU
with bf16 instructions, bf16 and fp16 weights are rewritten for one or two rows only: beyond
that, torch's own product streams them faster than Inductor's loop, which converts every
element to fp32 once per row.

Positions are symbolic, so one compilation serves every step. The loop over rows fixes the
batch size, so on a CPU each batch size up to FEW_ROWS is compiled once, as is a batch whose
sequences sit at different positions; after 8 such variants torch stops compiling (its
recompile_limit) and new ones run eagerly, with the same results. Prefill stays eager: its
large matrix products already run near the machine's arithmetic limit.
"""

import types

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from llama.decoding import Step
from llama.kernels import FEW_ROWS  # up to this many rows, a product on a CPU is a decode step's

# Whether the CPU has AVX512-BF16: torch's own bf16 products (and its fused int8/int4 kernels) are fast.
CPU_BF16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
FEW_BF16_ROWS = 2 if CPU_BF16 else FEW_ROWS  # the same limit for 16-bit weights


# Inductor checks the size and strides of every tensor its step is handed or computes, about 150
# checks a step at 110M, a fifth of the time the step spends outside its products and attention.
# Dynamo's guards check the tokens and positions, and a model keeps its tensors' shapes (see
# compile_decode_step); the kernels' outputs are what their fake implementations (llama.kernels)
# say, which the tests compare with eager.
# A loop over one token's features (the feed-forward's gate times up) is too little work to share:
# at Inductor's default of 512 elements a thread it ran on both threads, each time a round of waking
# and waiting for them. From 4096 elements a thread, a batch's or a 7B model's, loops still share.
INDUCTOR_OPTIONS = {"size_asserts": False, "cpp.min_chunk_size": 4096}

# A step's floats (each norm's eps) are constants of the model. dynamic=True makes floats symbolic
# too, which had the step turn each into a tensor before every call.
CONSTANT_FLOATS = torch._dynamo.config.patch(specialize_float=True)

# Which of Dynamo's guards a compiled step keeps (see compile_decode_step): all where this torch
# cannot filter them (older versions than this project tests with).
SKIP_MODULE_GUARDS = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
GUARDS = {"guard_filter_fn": SKIP_MODULE_GUARDS} if SKIP_MODULE_GUARDS else {}


def row_by_row(rows: int, device: torch.device, stored: torch.dtype) -> bool:
    """Whether a product of `rows` rows with a weight stored on `device` as `stored` is faster as
    one product and sum per row. A quantized weight's integers count as stored: the loop then
    dequantizes them as it reads them."""
    if device.type != "cpu":
        return False
    return rows <= (FEW_BF16_ROWS if stored in (torch.bfloat16, torch.float16) else FEW_ROWS)


class RowByRowProducts(TorchFunctionMode):
    """F.linear(x, weight) on a CPU with few rows (see row_by_row), as one product and sum per row."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) == 2 and not kwargs:
            x, weight = args
            rows = x.shape[:-1].numel()
            if row_by_row(rows, weight.device, weight.dtype):
                return row_by_row_product(x, weight)
        return func(*args, **kwargs)


def row_by_row_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) as one product and sum per row of x."""
    rows = x.shape[:-1].numel()
    per_row = [(row * weight).sum(-1) for row in x.reshape(rows, -1)]
    return torch.stack(per_row).view(*x.shape[:-1], -1)


def compile_decode_step(step: Step) -> Step:
    """The decode step through torch.compile, with row-by-row products on a CPU, for one model.

    Before each call Dynamo checks its guards: that every module and tensor of the model is as it
    was when compiled, thousands of checks, a noticeable part of a small or quantized model's step
    on a CPU. A loaded model keeps its modules and the shapes of its tensors, so this step checks
    only that it is handed the model it first was: it drops the guards on modules, and has a code
    object of its own, whose compilations no other model's calls can reach (Dynamo keeps them per
    code object). That also gives each model its own recompile limit.
    """

    def step_row_by_row(model, tokens, start_pos):
        with RowByRowProducts():
            return step(model, tokens, start_pos)

    def compiled(options: dict):
        own = types.FunctionType(step_row_by_row.__code__.replace(), globals(), closure=step_row_by_row.__closure__)
        return torch.compile(own, dynamic=True, fullgraph=True, options=INDUCTOR_OPTIONS | GUARDS | options)

    # Rows at their own positions read the cache up to the furthest of them. A graph with that max
    # in its shapes, found in Inductor's on-disk cache, comes back guarded on which row is furthest
    # (the cache re-checks its guards with Python's max): a compilation for each order the rows come
    # in, past torch's limit in a server. Those steps skip that cache and compile afresh.
    at_one_position, at_own_positions = compiled({}), compiled({"fx_graph_cache": False})
    served = None  # the model this step was first called with

    def compiled_or_eager(model, tokens, start_pos):
        nonlocal served
        if served is None:
            served = model
        elif model is not served:
            raise ValueError("a compiled decode step serves the one model it was first called with: compile another")
        # Past torch's recompile limit, fullgraph=True turns "run it eagerly" into an error.
        try:
            with CONSTANT_FLOATS:
                return (at_own_positions if isinstance(start_pos, list) else at_one_position)(model, tokens, start_pos)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            return step(model, tokens, start_pos)

    return compiled_or_eager

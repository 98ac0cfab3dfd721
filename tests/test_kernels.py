"""The C++ kernels of a CPU decode step: the same numbers as F.linear and SDPA, in eager and
compiled steps, built once, and a model that still runs where they cannot be built."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama import kernels
from llama.kernels import KernelAttention, KernelColumnParallel, KernelFeedForward, KernelRowParallel, use_kernels
from llama.model import Attention, FeedForward
from llama.parallel import ColumnParallel, RowParallel
from llama.quantization import Scheme, convert, dequantize, prepare_kernels, quantize
from tests.helpers import ROOT, assert_same_generation, build, environment

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs an x86 CPU with AVX2 and a C++ compiler")

# Widths that end in a partial step of the unrolled loop (40, 72), rows that leave one over for a
# pair (13), and input rows up to beyond what one pass takes (4). For int8 on a CPU with VNNI,
# 256 columns are one chunk of the input in fixed point, and 576 two and a part.
SHAPES = [(13, 40), (64, 72), (7, 256), (9, 576)]
ROWS = [1, 2, 3, 5, 8]


def close_to(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to fp32 rounding of sums taken in another order."""
    torch.testing.assert_close(got, expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-5)


def all_close_to(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for ours, theirs in zip(got, expected):
        close_to(ours, theirs)


# A second weight of another row count, multiplied in the same call: on two threads the second
# thread's rows begin inside the first weight.
SECOND_ROWS = 50


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_products_of_float_weights_equal_f_linear_in_fp32(dtype, shape, rows) -> None:
    weights = [torch.randn(shape).to(dtype), torch.randn(SECOND_ROWS, shape[1]).to(dtype)]
    x = torch.randn(rows, shape[1])
    all_close_to(kernels.matvec(x, weights), [F.linear(x, w.float()) for w in weights])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
def test_int8_products_equal_f_linear_with_the_dequantized_weight(shape, rows) -> None:
    q, scales = quantize(torch.randn(shape), Scheme(8))
    q2, scales2 = quantize(torch.randn(SECOND_ROWS, shape[1]), Scheme(8))
    x = torch.randn(rows, shape[1])
    expected = [F.linear(x, dequantize(q, scales, Scheme(8))), F.linear(x, dequantize(q2, scales2, Scheme(8)))]
    all_close_to(kernels.int8_matvec(x, [q, q2], [scales, scales2]), expected)


@pytest.mark.parametrize("rows", [1, 4, 8])
def test_int8_products_keep_each_inputs_largest_values_exactly_enough(rows) -> None:
    """Where the kernel puts the input in fixed point, each chunk's largest magnitude sets the
    scale and may round up by one unit: at a thousand magnitudes, all values +-it, it must still
    fit its digits. A few rows to a call, as a decode step's, which the fixed-point paths take."""
    q, scales = quantize(torch.randn(5, 256), Scheme(8))
    signs = torch.randn(1000, 256).sign()
    x = signs * torch.logspace(-20, 20, 1000).unsqueeze(1)
    expected = F.linear(x, dequantize(q, scales, Scheme(8)))
    for part, theirs in zip(x.split(rows), expected.split(rows)):
        close_to(kernels.int8_matvec(part, [q], [scales])[0], theirs)


@pytest.mark.parametrize("rows", [1, 2, 8])
def test_int8_products_keep_small_inputs_beside_a_large_one(rows) -> None:
    """An outlier feature 10^4 times the rest, whose weights are zero: where the kernel puts the
    input in fixed point, the values beside it must still count as fp32 counts them."""
    q, scales = quantize(torch.randn(64, 256), Scheme(8))
    q[:, 7] = 0
    x = torch.randn(rows, 256)
    x[:, 7] = 1e4
    all_close_to(kernels.int8_matvec(x, [q], [scales]), [F.linear(x, dequantize(q, scales, Scheme(8)))])


@pytest.mark.parametrize("special", ["nan", "inf", "tiny"])
def test_int8_products_of_nan_infinite_and_tiny_inputs_match_f_linear(special) -> None:
    """Inputs that fixed point cannot hold (the float kernel takes them): NaN and infinities give
    what F.linear gives, and magnitudes of 1e-35 (a scale of 2^23 over them overflows) are kept."""
    q, scales = quantize(torch.randn(5, 256), Scheme(8))
    x = torch.randn(2, 256)
    if special == "tiny":
        x[0] *= 1e-35
    else:
        x[0, 3] = float(special)
    (got,) = kernels.int8_matvec(x, [q], [scales])
    expected = F.linear(x, dequantize(q, scales, Scheme(8)))
    if special == "tiny":
        assert expected[0].abs().min() > 0
        close_to(got[0], expected[0])
    else:
        assert not expected[0].isfinite().any()
        torch.testing.assert_close(got[0], expected[0], equal_nan=True)
    close_to(got[1], expected[1])


@pytest.mark.parametrize(
    ("group_size", "width"), [(g, w) for g in (16, 32, 48, 64, 128) for w in (384, 192) if w % g == 0]
)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("inputs", ["fp32", "bf16 values"])
def test_int4_products_equal_f_linear_with_the_dequantized_weight(group_size, width, rows, inputs) -> None:
    """Half-groups of 8 to 64 bytes: 8 and 24 leave a step over after the float kernel's unrolled
    pairs, and 24 puts group boundaries inside the bf16 kernel's 64-byte steps. One row 384 wide
    (whole steps of 128 columns) takes the bf16 dot product where the CPU has it: in one part for
    inputs that are bf16 values already, in two for others. Width 192 and more rows take floats."""
    scheme = Scheme(4, group_size)
    weights = [quantize(torch.randn(n, width) * torch.linspace(0.1, 2, width), scheme) for n in (13, SECOND_ROWS)]
    x = torch.randn(rows, width)
    if inputs == "bf16 values":
        x = x.bfloat16().float()
    q, scales = [w[0] for w in weights], [w[1] for w in weights]
    expected = [F.linear(x, dequantize(*w, scheme)) for w in weights]
    all_close_to(kernels.int4_matvec(x, q, scales, group_size), expected)


@pytest.mark.parametrize("scheme", [Scheme(8), Scheme(4, 16), Scheme(4, 48), Scheme(4, 64)])
@pytest.mark.parametrize("dtype", kernels.FLOATS)
def test_dequantizing_gives_the_weight_the_integers_stand_for(scheme: Scheme, dtype: torch.dtype) -> None:
    """In fp32, or rounded to bf16 or fp16 exactly as torch rounds the fp32 weight."""
    q, scales = quantize(torch.randn(13, 192), scheme)
    expected = dequantize(q, scales, scheme).to(dtype)
    assert torch.equal(kernels.dequantize(q, scales, scheme.group_size, dtype), expected)
    assert torch.equal(kernels.dequantize(q[5:9], scales[5:9], scheme.group_size, dtype), expected[5:9])  # a tile


# Weights whose rows go to two threads in tiles, the last one short: 1500 rows of 192 columns (680
# to an fp32 tile, 1360 to a bf16 one), and 150 of 8192 (64 to a tile, the fewest: two per thread).
@pytest.mark.parametrize("shape", [(1500, 192), (150, 8192)])
@pytest.mark.parametrize("scheme", [Scheme(8), Scheme(4, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inference", [True, False])
def test_prefill_products_equal_f_linear_with_the_dequantized_weight(shape, scheme, dtype, inference) -> None:
    """Each thread dequantizes its own tiles, in x's dtype, and multiplies them: the numbers of the
    whole weight's product, whether or not the caller is in inference mode (torch's threads do not
    inherit it)."""
    q, scales = quantize(torch.randn(shape), scheme)
    x = torch.randn(3, 11, shape[1]).to(dtype)
    with torch.inference_mode(inference):
        got = kernels.dequantized_product(x, q, scales, scheme.group_size)
    expected = F.linear(x, dequantize(q, scales, scheme).to(dtype))
    assert got.dtype == dtype
    if dtype == torch.float32:
        close_to(got, expected)
    else:  # bf16 sums, taken in blocks of their own size: each within a few of bf16's steps
        torch.testing.assert_close(got.float(), expected.float(), atol=0.02 * expected.abs().max().item(), rtol=0.02)


@pytest.mark.parametrize("rows", [1, 3, 9])
def test_layers_with_one_input_give_each_its_own_product(rows: int) -> None:
    """A decode step's layers alike (all int4) go to the kernels in one call, a mix of kinds one
    by one, and more rows than a decode step's through F.linear: the same numbers each way."""
    torch.manual_seed(0)
    scheme = Scheme(4, 32)
    quantized = [ColumnParallel(64, n, 1) for n in (48, 16)]
    weights = [torch.randn(layer.weight.shape) for layer in quantized]
    convert(nn.Sequential(*quantized), scheme)
    for layer, weight in zip(quantized, weights):
        layer.qweight, layer.scales = quantize(weight, scheme)
    prepare_kernels(nn.Sequential(*quantized))
    floats = ColumnParallel(64, 24, 1)  # built for loading: its weight is still empty
    floats.weight = nn.Parameter(torch.randn(24, 64), requires_grad=False)
    use_kernels(floats)
    assert isinstance(floats, KernelColumnParallel) and all(layer.kernel for layer in quantized)
    x = torch.randn(rows, 1, 64)
    expected = [F.linear(x, dequantize(layer.qweight, layer.scales, scheme)) for layer in quantized]
    all_close_to(kernels.products(x, quantized), expected)
    all_close_to(kernels.products(x, [*quantized, floats]), [*expected, F.linear(x, floats.weight)])


def test_products_keep_the_inputs_dtype_and_leading_dimensions() -> None:
    x, weight = torch.randn(2, 1, 64, dtype=torch.bfloat16), torch.randn(24, 64, dtype=torch.bfloat16)
    (product,) = kernels.matvec(x, [weight])
    assert product.shape == (2, 1, 24) and product.dtype == torch.bfloat16
    # Computed in fp32 and rounded once, where a bf16 product rounds as it goes.
    torch.testing.assert_close(product, F.linear(x.float(), weight.float()).bfloat16(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "head_dim", "positions"),
    # one head, grouped heads, an odd width, Llama 2's width
    [(1, 12, 12, 64, 130), (3, 8, 2, 32, 17), (2, 4, 4, 24, 1), (1, 4, 2, 128, 41)],
)
@pytest.mark.parametrize("masked", [False, True])
def test_attention_of_one_query_equals_sdpa(dtype, batch, heads, kv_heads, head_dim, positions, masked) -> None:
    """Over rows of a cache (a slice, with the cache's strides), as a decode step reads them."""
    cache = torch.randn(2, batch + 1, kv_heads, 200, head_dim).to(dtype)
    keys, values = cache[0, 1:, :, :positions], cache[1, 1:, :, :positions]
    q = torch.randn(batch, 1, heads, head_dim).to(dtype).transpose(1, 2)
    mask = None
    if masked:
        mask = torch.rand(batch, 1, 1, positions) < 0.7
        mask[..., -1] = True  # a token always sees itself
    got = kernels.attend(q, keys, values, mask)
    expected = F.scaled_dot_product_attention(
        q.float(), keys.float(), values.float(), attn_mask=mask, enable_gqa=heads != kv_heads
    )
    assert got.dtype == dtype and got.shape == q.shape
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # fp32 inside, rounded once to the dtype
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize(("batch", "heads", "kv_heads"), [(1, 8, 1), (2, 6, 2)])
def test_attention_with_a_group_split_over_threads_equals_sdpa(threads, batch, heads, kv_heads) -> None:
    """Fewer key-value heads than threads: each group's query heads go to the threads in parts."""
    q, keys, values = torch.randn(batch, heads, 1, 32), *torch.randn(2, batch, kv_heads, 19, 32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernels.attend(q, keys, values, None)
    finally:
        torch.set_num_threads(before)
    expected = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_attention_with_scores_far_apart_equals_sdpa() -> None:
    """Scores hundreds apart: the smallest weights underflow to (near) 0, as in fp32's own softmax."""
    q, keys, values = torch.randn(1, 2, 1, 64) * 30, torch.randn(1, 2, 37, 64) * 30, torch.randn(1, 2, 37, 64)
    expected = F.scaled_dot_product_attention(q, keys, values)
    torch.testing.assert_close(kernels.attend(q, keys, values, None), expected, atol=1e-5, rtol=1e-5)


def test_attention_with_no_key_visible_gives_zeros_not_nan() -> None:
    q, keys = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 9, 16)
    got = kernels.attend(q, keys, keys, torch.zeros(1, 1, 1, 9, dtype=torch.bool))
    assert torch.equal(got, torch.zeros_like(q))


def test_products_run_inside_a_compiled_function() -> None:
    q, scales = quantize(torch.randn(48, 64), Scheme(4, 32))
    weight = torch.randn(64, 48)

    def layer(x):
        (hidden,) = kernels.int4_matvec(x, [q], [scales], 32)
        return kernels.matvec(F.silu(hidden), [weight])[0] * 2

    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for rows in (1, 3):
        x = torch.randn(rows, 64)
        close_to(compiled(x), layer(x))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: torch.ops.llama.matvec(torch.randn(1, 12), [torch.randn(4, 12)]), "a multiple of 8"),
        (lambda: torch.ops.llama.matvec(torch.randn(1, 16), [torch.randn(16, 4).t()]), "contiguous matrix"),
        (
            lambda: torch.ops.llama.int8_matvec(
                torch.randn(1, 16), [torch.zeros(4, 16, dtype=torch.uint8)], [torch.ones(4)]
            ),
            "q must be int8",
        ),  # fmt: skip
        (
            lambda: torch.ops.llama.int4_matvec(
                torch.randn(1, 16), [torch.zeros(4, 8, dtype=torch.uint8)], [torch.ones(4, 2)], 8
            ),
            "group size must be a multiple of 16",
        ),  # fmt: skip
        (
            lambda: torch.ops.llama.matvec(torch.randn(1, 16), [torch.randn(4, 16), torch.randn(4, 16).bfloat16()]),
            "the weights differ in dtype",
        ),  # fmt: skip
        (
            lambda: torch.ops.llama.int8_matvec(
                torch.randn(1, 16), [torch.zeros(4, 16, dtype=torch.int8)] * 2, [torch.ones(4)]
            ),
            "one scales tensor per weight",
        ),  # fmt: skip
        (lambda: torch.ops.llama.attend(*[torch.randn(1, 2, 1, 12)] * 3, None), "head size must be a multiple of 8"),
        (
            lambda: torch.ops.llama.attend(torch.randn(1, 2, 1, 16), *[torch.randn(1, 2, 5, 16)] * 2, torch.ones(1, 4)),
            "visible must be contiguous bool",
        ),  # fmt: skip
    ],
)
def test_the_kernels_refuse_what_they_cannot_read(call, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        call()


def test_a_models_layers_take_the_kernels_and_its_tokens_stay_the_same(
    checkpoint: Path, tokenizer_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prompts of different lengths: the decode steps attend through a mask."""
    fast = build(checkpoint, tokenizer_path)
    kernel_layers = KernelColumnParallel | KernelRowParallel | KernelAttention | KernelFeedForward
    layers = [m for m in fast.model.modules() if isinstance(m, ColumnParallel | RowParallel | Attention | FeedForward)]
    assert len(layers) == 19
    assert all(isinstance(m, kernel_layers) for m in layers)
    monkeypatch.setattr(kernels, "available", lambda: False)
    plain = build(checkpoint, tokenizer_path)
    assert not any(isinstance(m, kernel_layers) for m in plain.model.modules())
    prompts = [[1, 5, 9, 13], [1, 20, 30]]
    got = fast.generate(prompts, max_gen_len=10, temperature=0, logprobs=True)
    assert_same_generation(got, plain.generate(prompts, max_gen_len=10, temperature=0, logprobs=True))


def run_demo(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """The example chat on the demo model, in a fresh process with its own kernel cache."""
    return subprocess.run(
        [sys.executable, "example_chat_completion.py"],
        cwd=ROOT, env={**environment(), "XDG_CACHE_HOME": str(tmp_path), **env}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def answers(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stdout.splitlines() if not line.startswith("Loaded in")]


def test_the_kernels_are_compiled_once_per_machine_and_then_loaded(tmp_path: Path) -> None:
    first = run_demo(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "compiling the CPU kernels" in first.stderr
    assert len(list((tmp_path / "llama").iterdir())) == 1  # the library, and no half-written file beside it
    second = run_demo(tmp_path)
    assert second.returncode == 0 and "compiling" not in second.stderr
    assert answers(second) == answers(first)


def test_without_a_compiler_the_model_runs_and_says_why_it_is_slower(tmp_path: Path) -> None:
    done = run_demo(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CPU kernels could not be compiled" in done.stderr and "Install a C++ compiler" in done.stderr
    assert "38 + 47 = 85" in done.stdout
    assert not any((tmp_path / "llama").iterdir())  # nothing half-written left behind
    off = run_demo(tmp_path, LLAMA_CPU_KERNELS="0")
    assert off.returncode == 0 and "kernels" not in off.stderr and answers(off) == answers(done)


def test_the_library_name_changes_with_the_source_and_the_target(tmp_path: Path, monkeypatch) -> None:
    """A changed kernels.cpp, or another CPU sharing the cache, never loads a stale build."""

    def compile_nothing(command: list[str], **kwargs) -> None:
        Path(command[command.index("-o") + 1]).touch()

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels.subprocess, "run", compile_nothing)
    avx2, avx512 = kernels.build(kernels.TARGETS["AVX2"]), kernels.build(kernels.TARGETS["AVX512"])
    assert avx2 != avx512 and avx2.parent == tmp_path / "llama" and avx2.exists()
    source = tmp_path / "kernels.cpp"
    source.write_text(kernels.SOURCE.read_text() + "// changed\n")
    monkeypatch.setattr(kernels, "SOURCE", source)
    assert kernels.build(kernels.TARGETS["AVX2"]) not in (avx2, avx512)

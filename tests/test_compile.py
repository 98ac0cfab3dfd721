"""The compiled decode step: the same tokens as the eager one, with llama.kernels' products or,
where those are not built, Inductor's row-by-row ones."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama import Llama, kernels
from llama.compile import FEW_ROWS, RowByRowProducts, compile_decode_step
from llama.decoding import decode_step
from tests.helpers import assert_same_generation, build, prompt_ids


def test_compiled_decode_step_gives_the_same_tokens(generator: Llama) -> None:
    prompts = prompt_ids(generator.tokenizer)
    eager, eager_logprobs = generator.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    compiled = Llama(generator.model, generator.tokenizer, compile=True)
    for batch in (prompts, prompts[:1]):  # sequences at different positions, then one
        got = compiled.generate(batch, max_gen_len=12, temperature=0, logprobs=True)
        assert_same_generation(got, (eager[: len(batch)], eager_logprobs[: len(batch)]))


def test_without_the_kernels_the_compiled_step_gives_the_same_tokens(
    checkpoint: Path, tokenizer_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernels, "available", lambda: False)
    generator = build(checkpoint, tokenizer_path)
    prompts = prompt_ids(generator.tokenizer)[:2]
    eager = generator.generate(prompts, max_gen_len=10, temperature=0, logprobs=True)
    compiled = Llama(generator.model, generator.tokenizer, compile=True)
    assert_same_generation(compiled.generate(prompts, max_gen_len=10, temperature=0, logprobs=True), eager)


def test_a_compiled_bf16_step_gives_the_same_tokens(checkpoint: Path, tokenizer_path: str) -> None:
    """bf16 weights and activations, in batches of 4 and 1: products computed in fp32 by the
    kernels, compiled and eager alike."""
    bf16 = Llama.build(
        str(checkpoint), tokenizer_path, max_seq_len=48, max_batch_size=4, device="cpu", dtype="bfloat16"
    )
    prompts = prompt_ids(bf16.tokenizer)
    compiled = Llama(bf16.model, bf16.tokenizer, compile=True)
    for batch in (prompts, prompts[:1]):
        eager = bf16.generate(batch, max_gen_len=8, temperature=0, logprobs=True)
        got = compiled.generate(batch, max_gen_len=8, temperature=0, logprobs=True)
        assert_same_generation(got, eager, abs=0.1)  # bf16 products summed in another order


def test_through_inductors_cpp_wrapper_the_compiled_step_gives_the_same_tokens(generator: Llama) -> None:
    """With torch's TORCHINDUCTOR_CPP_WRAPPER=1, Inductor's C++ calls the kernels directly, which it
    can for operators that return one tensor; it crashed the process when they returned a list."""
    prompts = prompt_ids(generator.tokenizer)[:2]
    eager = generator.generate(prompts, max_gen_len=8, temperature=0, logprobs=True)
    compiled = Llama(generator.model, generator.tokenizer, compile=True)
    with torch._inductor.config.patch(cpp_wrapper=True, cpp_wrapper_build_separate=True):
        assert_same_generation(compiled.generate(prompts, max_gen_len=8, temperature=0, logprobs=True), eager)


def test_past_the_recompile_limit_the_step_runs_eagerly(generator: Llama) -> None:
    """fullgraph=True makes torch's recompile limit an error; a server meeting its ninth batch
    shape answered 500 with it. Here the limit is 1: the second shape runs eagerly."""
    prompts = prompt_ids(generator.tokenizer)
    eager = generator.generate(prompts, max_gen_len=6, temperature=0)[0]
    compiled = Llama(generator.model, generator.tokenizer, compile=True)
    with torch._dynamo.config.patch(recompile_limit=1):
        assert compiled.generate(prompts[:1], max_gen_len=6, temperature=0)[0] == eager[:1]
        assert compiled.generate(prompts, max_gen_len=6, temperature=0)[0] == eager


def test_compiled_steps_of_two_models_each_give_their_own_tokens(
    generator: Llama, checkpoint: Path, tokenizer_path: str
) -> None:
    """A compiled step skips the guards on the model's modules, so another model must never reach
    its compilations: here an int8 model of other shapes, compiled and called in turn with it."""
    other = build(checkpoint, tokenizer_path, quantize="int8")
    prompts = prompt_ids(generator.tokenizer)[:2]
    eager = [g.generate(prompts, max_gen_len=8, temperature=0, logprobs=True) for g in (generator, other)]
    compiled = [Llama(g.model, g.tokenizer, compile=True) for g in (generator, other)]
    assert eager[0][1][0] != pytest.approx(eager[1][1][0], abs=1e-3)  # the two models' answers differ
    for _ in range(2):
        for ours, theirs in zip(compiled, eager):
            assert_same_generation(ours.generate(prompts, max_gen_len=8, temperature=0, logprobs=True), theirs)


def test_a_compiled_step_refuses_a_second_model(generator: Llama, checkpoint: Path, tokenizer_path: str) -> None:
    step = compile_decode_step(decode_step)
    tokens = torch.tensor([5])
    step(generator.model, tokens, 0)
    with pytest.raises(ValueError, match="the one model it was first called with"):
        step(build(checkpoint, tokenizer_path).model, tokens, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS, FEW_ROWS + 1])
def test_row_by_row_products_equal_f_linear(rows: int, dtype: torch.dtype) -> None:
    x, weight = torch.randn(rows, 1, 48, dtype=dtype), torch.randn(40, 48, dtype=dtype)
    with RowByRowProducts():
        product = F.linear(x, weight)
    assert product.shape == (rows, 1, 40) and product.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(product, F.linear(x, weight), atol=tolerance, rtol=tolerance)

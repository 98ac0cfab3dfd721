"""The compiled decode step: the same tokens as the eager one."""

import pytest
import torch
import torch.nn.functional as F

from llama import Llama
from llama.compile import FEW_ROWS, RowByRowProducts
from tests.helpers import prompt_ids


def test_compiled_decode_step_gives_the_same_tokens(generator: Llama) -> None:
    prompts = prompt_ids(generator.tokenizer)
    eager, eager_logprobs = generator.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    compiled = Llama(generator.model, generator.tokenizer, compile=True)
    for batch in (prompts, prompts[:1]):  # sequences at different positions, then one
        tokens, logprobs = compiled.generate(batch, max_gen_len=12, temperature=0, logprobs=True)
        assert tokens == eager[: len(batch)]
        for ours, theirs in zip(logprobs, eager_logprobs):
            assert ours == pytest.approx(theirs, abs=1e-4)


def test_past_the_recompile_limit_the_step_runs_eagerly(generator: Llama) -> None:
    """fullgraph=True makes torch's recompile limit an error; a server meeting its ninth batch
    shape answered 500 with it. Here the limit is 1: the second shape runs eagerly."""
    prompts = prompt_ids(generator.tokenizer)
    eager = generator.generate(prompts, max_gen_len=6, temperature=0)[0]
    compiled = Llama(generator.model, generator.tokenizer, compile=True)
    with torch._dynamo.config.patch(recompile_limit=1):
        assert compiled.generate(prompts[:1], max_gen_len=6, temperature=0)[0] == eager[:1]
        assert compiled.generate(prompts, max_gen_len=6, temperature=0)[0] == eager


@pytest.mark.parametrize("rows", [1, 3, FEW_ROWS, FEW_ROWS + 1])
def test_row_by_row_products_equal_f_linear(rows: int) -> None:
    x, weight = torch.randn(rows, 1, 48), torch.randn(40, 48)
    with RowByRowProducts():
        product = F.linear(x, weight)
    assert product.shape == (rows, 1, 40)
    torch.testing.assert_close(product, F.linear(x, weight), atol=1e-5, rtol=1e-5)

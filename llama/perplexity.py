"""How well a model predicts a text: the mean negative log-likelihood per token and perplexity.

    python -m llama.perplexity --ckpt_dir llama-2-7b/ --text wiki.txt [--quantize int8]
    torchrun --nproc_per_node 2 -m llama.perplexity --ckpt_dir llama-2-13b/ --text wiki.txt

The text is tokenized once, BOS first, and cut into windows of max_seq_len tokens, each starting
on the last token of the one before, so every token but the BOS is predicted exactly once, from
the tokens before it in its window. Windows go through the model max_batch_size at a time, one
forward pass each. The same text and window on two models (say, a checkpoint and its quantized
copy) measure what one loses against the other.
"""

import math
from pathlib import Path

import torch

from llama.cli import DEMO_MODEL_DIR, run_script
from llama.decoding import token_logprobs
from llama.generation import Llama
from llama.model import Transformer
from llama.runtime import is_main_process


def windows(tokens: list[int], length: int) -> list[list[int]]:
    """Windows of at most `length` tokens, each overlapping the one before by one token."""
    if length < 2:
        raise ValueError(f"max_seq_len must be at least 2 to predict anything, got {length}")
    return [tokens[start : start + length] for start in range(0, len(tokens) - 1, length - 1)]


@torch.inference_mode()
def negative_log_likelihoods(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """-log p(token | the tokens before it in its window), for every token of `tokens` after the first.

    Runs on the model's KV cache rows, overwriting what they held.
    """
    params, device = model.params, model.tok_embeddings.weight.device
    cut = windows(tokens, params.max_seq_len)
    scores = []
    for first in range(0, len(cut), params.max_batch_size):
        batch = cut[first : first + params.max_batch_size]
        longest = max(map(len, batch))
        # Shorter windows (only ever the last) are padded at the end, where nothing they score can see it.
        ids = torch.tensor([w + [0] * (longest - len(w)) for w in batch], device=device)
        hidden = model.hidden_states(ids, 0)
        for row, window in enumerate(batch):
            logits = model.logits(hidden[row, : len(window) - 1])
            scores.append(-token_logprobs(logits, ids[row, 1 : len(window)]))
    return torch.cat(scores).cpu()


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no text file {str(path)!r}: pass --text pointing to a UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text ({err}): convert it to UTF-8 first") from err


def main(
    text: str,
    ckpt_dir: str = str(DEMO_MODEL_DIR),
    tokenizer_path: str | None = None,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    quantize: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> None:
    """Print the mean negative log-likelihood (nats per token) and perplexity of the file TEXT.

    Windows are --max_seq_len tokens, --max_batch_size to a forward pass; --quantize int8 or
    int4 quantizes while loading, as Llama.build does.
    """
    content = read_text(text)
    generator = Llama.build(
        ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype=dtype, quantize=quantize
    )
    tokens = generator.tokenizer.encode(content, bos=True, eos=False)
    if len(tokens) < 2:
        raise ValueError(f"{text!r} holds no text to score: it needs at least one token")
    nll = negative_log_likelihoods(generator.model, tokens)
    mean = nll.double().mean().item()
    if is_main_process():
        print(f"tokens scored           {nll.numel()}")
        print(f"mean NLL                {mean:.4f} nats/token")
        print(f"perplexity              {math.exp(mean):.4f}")


if __name__ == "__main__":
    run_script(main)

"""Shared fixtures: a tokenizer trained with Llama 2's settings and tiny random checkpoints."""

import random
from pathlib import Path

import pytest
import torch

from llama.checkpoint import random_state_dict, save_checkpoint, split_state_dict
from llama.model import ModelArgs
from llama.runtime import choose_runtime, init_model_parallel
from llama.tokenizer import Tokenizer, train_tokenizer

# Plain multi-head attention, and grouped-query attention with a non-default FFN width.
MULTI_HEAD = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}
GROUPED_QUERY = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "multiple_of": 16,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-6,
    "rope_theta": 500000.0,
    "vocab_size": -1,
}

WORDS = "the a cat dog sat on mat sun moon star river tree house blue red green runs jumps sings".split()


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Sentences with words, numbers, punctuation, chat tags and some non-ASCII text."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(3, 10))
        lines.append(f"{' '.join(words).capitalize()} {rng.randint(0, 9999)} times.")
    lines += ["[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. ", "Café déjà vu, naïve résumé."] * 20
    return lines


@pytest.fixture(scope="session", autouse=True)
def model_parallel() -> None:
    """One process: a model-parallel group of size 1 on the CPU, as plain `python` gets."""
    init_model_parallel(choose_runtime("cpu"), 1)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return train_tokenizer(corpus(), str(tmp_path_factory.mktemp("tokenizer") / "tokenizer"), vocab_size=400)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path: str) -> Tokenizer:
    return Tokenizer(tokenizer_path)


def model_args(params: dict, vocab_size: int) -> ModelArgs:
    return ModelArgs.from_params({**params, "vocab_size": vocab_size})[0]


def write_checkpoint(
    folder: Path, params: dict, vocab_size: int, n_shards: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """A random checkpoint in Meta's layout; the same seed gives the same weights for any shard count."""
    state_dict = random_state_dict(model_args(params, vocab_size), seed, dtype)
    shards = [state_dict] if n_shards == 1 else split_state_dict(state_dict, n_shards)
    save_checkpoint(folder, shards, params)
    return folder


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """The grouped-query model in one shard."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "gqa", GROUPED_QUERY, tokenizer.n_words)


@pytest.fixture(scope="session")
def checkpoint_2_shards(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """The same weights as `checkpoint`, split for model-parallel size 2."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "gqa-mp2", GROUPED_QUERY, tokenizer.n_words, 2)


@pytest.fixture(scope="session")
def generator(checkpoint: Path, tokenizer_path: str):
    from llama import Llama

    return Llama.build(str(checkpoint), tokenizer_path, max_seq_len=48, max_batch_size=4, device="cpu")

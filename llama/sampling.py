"""Sampling: from a sequence's next-token logits to its next token.

The reference samples a whole batch at once with one temperature and top_p, from torch's global
random generator; with those two options alone, that is what happens here too, so seeded
results stay the reference's. The other options are the ones OpenAI's API and vLLM offer: they
adjust each sequence's logits (bias, penalties for what it has already said), narrow its choice
(top_k, min_p, top_p), and draw with a generator of its own when it has a seed, so that a seeded
sequence gives the same tokens whatever runs beside it.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens. The defaults are the reference's."""

    temperature: float = 0.6  # 0: always the most likely token
    top_p: float = 0.9  # keep the most likely tokens that make up this much probability
    top_k: int = 0  # keep only the k most likely tokens; 0: no limit
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    presence_penalty: float = 0.0  # subtracted from every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    repetition_penalty: float = 1.0  # divides the (positive) logits of tokens in the prompt or output
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # added to those tokens' logits
    seed: int | None = None  # a generator of the sequence's own; None: torch's global one

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, expected: str, error: type[Exception] = ValueError) -> None:
            if not ok:
                raise error(f"{name} must be {expected}, got {getattr(self, name)!r}")

        require(is_number(self.temperature), "temperature", "a number (0 for greedy)", TypeError)
        require(
            math.isfinite(self.temperature) and self.temperature >= 0, "temperature", "0 (greedy) or more, and finite"
        )
        require(is_number(self.top_p), "top_p", "a number in (0, 1]", TypeError)
        require(0 < self.top_p <= 1, "top_p", "in (0, 1] (1 keeps every token)")
        require(is_whole(self.top_k) and self.top_k >= 0, "top_k", "a whole number >= 0 (0: no limit)")
        require(is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "a number in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            require(is_number(getattr(self, name)) and -2 <= getattr(self, name) <= 2, name, "a number in [-2, 2]")
        penalty = self.repetition_penalty
        require(is_number(penalty) and 0 < penalty <= 10, "repetition_penalty", "a number in (0, 10] (1: none)")
        bias_ok = isinstance(self.logit_bias, Mapping) and all(
            is_whole(token) and is_number(value) and -100 <= value <= 100 for token, value in self.logit_bias.items()
        )
        require(bias_ok, "logit_bias", "a mapping of token ids to numbers in [-100, 100]")
        require(self.seed is None or is_whole(self.seed), "seed", "an integer or None")

    def check_vocabulary(self, vocab_size: int) -> None:
        bad = [token for token in self.logit_bias if not 0 <= token < vocab_size]
        if bad:
            raise ValueError(f"logit_bias names token {bad[0]}, outside the vocabulary (0 to {vocab_size - 1})")


class SequenceSampler:
    """One sequence's sampling state: its options, what it has said, and its own generator if seeded."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int, device: torch.device):
        params.check_vocabulary(vocab_size)
        self.params = params
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.counts = None  # how often each token was generated, for the penalties
        self.seen = None  # tokens in the prompt or output, for the repetition penalty
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, device=device)
        if params.repetition_penalty != 1:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt, device=device)] = True
        self.bias = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size, device=device)
            tokens = torch.tensor(list(params.logit_bias), device=device)
            self.bias[tokens] = torch.tensor(list(params.logit_bias.values()), device=device, dtype=torch.float32)

    def took(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits (vocab,) in fp32 after the bias and the penalties."""
        logits = logits.float()
        if self.bias is not None:
            logits = logits + self.bias
        if self.seen is not None:
            penalty = self.params.repetition_penalty
            logits = torch.where(self.seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
        if self.counts is not None:
            logits = logits - self.params.frequency_penalty * self.counts
            logits = logits - self.params.presence_penalty * (self.counts > 0)
        return logits

    def sample(self, logits: torch.Tensor) -> int:
        params = self.params
        logits = self.adjust(logits)
        if params.temperature == 0:
            return int(greedy(logits))
        probs = torch.softmax(logits / params.temperature, dim=-1)
        sorted_probs, sorted_ids = torch.sort(probs, descending=True)
        if params.top_k:
            sorted_probs[params.top_k :] = 0.0
        if params.min_p:
            sorted_probs[sorted_probs < params.min_p * sorted_probs[0]] = 0.0
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs[mass_before > params.top_p] = 0.0
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), num_samples=1, generator=self.generator)
        return int(sorted_ids[choice])


def sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of logits (batch, vocab): greedy at temperature 0, else nucleus sampling."""
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_top_p(probs, top_p).reshape(-1)
    return greedy(logits)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The first most likely token of each row: torch.argmax's answer, which on a CPU takes several
    times as long as max's, once per token."""
    return logits.max(dim=-1).indices


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probabilities add up to more than p.

    Returns (batch, 1) token ids.
    """
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs[mass_before > p] = 0.0
    sorted_probs.div_(sorted_probs.sum(dim=-1, keepdim=True))
    choice = torch.multinomial(sorted_probs, num_samples=1)
    return torch.gather(sorted_ids, -1, choice)


def sample_rows(logits: torch.Tensor, samplers: list[SequenceSampler | None]) -> list[int]:
    """A token for each row whose sampler is given (0 for the others, which are filler).

    Rows that all sample plainly with the same temperature and top_p are drawn together, as the
    reference draws a batch; the others one by one with their own options.
    """
    live = [s for s in samplers if s is not None]
    plain = live and SamplingParams(live[0].params.temperature, live[0].params.top_p)
    if plain and all(s.params == plain for s in live):
        tokens = sample(logits, plain.temperature, plain.top_p).tolist()
        return [token if s is not None else 0 for token, s in zip(tokens, samplers)]
    return [s.sample(row) if s is not None else 0 for row, s in zip(logits, samplers)]


def sampling_params(temperature: float, top_p: float, options: Mapping[str, object]) -> SamplingParams:
    """SamplingParams from the reference's two arguments and the further options by name."""
    known = [f.name for f in fields(SamplingParams)][2:]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"unknown sampling option {unknown[0]!r}: the options are {', '.join(known)}")
    return SamplingParams(temperature, top_p, **options)

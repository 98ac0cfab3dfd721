"""Loading a model and generating text: prefill, decode, sample, and the Llama 2 chat format."""

import time
from typing import Literal, TypedDict

import torch

from llama.checkpoint import load_model
from llama.model import Transformer
from llama.runtime import choose_runtime, init_model_parallel, is_main_process
from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # not required
    logprobs: list[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: list[str]  # not required
    logprobs: list[float]  # not required


Dialog = list[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: int | None = None,
        seed: int = 1,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> "Llama":
        """Load a Meta-format checkpoint folder and its tokenizer, one shard per model-parallel rank.

        device and dtype default to CUDA in bf16/fp16 when a GPU is present, else CPU in fp32.
        Every rank must use the same seed so that sampling picks the same tokens everywhere.
        """
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        tokenizer = Tokenizer(tokenizer_path)
        runtime = choose_runtime(device, dtype)
        init_model_parallel(runtime, model_parallel_size)
        torch.manual_seed(seed)

        start_time = time.time()
        model = load_model(ckpt_dir, tokenizer, runtime, max_seq_len, max_batch_size)
        if is_main_process():
            print(f"Loaded in {time.time() - start_time:.2f} seconds")
        return Llama(model, tokenizer)

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def check_prompts(self, prompt_tokens: list[list[int]]) -> None:
        """Reject batches the pre-allocated cache cannot hold, before any work is done."""
        params = self.model.params
        if len(prompt_tokens) == 0:
            raise ValueError("no prompts given: pass at least one prompt")
        if len(prompt_tokens) > params.max_batch_size:
            raise ValueError(
                f"{len(prompt_tokens)} prompts exceed max_batch_size={params.max_batch_size}: "
                "build with a larger max_batch_size or send the prompts in smaller batches"
            )
        for i, tokens in enumerate(prompt_tokens):
            if len(tokens) == 0:
                raise ValueError(f"prompt {i} has no tokens: every prompt needs at least one (usually BOS)")
            if len(tokens) > params.max_seq_len:
                raise ValueError(
                    f"prompt {i} is {len(tokens)} tokens long but max_seq_len is {params.max_seq_len}: "
                    "shorten the prompt or build with a larger max_seq_len"
                )

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Continue each prompt until EOS, max_gen_len new tokens, or max_seq_len.

        Each prompt is prefilled whole in one batched forward pass (right-padded), then every
        sequence decodes at its own position, so prompts of different lengths cost no extra passes.
        A token's logprob is taken from the logits one position earlier; the first prompt token
        has nothing before it and gets 0.
        """
        self.check_prompts(prompt_tokens)
        if max_gen_len < 0:
            raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len}")
        model, max_seq_len = self.model, self.model.params.max_seq_len
        device = model.tok_embeddings.weight.device
        bsz = len(prompt_tokens)
        prompt_lens = [len(t) for t in prompt_tokens]
        budgets = [min(n + max_gen_len, max_seq_len) - n for n in prompt_lens]
        steps = max(budgets)

        prompt_logprobs, next_logits = self.prefill(prompt_tokens, logprobs)
        out_tokens = torch.zeros((bsz, steps), dtype=torch.long, device=device)
        out_logprobs = torch.zeros((bsz, steps), device=device)
        budget = torch.tensor(budgets, device=device)
        finished = budget == 0
        for step in range(steps):
            next_token = sample(next_logits, temperature, top_p)
            out_tokens[:, step] = next_token
            if logprobs:
                out_logprobs[:, step] = token_logprobs(next_logits, next_token)
            finished |= (next_token == self.tokenizer.eos_id) | (budget <= step + 1)
            if bool(finished.all()):
                break
            # Sequences that are done keep stepping in lockstep at a harmless, in-range position.
            positions = [min(n + step, max_seq_len - 1) for n in prompt_lens]
            start_pos = positions[0] if len(set(positions)) == 1 else positions
            next_logits = model.logits(model.hidden_states(next_token.unsqueeze(1), start_pos)[:, -1])

        out_tokens_host, out_logprobs_host = out_tokens.tolist(), out_logprobs.tolist()
        prompt_logprobs_host = prompt_logprobs.tolist() if logprobs else None
        all_tokens, all_logprobs = [], []
        for i, tokens in enumerate(prompt_tokens):
            generated = out_tokens_host[i][: budgets[i]]
            if self.tokenizer.eos_id in generated:
                generated = generated[: generated.index(self.tokenizer.eos_id)]
            all_tokens.append((list(tokens) if echo else []) + generated)
            if logprobs:
                echoed = prompt_logprobs_host[i][: prompt_lens[i]] if echo else []
                all_logprobs.append(echoed + out_logprobs_host[i][: len(generated)])
        return all_tokens, (all_logprobs if logprobs else None)

    def prefill(self, prompt_tokens: list[list[int]], logprobs: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Run all prompts through the model at once; return their token logprobs and next-token logits.

        Padding sits after each prompt, where causal attention keeps it from touching the real
        tokens; decoding then overwrites those cache slots.
        """
        model = self.model
        device = model.tok_embeddings.weight.device
        bsz, longest = len(prompt_tokens), max(len(t) for t in prompt_tokens)
        prompt = torch.zeros((bsz, longest), dtype=torch.long, device=device)
        for i, tokens in enumerate(prompt_tokens):
            prompt[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        last = torch.tensor([len(t) - 1 for t in prompt_tokens], device=device)
        h = model.hidden_states(prompt, 0)
        rows = torch.arange(bsz, device=device)
        if not logprobs:
            return None, model.logits(h[rows, last])
        logits = model.logits(h)
        prompt_logprobs = torch.zeros((bsz, longest), device=device)
        prompt_logprobs[:, 1:] = token_logprobs(logits[:, :-1], prompt[:, 1:])
        return prompt_logprobs, logits[rows, last]

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> list[CompletionPrediction]:
        """Complete each prompt; by default generate until EOS or the end of the context window."""
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs, echo=echo
        )
        if logprobs:
            return [
                {"generation": self.tokenizer.decode(t), "tokens": self.decode_each(t), "logprobs": lp}
                for t, lp in zip(generation_tokens, generation_logprobs)
            ]
        return [{"generation": self.tokenizer.decode(t)} for t in generation_tokens]

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
    ) -> list[ChatPrediction]:
        """Answer the last user message of each dialog in the Llama 2 chat format.

        Dialogs that smuggle in the format's own tags are answered with UNSAFE_ERROR and are not
        sent to the model at all (the reference generated for them and then threw the answer away).
        """
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        if len(dialogs) == 0:
            raise ValueError("no dialogs given: pass at least one dialog")
        for i, dialog in enumerate(dialogs):
            check_dialog(dialog, i)
        unsafe = [has_special_tags(dialog) for dialog in dialogs]
        prompt_tokens = [encode_dialog(self.tokenizer, d) for d, refused in zip(dialogs, unsafe) if not refused]
        answers, answer_logprobs = [], []
        if prompt_tokens:
            answers, answer_logprobs = self.generate(
                prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs
            )
        answers, answer_logprobs = iter(answers), iter(answer_logprobs or [])
        predictions: list[ChatPrediction] = []
        for refused in unsafe:
            if refused:
                prediction: ChatPrediction = {"generation": {"role": "assistant", "content": UNSAFE_ERROR}}
                if logprobs:
                    prediction.update(tokens=[], logprobs=[])
            else:
                tokens = next(answers)
                prediction = {"generation": {"role": "assistant", "content": self.tokenizer.decode(tokens)}}
                if logprobs:
                    prediction.update(tokens=self.decode_each(tokens), logprobs=next(answer_logprobs))
            predictions.append(prediction)
        return predictions

    def decode_each(self, tokens: list[int]) -> list[str]:
        return [self.tokenizer.decode(token) for token in tokens]


def check_dialog(dialog: Dialog, index: int = 0) -> None:
    """Roles must be: an optional system message, then user/assistant alternating, ending with user."""
    where = f"dialog {index}"
    if not isinstance(dialog, list) or not dialog:
        raise ValueError(f"{where} must be a non-empty list of {{'role': ..., 'content': ...}} messages")
    for j, message in enumerate(dialog):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise ValueError(f"{where}, message {j}: expected {{'role': ..., 'content': str}}, got {message!r}")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    if not turns:
        raise ValueError(f"{where} has only a system message: add a user message after it")
    for j, message in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if message["role"] != expected:
            position = j + len(dialog) - len(turns)
            raise ValueError(
                f"{where}, message {position} has role {message['role']!r} where {expected!r} is expected: "
                "use an optional 'system' message, then 'user' and 'assistant' alternating"
            )
    if turns[-1]["role"] != "user":
        raise ValueError(f"{where} ends with an assistant message: the last message must come from the user")


def has_special_tags(dialog: Dialog) -> bool:
    return any(tag in message["content"] for message in dialog for tag in SPECIAL_TAGS)


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """Token ids of a dialog in the Llama 2 chat format.

    A system message is folded into the first user turn. Each finished exchange is
    BOS "[INST] user [/INST] answer " EOS; the open user turn is BOS "[INST] user [/INST]".
    """
    if dialog[0]["role"] == "system":
        merged = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": "user", "content": merged}] + dialog[2:]
    tokens: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(text, bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under logits (..., vocab) for tokens (...)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of logits (batch, vocab): greedy at temperature 0, else nucleus sampling."""
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return sample_top_p(probs, top_p).reshape(-1)
    return torch.argmax(logits, dim=-1)


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

"""Loading a model and generating text: prefill, decode, sample, stream, and the Llama 2 chat format."""

import time
from collections.abc import Iterator
from typing import Literal, TypedDict

import torch

from llama.checkpoint import find_tokenizer, load_model
from llama.model import Transformer
from llama.runtime import choose_runtime, init_model_parallel, is_main_process
from llama.streaming import TextStream
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
        tokenizer_path: str | None,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: int | None = None,
        seed: int = 1,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        compile: bool = False,
    ) -> "Llama":
        """Load a checkpoint folder (Meta's shards or Hugging Face's safetensors) and its tokenizer.

        Any shard count runs on any number of processes. tokenizer_path None means the
        tokenizer.model in ckpt_dir or its parent (where download.sh puts it).
        device and dtype default to CUDA in bf16/fp16 when a GPU is present, else CPU in fp32.
        Every rank must use the same seed so that sampling picks the same tokens everywhere.
        compile runs the decode step through torch.compile (see Llama.__init__).
        """
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        tokenizer = Tokenizer(str(find_tokenizer(ckpt_dir, tokenizer_path)))
        runtime = choose_runtime(device, dtype)
        init_model_parallel(runtime, model_parallel_size)
        torch.manual_seed(seed)

        start_time = time.time()
        model = load_model(ckpt_dir, tokenizer, runtime, max_seq_len, max_batch_size)
        if is_main_process():
            print(f"Loaded in {time.time() - start_time:.2f} seconds")
        return Llama(model, tokenizer, compile)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        # The decode step repeats for every token: compiled, each layer becomes a few fused loops,
        # and on a CPU its matrix-vector products stream the weights on every core (model.linear);
        # decode runs about twice as fast, which pays back the compile time (tens of seconds) on
        # long generations. Positions are symbolic, so one compilation serves every step; on a
        # CPU each batch size up to model.FEW_ROWS gets its own, as does a batch whose sequences
        # sit at different positions. After 8 such variants torch stops compiling (its
        # recompile_limit) and new ones run eagerly, with the same results. Prefill runs eagerly:
        # its large matrix products are already near the machine's arithmetic limit.
        self.decode_step = torch.compile(decode_step, dynamic=True) if compile else decode_step
        # The tokens whose keys and values sit in cache row 0 from position 0, as far as this object
        # knows; a prefill with reuse_cache skips the prefix a new prompt shares with them. Every
        # prefill rewrites it. Running self.model directly, or another Llama on the same model,
        # leaves it stale: set it to [] afterwards.
        self.cached_tokens: list[int] = []

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

    def token_budgets(self, prompt_tokens: list[list[int]], max_gen_len: int) -> list[int]:
        """Check the prompts; return how many tokens each may generate: max_gen_len, or what the window leaves."""
        self.check_prompts(prompt_tokens)
        if max_gen_len < 0:
            raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len}")
        max_seq_len = self.model.params.max_seq_len
        return [min(len(t) + max_gen_len, max_seq_len) - len(t) for t in prompt_tokens]

    def max_gen_len_or_window(self, max_gen_len: int | None) -> int:
        """None means: until EOS or the end of the context window, as in the reference."""
        return self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len

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
        budgets = self.token_budgets(prompt_tokens, max_gen_len)
        device = self.model.tok_embeddings.weight.device
        bsz, steps = len(prompt_tokens), max(budgets)
        prompt_lens = [len(t) for t in prompt_tokens]

        prompt_logprobs, next_logits = self.prefill(prompt_tokens, logprobs)
        out_tokens = torch.zeros((bsz, steps), dtype=torch.long, device=device)
        out_logprobs = torch.zeros((bsz, steps), device=device)
        decoding = self.decode(next_logits, prompt_lens, budgets, temperature, top_p, logprobs)
        for step, (next_token, next_logprobs) in enumerate(decoding):
            out_tokens[:, step] = next_token
            if logprobs:
                out_logprobs[:, step] = next_logprobs

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

    def prefill(
        self, prompt_tokens: list[list[int]], logprobs: bool, reuse_cache: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Run all prompts through the model at once; return their token logprobs and next-token logits.

        Padding sits after each prompt, where causal attention keeps it from touching the real
        tokens; decoding then overwrites those cache slots. With reuse_cache (one prompt, no
        logprobs) the prefix the prompt shares with cached_tokens is already in the cache: only the
        rest is run, from the position where it starts.
        """
        model = self.model
        device = model.tok_embeddings.weight.device
        start = self.reusable_prefix(prompt_tokens[0]) if reuse_cache else 0
        self.cached_tokens = self.cached_tokens[:start]  # all that is sure to be in the cache until the pass is done
        bsz, longest = len(prompt_tokens), max(len(t) for t in prompt_tokens) - start
        prompt = torch.zeros((bsz, longest), dtype=torch.long, device=device)
        for i, tokens in enumerate(prompt_tokens):
            prompt[i, : len(tokens) - start] = torch.tensor(tokens[start:], dtype=torch.long)
        last = torch.tensor([len(t) - 1 - start for t in prompt_tokens], device=device)
        h = model.hidden_states(prompt, start)
        if reuse_cache:
            self.cached_tokens = list(prompt_tokens[0])
        rows = torch.arange(bsz, device=device)
        if not logprobs:
            return None, model.logits(h[rows, last])
        logits = model.logits(h)
        prompt_logprobs = torch.zeros((bsz, longest), device=device)
        prompt_logprobs[:, 1:] = token_logprobs(logits[:, :-1], prompt[:, 1:])
        return prompt_logprobs, logits[rows, last]

    def reusable_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens of a prompt are in the cache already, leaving at least one to run.

        Compared by id: the cache holds the ids the model generated, and re-encoding their text
        (as the chat format does for past answers) may split it into different tokens.
        """
        shared = 0
        for cached, token in zip(self.cached_tokens, tokens):
            if cached != token:
                break
            shared += 1
        return min(shared, len(tokens) - 1)

    def decode(
        self,
        next_logits: torch.Tensor,
        prompt_lens: list[int],
        budgets: list[int],
        temperature: float,
        top_p: float,
        logprobs: bool,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Sample a token for every sequence and feed it back, until each has hit EOS or its budget.

        Yields each step's tokens (batch,) and, with logprobs, their logprobs, before they are fed
        back: a consumer sees every token as soon as it exists, and one that stops early (a stop
        string) costs no extra forward pass. Every yielded token but the last has been fed by the
        time the next is yielded. Sequences that are done keep stepping in lockstep at a harmless,
        in-range position; their tokens are filler.
        """
        model, max_seq_len = self.model, self.model.params.max_seq_len
        budget = torch.tensor(budgets, device=next_logits.device)
        finished = budget == 0
        for step in range(max(budgets)):
            next_token = sample(next_logits, temperature, top_p)
            yield next_token, (token_logprobs(next_logits, next_token) if logprobs else None)
            finished |= (next_token == self.tokenizer.eos_id) | (budget <= step + 1)
            if bool(finished.all()):
                return
            positions = [min(n + step, max_seq_len - 1) for n in prompt_lens]
            start_pos = positions[0] if len(set(positions)) == 1 else positions
            next_logits = self.decode_step(model, next_token, start_pos)

    def generate_stream(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        stop: str | list[str] | None = None,
        reuse_cache: bool = False,
    ) -> Iterator[list[str]]:
        """generate, as text: after each step, yield the new text of every sequence ("" where there is none).

        A sequence's deltas add up to tokenizer.decode(its generated tokens), cut before the earliest
        of the stop strings; a sequence that reaches one finishes as at EOS. With reuse_cache (one
        prompt), the part of the prompt that the cache still holds from the last call is not run again.
        The arguments are checked here, before the first step.
        """
        budgets = self.token_budgets(prompt_tokens, max_gen_len)
        stop = check_stop(stop)
        if reuse_cache and len(prompt_tokens) != 1:
            raise ValueError(f"reuse_cache works with one prompt at a time, got {len(prompt_tokens)}")
        return self.stream_text(prompt_tokens, budgets, temperature, top_p, stop, reuse_cache)

    @torch.inference_mode()
    def stream_text(
        self,
        prompt_tokens: list[list[int]],
        budgets: list[int],
        temperature: float,
        top_p: float,
        stop: list[str],
        reuse_cache: bool,
    ) -> Iterator[list[str]]:
        """The steps behind generate_stream, with its arguments checked."""
        streams = [TextStream(self.tokenizer, stop) for _ in prompt_tokens]
        finished = [budget == 0 for budget in budgets]
        _, next_logits = self.prefill(prompt_tokens, logprobs=False, reuse_cache=reuse_cache)
        decoding = self.decode(next_logits, [len(t) for t in prompt_tokens], budgets, temperature, top_p, False)
        tokens: list[int] = []  # the last step's
        for step, (next_token, _) in enumerate(decoding):
            if reuse_cache and tokens:
                self.cached_tokens.append(tokens[0])  # decode ran the last step's token through the model
            tokens = next_token.tolist()
            deltas = [""] * len(tokens)
            for i, (stream, token) in enumerate(zip(streams, tokens)):
                if not finished[i]:
                    deltas[i], finished[i] = next_text(stream, token, self.tokenizer.eos_id, step + 1 == budgets[i])
            yield deltas
            if all(finished):
                return

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        stop: str | list[str] | None = None,
    ) -> list[CompletionPrediction]:
        """Complete each prompt; by default generate until EOS or the end of the context window.

        With stop strings, each completion also ends before the first of them that it produces. A stop
        string may end inside a token, so it cannot be combined with the per-token logprobs or echo.
        """
        if check_stop(stop):
            if logprobs or echo:
                raise ValueError("stop strings cannot be combined with logprobs or echo: drop one or the other")
            stream = self.text_completion_stream(prompts, temperature, top_p, max_gen_len, stop)
            return [{"generation": text} for text in join_deltas(stream, len(prompts))]
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens,
            self.max_gen_len_or_window(max_gen_len),
            temperature=temperature,
            top_p=top_p,
            logprobs=logprobs,
            echo=echo,
        )
        if logprobs:
            return [
                {"generation": self.tokenizer.decode(t), "tokens": self.decode_each(t), "logprobs": lp}
                for t, lp in zip(generation_tokens, generation_logprobs)
            ]
        return [{"generation": self.tokenizer.decode(t)} for t in generation_tokens]

    def text_completion_stream(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        stop: str | list[str] | None = None,
    ) -> Iterator[list[str]]:
        """text_completion as it is generated: after each step, a list with each prompt's new text.

        Each prompt's deltas add up to its text_completion "generation" for the same arguments (and seed).
        """
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        return self.generate_stream(prompt_tokens, self.max_gen_len_or_window(max_gen_len), temperature, top_p, stop)

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
        unsafe, prompt_tokens = self.encode_dialogs(dialogs)
        answers, answer_logprobs = [], []
        if prompt_tokens:
            answers, answer_logprobs = self.generate(
                prompt_tokens,
                self.max_gen_len_or_window(max_gen_len),
                temperature=temperature,
                top_p=top_p,
                logprobs=logprobs,
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

    def chat_completion_stream(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
    ) -> Iterator[list[str]]:
        """chat_completion as it is generated: after each step, a list with each answer's new text.

        Each dialog's deltas add up to its chat_completion answer; a refused dialog's answer
        (UNSAFE_ERROR) comes whole in the first step.
        """
        unsafe, prompt_tokens = self.encode_dialogs(dialogs)
        answers: Iterator[list[str]] = iter([])
        if prompt_tokens:
            answers = self.generate_stream(prompt_tokens, self.max_gen_len_or_window(max_gen_len), temperature, top_p)
        return with_refusals(answers, unsafe)

    def encode_dialogs(self, dialogs: list[Dialog]) -> tuple[list[bool], list[list[int]]]:
        """Check the dialogs; return which are refused for special tags, and the tokens of the others."""
        if len(dialogs) == 0:
            raise ValueError("no dialogs given: pass at least one dialog")
        for i, dialog in enumerate(dialogs):
            check_dialog(dialog, i)
        unsafe = [has_special_tags(dialog) for dialog in dialogs]
        prompt_tokens = [encode_dialog(self.tokenizer, d) for d, refused in zip(dialogs, unsafe) if not refused]
        return unsafe, prompt_tokens

    def decode_each(self, tokens: list[int]) -> list[str]:
        return [self.tokenizer.decode(token) for token in tokens]


class ChatSession:
    """One conversation, answered turn by turn, that keeps its dialog (and its cache) across turns.

    The dialog is kept within max_seq_len by dropping the oldest exchanges, so that max_gen_len
    tokens stay free for each answer. With reuse_cache, a turn runs only the tokens the cache does
    not hold yet (the end of the last answer and the new message) instead of the whole dialog. The
    session assumes it is the only user of its Llama's cache between turns.
    """

    def __init__(
        self,
        generator: Llama,
        system: str | None = None,
        max_gen_len: int | None = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        reuse_cache: bool = True,
    ):
        max_seq_len = generator.model.params.max_seq_len
        if max_gen_len is None:
            max_gen_len = max_seq_len // 4
        if not 0 < max_gen_len < max_seq_len:
            raise ValueError(
                f"max_gen_len must be between 1 and {max_seq_len - 1} to leave room for the dialog "
                f"in max_seq_len={max_seq_len}, got {max_gen_len}"
            )
        if system is not None and has_special_tags([{"role": "system", "content": system}]):
            raise ValueError(f"the system prompt contains one of the special tags {', '.join(SPECIAL_TAGS)}: remove it")
        self.generator = generator
        self.max_gen_len, self.temperature, self.top_p = max_gen_len, temperature, top_p
        self.reuse_cache = reuse_cache
        self.system: Dialog = [] if system is None else [{"role": "system", "content": system}]
        self.dialog: Dialog = list(self.system)

    def reset(self) -> None:
        """Start a new dialog; the system prompt stays."""
        self.dialog = list(self.system)

    def send(self, message: str) -> tuple[int, Iterator[str]]:
        """Add the user's message; return how many of the oldest exchanges were dropped, and the answer.

        The answer is text deltas as they are generated. It joins the dialog as it streams, so an
        answer the caller stops reading stays in the dialog as far as it got. A message with special
        tags, or one too long to fit even alone, raises ValueError and leaves the dialog as it was.
        """
        if has_special_tags([{"role": "user", "content": message}]):
            raise ValueError(f"the message contains one of the special tags {', '.join(SPECIAL_TAGS)}; it was not sent")
        dialog, dropped = self.fit(self.dialog + [{"role": "user", "content": message}])
        answer: Message = {"role": "assistant", "content": ""}
        self.dialog = dialog + [answer]
        return dropped, self.stream_answer(encode_dialog(self.generator.tokenizer, dialog), answer)

    def fit(self, dialog: Dialog) -> tuple[Dialog, int]:
        """Drop the oldest exchanges until the dialog leaves max_gen_len tokens of the window free."""
        room = self.generator.model.params.max_seq_len - self.max_gen_len
        first, dropped = len(self.system), 0
        while (length := len(encode_dialog(self.generator.tokenizer, dialog))) > room:
            if len(dialog) == first + 1:
                raise ValueError(
                    f"the message is too long: in the chat format, with the system prompt if any, it takes "
                    f"{length} tokens, but only {room} fit beside a {self.max_gen_len}-token answer in "
                    f"max_seq_len={room + self.max_gen_len}; shorten it, or use a larger max_seq_len or a "
                    "smaller max_gen_len"
                )
            dialog, dropped = dialog[:first] + dialog[first + 2 :], dropped + 1
        return dialog, dropped

    def stream_answer(self, prompt_tokens: list[int], answer: Message) -> Iterator[str]:
        steps = self.generator.generate_stream(
            [prompt_tokens], self.max_gen_len, self.temperature, self.top_p, reuse_cache=self.reuse_cache
        )
        for deltas in steps:
            answer["content"] += deltas[0]
            yield deltas[0]


def check_stop(stop: str | list[str] | None) -> list[str]:
    """Stop strings as a list: one string, or a list of them; none may be empty."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    return stop


def next_text(stream: TextStream, token: int, eos_id: int, last: bool) -> tuple[str, bool]:
    """A sequence's new text for its next token, and whether it is finished: EOS, a stop string or its last token."""
    if token == eos_id:
        return stream.finish(), True
    delta = stream.push(token)
    if stream.stopped or last:
        return delta + stream.finish(), True
    return delta, False


def join_deltas(stream: Iterator[list[str]], count: int) -> list[str]:
    """The whole text of each of count sequences from a stream of per-step deltas."""
    parts: list[list[str]] = [[] for _ in range(count)]
    for deltas in stream:
        for part, delta in zip(parts, deltas):
            part.append(delta)
    return ["".join(part) for part in parts]


def with_refusals(answers: Iterator[list[str]], refused: list[bool]) -> Iterator[list[str]]:
    """Interleave refused dialogs, each answered whole with UNSAFE_ERROR in the first step, with the streamed rest."""
    pending = any(refused)
    for deltas in answers:
        safe = iter(deltas)
        yield [(UNSAFE_ERROR if pending else "") if r else next(safe) for r in refused]
        pending = False
    if pending:
        yield [UNSAFE_ERROR if r else "" for r in refused]


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


def decode_step(model: Transformer, tokens: torch.Tensor, start_pos: int | list[int]) -> torch.Tensor:
    """Logits (batch, vocab) after feeding one token (batch,) per sequence at start_pos."""
    return model.logits(model.hidden_states(tokens.unsqueeze(1), start_pos)[:, -1])


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

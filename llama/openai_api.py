"""OpenAI's chat and completions API: what a request may hold, and how answers are written.

The request models are pydantic's, so a malformed field is refused with its name; the fields
follow OpenAI's reference (plus top_k, min_p and repetition_penalty as vLLM accepts them).
Fields a client may send that change nothing here (user, service_tier, ...) are accepted and
ignored; those that would change the answer in ways this server cannot (tools, response
formats) are refused by name rather than silently dropped.
"""

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llama.engine import Event
from llama.sampling import SamplingParams
from llama.tokenizer import Tokenizer

# Fields that would change what the answer is, which this server does not do.
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "response_format", "suffix", "audio", "best_of")


class Request(BaseModel):
    """What both endpoints take."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int = Field(default=0, ge=-1)  # vLLM's: -1 and 0 mean no limit
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    ignore_eos: bool = False  # vLLM's: generate max_tokens whatever comes (for benchmarks)

    def unsupported(self) -> str | None:
        """The first field this server would have to ignore to answer, if any."""
        extra = self.model_extra or {}
        return next((name for name in UNSUPPORTED if extra.get(name) not in (None, [], {})), None)

    def sampling(self, temperature: float, top_p: float) -> SamplingParams:
        """The sampling options, with the server's defaults where the request has none."""
        bias = {}
        for token, value in (self.logit_bias or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            bias[int(token)] = value
        return SamplingParams(
            temperature=temperature if self.temperature is None else self.temperature,
            top_p=top_p if self.top_p is None else self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=bias,
            seed=self.seed,
        )

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def dialog(self) -> list[dict[str, str]]:
        """The messages as a Llama 2 dialog; OpenAI's "developer" role is its new name for "system"."""
        role = {"developer": "system"}
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs

    @property
    def alternatives(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0


class CompletionRequest(Request):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @property
    def token_limit(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens  # OpenAI's default for completions

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    @property
    def alternatives(self) -> int:
        return self.logprobs or 0


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class TokenText:
    """Each token's own text and bytes, as OpenAI's logprobs give them (spaces included)."""

    def __init__(self, tokenizer: Tokenizer):
        self.sp = tokenizer.sp_model

    def bytes(self, token: int) -> list[int]:
        if self.sp.is_byte(token):
            return [int(self.sp.id_to_piece(token)[3:5], 16)]
        if self.sp.is_control(token) or self.sp.is_unknown(token):
            return []
        return list(self.sp.id_to_piece(token).replace("\u2581", " ").encode("utf-8"))

    def text(self, token: int) -> str:
        return bytes(self.bytes(token)).decode("utf-8", errors="replace")

    def chat_logprobs(self, tokens: list[int], logprobs: list[float], top: list[list[tuple[int, float]]]) -> list[dict]:
        """OpenAI chat's logprobs.content entries."""
        entries = []
        for i, (token, logprob) in enumerate(zip(tokens, logprobs)):
            alternatives = top[i] if i < len(top) else []
            entries.append(
                {
                    "token": self.text(token),
                    "logprob": logprob,
                    "bytes": self.bytes(token),
                    "top_logprobs": [
                        {"token": self.text(t), "logprob": lp, "bytes": self.bytes(t)} for t, lp in alternatives
                    ],
                }
            )
        return entries

    def completion_logprobs(
        self,
        tokens: list[int],
        logprobs: list[float | None],
        top: list[list[tuple[int, float]]] | None,
        offset: int,
    ) -> dict[str, Any]:
        """OpenAI completions' logprobs object; text offsets count from `offset`."""
        texts = [self.text(token) for token in tokens]
        offsets, position = [], offset
        for text in texts:
            offsets.append(position)
            position += len(text)
        return {
            "tokens": texts,
            "token_logprobs": logprobs,
            "top_logprobs": None if top is None else [{self.text(t): lp for t, lp in alts} or None for alts in top],
            "text_offset": offsets,
        }


class Answer:
    """One choice's answer, gathered from the engine's events."""

    def __init__(self):
        self.text, self.tokens, self.logprobs, self.top = "", [], [], []
        self.finish_reason, self.prompt_logprobs = None, None

    def add(self, event: Event) -> None:
        self.text += event.text
        self.tokens += event.tokens
        self.logprobs += event.logprobs
        self.top += event.top_logprobs
        self.finish_reason = event.finish_reason or self.finish_reason
        self.prompt_logprobs = event.prompt_logprobs or self.prompt_logprobs


class ChatWriter:
    """Chat answers as OpenAI writes them: a chat.completion, or chat.completion.chunk events."""

    def __init__(self, request: ChatRequest, head: dict, token_text: TokenText):
        self.request, self.head, self.token_text = request, head, token_text

    def logprobs(self, tokens: list[int], logprobs: list[float], top: list) -> dict | None:
        return {"content": self.token_text.chat_logprobs(tokens, logprobs, top)} if self.request.logprobs else None

    def response(self, answers: list[Answer], prompt_tokens: int) -> dict:
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": answer.text},
                "logprobs": self.logprobs(answer.tokens, answer.logprobs, answer.top),
                "finish_reason": answer.finish_reason,
            }
            for index, answer in enumerate(answers)
        ]
        generated = sum(len(answer.tokens) for answer in answers)
        return {**self.head, "object": "chat.completion", "choices": choices, "usage": usage(prompt_tokens, generated)}

    def chunk(self, choices: list[dict], **extra: Any) -> dict:
        return {**self.head, "object": "chat.completion.chunk", "choices": choices, **extra}

    def opening(self, count: int) -> list[dict]:
        delta = {"role": "assistant", "content": ""}
        return [
            self.chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]) for i in range(count)
        ]

    def chunks(self, index: int, event: Event) -> list[dict]:
        chunks = []
        if event.text or (self.request.logprobs and event.tokens):
            logprobs = self.logprobs(event.tokens, event.logprobs, event.top_logprobs)
            choice = {"index": index, "delta": {"content": event.text}, "logprobs": logprobs, "finish_reason": None}
            chunks.append(self.chunk([choice]))
        if event.finish_reason is not None:
            choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": event.finish_reason}
            chunks.append(self.chunk([choice]))
        return chunks


class CompletionWriter:
    """Completions as OpenAI writes them: a text_completion, whole or in chunks."""

    def __init__(
        self, request: CompletionRequest, head: dict, token_text: TokenText, prompts: list[tuple[str, list[int]]]
    ):
        self.request, self.head, self.token_text = request, head, token_text
        self.prompts = prompts  # each choice's prompt, as text and as token ids

    def logprobs(self, tokens: list[int], logprobs: list, top: list, offset: int) -> dict | None:
        if not self.request.wants_logprobs:
            return None
        return self.token_text.completion_logprobs(tokens, logprobs, top if self.request.alternatives else None, offset)

    def response(self, answers: list[Answer], prompt_tokens: int) -> dict:
        choices = []
        for index, answer in enumerate(answers):
            prompt_text, prompt = self.prompts[index]
            tokens, logprobs, top, offset = answer.tokens, answer.logprobs, answer.top, len(prompt_text)
            text = answer.text
            if self.request.echo:
                text, offset = prompt_text + text, 0
                tokens, logprobs = prompt + tokens, list(answer.prompt_logprobs or [None] * len(prompt)) + logprobs
                top = [[] for _ in prompt] + top
            choice = {"text": text, "index": index, "logprobs": self.logprobs(tokens, logprobs, top, offset)}
            choices.append({**choice, "finish_reason": answer.finish_reason})
        generated = sum(len(answer.tokens) for answer in answers)
        return {**self.head, "object": "text_completion", "choices": choices, "usage": usage(prompt_tokens, generated)}

    def chunk(self, choices: list[dict], **extra: Any) -> dict:
        return {**self.head, "object": "text_completion", "choices": choices, **extra}

    def opening(self, count: int) -> list[dict]:
        return []

    def chunks(self, index: int, event: Event) -> list[dict]:
        if not event.text and event.finish_reason is None:
            return []
        logprobs = self.logprobs(event.tokens, event.logprobs, event.top_logprobs, 0)
        return [
            self.chunk(
                [{"text": event.text, "index": index, "logprobs": logprobs, "finish_reason": event.finish_reason}]
            )
        ]


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"

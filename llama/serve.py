"""An OpenAI-compatible HTTP server with continuous batching.

    python -m llama.serve                                    # the demo model on http://127.0.0.1:8000
    python -m llama.serve --ckpt_dir llama-2-7b-chat/ --api_key $KEY --max_batch_size 16
    torchrun --nproc_per_node 2 -m llama.serve --ckpt_dir llama-2-13b-chat/

Starlette (through FastAPI) and uvicorn serve HTTP and pydantic checks every request, as in vLLM
and llama-cpp-python; prometheus_client writes /metrics. All are the `serve` extra. Requests go
to one engine thread (llama.engine): under torchrun, rank 0 serves HTTP and every rank steps the
engine together. The server binds to localhost unless told otherwise, and with an API key
(--api_key or LLAMA_API_KEY) every /v1 endpoint and /metrics wants `Authorization: Bearer KEY`.
"""

import os
import secrets
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

try:
    import uvicorn
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import generate_latest
except ImportError as err:
    raise ImportError(f"the server needs its extra: pip install -e '.[serve]' ({err})") from err

from llama.chat_format import UNSAFE_ERROR, check_dialog, encode_dialog, has_special_tags
from llama.cli import DEMO_MODEL_DIR, run_script
from llama.engine import Event, follow
from llama.generation import Llama
from llama.openai_api import (
    Answer,
    ChatRequest,
    ChatWriter,
    CompletionRequest,
    CompletionWriter,
    error_body,
    new_id,
    now,
    sse,
    usage,
)
from llama.quantization import parse_scheme
from llama.runtime import is_main_process
from llama.sampling import SamplingParams
from llama.serving import Generation, Refused, Server, new_engine

API_KEY_ENV = "LLAMA_API_KEY"
# What needs no API key: the chat page (which asks for one) and the health check.
OPEN_PATHS = {"/", "/health", "/static/chat.js", "/static/chat.css"}
STATIC = Path(__file__).with_name("static")
# The page's own files only: no inline script or style, nothing from elsewhere, no framing.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
     b"img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]  # fmt: skip
# Waiting for the next request: an idle server's other ranks must not time out (see chat.py).
IDLE_TIMEOUT = timedelta(days=7)


class TooLarge(Exception):
    """A request body, sent in chunks, that grew past the limit."""


class Guard:
    """ASGI middleware: the API key, the body size limit, and the count of answers by status.

    Written against ASGI itself: Starlette's BaseHTTPMiddleware cancels streamed responses early.
    """

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings, status = self.server.settings, {}
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        key, limit = settings["api_key"], settings["max_body_bytes"]

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise TooLarge()
            return message

        given = headers.get("authorization", "")
        if key and scope["path"] not in OPEN_PATHS and not secrets.compare_digest(given, f"Bearer {key}"):
            message = "a valid API key is needed: send Authorization: Bearer KEY"
            response = JSONResponse(error_body(message, "invalid_request_error", code="invalid_api_key"), 401)
            await response(scope, receive, counted)
        elif int(headers.get("content-length") or 0) > limit:
            await too_large(limit)(scope, receive, counted)
        else:
            await self.app(scope, limited, counted)
        self.server.metrics.requests.labels(scope["path"], str(status.get("code", 500))).inc()


def too_large(limit: int) -> JSONResponse:
    message = f"the request body is larger than the server's limit of {limit} bytes"
    return JSONResponse(error_body(message, "invalid_request_error"), status_code=413)


def create_app(server: Server) -> FastAPI:
    """The HTTP side: OpenAI's endpoints, /health and /metrics, errors as OpenAI's error objects."""
    app = FastAPI(title="llama", docs_url=None, redoc_url=None, openapi_url=None)
    settings = server.settings

    app.add_middleware(Guard, server=server)

    @app.exception_handler(Refused)
    async def refused(request: Request, err: Refused) -> JSONResponse:
        return JSONResponse(err.body, status_code=err.status)

    @app.exception_handler(TooLarge)
    async def body_too_large(request: Request, err: TooLarge) -> JSONResponse:
        return too_large(settings["max_body_bytes"])

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = []
        for part in first.get("loc", ())[1:]:  # after "body"
            if isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list")):
                break  # the member of a union pydantic tried, not a field
            where.append(str(part))
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {first['msg']}", "invalid_request_error"), 400)
        param = ".".join(where) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(err.detail), "invalid_request_error"), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {err}", "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = 200 if server.state == "ready" else 503
        return JSONResponse({"status": server.state, **({"error": server.failure} if server.failure else {})}, status)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(
            generate_latest(server.metrics.registry).decode(), media_type="text/plain; version=0.0.4"
        )

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "chat.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(name: str) -> FileResponse:
        types = {"chat.js": "text/javascript", "chat.css": "text/css"}
        if name not in types:
            raise Refused(404, f"no such file: /static/{name}", kind="not_found_error")
        return FileResponse(STATIC / name, media_type=types[name])

    @app.get("/v1/llama/config")
    async def config() -> dict:
        """What the chat page shows: the model and the server's defaults."""
        server.check_ready()
        limits = {"max_seq_len": server.args.max_seq_len, "max_batch_size": server.args.max_batch_size}
        return {
            "model": settings["model"],
            "temperature": settings["temperature"],
            "top_p": settings["top_p"],
            **limits,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": settings["model"], "object": "model", "created": settings["created"], "owned_by": "llama"}
        return {"object": "list", "data": [entry]}

    def check_request(request: ChatRequest | CompletionRequest, choices: int) -> None:
        server.check_ready()
        if request.model != settings["model"]:
            raise Refused(404, f"model {request.model!r} does not exist: this server serves {settings['model']!r}",
                          "model", kind="not_found_error")  # fmt: skip
        if (field := request.unsupported()) is not None:
            raise Refused(400, f"{field} is not supported by this server", field)
        if choices > server.args.max_batch_size:
            raise Refused(400, f"n x prompts is {choices}, but the server runs at most {server.args.max_batch_size} "
                          "sequences at once (--max_batch_size)", "n")  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest, http: Request):
        check_request(request, request.n)
        dialog = request.dialog()
        try:
            check_dialog(dialog)
            prompt = encode_dialog(server.tokenizer, dialog)
        except ValueError as err:
            raise Refused(400, str(err).replace("dialog 0, ", ""), "messages") from err
        writer = ChatWriter(request, {"id": new_id("chatcmpl"), "created": now(), "model": settings["model"]},
                            server.token_text)  # fmt: skip
        if has_special_tags(dialog):  # answered without the model, as chat_completion does
            refusal = Answer()
            refusal.add(Event(0, text=UNSAFE_ERROR, finish_reason="stop"))
            return writer.response([refusal] * request.n, len(prompt))
        return await answer(Generation(server, server.jobs(prompt, request, request.n)), writer, request, http)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        texts = request.prompts()
        if not texts:
            raise Refused(400, "prompt is an empty list: give at least one prompt", "prompt")
        check_request(request, len(texts) * request.n)
        try:
            prompts = [(text, server.tokenizer.encode(text, bos=True, eos=False)) for text in texts]
        except ValueError as err:
            raise Refused(400, f"prompt: {err}", "prompt") from err
        choices = [prompt for prompt in prompts for _ in range(request.n)]
        writer = CompletionWriter(request, {"id": new_id("cmpl"), "created": now(), "model": settings["model"]},
                                  server.token_text, choices)  # fmt: skip
        jobs = [job for _, tokens in prompts for job in server.jobs(tokens, request, request.n)]
        return await answer(Generation(server, jobs), writer, request, http)

    async def answer(generation: Generation, writer, request, http: Request):
        """The answer whole, or as server-sent events that end with [DONE]."""
        index = {job.id: i for i, job in enumerate(generation.jobs)}
        prompt_tokens = sum(len(job.prompt) for job in generation.jobs[:: request.n])
        if not request.stream:
            answers = [Answer() for _ in generation.jobs]
            try:
                async for event in generation.events(http):
                    answers[index[event.id]].add(event)
            finally:
                generation.close()
            return writer.response(answers, prompt_tokens)

        async def events() -> AsyncIterator[str]:
            generated = 0
            try:
                for chunk in writer.opening(len(generation.jobs)):
                    yield sse(chunk)
                async for event in generation.events(http):
                    generated += len(event.tokens)
                    for chunk in writer.chunks(index[event.id], event):
                        yield sse(chunk)
                if request.include_usage:
                    yield sse(writer.chunk([], usage=usage(prompt_tokens, generated)))
                yield sse("[DONE]")
            except Refused as err:
                yield sse(err.body)
            finally:
                generation.close()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def check_port(host: str, port: int) -> None:
    """Refuse a port that is taken before loading a model for nothing."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ValueError(
                f"cannot listen on {host}:{port}: {err.strerror}; choose another --port or --host"
            ) from err


def main(
    ckpt_dir: str = str(DEMO_MODEL_DIR),
    tokenizer_path: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    max_seq_len: int = 2048,
    max_queue: int = 64,
    prefill_chunk: int = 256,
    temperature: float = 0.6,
    top_p: float = 0.9,
    api_key: str | None = None,
    model_name: str | None = None,
    max_body_bytes: int = 1 << 20,
    device: str | None = None,
    dtype: str | None = None,
    compile: bool = False,
    verify: bool = False,
    quantize: str | None = None,
) -> None:
    """Serve CKPT_DIR (default: the demo model) over OpenAI's API on http://HOST:PORT/v1.

    --max_batch_size is the number of sequences generated at once (KV-cache slots); up to
    --max_queue more wait for one, and beyond that requests get 429. --temperature and --top_p
    are the defaults for requests that give none. --api_key (or LLAMA_API_KEY) is required of
    every client; --model_name is the model's id (default: the folder's name). --quantize int8
    or int4 quantizes the weights while loading.
    """
    for name, value in (("port", port), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk),
                        ("max_body_bytes", max_body_bytes)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value!r}")
    SamplingParams(temperature, top_p)  # the defaults, checked before loading
    parse_scheme(quantize)
    settings = {
        "model": model_name or Path(ckpt_dir).resolve().name,
        "created": now(),
        "api_key": api_key or os.environ.get(API_KEY_ENV) or None,
        "max_body_bytes": max_body_bytes,
        "temperature": temperature,
        "top_p": top_p,
        "compile": compile,
        "prefill_chunk": prefill_chunk,
    }

    def build() -> tuple[Llama, dist.ProcessGroup | None]:
        generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype=dtype,
                                verify=verify, quantize=quantize)  # fmt: skip
        group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT) if dist.get_world_size() > 1 else None
        return generator, group

    if not is_main_process():
        generator, group = build()
        follow(new_engine(generator, compile, prefill_chunk), group)
        return
    check_port(host, port)
    server = Server(settings, max_queue)
    engine_thread = threading.Thread(target=server.run, args=(build,), name="llama-engine", daemon=True)
    engine_thread.start()
    print(f"serving {settings['model']} on http://{host}:{port}/v1 (loading; /health says when ready)", flush=True)
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning", access_log=False)
    server.inbox.stop()
    engine_thread.join(timeout=30)


if __name__ == "__main__":
    run_script(main)

"""The OpenAI-compatible HTTP API of ``dylora serve`` (docs/serving.md).

``POST /v1/completions`` (raw prompts), ``POST /v1/chat/completions`` (the tokenizer's chat
template), ``GET /v1/models``, ``GET /health``. The HTTP side is async and never touches torch:
it validates a request, tokenises it, hands it to the :class:`~.engine.Engine`'s worker thread and
turns the events it gets back into a JSON response or server-sent events. Every response carries
the gate each prompt was routed with in a ``dylora`` field. Errors have OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Draining, Engine, Failed, Finished, Gate, QueueFull, Request, Sampling, Started, Text

MAX_STOPS = 4
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class ServedModel:
    """What /v1/models describes and requests must name."""

    name: str
    tokenizer: Any
    window: int | None
    info: dict  # the dylora block of /v1/models: experts, routing, base model (empty for a base model)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def create_app(engine: Engine, served: ServedModel, *, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="dylora serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_, err: APIError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return APIError(err.status_code, str(err.detail), kind=kind).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, err: RequestValidationError):
        return APIError(400, str(err)).response()

    @app.middleware("http")
    async def authenticate(request: HTTPRequest, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY' with the key "
                                "given to dylora serve --api_key.", code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health():
        status = "draining" if engine.draining else "ok"
        return JSONResponse({"status": status, **engine.load()}, status_code=503 if engine.draining else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": created,
                                            "owned_by": "dylora", "dylora": served.info}]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await _json(request)
        _check_model(body, served)
        prompts = _prompts(body.get("prompt"), served.tokenizer)
        _unsupported(body, {"echo": False, "logprobs": None, "best_of": 1, "suffix": None,
                            "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None})
        max_tokens = _int(body, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS, minimum=1)
        sampling = _sampling(body, max_tokens, engine)
        for ids in prompts:
            _check_window(ids, sampling.max_tokens, served.window)
        return await _respond(request, engine, served, prompts, sampling, chat=False,
                              stream=_bool(body, "stream"), usage_in_stream=_include_usage(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await _json(request)
        _check_model(body, served)
        if not served.has_chat_template:
            raise APIError(400, f"model {served.name!r} has no chat template (its tokenizer defines none), so "
                           "/v1/chat/completions cannot build a prompt: use /v1/completions with a raw prompt.",
                           param="messages", code="chat_template_missing")
        ids = _chat_prompt(body.get("messages"), served.tokenizer)
        _unsupported(body, {"logprobs": False, "top_logprobs": None, "presence_penalty": 0, "frequency_penalty": 0,
                            "logit_bias": None, "tools": None, "response_format": None})
        room = (served.window - len(ids)) if served.window else None
        default = max(room, 1) if room is not None else 256
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        sampling = _sampling(body, _int(body, name, default, minimum=1), engine)
        _check_window(ids, sampling.max_tokens, served.window, "messages", name)
        return await _respond(request, engine, served, [ids], sampling, chat=True,
                              stream=_bool(body, "stream"), usage_in_stream=_include_usage(body))

    return app


# ---------------------------------------------------------------------- validation
async def _json(request: HTTPRequest) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}.") from err
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object.")
    return body


def _check_model(body: dict, served: ServedModel) -> None:
    model = body.get("model")
    if model is None:
        raise APIError(400, "you must provide a model parameter.", param="model")
    if model != served.name:
        raise APIError(404, f"The model {model!r} does not exist: this server serves {served.name!r} "
                       "(see GET /v1/models).", param="model", code="model_not_found", kind="not_found_error")


def _unsupported(body: dict, defaults: dict) -> None:
    for name, default in defaults.items():
        value = body.get(name)
        if value is not None and value != default and not (value == [] or value == {}):
            raise APIError(400, f"{name}={json.dumps(value)} is not supported by dylora serve "
                           f"(leave it out, or {json.dumps(default)}).", param=name, code="unsupported_parameter")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(body: dict, name: str, default: int | None, *, minimum: int | None = None, maximum: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f" from {minimum} to {maximum}" if maximum is not None else f" >= {minimum}"
                  if minimum is not None else "")
        raise APIError(400, f"{json.dumps(value)} is not a valid value for '{name}': give an integer{bounds}.",
                       param=name, code="invalid_value")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not (low < value if low_open else low <= value) or value > high or value != value:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"{json.dumps(value)} is not a valid value for '{name}': give a number in {interval}.",
                       param=name, code="invalid_value")
    return float(value)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{json.dumps(value)} is not a valid value for '{name}': give true or false.",
                       param=name, code="invalid_value")
    return value


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object such as {\"include_usage\": true}.",
                       param="stream_options", code="invalid_value")
    return _bool(options, "include_usage")


def _sampling(body: dict, max_tokens: int, engine: Engine) -> Sampling:
    stop = body.get("stop")
    if stop is None:
        stops = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) and s for s in stop):
        stops = tuple(stop)
    else:
        raise APIError(400, f"{json.dumps(stop)} is not a valid value for 'stop': give a string or a list of at "
                       f"most {MAX_STOPS} non-empty strings.", param="stop", code="invalid_value")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise APIError(400, f"{json.dumps(seed)} is not a valid value for 'seed': give an integer.",
                       param="seed", code="invalid_value")
    return Sampling(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                    top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
                    n=_int(body, "n", 1, minimum=1, maximum=engine.max_batch_size), stop=stops, seed=seed)


def _prompts(prompt, tokenizer) -> list[list[int]]:
    """Token ids of each prompt: a string, a list of strings, a list of token ids or a list of such lists."""
    def bad(why: str) -> APIError:
        return APIError(400, f"'prompt' {why}: give a string, a list of strings, a list of token ids or a list "
                        "of lists of token ids.", param="prompt", code="invalid_value")

    vocab = len(tokenizer)
    def tokens(ids: list) -> list[int]:
        if not ids:
            raise bad("holds an empty list of tokens")
        if not all(_is_int(t) and 0 <= t < vocab for t in ids):
            raise bad(f"holds a token id outside the vocabulary [0, {vocab})")
        return ids

    if prompt is None:
        raise APIError(400, "you must provide a prompt.", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("is empty or of the wrong type")
    if all(_is_int(t) for t in prompt):
        return [tokens(prompt)]
    encoded = []
    for item in prompt:
        if isinstance(item, str):
            ids = tokenizer(item).input_ids
            if not ids:
                raise bad("is an empty string, which gives no token to start from")
            encoded.append(ids)
        elif isinstance(item, list):
            encoded.append(tokens(item))
        else:
            raise bad(f"holds {json.dumps(item)}")
    return encoded


def _chat_prompt(messages, tokenizer) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects.",
                       param="messages", code="invalid_value")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role' and a 'content'.",
                           param=f"messages[{i}]", code="invalid_value")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                               "are supported.", param=f"messages[{i}].content", code="invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string.", param=f"messages[{i}].content",
                           code="invalid_value")
        plain.append({"role": message["role"], "content": content})
    try:
        text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # the template's own check (roles out of order, a role it does not know)
        raise APIError(400, f"the model's chat template rejected these messages: {err}", param="messages",
                       code="invalid_value") from err
    return tokenizer(text, add_special_tokens=False).input_ids


def _check_window(ids: list[int], max_tokens: int, window: int | None, prompt_param: str = "prompt",
                  param: str = "max_tokens") -> None:
    if window is None:
        return
    if len(ids) >= window:
        raise APIError(400, f"This model's maximum context length is {window} tokens, but the prompt has "
                       f"{len(ids)} tokens: shorten it.", param=prompt_param,
                       code="context_length_exceeded")
    if len(ids) + max_tokens > window:
        raise APIError(400, f"This model's maximum context length is {window} tokens; you requested "
                       f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} to generate): lower "
                       f"'{param}' to at most {window - len(ids)}.", param=param, code="context_length_exceeded")


# ---------------------------------------------------------------------- responses
async def _respond(http: HTTPRequest, engine: Engine, served: ServedModel, prompts: list[list[int]],
                   sampling: Sampling, *, chat: bool, stream: bool, usage_in_stream: bool):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    requests = []
    try:
        for p, ids in enumerate(prompts):
            emit = (lambda p: lambda event: loop.call_soon_threadsafe(events.put_nowait, (p, event)))(p)
            requests.append(engine.submit(Request(ids, sampling, emit)))
    except (QueueFull, Draining) as err:
        for request in requests:
            request.cancel()
        if isinstance(err, Draining):
            raise APIError(503, "the server is shutting down and takes no new request.", code="server_shutting_down",
                           kind="server_error") from None
        raise APIError(503, f"the server is overloaded: {engine.max_queue} requests already wait (--max_queue); "
                       "retry later.", code="queue_full", kind="server_error", headers={"Retry-After": "1"}) from None
    reply = _Reply(served, prompts, sampling, chat)
    stream_of = _events(http, events, reply.expected, requests)
    if stream:
        return StreamingResponse(_sse(reply, stream_of, usage_in_stream), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    async for p, event in stream_of:
        reply.take(p, event)
    return JSONResponse(reply.body())


async def _events(http: HTTPRequest, events: asyncio.Queue, expected: int, requests: list[Request]) -> AsyncIterator:
    """The engine's events until every choice finished; a client that goes away cancels its requests."""
    disconnected = asyncio.ensure_future(_disconnect(http))
    finished = 0
    try:
        while finished < expected:
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return
            p, event = getter.result()
            if isinstance(event, Failed):
                raise APIError(503 if isinstance(event.error, Draining) else 500,
                               "the server stopped before this request finished." if isinstance(event.error, Draining)
                               else f"generation failed: {event.error}", kind="server_error")
            finished += isinstance(event, Finished)
            yield p, event
    finally:
        disconnected.cancel()
        for request in requests:  # a no-op for finished ones; frees the slots of a gone client
            request.cancel()


async def _disconnect(http: HTTPRequest) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


class _Reply:
    """Collects one HTTP request's events into OpenAI's completion or chat completion objects."""

    def __init__(self, served: ServedModel, prompts: list[list[int]], sampling: Sampling, chat: bool):
        self.served, self.prompts, self.sampling, self.chat = served, prompts, sampling, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.expected = len(prompts) * sampling.n
        self.texts = [""] * self.expected
        self.reasons: list[str | None] = [None] * self.expected
        self.gates: list[Gate | None] = [None] * self.expected
        self.completion_tokens = 0

    def choice_index(self, p: int, index: int) -> int:
        return p * self.sampling.n + index

    def take(self, p: int, event) -> None:
        i = self.choice_index(p, event.index)
        if isinstance(event, Started):
            self.gates[i] = event.gate
        elif isinstance(event, Text):
            self.texts[i] += event.text
        elif isinstance(event, Finished):
            self.reasons[i] = event.reason
            self.completion_tokens += event.completion_tokens

    def usage(self) -> dict:
        prompt_tokens = sum(len(ids) for ids in self.prompts)  # once per prompt, however many choices
        return {"prompt_tokens": prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt_tokens + self.completion_tokens}

    def gate(self, i: int) -> dict | None:
        gate = self.gates[i]
        return gate.as_json() if gate is not None else None

    def header(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.served.name}

    def body(self) -> dict:
        choices = []
        for i in range(self.expected):
            choice = {"index": i, "finish_reason": self.reasons[i], "dylora": self.gate(i)}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": self.texts[i]}
                choice["logprobs"] = None
            else:
                choice.update(text=self.texts[i], logprobs=None)
            choices.append(choice)
        return {**self.header(), "object": "chat.completion" if self.chat else "text_completion",
                "choices": choices, "usage": self.usage(), "dylora": self.gate(0)}

    def chunk(self, i: int, *, text: str | None = None, reason: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else {"content": text} if text is not None else {}
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
        if first:
            choice["dylora"] = self.gate(i)
        chunk = {**self.header(), "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "choices": [choice]}
        if first and i == 0:
            chunk["dylora"] = self.gate(0)
        return chunk


async def _sse(reply: _Reply, events: AsyncIterator, usage_in_stream: bool) -> AsyncIterator[str]:
    def data(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    try:
        async for p, event in events:
            reply.take(p, event)
            i = reply.choice_index(p, event.index)
            if isinstance(event, Started):
                yield data(reply.chunk(i, first=True))
            elif isinstance(event, Text):
                yield data(reply.chunk(i, text=event.text))
            elif isinstance(event, Finished):
                yield data(reply.chunk(i, reason=event.reason))
    except APIError as err:  # after the headers went out: the error travels as an event
        yield data({"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}})
        return
    if usage_in_stream:
        yield data({**reply.header(), "object": "chat.completion.chunk" if reply.chat else "text_completion",
                    "choices": [], "usage": reply.usage()})
    yield "data: [DONE]\n\n"

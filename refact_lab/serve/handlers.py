"""HTTP handlers of the inference API: parse, call the engine from the server settings, write JSON or SSE.

Routes (all behind the token):

    GET  /v1/health                         ours and Tabby's agent's
    GET  /v1/models                         OpenAI: local models (base, base:lora) and upstream ones
    POST /v1/completions                    OpenAI completions (suffix = FIM), or Tabby's segments request
    POST /v1/chat/completions               OpenAI chat; upstream model names are proxied
    GET  /refact-caps, /coding_assistant_caps.json    refact-lsp's caps (older flat layout)
    GET  /tokenizer/<model>                 the model's tokenizers JSON (refact-lsp builds prompts with it)
    GET  /v1/refact-lab/status              engine state, memory, deployed LoRA, counters, recent requests
    POST /v1/events                         Tabby's agent logs events here; accepted and dropped

Every error, including a missing or wrong token, is answered as JSON naming the problem; every response has an
`X-Caps-Version` header and JSON bodies carry `caps_version`, so clients know when to refetch the caps.
POST bodies are streamed in and counted, so an oversized body gets a clean 413 JSON instead of a dropped
connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import platform
import socket
from http.client import responses

from jupyter_server.base.handlers import APIHandler
from tornado import web
from tornado.iostream import StreamClosedError
from tornado.queues import Queue, QueueEmpty

from refact_lab.serve.engine import EngineError, Generation, SamplingParams
from refact_lab.serve.protocol import (
    ApiError, chat_chunk, chat_response, completion_chunk, completion_response, error_body, is_tabby,
    models_response, new_id, parse_chat, parse_completion, parse_json_object, parse_tabby, refact_caps,
)
from refact_lab.serve.upstream import proxy, upstreams_from_settings

# Bodies up to this many times the API limit are read and dropped to answer 413 cleanly; beyond it we answer at
# once from the Content-Length (the client may then see the connection close while it still sends).
DRAIN_FACTOR = 8
DISCONNECT_POLL_S = 0.25


def api_errors(method):
    """Turn ApiError / EngineError raised by a handler method into a JSON error response."""

    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        try:
            return await method(self, *args, **kwargs)
        except ApiError as e:
            self.write_api_error(e.status, e.message, e.param, e.code)
        except EngineError as e:
            self.write_api_error(e.status, str(e))

    return wrapper


class ApiHandler(APIHandler):
    """Base for our API: JSON errors in the OpenAI shape, clear auth failures, the caps version header."""

    @property
    def lab(self) -> dict:
        return self.settings["refact_lab"]

    @property
    def engine(self):
        return self.lab["engine"]

    def set_default_headers(self):
        super().set_default_headers()
        engine = self.settings.get("refact_lab", {}).get("engine")
        if engine is not None:
            self.set_header("X-Caps-Version", str(engine.caps_version))

    def check_xsrf_cookie(self):
        # API clients (IDE plugins, the openai package) send a bearer token, never an XSRF cookie; a token-
        # authenticated request skips the check in jupyter_server, and with --no-auth the server disables it.
        return super().check_xsrf_cookie()

    def write_json(self, obj, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj))

    def write_api_error(self, status: int, message: str, param: str | None = None, code=None) -> None:
        if self._finished:
            return
        if self._headers_written:
            # an SSE stream already started: the error travels as one more event
            self.write(f"data: {json.dumps(error_body(status, message, param, code))}\n\n")
            self.finish()
            return
        self.clear()
        if status == 503:
            self.set_header("Retry-After", "5")
        self.write_json(error_body(status, message, param, code), status)

    def write_error(self, status_code: int, **kwargs) -> None:
        message = responses.get(status_code, "error")
        exc = (kwargs.get("exc_info") or (None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        if status_code == 403 and not self.current_user:
            status_code, message = 401, ("missing or wrong token: send 'Authorization: Bearer <token>' "
                                         "(the token is printed when the server starts)")
            self.set_status(401)
            self.set_header("WWW-Authenticate", 'Bearer realm="refact_lab"')
        elif not isinstance(exc, web.HTTPError) and exc is not None:
            message = f"internal error: {type(exc).__name__}: {exc}"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(error_body(status_code, message)))

    def request_token(self) -> str | None:
        """The token this request authenticated with (header or ?token=), if any."""
        auth = self.request.headers.get("Authorization", "")
        if auth.lower().startswith(("bearer ", "token ")):
            return auth.split(None, 1)[1].strip() or None
        return self.get_query_argument("token", None) or None

    def caps_version(self) -> int:
        return self.engine.caps_version

    def upstreams(self):
        return upstreams_from_settings(self.engine.settings)

    async def upstream_models(self) -> list[dict]:
        local = {r.name for r in self.engine.served_models()}
        return await self.lab["upstream_directory"].all_models(self.upstreams(), exclude=local)


@web.stream_request_body
class JsonPostHandler(ApiHandler):
    """A POST API endpoint whose JSON body is counted while it arrives (see DRAIN_FACTOR)."""

    async def prepare(self):
        await super().prepare()
        if not self.current_user:
            raise web.HTTPError(403)
        self._limit = self.lab["max_body_mb"] * 1024 * 1024
        self._chunks: list[bytes] = []
        self._size = 0
        self._generations: list[Generation] = []
        declared = int(self.request.headers.get("Content-Length") or 0)
        if declared > self._limit * DRAIN_FACTOR:
            raise web.HTTPError(413, self._too_big_message(declared))
        # tornado's own cap is the server-wide max_body_size; let this body through so we can count it
        self.request.connection.set_max_body_size(self._limit * DRAIN_FACTOR)

    def _too_big_message(self, size: int) -> str:
        return (f"the request body is {size / 2**20:.1f} MiB; this server accepts at most "
                f"{self.lab['max_body_mb']} MiB (max_body_mb)")

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self._limit:
            self._chunks.append(chunk)
        else:
            self._chunks = []  # drop it: we only need to know it was too big

    def body_json(self) -> dict:
        if self._size > self._limit:
            raise ApiError(413, self._too_big_message(self._size))
        return parse_json_object(b"".join(self._chunks))

    def on_connection_close(self):
        for g in self._generations:
            g.cancel()

    def _client_gone(self) -> bool:
        """Whether the client closed its end (tornado only notices on the next write, so peek at the socket)."""
        stream = self.request.connection.stream
        if stream is None or stream.closed():
            return True
        try:
            return stream.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    # ---- running generations on the engine --------------------------------------------------------------

    def _submit(self, route, ids: list[int], params: SamplingParams, n: int,
                extra_stops: tuple[str, ...] = (), stream: bool = False) -> Queue:
        events: Queue = Queue()
        loop = asyncio.get_running_loop()

        def sink(event):  # called on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        for i in range(n):
            p = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            self._generations.append(Generation(ids, p, sink, route=route, index=i, extra_stops=extra_stops,
                                                stream=stream))
        for g in self._generations:
            self.engine.submit(g)
        return events

    async def _next_event(self, events: Queue):
        """The next engine event; None once the client has gone (its generations are then cancelled)."""
        while True:
            try:
                return events.get_nowait()
            except QueueEmpty:
                pass
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if self._client_gone():
                    self.on_connection_close()
                    return None

    async def collect(self, events: Queue, n: int) -> list[dict] | None:
        done = []
        while len(done) < n:
            ev = await self._next_event(events)
            if ev is None:
                return None
            if ev["type"] == "done":
                done.append(ev)
            elif ev["type"] == "error":
                self.on_connection_close()  # the other choices of this request are of no use now
                raise EngineError(ev["message"], 500)
        return sorted(done, key=lambda e: e["index"])

    async def stream(self, events: Queue, n: int, chunk) -> None:
        """Relay events as SSE: `chunk(index, text, finish_reason)` builds each JSON event."""
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        remaining = n
        try:
            while remaining:
                ev = await self._next_event(events)
                if ev is None:
                    return
                if ev["type"] == "text":
                    self.write(f"data: {json.dumps(chunk(ev['index'], ev['text'], None))}\n\n")
                elif ev["type"] == "done":
                    remaining -= 1
                    self.write(f"data: {json.dumps(chunk(ev['index'], '', ev['finish_reason']))}\n\n")
                else:
                    remaining -= 1
                    self.write(f"data: {json.dumps(error_body(500, ev['message']))}\n\n")
                await self.flush()
            self.write("data: [DONE]\n\n")
            await self.flush()
            self.finish()
        except StreamClosedError:
            self.on_connection_close()


def check_budget(prompt_tokens: int, max_tokens: int, n_ctx: int) -> int:
    """Validate prompt length and max_tokens against the context; returns the max_tokens that fits."""
    if prompt_tokens >= n_ctx:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens, longer than the model's context of {n_ctx} "
                            "tokens (prompt plus completion must fit)", "prompt", "context_length_exceeded")
    if max_tokens > n_ctx:
        raise ApiError(400, f"'max_tokens' is {max_tokens}; it must be at most {n_ctx} (the model's context)",
                       "max_tokens")
    return min(max_tokens, n_ctx - prompt_tokens)


class CompletionsHandler(JsonPostHandler):
    @api_errors
    async def post(self):
        body = self.body_json()
        if is_tabby(body):
            return await self._tabby(body)
        model = body.get("model")
        if isinstance(model, str) and model and model not in {r.name for r in self.engine.served_models()}:
            up = await self.lab["upstream_directory"].find(self.upstreams(), model)
            if up is not None:
                return await proxy(self, up, "/completions", body)
        req = parse_completion(body)
        route = self.engine.route(req.model)
        # With `suffix` we build the FIM prompt, so the code stays content; a prompt the client built (refact-lsp,
        # Continue) carries its own markers, which must be parsed.
        if req.suffix is not None:
            ids = self.engine.encode_fim(route.fim, req.prompt, req.suffix)
        else:
            ids = self.engine.encode(req.prompt)
        s = req.sampling
        params = SamplingParams(check_budget(len(ids), s.max_tokens, route.n_ctx), s.temperature, s.top_p, s.stop,
                                req.single_line, s.seed)
        events = self._submit(route, ids, params, s.n, stream=s.stream)
        rid, version = new_id("cmpl"), self.caps_version()
        if s.stream:
            return await self.stream(events, s.n, lambda i, t, f: completion_chunk(rid, route.name, i, t, f, version))
        done = await self.collect(events, s.n)
        if done is not None:
            self.write_json(completion_response(rid, route.name, done, len(ids), version))

    async def _tabby(self, body: dict):
        req = parse_tabby(body)
        route = self.engine.route(None)
        # Tabby's agent sends as much of the file as it likes; like Tabby's server, keep what fits around the cursor
        max_tokens = min(req.max_tokens, route.n_ctx // 2)
        ids = self.engine.encode_fim(route.fim, req.prefix, req.suffix, route.n_ctx - max_tokens)
        params = SamplingParams(check_budget(len(ids), max_tokens, route.n_ctx), req.temperature, 1.0, (),
                                req.single_line, req.seed)
        events = self._submit(route, ids, params, 1)
        done = await self.collect(events, 1)
        if done is not None:
            self.write_json({"id": new_id("cmpl"), "choices": [{"index": 0, "text": done[0]["text"]}],
                             "model": route.name, "caps_version": self.caps_version()})


class ChatCompletionsHandler(JsonPostHandler):
    @api_errors
    async def post(self):
        body = self.body_json()
        model = body.get("model")
        if isinstance(model, str) and model and model not in {r.name for r in self.engine.served_models()}:
            up = await self.lab["upstream_directory"].find(self.upstreams(), model)
            if up is not None:
                return await proxy(self, up, "/chat/completions", body)
        req = parse_chat(body)
        route = self.engine.route(req.model)
        ids, extra_stops = self.engine.encode_chat(req.messages)
        s = req.sampling
        params = SamplingParams(check_budget(len(ids), s.max_tokens, route.n_ctx), s.temperature, s.top_p, s.stop,
                                False, s.seed)
        events = self._submit(route, ids, params, s.n, extra_stops, stream=s.stream)
        rid, version = new_id("chatcmpl"), self.caps_version()
        if s.stream:
            started = set()

            def chunk(i, text, finish):
                delta = {} if finish else {"content": text}
                if i not in started:
                    started.add(i)
                    delta["role"] = "assistant"
                    delta.setdefault("content", "")
                return chat_chunk(rid, route.name, i, delta, finish, version)

            return await self.stream(events, s.n, chunk)
        done = await self.collect(events, s.n)
        if done is not None:
            self.write_json(chat_response(rid, route.name, done, len(ids), version))


class ModelsHandler(ApiHandler):
    @web.authenticated
    @api_errors
    async def get(self):
        local = [{"name": r.name, "extra": {"n_ctx": r.n_ctx, "lora": {"run_id": r.adapter.run_id,
                                                                       "checkpoint": r.adapter.name}
                                            if r.adapter else None}}
                 for r in self.engine.served_models()]
        upstream = await self.upstream_models()
        self.write_json(models_response(local, upstream, self.caps_version()))


class CapsHandler(ApiHandler):
    @web.authenticated
    @api_errors
    async def get(self):
        from refact_lab import __version__

        local = [{"name": r.name, "n_ctx": r.n_ctx, "fim": r.fim} for r in self.engine.served_models()]
        upstream = [m["name"] for m in await self.upstream_models()]
        self.write_json(refact_caps(local, upstream, self.engine.default_model(), self.caps_version(),
                                    __version__, token=self.request_token()))


class TokenizerHandler(ApiHandler):
    @web.authenticated
    @api_errors
    async def get(self, name: str):
        self.engine.route(name)  # 404 for a model we do not serve
        self.set_header("Content-Type", "application/json")
        self.finish(self.engine.tokenizer_json())


class StatusHandler(ApiHandler):
    @web.authenticated
    @api_errors
    async def get(self):
        snap = self.engine.snapshot()
        ups = []
        for up in self.upstreams():
            names, error = await self.lab["upstream_directory"].models(up)
            ups.append({"name": up.name, "base_url": up.base_url, "models": list(names), "error": error})
        snap["upstreams"] = ups
        self.write_json(snap)


class HealthHandler(ApiHandler):
    """Ours, and what Tabby's agent reads (model, device, version.git_describe...)."""

    @web.authenticated
    def get(self):
        snap = self.engine.snapshot() if "engine" in self.lab else {}
        device = str(snap.get("device") or "cpu")
        self.write_json({
            "status": "ok", "version_text": self.lab["version"], "home": str(self.lab["home"].root),
            "model": (self.engine.default_model() if snap else None) or snap.get("model"),
            "model_state": snap.get("state"), "chat_model": None,
            "device": "cuda" if device.startswith(("cuda", "shard")) else "cpu",
            "arch": platform.machine(), "cpu_info": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "cuda_devices": [], "accelerators": [],
            "version": {"build_date": "", "git_describe": f"v{self.lab['version']}", "git_sha": "",
                        "cargo_target_triple": "", "refact_lab": self.lab["version"]},
            "caps_version": snap.get("caps_version"),
        })


class EventsHandler(JsonPostHandler):
    """Tabby's agent posts completion view/select events; we keep no telemetry."""

    async def post(self):
        self.write_json({})


def handlers() -> list[tuple]:
    return [
        (r"/v1/health", HealthHandler),
        (r"/v1/models", ModelsHandler),
        (r"/v1/completions", CompletionsHandler),
        (r"/v1/chat/completions", ChatCompletionsHandler),
        (r"/v1/refact-lab/status", StatusHandler),
        (r"/v1/events", EventsHandler),
        (r"/refact-caps", CapsHandler),
        (r"/coding_assistant_caps.json", CapsHandler),
        (r"/tokenizer/(.+)", TokenizerHandler),
    ]

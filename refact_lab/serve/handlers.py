"""HTTP handlers of the inference API: parse, call the engine from the server settings, write JSON or SSE.

Routes (all behind the token):

    GET  /v1/health                         ours and Tabby's agent's
    GET  /v1/models                         OpenAI: every hosted model (base, base:lora; loading or failed ones with
                                            their state) and upstream ones
    POST /v1/completions                    OpenAI completions (suffix = FIM), or Tabby's segments request
    POST /v1/chat/completions               OpenAI chat; upstream model names are proxied
    GET  /refact-caps, /coding_assistant_caps.json    refact-lsp's caps (older flat layout)
    GET  /tokenizer/<model>                 the model's tokenizers JSON (refact-lsp builds prompts with it)
    GET  /v1/refact-lab/status              engine state, memory, deployed LoRA, counters, recent requests
    POST /v1/events                         Tabby's agent logs events here; accepted and dropped

Every error, including a missing or wrong token, is answered as JSON naming the problem; every response has an
`X-Caps-Version` header and JSON bodies carry `caps_version`, so clients know when to refetch the caps.
POST bodies are streamed in and counted, so an oversized body gets a clean 413 JSON instead of a dropped
connection. Prompts are prepared (size check, tokenizing, budget) by `refact_lab.serve.prepare` in a worker
thread, off the event loop. A request that needs the model while it loads (the server just started, or a new
base model was chosen) waits for it, up to the server's `load_wait_s`, instead of failing at once.

Several models: the server hosts a fleet of engines (`refact_lab.serve.fleet`); a request's `model` field picks
the engine (without one, completions go to the completion role's model and chat to the chat role's), and the
prompt is prepared and run on that engine alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import platform
import socket
import time
from http.client import responses

from jupyter_server.base.handlers import APIHandler
from tornado import web
from tornado.iostream import StreamClosedError
from tornado.queues import Queue, QueueEmpty

from refact_lab.serve.engine import EngineError, Generation
from refact_lab.serve.fleet import CHAT, COMPLETION, Fleet, default_chat_name
from refact_lab.serve.prepare import Prepared, off_loop, prepare_around_cursor, prepare_chat, prepare_completion
from refact_lab.serve.protocol import (
    ApiError, chat_chunk, chat_response, completion_chunk, completion_response, debug_data, error_body,
    infill_response, is_tabby, models_response, new_id, parse_chat, parse_completion, parse_infill,
    parse_json_object, parse_tabby, refact_caps,
)
from refact_lab.serve.upstream import proxy, upstreams_from_choice

# Bodies up to this many times the API limit are read and dropped to answer 413 cleanly; beyond it we answer at
# once from the Content-Length (the client may then see the connection close while it still sends).
DRAIN_FACTOR = 8
DISCONNECT_POLL_S = 0.25
LOAD_POLL_S = 0.1


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
        """Entry one's engine: the server's settings (upstreams, guard) and its status."""
        return self.lab["engine"]

    @property
    def fleet(self):
        return self.lab["fleet"]

    def set_default_headers(self):
        super().set_default_headers()
        fleet = self.settings.get("refact_lab", {}).get("fleet")
        if fleet is not None:
            self.set_header("X-Caps-Version", str(fleet.caps_version))

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
        if status_code == 403 and not self.check_host():
            # jupyter_server's guard against DNS rebinding on a server bound to loopback, not a token problem
            message = (f"this server answers local names only, and the request's Host header is "
                       f"{self.request.host[:100]!r}: use 127.0.0.1 or localhost, or start the server with --host "
                       "0.0.0.0 to serve other machines")
        elif status_code == 403 and not self.current_user:
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
        return self.fleet.caps_version

    def upstreams(self):
        return upstreams_from_choice(self.engine.choice)

    async def wait_for_model(self, name: str | None = None, kind: str = COMPLETION):
        """While the model a request names (its kind's default without a name) loads, wait for it (up to
        load_wait_s): an IDE started together with the server gets its first completion late rather than a 503.
        Returns that model's engine, which answers for itself afterwards (ready or not)."""
        deadline = time.monotonic() + self.lab["load_wait_s"]
        while self.fleet.is_loading(name, kind) and time.monotonic() < deadline and not self.request_gone():
            await asyncio.sleep(LOAD_POLL_S)
        return self.fleet.engine_for(name, kind)

    def request_gone(self) -> bool:
        return False

    async def upstream_models(self) -> list[dict]:
        local = self.fleet.names()
        return await self.lab["upstream_directory"].all_models(self.upstreams(), exclude=local)


@web.stream_request_body
class JsonPostHandler(ApiHandler):
    """A POST API endpoint whose JSON body is counted while it arrives (see DRAIN_FACTOR)."""

    # a request refused in prepare (auth, Host, headers) may close before prepare sets the instance's list
    _generations: tuple = ()

    async def prepare(self):
        await super().prepare()
        if not self.current_user:
            raise web.HTTPError(403)
        self._limit = self.lab["max_body_mb"] * 1024 * 1024
        self._chunks: list[bytes] = []
        self._size = 0
        self._generations: list[Generation] = []
        try:
            declared = int(self.request.headers.get("Content-Length") or 0)
        except ValueError:
            raise web.HTTPError(400, "the Content-Length header must be a whole number of bytes") from None
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

    def request_gone(self) -> bool:
        return self._client_gone()

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

    def _submit(self, engine, prep: Prepared, n: int, stream: bool = False) -> Queue:
        events: Queue = Queue()
        loop = asyncio.get_running_loop()

        def sink(event):  # called on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        params = prep.params
        for i in range(n):
            p = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            self._generations.append(Generation(prep.ids, p, sink, route=prep.route, index=i,
                                                extra_stops=prep.extra_stops, stream=stream))
        for g in self._generations:
            engine.submit(g)
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


class CompletionsHandler(JsonPostHandler):
    @api_errors
    async def post(self):
        body = self.body_json()
        if is_tabby(body):
            return await self._tabby(body)
        model = body.get("model")
        if isinstance(model, str) and model and model not in self.fleet.names():
            up = await self.lab["upstream_directory"].find(self.upstreams(), model)
            if up is not None:
                return await proxy(self, up, "/completions", body)
        req = parse_completion(body)
        engine = await self.wait_for_model(req.model, COMPLETION)
        s = req.sampling
        prep = await off_loop(prepare_completion, engine, req.model, req.prompt, req.suffix, s,
                              req.single_line)
        name = prep.route.name
        events = self._submit(engine, prep, s.n, stream=s.stream)
        rid, version = new_id("cmpl"), self.caps_version()
        if s.stream:
            return await self.stream(events, s.n, lambda i, t, f: completion_chunk(rid, name, i, t, f, version))
        done = await self.collect(events, s.n)
        if done is not None:
            out = completion_response(rid, name, done, len(prep.ids), version)
            if req.return_prompt:
                out["debug_data"] = debug_data(await off_loop(engine.decode_prompt, prep.ids), prep.snippets)
            self.write_json(out)

    async def _tabby(self, body: dict):
        req = parse_tabby(body)
        engine = await self.wait_for_model()
        prep = await off_loop(prepare_around_cursor, engine, req.prefix, req.suffix, req.max_tokens,
                              req.temperature, req.single_line, req.seed, repo_context=True, path=req.filepath,
                              snippets=req.snippets)
        events = self._submit(engine, prep, 1)
        done = await self.collect(events, 1)
        if done is not None:
            out = {"id": new_id("cmpl"), "choices": [{"index": 0, "text": done[0]["text"]}],
                   "model": prep.route.name, "caps_version": self.caps_version()}
            if req.return_prompt:
                out["debug_data"] = debug_data(await off_loop(engine.decode_prompt, prep.ids), prep.snippets)
            self.write_json(out)


class InfillHandler(JsonPostHandler):
    """llama.cpp's /infill, so llama.vim / llama.vscode can point at us: the client's `input_extra` files are
    context first, then retrieved snippets (the prompt is built by models/prompt.py like every FIM prompt)."""

    @api_errors
    async def post(self):
        req = parse_infill(self.body_json())
        engine = await self.wait_for_model()
        prep = await off_loop(prepare_around_cursor, engine, req.prefix, req.suffix, req.max_tokens,
                              req.temperature, False, req.seed, repo_context=True, snippets=req.snippets,
                              stop=req.stop, top_p=req.top_p)
        events = self._submit(engine, prep, 1, stream=req.stream)
        name = prep.route.name
        if not req.stream:
            done = await self.collect(events, 1)
            if done is not None:
                self.write_json(infill_response(done[0], name))
            return
        # llama.cpp's stream: one `data: {"content": ..., "stop": false}` event per piece, then the final answer
        # with "stop": true (no [DONE] line on this route)
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        try:
            while True:
                ev = await self._next_event(events)
                if ev is None:
                    return
                if ev["type"] == "text":
                    self.write(f"data: {json.dumps({'content': ev['text'], 'stop': False})}\n\n")
                elif ev["type"] == "done":
                    self.write(f"data: {json.dumps({**infill_response(ev, name), 'content': ''})}\n\n")
                else:
                    self.write(f"data: {json.dumps(error_body(500, ev['message']))}\n\n")
                await self.flush()
                if ev["type"] != "text":
                    break
            self.finish()
        except StreamClosedError:
            self.on_connection_close()


class ChatCompletionsHandler(JsonPostHandler):
    @api_errors
    async def post(self):
        body = self.body_json()
        model = body.get("model")
        if isinstance(model, str) and model and model not in self.fleet.names():
            up = await self.lab["upstream_directory"].find(self.upstreams(), model)
            if up is not None:
                return await proxy(self, up, "/chat/completions", body)
        req = parse_chat(body)
        engine = await self.wait_for_model(req.model, CHAT)
        s = req.sampling
        prep = await off_loop(prepare_chat, engine, req.model, req.messages, s)
        route = prep.route
        events = self._submit(engine, prep, s.n, stream=s.stream)
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
            self.write_json(chat_response(rid, route.name, done, len(prep.ids), version))


class ModelsHandler(ApiHandler):
    @web.authenticated
    @api_errors
    async def get(self):
        local = []
        for engine in self.fleet.engines():
            local += [{"name": r.name, "extra": {"n_ctx": r.n_ctx, "state": "ready",
                                                 "lora": {"run_id": r.adapter.run_id, "checkpoint": r.adapter.name}
                                                 if r.adapter else None}}
                      for r in engine.served_models()]
            pending = engine.loading_model()
            if pending is not None:  # a client started with the server sees what is coming, and that it is not ready
                local.append({"name": pending["name"],
                              "extra": {"n_ctx": None, "state": pending["state"], "lora": None}})
            elif engine.entry is not None and engine.state == "failed":  # a hosted model that could not load
                local.append({"name": engine.entry.name,
                              "extra": {"n_ctx": None, "state": "failed", "error": engine.error, "lora": None}})
        upstream = await self.upstream_models()
        self.write_json(models_response(local, upstream, self.caps_version()))


class CapsHandler(ApiHandler):
    @web.authenticated
    @api_errors
    async def get(self):
        from refact_lab import __version__

        await self.wait_for_model()  # refact-lsp reads the caps once at start: give it the model's
        chat_engine = self.fleet.role_engine(CHAT)
        chat_names = {r.name for r in chat_engine.served_models()} if chat_engine is not None else set()
        routes = [r for _, r in self.fleet.routes()]
        # refact-lsp sends code completion to a model listed as a chat model to the chat endpoint: the chat
        # role's model is listed as a chat model only (the completion default is another model)
        local = [{"name": r.name, "n_ctx": r.n_ctx, "fim": r.fim} for r in routes if r.name not in chat_names]
        upstream = [m["name"] for m in await self.upstream_models()]
        caps = refact_caps(local, upstream, self.fleet.default_engine(COMPLETION).default_model(),
                           self.caps_version(), __version__, token=self.request_token())
        if chat_names:
            for r in routes:
                if r.name in chat_names:
                    caps["code_chat_models"][r.name] = {
                        "n_ctx": r.n_ctx, "supports_scratchpads": {"PASSTHROUGH": {}},
                        "default_scratchpad": "PASSTHROUGH", "similar_models": [], "supports_tools": False}
            caps["code_chat_default_model"] = default_chat_name(self.fleet)
            caps["running_models"] = list(dict.fromkeys(caps["running_models"] + sorted(chat_names)))
            caps["tokenizer_rewrite_path"].update({n: n for n in chat_names})
        self.write_json(caps)


class TokenizerHandler(ApiHandler):
    @web.authenticated
    @api_errors
    async def get(self, name: str):
        engine = await self.wait_for_model(name)
        engine.route(name)  # 404 for a model we do not serve
        text = await off_loop(engine.tokenizer_json)  # megabytes of JSON for a large vocabulary
        self.set_header("Content-Type", "application/json")
        self.finish(text)


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
        lora_engine = await off_loop(self.fleet.lora_engine)
        if lora_engine is not self.engine:  # the LoRA went to the hosted model its run was trained from
            snap["lora"] = {**lora_engine.snapshot()["lora"], "model": lora_engine.entry.name}
        snap["hosted"] = await off_loop(self.fleet.listing)  # every hosted model: entry one, then the others
        snap["hosted_error"] = self.fleet.problem()
        snap["caps_version"] = self.caps_version()
        self.write_json(snap)


class ExportHandler(ApiHandler):
    """A checkpoint as a .zip download, PEFT adapter or merged model with its card (the Deploy panel's link):
    `GET /v1/refact-lab/export?run=RUN&checkpoint=best|latest|NAME&format=peft|merged`."""

    @web.authenticated
    @api_errors
    async def get(self):
        import shutil
        import tempfile

        from refact_lab.finetune.export import ExportError, export_archive

        from refact_lab.home import check_name

        run = self.get_query_argument("run", "")
        if not run:
            raise ApiError(400, "'run' is required: the run whose checkpoint to export", "run")
        try:
            check_name(run, "run id")
        except ValueError as e:
            raise ApiError(400, str(e), "run") from None
        checkpoint = self.get_query_argument("checkpoint", "best")
        fmt = self.get_query_argument("format", "peft")
        tmp = tempfile.mkdtemp(prefix="refact-lab-export-")
        try:
            try:
                path = await off_loop(export_archive, self.lab["home"], run, checkpoint, fmt, tmp)
            except (ExportError, FileNotFoundError) as e:
                raise ApiError(400, str(e)) from None
            self.set_header("Content-Type", "application/zip")
            self.set_header("Content-Disposition", f'attachment; filename="{path.name}"')
            self.set_header("Content-Length", str(path.stat().st_size))
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    self.write(chunk)
                    await self.flush()
            self.finish()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class HealthHandler(ApiHandler):
    """Ours, and what Tabby's agent reads (model, device, version.git_describe...)."""

    @web.authenticated
    def get(self):
        snap = self.engine.snapshot() if "engine" in self.lab else {}
        device = str(snap.get("device") or "cpu")
        fleet = self.lab.get("fleet")
        default = fleet.default_engine(COMPLETION) if fleet else None
        # every hosted model with its state (Tabby reads `model`; the others are for people and our panels)
        hosted = [{"name": r.name, "state": "ready", "n_ctx": r.n_ctx} for _, r in fleet.routes()] if fleet else []
        for engine in fleet.engines() if fleet else []:
            name = Fleet._pending_name(engine) if engine.state != "ready" else None
            if name:
                hosted.append({"name": name, "state": engine.state, "error": engine.error})
        self.write_json({
            "status": "ok", "version_text": self.lab["version"], "home": str(self.lab["home"].root),
            "model": (default.default_model() if default else None) or snap.get("model"),
            "model_state": (default.state if default else None) or snap.get("state"),
            "chat_model": default_chat_name(fleet) if fleet else None,
            "models": hosted,
            "device": "cuda" if device.startswith(("cuda", "shard")) else "cpu",
            "arch": platform.machine(), "cpu_info": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "cuda_devices": [], "accelerators": [],
            "version": {"build_date": "", "git_describe": f"v{self.lab['version']}", "git_sha": "",
                        "cargo_target_triple": "", "refact_lab": self.lab["version"]},
            "caps_version": fleet.caps_version if fleet else snap.get("caps_version"),
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
        (r"/infill", InfillHandler),
        (r"/v1/refact-lab/status", StatusHandler),
        (r"/v1/refact-lab/export", ExportHandler),
        (r"/v1/events", EventsHandler),
        (r"/refact-caps", CapsHandler),
        (r"/coding_assistant_caps.json", CapsHandler),
        (r"/tokenizer/(.+)", TokenizerHandler),
    ]

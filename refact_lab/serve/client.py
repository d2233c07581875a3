"""How the services reach the engine: over HTTP to the running server, or an engine in this process.

Panels run in a kernel, not in the server (see `refact_lab.serve.state`). Inside the app the kernel inherits
`REFACT_LAB_URL` and `REFACT_LAB_TOKEN` from `refact-lab serve`, so `default_inference()` returns an
`HttpInference` that calls the server's own API with the token. A notebook or the CLI without a server gets a
`LocalInference`: an `Engine` started in this process on first use, watching the same settings.json.

Both answer the same three questions: `status()` (the engine snapshot), `complete(...)` and `caps()`.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from refact_lab.home import Home


class InferenceError(RuntimeError):
    """The server answered with an error (message from its JSON body) or could not be reached."""


class HttpInference:
    def __init__(self, url: str, token: str = "", timeout: float = 120):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(f"{self.url}{path}", method=method, headers=headers,
                                     data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = e.reason
            raise InferenceError(f"{method} {path}: {e.code} {message}") from None
        except (urllib.error.URLError, OSError) as e:
            raise InferenceError(f"the server at {self.url} is not reachable: {e}") from None

    def status(self) -> dict:
        return self._call("GET", "/v1/refact-lab/status", timeout=10)

    def caps(self) -> dict:
        return self._call("GET", "/refact-caps", timeout=10)

    def complete(self, prefix: str, suffix: str | None = None, *, model: str | None = None, max_tokens: int = 32,
                 temperature: float = 0.0, single_line: bool = False) -> dict:
        """The completion, with `prompt` (what the model saw) and `snippets` (the repository context in it)."""
        body = {"prompt": prefix, "max_tokens": max_tokens, "temperature": temperature, "single_line": single_line,
                "debug_options": {"return_prompt": True}}
        if suffix is not None:
            body["suffix"] = suffix
        if model:
            body["model"] = model
        out = self._call("POST", "/v1/completions", body)
        choice = out["choices"][0]
        debug = out.get("debug_data") or {}
        return {"text": choice["text"], "finish_reason": choice["finish_reason"], "model": out["model"],
                "prompt": debug.get("prompt"), "snippets": debug.get("snippets") or []}


class LocalInference:
    """An engine in this process, started on first use (loading a model is not free)."""

    def __init__(self, home: Home, overrides: dict | None = None):
        self.home = home
        self.overrides = overrides
        self.engine = None

    def start(self):
        if self.engine is None:
            from refact_lab.serve.engine import Engine

            self.engine = Engine(self.home, overrides=self.overrides).start()
        return self.engine

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()
            self.engine = None

    def status(self) -> dict:
        if self.engine is None:
            return {"state": "stopped", "error": None, "models": [], "lora": None, "memory": {},
                    "note": "no server in this session: the model loads in this process on first use"}
        return self.engine.snapshot()

    def caps(self) -> dict:
        from refact_lab import __version__
        from refact_lab.serve.protocol import refact_caps

        engine = self.start()
        local = [{"name": r.name, "n_ctx": r.n_ctx, "fim": r.fim} for r in engine.served_models()]
        return refact_caps(local, [], engine.default_model(), engine.caps_version, __version__)

    def complete(self, prefix: str, suffix: str | None = None, *, model: str | None = None, max_tokens: int = 32,
                 temperature: float = 0.0, single_line: bool = False, timeout: float = 300) -> dict:
        from refact_lab.serve.engine import EngineError
        from refact_lab.serve.prepare import prepare_completion
        from refact_lab.serve.protocol import ApiError, Sampling, debug_data

        engine = self.start()
        engine.wait_ready(timeout)
        sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=1.0, stop=(), n=1, stream=False,
                            seed=None)
        try:
            # the same preparation as the HTTP API's (size check, encoding, budget, sampling)
            prep = prepare_completion(engine, model, prefix, suffix, sampling, single_line)
            done = engine.generate(prep.ids, prep.params, model=prep.route.name, timeout=timeout)
        except ApiError as e:
            raise InferenceError(e.message) from None
        except EngineError as e:
            raise InferenceError(str(e)) from None
        return {"text": done["text"], "finish_reason": done["finish_reason"], "model": prep.route.name,
                **debug_data(engine.decode_prompt(prep.ids), prep.snippets)}


def default_inference(home: Home):
    """The server's API when this process runs under `refact-lab serve` (its env says where), else local."""
    url = os.environ.get("REFACT_LAB_URL")
    if url:
        return HttpInference(url, os.environ.get("REFACT_LAB_TOKEN", ""))
    return LocalInference(home)

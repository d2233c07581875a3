"""Upstream OpenAI-compatible engines: GPT models with a saved OpenAI key, or any engine given a base URL.

Two kinds, both from settings.json (see `refact_lab.serve.state`):

- **OpenAI**: `openai_api_key` (and optionally `openai_base_url`, `openai_models`) makes GPT models appear in
  `/v1/models` and the caps; chat requests naming them are proxied to OpenAI.
- **Any OpenAI-compatible engine** (a vLLM server with `--enable-lora --lora-modules`, for teams that outgrow one
  process): `upstream_url` (+ `upstream_api_key`); its models are read from its own `/models` (cached briefly)
  unless `upstream_models` lists them.

Requests are forwarded unchanged with the upstream's key (never ours), streaming included: the upstream's SSE
bytes are relayed as they arrive through tornado's AsyncHTTPClient, and a client that disconnects aborts the
upstream request.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

DEFAULT_OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_OPENAI_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1")
DISCOVERY_TTL = 30.0


@dataclass(frozen=True)
class Upstream:
    name: str                      # "openai" or "upstream"
    base_url: str                  # ends without a slash, e.g. http://10.0.0.5:8000/v1
    api_key: str
    models: tuple[str, ...] | None  # None: ask the upstream


def upstreams_from_choice(choice) -> list[Upstream]:
    """The upstreams a `ServingChoice` (settings.json) names."""
    out = []
    key = choice.openai_api_key
    if key and key.strip():
        models = choice.openai_models or DEFAULT_OPENAI_MODELS
        out.append(Upstream("openai", (choice.openai_base_url or DEFAULT_OPENAI_URL).rstrip("/"),
                            key.strip(), tuple(models)))
    url = choice.upstream_url
    if url and url.strip():
        out.append(Upstream("upstream", url.strip().rstrip("/"), (choice.upstream_api_key or "").strip(),
                            choice.upstream_models))
    return out


class Directory:
    """Which upstream serves which model name; discovered model lists are cached for DISCOVERY_TTL seconds."""

    def __init__(self):
        self._cache: dict[str, tuple[float, tuple[str, ...], str | None]] = {}

    async def models(self, upstream: Upstream) -> tuple[tuple[str, ...], str | None]:
        """(model names, error) for one upstream."""
        if upstream.models is not None:
            return upstream.models, None
        cached = self._cache.get(upstream.base_url)
        if cached and time.monotonic() - cached[0] < DISCOVERY_TTL:
            return cached[1], cached[2]
        from tornado.httpclient import AsyncHTTPClient, HTTPClientError

        try:
            resp = await AsyncHTTPClient().fetch(f"{upstream.base_url}/models", headers=_auth(upstream),
                                                 request_timeout=5, connect_timeout=3)
            names = tuple(m["id"] for m in json.loads(resp.body).get("data", []) if isinstance(m.get("id"), str))
            result = (names, None)
        except (HTTPClientError, OSError, ValueError, KeyError, AttributeError) as e:
            result = ((), f"{upstream.base_url}/models: {e}")
        self._cache[upstream.base_url] = (time.monotonic(), *result)
        return result

    async def all_models(self, upstreams: list[Upstream], exclude: set[str]) -> list[dict]:
        out = []
        for up in upstreams:
            names, _ = await self.models(up)
            out += [{"name": n, "owner": up.name, "upstream": up} for n in names if n not in exclude]
        return out

    async def find(self, upstreams: list[Upstream], model: str | None) -> Upstream | None:
        if not model:
            return None
        for up in upstreams:
            names, _ = await self.models(up)
            if model in names:
                return up
        return None


def _auth(upstream: Upstream) -> dict:
    return {"Authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}


async def proxy(handler, upstream: Upstream, path: str, body: dict) -> None:
    """Forward one JSON POST to the upstream and relay its answer (streamed when the request streams)."""
    from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
    from tornado.iostream import StreamClosedError

    stream = bool(body.get("stream"))
    started = {"done": False}

    def on_header(line: str) -> None:
        # the status line comes first; relay status and content type before the first body bytes
        if line.startswith("HTTP/"):
            parts = line.split(" ", 2)
            handler.set_status(int(parts[1]))
        elif line.lower().startswith("content-type:"):
            handler.set_header("Content-Type", line.split(":", 1)[1].strip())

    def on_chunk(chunk: bytes) -> None:
        if handler.request.connection.stream is None or handler.request.connection.stream.closed():
            raise StreamClosedError()  # the client left: abort the upstream request
        started["done"] = True
        handler.write(chunk)
        handler.flush()

    headers = {"Content-Type": "application/json", **_auth(upstream)}
    if stream:
        headers["Accept"] = "text/event-stream"
        handler.set_header("Cache-Control", "no-cache")
    request = HTTPRequest(f"{upstream.base_url}{path}", method="POST", body=json.dumps(body), headers=headers,
                          request_timeout=600, connect_timeout=10,
                          header_callback=on_header if stream else None,
                          streaming_callback=on_chunk if stream else None)
    try:
        resp = await AsyncHTTPClient().fetch(request, raise_error=False)
    except (OSError, StreamClosedError) as e:
        if started["done"]:
            return
        handler.write_api_error(502, f"upstream {upstream.name} at {upstream.base_url} is unreachable: {e}")
        return
    except HTTPClientError as e:
        handler.write_api_error(502, f"upstream {upstream.name} failed: {e}")
        return
    if stream:
        if resp.code == 599 and not started["done"]:
            handler.write_api_error(502, f"upstream {upstream.name} at {upstream.base_url} is unreachable: "
                                         f"{resp.error}")
            return
        handler.finish()
        return
    if resp.code == 599:
        handler.write_api_error(502, f"upstream {upstream.name} at {upstream.base_url} is unreachable: "
                                     f"{resp.error}")
        return
    handler.set_status(resp.code)
    handler.set_header("Content-Type", resp.headers.get("Content-Type", "application/json"))
    handler.finish(resp.body or b"")

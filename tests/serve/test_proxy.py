"""GPT models through a saved OpenAI key, and any OpenAI-compatible engine through a base URL.

The upstream is a real HTTP server on loopback (a small tornado app speaking the OpenAI wire format, streaming
included) that records what it received, so the tests see exactly what our proxy forwarded; no external network.
The official `openai` package talks to our server as a user's tool would.
"""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from refact_lab.home import Home
from tests.conftest import RunningServer, free_port
from tests.serve.helpers import call, wait_for, wait_model_ready


class Upstream:
    """An OpenAI-compatible server in a thread: /v1/models, /v1/chat/completions, /v1/completions."""

    def __init__(self, models: list[str]):
        self.models = models
        self.requests: list[dict] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _serve(self, ready):
        import tornado.web

        outer = self

        class Base(tornado.web.RequestHandler):
            def record(self):
                body = json.loads(self.request.body) if self.request.body else None
                outer.requests.append({"path": self.request.path, "auth": self.request.headers.get("Authorization"),
                                       "body": body})
                return body

        class Models(Base):
            def get(self):
                self.record()
                self.write({"object": "list", "data": [{"id": m, "object": "model"} for m in outer.models]})

        class Chat(Base):
            async def post(self):
                body = self.record()
                answer = f"upstream says hi to {body['messages'][-1]['content']}"
                if not body.get("stream"):
                    self.write({"id": "up-1", "object": "chat.completion", "model": body["model"],
                                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                             "finish_reason": "stop"}]})
                    return
                self.set_header("Content-Type", "text/event-stream")
                for i, word in enumerate(answer.split(" ")):
                    delta = {"content": (" " if i else "") + word}
                    chunk = {"id": "up-1", "object": "chat.completion.chunk", "model": body["model"],
                             "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
                    self.write(f"data: {json.dumps(chunk)}\n\n")
                    await self.flush()
                    await asyncio.sleep(0.01)
                self.write("data: [DONE]\n\n")

        class Completions(Base):
            def post(self):
                body = self.record()
                self.write({"id": "up-2", "object": "text_completion", "model": body["model"],
                            "choices": [{"index": 0, "text": f"<{body['model']} completes {body['prompt']}>",
                                         "finish_reason": "stop"}]})

        async def main():
            app = tornado.web.Application([(r"/v1/models", Models), (r"/v1/chat/completions", Chat),
                                           (r"/v1/completions", Completions)])
            app.listen(self.port, address="127.0.0.1")
            ready.set()
            await asyncio.Event().wait()

        asyncio.run(main())


@pytest.fixture(scope="module")
def upstreams():
    return {"openai": Upstream(["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]),
            "vllm": Upstream(["Qwen/Qwen2.5-Coder-1.5B", "qwen-lora-mine"])}


@pytest.fixture(scope="module")
def proxy_server(tmp_path_factory, varied_model_dir, upstreams):
    home_dir = tmp_path_factory.mktemp("proxy_server") / "home"
    home = Home.resolve(home_dir).ensure()
    home.update_settings(openai_api_key="sk-test-key", openai_base_url=upstreams["openai"].url,
                         openai_models=["gpt-4o-mini", "gpt-4o"])
    srv = RunningServer(home_dir, extra_args=["--model", str(varied_model_dir)]).wait_ready()
    srv.home = home
    try:
        wait_model_ready(srv)
        yield srv
    finally:
        srv.stop()


def test_gpt_models_are_listed_and_offered_in_caps(proxy_server):
    models = [m["id"] for m in call(proxy_server, "GET", "/v1/models")[1]["data"]]
    assert models == ["tinycoder", "gpt-4o-mini", "gpt-4o"]
    caps = call(proxy_server, "GET", "/refact-caps")[1]
    assert set(caps["code_chat_models"]) == {"gpt-4o-mini", "gpt-4o"}
    assert caps["code_chat_default_model"] == "gpt-4o-mini"
    assert caps["running_models"] == ["tinycoder", "gpt-4o-mini", "gpt-4o"]
    assert caps["endpoint_chat_passthrough"] == "/v1/chat/completions"


def test_chat_for_a_gpt_model_is_proxied_with_the_openai_key(proxy_server, upstreams):
    seen = len(upstreams["openai"].requests)
    status, out = call(proxy_server, "POST", "/v1/chat/completions",
                       {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Ada"}]})
    assert status == 200 and out["choices"][0]["message"]["content"] == "upstream says hi to Ada"
    forwarded = upstreams["openai"].requests[seen:]
    chat = next(r for r in forwarded if r["path"] == "/v1/chat/completions")
    # the upstream gets the saved key, never our server token
    assert chat["auth"] == "Bearer sk-test-key" and chat["body"]["model"] == "gpt-4o-mini"


def test_streaming_chat_is_relayed_through_the_openai_package(proxy_server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{proxy_server.url}/v1", api_key=proxy_server.token, max_retries=0)
    stream = client.chat.completions.create(model="gpt-4o", stream=True,
                                            messages=[{"role": "user", "content": "Grace"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "upstream says hi to Grace"
    # local models still answer locally on the same endpoint
    local = client.chat.completions.create(model="tinycoder", max_tokens=4,
                                           messages=[{"role": "user", "content": "hi"}])
    assert local.model == "tinycoder"


def test_any_openai_compatible_engine_by_base_url(proxy_server, upstreams):
    before = call(proxy_server, "GET", "/refact-caps")[1]["caps_version"]
    proxy_server.home.update_settings(upstream_url=upstreams["vllm"].url, upstream_api_key="vllm-key")

    def listed():
        models = [m["id"] for m in call(proxy_server, "GET", "/v1/models")[1]["data"]]
        return models if "qwen-lora-mine" in models else None

    models = wait_for(listed, timeout=10, what="the vLLM models")
    assert models == ["tinycoder", "gpt-4o-mini", "gpt-4o", "Qwen/Qwen2.5-Coder-1.5B", "qwen-lora-mine"]
    assert call(proxy_server, "GET", "/refact-caps")[1]["caps_version"] > before
    status, out = call(proxy_server, "POST", "/v1/completions",
                       {"model": "qwen-lora-mine", "prompt": "def f(", "max_tokens": 5})
    assert status == 200 and out["choices"][0]["text"] == "<qwen-lora-mine completes def f(>"
    assert upstreams["vllm"].requests[-1]["auth"] == "Bearer vllm-key"
    status, snap = call(proxy_server, "GET", "/v1/refact-lab/status")
    assert {u["name"] for u in snap["upstreams"]} == {"openai", "upstream"}
    assert "sk-test-key" not in json.dumps(snap) and "vllm-key" not in json.dumps(snap)


def test_an_unreachable_upstream_is_a_json_502(proxy_server):
    proxy_server.home.update_settings(upstream_url=f"http://127.0.0.1:{free_port()}/v1",
                                      upstream_models=["ghost-model"])
    wait_for(lambda: "ghost-model" in [m["id"] for m in call(proxy_server, "GET", "/v1/models")[1]["data"]],
             timeout=10, what="ghost-model listed")
    status, out = call(proxy_server, "POST", "/v1/chat/completions",
                       {"model": "ghost-model", "messages": [{"role": "user", "content": "x"}]})
    assert status == 502 and "unreachable" in out["error"]["message"]
    assert call(proxy_server, "POST", "/v1/completions", {"prompt": "ok", "max_tokens": 2})[0] == 200

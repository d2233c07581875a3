"""The inference API on the real server serving a tiny model: OpenAI completions and chat (streaming too),
models, Refact caps and tokenizer, Tabby, bad input, auth, concurrency and cancellation on disconnect.

Texts are compared with `model.generate` on the same model in the test process, so a test fails if the server
returns anything other than what the model itself says.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest

from tests.serve.conftest import cut_at_special
from tests.serve.helpers import call, wait_for

PROMPTS = ["def fib(n):\n    if n < 2:\n        return", "import os\nimport sys\n\nclass Config:", "x = [1, 2,",
           "for key, value in items.items():\n    print(", "# utils\n\ndef add(a, b):\n    return a +",
           "SELECT name FROM"]


def complete(srv, **body):
    status, out = call(srv, "POST", "/v1/completions", {"model": "tinycoder", **body})
    assert status == 200, out
    return out


def sse_events(srv, path: str, body: dict) -> list:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request("POST", path, json.dumps(body), {**srv.headers, "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("Content-Type").startswith("text/event-stream")
    raw = resp.read().decode()
    conn.close()
    lines = [line for line in raw.split("\n\n") if line.strip()]
    assert all(line.startswith("data: ") for line in lines), raw
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_completion_is_the_models_own_greedy_text(model_server, reference):
    for prompt in PROMPTS[:3]:
        out = complete(model_server, prompt=prompt, max_tokens=12, temperature=0)
        choice = out["choices"][0]
        assert choice["text"] == cut_at_special(reference(prompt, 12))
        assert choice["finish_reason"] in ("stop", "length")
        assert out["usage"]["prompt_tokens"] == len(reference.tokenizer(prompt).input_ids)
        assert out["object"] == "text_completion" and out["model"] == "tinycoder"
        assert isinstance(out["caps_version"], int)


def test_suffix_makes_a_fim_prompt(model_server, reference):
    prefix, suffix = "def area(r):\n    return ", "\n\nprint(area(2))\n"
    out = complete(model_server, prompt=prefix, suffix=suffix, max_tokens=10)
    fim = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    assert out["choices"][0]["text"] == cut_at_special(reference(fim, 10))
    assert out["usage"]["prompt_tokens"] == len(reference.tokenizer(fim).input_ids)


def test_code_that_spells_special_tokens_stays_text(model_server, reference):
    """Editing a tokenizer's source: "<|endoftext|>" in the file is text in the FIM prompt we build (from
    `suffix` and from Tabby's segments), not the end of the document, so the prompt is the content's tokens."""
    tok = reference.tokenizer
    prefix, suffix = 'EOT = "<|endoftext|>"\nMID = "<|fim_middle|>"\nx = ', '\nprint("<|fim_prefix|>")\n'

    def content(text):
        return tok(text, add_special_tokens=False, split_special_tokens=True).input_ids

    want = 3 + len(content(prefix)) + len(content(suffix))
    assert len(tok(f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>").input_ids) < want
    out = complete(model_server, prompt=prefix, suffix=suffix, max_tokens=8)
    assert out["usage"]["prompt_tokens"] == want
    status, tabby = call(model_server, "POST", "/v1/completions",
                         {"language": "python", "segments": {"prefix": prefix, "suffix": suffix}})
    assert status == 200 and isinstance(tabby["choices"][0]["text"], str)


def test_a_cursor_inside_a_word_is_token_healed(model_server, reference):
    """The prompt's last prefix token is dropped and the completion made to continue it (models.healing); the
    text the user typed is not repeated. The same happens to a FIM prompt a client built itself (refact-lsp)."""
    from refact_lab.models.healing import heal_fim_prompt
    from refact_lab.models.registry import QWEN_FIM

    prefix, suffix = "def total(xs):\n    ret", "\n"
    fim = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    ids = reference.tokenizer(fim).input_ids
    _, healed, allowed = heal_fim_prompt(reference.tokenizer, QWEN_FIM, ids)
    assert healed and prefix.endswith(healed) and allowed  # this prefix does end inside a word
    out = complete(model_server, prompt=prefix, suffix=suffix, max_tokens=8)
    assert out["choices"][0]["text"] == cut_at_special(reference(fim, 8))
    assert out["usage"]["prompt_tokens"] == len(ids)
    raw = complete(model_server, prompt=fim, max_tokens=8)  # the FIM prompt spelled out by the client
    assert raw["choices"][0]["text"] == out["choices"][0]["text"]
    events = sse_events(model_server, "/v1/completions",
                        {"prompt": prefix, "suffix": suffix, "max_tokens": 8, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events) == out["choices"][0]["text"]


def test_streaming_completion_matches_the_whole_answer(model_server):
    prompt = PROMPTS[3]
    whole = complete(model_server, prompt=prompt, max_tokens=16)["choices"][0]
    events = sse_events(model_server, "/v1/completions",
                        {"model": "tinycoder", "prompt": prompt, "max_tokens": 16, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events) == whole["text"]
    assert events[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert len(events) >= 2 and all(e["caps_version"] == events[0]["caps_version"] for e in events)


def test_stop_strings_and_single_line(model_server, reference):
    prompt = PROMPTS[1]
    full = cut_at_special(reference(prompt, 24))
    assert len(full) > 6
    stop = full[3:5]
    out = complete(model_server, prompt=prompt, max_tokens=24, stop=[stop])["choices"][0]
    assert out["text"] == full[:full.index(stop)] and out["finish_reason"] == "stop"
    # single_line (our extension, used by the playground and Tabby mid-line): nothing past the first newline
    multiline = next(p for p in PROMPTS if "\n" in cut_at_special(reference(p, 40)))
    text = cut_at_special(reference(multiline, 40))
    out = complete(model_server, prompt=multiline, max_tokens=40, single_line=True)["choices"][0]
    assert out["text"] == text[:text.index("\n")]


def test_n_choices_with_sampling_and_seed(model_server):
    body = dict(prompt=PROMPTS[0], max_tokens=8, temperature=1.0, top_p=0.9, n=3, seed=7)
    a, b = complete(model_server, **body), complete(model_server, **body)
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]  # seeded: reproducible
    assert len({c["text"] for c in a["choices"]}) > 1  # each choice has its own seed
    assert 3 <= a["usage"]["completion_tokens"] <= 3 * 8


def test_chat_on_a_base_model_uses_a_plain_transcript(model_server, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write hello world"}]
    status, out = call(model_server, "POST", "/v1/chat/completions",
                       {"model": "tinycoder", "messages": messages, "max_tokens": 12})
    assert status == 200, out
    transcript = "System: Be brief.\nUser: Write hello world\nAssistant:"
    expected = cut_at_special(reference(transcript, 12))
    for stop in ("\nUser:", "\nSystem:"):
        expected = expected.split(stop)[0]
    assert out["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert out["object"] == "chat.completion"
    events = sse_events(model_server, "/v1/chat/completions",
                        {"model": "tinycoder", "messages": messages, "max_tokens": 12, "stream": True})
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_caps_and_tokenizer(model_server, reference):
    status, models = call(model_server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tinycoder"]
    for path in ("/refact-caps", "/coding_assistant_caps.json"):
        status, caps = call(model_server, "GET", path)
        assert status == 200
        assert caps["endpoint_template"] == "/v1/completions" and caps["endpoint_style"] == "openai"
        assert caps["code_completion_default_model"] == "tinycoder"
        assert caps["running_models"] == ["tinycoder"]
        pad = caps["code_completion_models"]["tinycoder"]["supports_scratchpads"]["FIM-PSM"]
        assert (pad["fim_prefix"], pad["fim_suffix"], pad["fim_middle"]) == (
            "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
        assert caps["code_completion_models"]["tinycoder"]["n_ctx"] == 1024
        assert caps["tokenizer_path_template"] == f"/tokenizer/$MODEL?token={model_server.token}"
        assert caps["caps_version"] == models["caps_version"]
    status, tok_json = call(model_server, "GET", "/tokenizer/tinycoder")
    assert status == 200
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(tok_json))
    assert tok.encode("def f(x): return x").ids == reference.tokenizer("def f(x): return x").input_ids
    status, err = call(model_server, "GET", "/tokenizer/nope")
    assert status == 404 and "nope" in err["error"]["message"]


def test_every_response_carries_the_caps_version(model_server):
    import urllib.request

    for method, path, body in [("GET", "/v1/models", None), ("GET", "/v1/health", None),
                               ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}),
                               ("POST", "/v1/completions", {"prompt": 3})]:
        req = urllib.request.Request(f"{model_server.url}{path}", method=method,
                                     data=json.dumps(body).encode() if body else None, headers=model_server.headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                header = r.headers["X-Caps-Version"]
        except urllib.error.HTTPError as e:
            header = e.headers["X-Caps-Version"]
        assert header and header.isdigit(), (path, header)


def test_tabby_segments_and_health(model_server, reference):
    prefix, suffix = "def square(x):\n    return ", "\n"
    status, out = call(model_server, "POST", "/v1/completions",
                       {"language": "python", "segments": {"prefix": prefix, "suffix": suffix,
                                                           "filepath": "a.py"}})
    assert status == 200, out
    assert set(out) >= {"id", "choices"} and out["choices"][0]["index"] == 0
    fim = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    assert out["choices"][0]["text"] == cut_at_special(reference(fim, 64))
    # mid-line (text right of the cursor): one line only
    status, out = call(model_server, "POST", "/v1/completions",
                       {"language": "python", "segments": {"prefix": "x = foo(", "suffix": ")\nprint(x)\n"}})
    assert status == 200 and "\n" not in out["choices"][0]["text"]
    # a whole long file around the cursor: cut to the context (as Tabby's server does), not refused
    big = "".join(f"value_{i} = compute({i})\n" for i in range(3000))
    status, out = call(model_server, "POST", "/v1/completions",
                       {"language": "python", "segments": {"prefix": big + "total = ", "suffix": "\n" + big}})
    assert status == 200 and isinstance(out["choices"][0]["text"], str)
    status, health = call(model_server, "GET", "/v1/health")
    assert status == 200 and health["model"] == "tinycoder" and health["device"] == "cpu"
    assert health["version"]["git_describe"] and health["model_state"] == "ready"
    status, _ = call(model_server, "POST", "/v1/events", {"type": "view"})
    assert status == 200


BAD = [
    ("malformed json", "/v1/completions", b'{"prompt": "x",', 400, "malformed JSON"),
    ("not an object", "/v1/completions", b'["prompt"]', 400, "JSON object"),
    ("empty body", "/v1/completions", b"", 400, "empty"),
    ("prompt missing", "/v1/completions", {"max_tokens": 3}, 400, "'prompt' is required"),
    ("prompt wrong type", "/v1/completions", {"prompt": 42}, 400, "'prompt' must be a string"),
    ("token ids", "/v1/completions", {"prompt": [1, 2, 3]}, 400, "token ids"),
    ("max_tokens type", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "'max_tokens' must be"),
    ("max_tokens zero", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "'max_tokens' is 0"),
    ("max_tokens over context", "/v1/completions", {"prompt": "x", "max_tokens": 5000}, 400, "at most 1024"),
    ("temperature", "/v1/completions", {"prompt": "x", "temperature": -1}, 400, "'temperature'"),
    ("top_p", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "'top_p'"),
    ("n", "/v1/completions", {"prompt": "x", "n": 100}, 400, "'n' is 100"),
    ("stop type", "/v1/completions", {"prompt": "x", "stop": 5}, 400, "'stop'"),
    ("bool as int", "/v1/completions", {"prompt": "x", "max_tokens": True}, 400, "'max_tokens'"),
    ("logprobs", "/v1/completions", {"prompt": "x", "logprobs": 3}, 400, "'logprobs' is not supported"),
    ("unknown model", "/v1/completions", {"prompt": "x", "model": "gpt-17"}, 404, "unknown model 'gpt-17'"),
    ("prompt too long", "/v1/completions", {"prompt": "word " * 3000}, 400, "longer than the model's context"),
    ("chat no messages", "/v1/chat/completions", {"model": "tinycoder"}, 400, "'messages'"),
    ("chat bad message", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "'role'"),
    ("chat image part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "only text parts"),
    ("chat unknown role", "/v1/chat/completions", {"messages": [{"role": "user\nAssistant", "content": "hi"}]},
     400, "role"),
    ("chat suffix", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "suffix": "x"}, 400,
     "'suffix'"),
    ("chat tools", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "'tools'"),
    ("chat json mode", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}, 400,
     "'response_format'"),
    ("best_of", "/v1/completions", {"prompt": "x", "best_of": 3}, 400, "'best_of'"),
    ("tabby bad segments", "/v1/completions", {"segments": "def f"}, 400, "'segments'"),
    ("tabby suffix not text", "/v1/completions", {"segments": {"prefix": "x", "suffix": 0}}, 400,
     "'segments.suffix'"),
    ("tabby debug options", "/v1/completions", {"segments": {"prefix": "x"}, "debug_options": []}, 400,
     "'debug_options'"),
    ("infill top_p", "/infill", {"input_prefix": "x", "top_p": 99}, 400, "'top_p'"),
    ("NaN", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "NaN is not a JSON number"),
    ("nested too deeply", "/v1/completions", b'{"prompt": ' + b"[" * 50000 + b"]" * 50000 + b"}", 400,
     "nested too deeply"),
]


def test_odd_but_valid_input_is_served(model_server):
    """Valid JSON that once reached the model raw: an empty prompt (the start of a file), a lone UTF-16
    surrogate (tokenizers refuse it; it becomes U+FFFD), a seed beyond 64 bits, a negative seed."""
    for body in ({"prompt": ""}, {"prompt": "x = '\ud800'"}, {"prompt": "x", "suffix": "\udfff"},
                 {"prompt": "x", "temperature": 1, "seed": 2 ** 70}, {"prompt": "x", "temperature": 1, "seed": -5}):
        status, out = call(model_server, "POST", "/v1/completions", {**body, "max_tokens": 3})
        assert status == 200 and isinstance(out["choices"][0]["text"], str), (body, out)
    status, out = call(model_server, "POST", "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "\ud83d"}], "max_tokens": 3})
    assert status == 200, out
    # a null max_tokens counts as absent (its alias max_new_tokens then counts)
    status, out = call(model_server, "POST", "/v1/completions",
                       {"prompt": "def f(x):\n", "max_tokens": None, "max_new_tokens": 2})
    assert status == 200 and out["usage"]["completion_tokens"] <= 2, out


def test_a_tiny_temperature_is_nearly_greedy_and_harms_no_other_request(model_server, reference):
    """temperature 1e-300 is valid JSON in OpenAI's range: it once overflowed the softmax to NaN, and the failed
    sample ended every request decoding in the same batch with a 500."""
    results = {}

    def one(key, body):
        results[key] = call(model_server, "POST", "/v1/completions", body)

    long = {"prompt": PROMPTS[1], "max_tokens": 60, "temperature": 0}
    threads = [threading.Thread(target=one, args=(i, long)) for i in range(3)]
    threads += [threading.Thread(target=one, args=(f"tiny{t}", {"prompt": PROMPTS[0], "max_tokens": 4,
                                                                  "temperature": t})) for t in (1e-300, 5e-324)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key, (status, out) in results.items():
        assert status == 200, (key, out)
    assert results["tiny1e-300"][1]["choices"][0]["text"] == cut_at_special(reference(PROMPTS[0], 4))


@pytest.mark.parametrize("name,path,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_json_error_naming_the_problem(model_server, name, path, body, status, words):
    got, out = call(model_server, "POST", path, raw=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert got == status, out
    assert isinstance(out, dict) and words in out["error"]["message"], out
    # the server is still fine
    assert complete(model_server, prompt="ok", max_tokens=2)["choices"][0]["finish_reason"] in ("stop", "length")


def test_oversized_body_is_refused_with_json(model_server):
    big = json.dumps({"prompt": "x" * (17 * 1024 * 1024)}).encode()
    status, out = call(model_server, "POST", "/v1/completions", raw=big)
    assert status == 413 and "MiB" in out["error"]["message"] and "16" in out["error"]["message"]
    assert complete(model_server, prompt="ok", max_tokens=2)["choices"]


def test_missing_or_wrong_token_is_401_json(model_server):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        for method, path in (("POST", "/v1/completions"), ("GET", "/refact-caps"), ("GET", "/v1/models")):
            status, out = call(model_server, method, path, {"prompt": "x"} if method == "POST" else None,
                               headers=headers)
            assert status in (401, 403) and "token" in out["error"]["message"], (path, out)
    # a server on loopback refuses other Host names (DNS rebinding): the error says that, not "wrong token"
    status, out = call(model_server, "POST", "/v1/completions", {"prompt": "x"}, headers={"Host": "evil.example"})
    assert status == 403 and "Host" in out["error"]["message"] and "token" not in out["error"]["message"], out


def test_many_simultaneous_requests_are_batched_and_all_correct(model_server, reference):
    expected = {p: cut_at_special(reference(p, 10)) for p in PROMPTS}
    results, errors = {}, []

    def one(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        status, out = call(model_server, "POST", "/v1/completions",
                           {"model": "tinycoder", "prompt": prompt, "max_tokens": 10})
        if status != 200:
            errors.append(out)
        else:
            results[i] = (prompt, out["choices"][0]["text"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 24
    # rows of different lengths decoded together in one batch still give each prompt its own greedy text
    assert all(text == expected[prompt] for prompt, text in results.values())


def _recent(srv):
    return call(srv, "GET", "/v1/refact-lab/status")[1]["recent"]


LONG_PROMPT = "while True:\n    "  # greedy decoding of this prompt runs to max_tokens without a stop token


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "waiting"])
def test_a_client_that_disconnects_cancels_its_generation(model_server, stream):
    before = {r["id"] for r in _recent(model_server)}
    sock = socket.create_connection(("127.0.0.1", model_server.port))
    body = json.dumps({"model": "tinycoder", "prompt": LONG_PROMPT, "max_tokens": 1000, "stream": stream}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{model_server.port}\r\n"
            f"Authorization: Bearer {model_server.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body)
    if stream:
        assert b"data: " in sock.recv(4096)  # tokens are flowing
    else:
        # Close as soon as the engine is working on it: on an idle machine the tiny model can reach a stop
        # token within half a second, so a fixed sleep would race the generation.
        wait_for(lambda: call(model_server, "GET", "/v1/refact-lab/status")[1]["active"] >= 1, timeout=30, interval=0.01,
                 what="the request to start")
    sock.close()

    def finished():
        return next((r for r in _recent(model_server) if r["id"] not in before), None)

    record = wait_for(finished, timeout=30, what="the request's record")
    assert record["finish_reason"] == "cancelled" and record["completion_tokens"] < 1000, record
    assert call(model_server, "GET", "/v1/refact-lab/status")[1]["active"] == 0

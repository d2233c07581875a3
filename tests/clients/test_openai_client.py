"""The official `openai` package, unchanged, against our server: completions, FIM with suffix, streaming, chat."""

from __future__ import annotations

import pytest

from tests.serve.conftest import cut_at_special


@pytest.fixture(scope="module")
def client(model_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{model_server.url}/v1", api_key=model_server.token, max_retries=0)


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["tinycoder"]


def test_completion(client, reference):
    prompt = "def fib(n):\n    if n < 2:\n        return"
    out = client.completions.create(model="tinycoder", prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == cut_at_special(reference(prompt, 12))
    assert out.usage.completion_tokens <= 12 and out.choices[0].finish_reason in ("stop", "length")


def test_fim_with_suffix(client, reference):
    prefix, suffix = "def area(r):\n    return ", "\n\nprint(area(2))\n"
    out = client.completions.create(model="tinycoder", prompt=prefix, suffix=suffix, max_tokens=10)
    fim = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    assert out.choices[0].text == cut_at_special(reference(fim, 10))


def test_streaming_completion(client):
    prompt = "import os\nimport sys\n\nclass Config:"
    whole = client.completions.create(model="tinycoder", prompt=prompt, max_tokens=16).choices[0].text
    chunks = list(client.completions.create(model="tinycoder", prompt=prompt, max_tokens=16, stream=True))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_and_streaming_chat(client, reference):
    messages = [{"role": "user", "content": "Write a function"}]
    out = client.chat.completions.create(model="tinycoder", messages=messages, max_tokens=10)
    expected = cut_at_special(reference("User: Write a function\nAssistant:", 10)).split("\nUser:")[0]
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == expected
    stream = client.chat.completions.create(model="tinycoder", messages=messages, max_tokens=10, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected


def test_errors_surface_as_openai_exceptions(client):
    import openai

    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tinycoder", prompt="x", max_tokens=100000)

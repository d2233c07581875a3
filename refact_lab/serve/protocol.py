"""The wire formats: parsing and checking requests, shaping responses (OpenAI, Refact caps, Tabby).

Pure functions over dicts, no tornado and no torch, so every rule is testable on its own. A bad request raises
`ApiError(status, message, param)`; the message names the field and what is allowed, because the person
reading it is usually configuring an IDE plugin.

OpenAI clients send many fields we do not use (`user`, `logit_bias`, penalties...): unknown fields are ignored,
but the fields we use are type-checked, and options we cannot honour (`logprobs`, `echo`, token-id prompts) are
refused rather than silently ignored.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from urllib.parse import quote
from dataclasses import dataclass, field

MAX_N = 16
MAX_STOPS = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "authentication_error" if status == 401 else (
        "invalid_request_error" if 400 <= status < 500 else "server_error")
    # "detail" is what refact-lsp shows from a failed caps request; "error" is OpenAI's shape
    return {"error": {"message": message, "type": kind, "param": param, "code": code or status},
            "detail": message}


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _reject_constant(name: str):
    raise ApiError(400, f"malformed JSON in the request body: {name} is not a JSON number")


def _clean_strings(value, depth: int = 0):
    """Lone UTF-16 surrogates ("\\ud800" is valid JSON) cannot be encoded as UTF-8 or tokenized: U+FFFD instead."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value) if _LONE_SURROGATE.search(value) else value
    if depth > 64:
        return value
    if isinstance(value, list):
        return [_clean_strings(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {_clean_strings(k, depth + 1): _clean_strings(v, depth + 1) for k, v in value.items()}
    return value


def parse_json_object(body: bytes) -> dict:
    if not body or not body.strip():
        raise ApiError(400, "the request body is empty: send a JSON object")
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON in the request body: {e.msg} at line {e.lineno} column {e.colno}"
                       ) from None
    except RecursionError:
        raise ApiError(400, "malformed JSON in the request body: nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise ApiError(400, f"malformed JSON in the request body: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    return _clean_strings(data)


def _type_name(t) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             dict: "an object"}
    return " or ".join(names.get(x, x.__name__) for x in (t if isinstance(t, tuple) else (t,)))


def _get(body: dict, name: str, types, default=None, *, lo=None, hi=None, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    types_t = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types_t) and not (isinstance(value, bool) and bool not in types_t)
    if not ok and float in types_t and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ApiError(400, f"'{name}' must be {_type_name(types)}, got {json.dumps(value)[:60]}", name)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ApiError(400, f"'{name}' is {value}; it must be {'above' if lo_open else 'at least'} {lo}", name)
    if hi is not None and value > hi:
        raise ApiError(400, f"'{name}' is {value}; it must be at most {hi}", name)
    return value


def _stop_list(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop")
    if len(stop) > MAX_STOPS:
        raise ApiError(400, f"'stop' has {len(stop)} entries; at most {MAX_STOPS} are allowed", "stop")
    return tuple(s for s in stop if s)


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    n: int
    stream: bool
    seed: int | None


def _sampling(body: dict, default_max_tokens: int) -> Sampling:
    max_tokens = body.get("max_tokens")
    if max_tokens is None:  # null counts as absent, as for every other field
        max_tokens = body.get("max_new_tokens")
    if max_tokens is None and body.get("max_completion_tokens") is not None:
        max_tokens = body["max_completion_tokens"]
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        raise ApiError(400, f"'max_tokens' must be an integer, got {json.dumps(max_tokens)[:60]}", "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'max_tokens' is {max_tokens}; it must be at least 1", "max_tokens")
    for name in ("logprobs", "top_logprobs"):
        if body.get(name) not in (None, False, 0):
            raise ApiError(400, f"'{name}' is not supported by this server", name)
    if body.get("echo"):
        raise ApiError(400, "'echo' is not supported by this server", "echo")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "'best_of' is not supported by this server (ask for 'n' completions instead)", "best_of")
    return Sampling(
        max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        temperature=float(_get(body, "temperature", float, 0.0, lo=0.0, hi=2.0)),
        top_p=float(_get(body, "top_p", float, 1.0, lo=0.0, hi=1.0, lo_open=True)),
        stop=_stop_list(body),
        n=_get(body, "n", int, 1, lo=1, hi=MAX_N),
        stream=_get(body, "stream", bool, False),
        seed=_get(body, "seed", int, None),
    )


@dataclass
class CompletionRequest:
    model: str | None
    prompt: str
    suffix: str | None
    sampling: Sampling
    single_line: bool = False
    return_prompt: bool = False      # debug_options.return_prompt, as Tabby's: the prompt and its context snippets


def _debug_options(body: dict) -> dict:
    debug = body.get("debug_options")
    if debug is None:
        return {}
    if not isinstance(debug, dict):
        raise ApiError(400, "'debug_options' must be an object", "debug_options")
    return debug


def debug_data(prompt: str, snippets) -> dict:
    """What `debug_options.return_prompt` answers with: the prompt the model saw, and the context snippets in it
    (path and text; the prompt builder may have cut the last one to the budget)."""
    return {"prompt": prompt, "snippets": [{"path": s.path, "text": s.text} for s in snippets]}


def parse_completion(body: dict) -> CompletionRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif prompt and all(isinstance(x, int) for x in prompt):
            raise ApiError(400, "'prompt' as token ids is not supported: send text", "prompt")
        else:
            raise ApiError(400, "'prompt' must be a string (a list holding exactly one string is accepted too)",
                           "prompt")
    if prompt is None:
        raise ApiError(400, "'prompt' is required", "prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, f"'prompt' must be a string, got {json.dumps(prompt)[:60]}", "prompt")
    return CompletionRequest(
        model=_get(body, "model", str, None) or None,
        prompt=prompt,
        suffix=_get(body, "suffix", str, None),
        sampling=_sampling(body, default_max_tokens=16),
        single_line=_get(body, "single_line", bool, False),
        return_prompt=_debug_options(body).get("return_prompt") is True,
    )


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]
    sampling: Sampling


def _content_text(content, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")


# OpenAI's roles, as chat templates know them ("developer" is the newer name of "system", "function" of "tool")
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool",
              "function": "tool"}


def parse_chat(body: dict) -> ChatRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role' string", "messages")
        role = CHAT_ROLES.get(m["role"])
        if role is None:
            raise ApiError(400, f"messages[{i}].role is {json.dumps(m['role'])[:40]}; it must be one of "
                                f"{', '.join(CHAT_ROLES)}", "messages")
        out.append({"role": role, "content": _content_text(m.get("content"), i)})
    # options a chat here cannot honour are refused, not dropped
    if body.get("suffix") is not None:
        raise ApiError(400, "'suffix' belongs to /v1/completions (fill-in-the-middle); a chat has no suffix",
                       "suffix")
    if body.get("tools"):
        raise ApiError(400, "'tools' (function calling) is not supported by this server", "tools")
    _get(body, "single_line", bool, False)
    _debug_options(body)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError(400, "'response_format' other than {\"type\": \"text\"} is not supported by this server",
                       "response_format")
    return ChatRequest(_get(body, "model", str, None) or None, out, _sampling(body, default_max_tokens=256))


@dataclass
class TabbyRequest:
    prefix: str
    suffix: str
    language: str | None
    temperature: float
    seed: int | None
    max_tokens: int
    single_line: bool
    extra: dict = field(default_factory=dict)
    filepath: str | None = None      # the file being edited: never its own context
    snippets: tuple = ()             # the client's context (Snippet): declarations, then relevant snippets
    return_prompt: bool = False      # debug_options.return_prompt: answer with the prompt in debug_data


# Tabby's agent (1.5+) sends context from the editor under these keys of `segments`, most relevant first.
TABBY_CONTEXT_KEYS = ("declarations", "relevant_snippets_from_changed_files",
                      "relevant_snippets_from_recently_opened_files")


def client_snippets(items, param: str, path_key: str, text_key: str) -> tuple:
    """A client's context list ([{path_key, text_key}, ...]) as prompt-builder snippets; 400 when malformed."""
    from refact_lab.models.prompt import Snippet

    if items is None:
        return ()
    if not isinstance(items, list):
        raise ApiError(400, f"'{param}' must be a list of objects with '{path_key}' and '{text_key}'", param)
    out = []
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get(path_key, ""), str)
                and isinstance(item.get(text_key), str)):
            raise ApiError(400, f"'{param}[{i}]' must be an object with '{path_key}' (text) and '{text_key}' "
                                "(text)", param)
        if item[text_key].strip():
            out.append(Snippet(item.get(path_key) or "unknown", item[text_key]))
    return tuple(out)


def is_tabby(body: dict) -> bool:
    return "segments" in body and "prompt" not in body


def parse_tabby(body: dict) -> TabbyRequest:
    seg = body.get("segments")
    if not isinstance(seg, dict):
        raise ApiError(400, "'segments' must be an object with 'prefix' and optional 'suffix'", "segments")
    prefix, suffix = seg.get("prefix"), seg.get("suffix")
    suffix = "" if suffix is None else suffix
    if not isinstance(prefix, str):
        raise ApiError(400, "'segments.prefix' must be a string", "segments.prefix")
    if not isinstance(suffix, str):
        raise ApiError(400, "'segments.suffix' must be a string", "segments.suffix")
    filepath = seg.get("filepath")
    if filepath is not None and not isinstance(filepath, str):
        raise ApiError(400, "'segments.filepath' must be a string", "segments.filepath")
    snippets = tuple(s for key in TABBY_CONTEXT_KEYS
                     for s in client_snippets(seg.get(key), f"segments.{key}", "filepath", "body"))
    debug = _debug_options(body)
    # Tabby's agent decides line vs block itself; mid-line (text right of the cursor) gets one line, as its
    # server does, so a completion does not run over the rest of the line.
    rest_of_line = suffix.split("\n", 1)[0]
    return TabbyRequest(
        prefix=prefix, suffix=suffix, language=_get(body, "language", str, None),
        temperature=float(_get(body, "temperature", float, 0.0, lo=0.0, hi=2.0)),
        seed=_get(body, "seed", int, None),
        max_tokens=_get(body, "max_tokens", int, 64, lo=1, hi=4096),
        single_line=bool(rest_of_line.strip()),
        filepath=filepath or None, snippets=snippets, return_prompt=debug.get("return_prompt") is True,
    )


@dataclass
class InfillRequest:
    """llama.cpp's /infill (what llama.vim and llama.vscode send)."""

    prefix: str
    suffix: str
    snippets: tuple          # input_extra, as prompt-builder snippets
    max_tokens: int
    temperature: float
    seed: int | None
    stream: bool
    stop: tuple[str, ...] = ()
    top_p: float = 1.0


# llama.cpp's n_predict -1 means "until the end token"; a FIM completion asked that way gets this many at most.
INFILL_DEFAULT_TOKENS = 128


def parse_infill(body: dict) -> InfillRequest:
    prefix = _get(body, "input_prefix", str, "")
    # llama.cpp adds `prompt` right after input_prefix: the text of the cursor's line before the cursor
    prefix += _get(body, "prompt", str, "")
    n_predict = _get(body, "n_predict", int, -1, lo=-1, hi=4096)
    return InfillRequest(
        prefix=prefix, suffix=_get(body, "input_suffix", str, ""),
        snippets=client_snippets(body.get("input_extra"), "input_extra", "filename", "text"),
        max_tokens=INFILL_DEFAULT_TOKENS if n_predict in (-1, 0) else n_predict,
        temperature=float(_get(body, "temperature", float, 0.0, lo=0.0, hi=2.0)),
        seed=_get(body, "seed", int, None), stream=bool(_get(body, "stream", bool, False)),
        stop=_stop_list(body), top_p=float(_get(body, "top_p", float, 1.0, lo=0.0, hi=1.0, lo_open=True)))


def infill_response(done: dict, model: str, stop: bool = True) -> dict:
    """llama.cpp's final /infill answer (also the last SSE event of a stream, with empty content)."""
    return {"content": done["text"], "stop": stop, "model": model, "tokens_predicted": done["completion_tokens"],
            "tokens_evaluated": done["prompt_tokens"],
            "stop_type": "limit" if done["finish_reason"] == "length" else "eos",
            "truncated": False}


# ---- responses --------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def openai_finish_reason(reason: str) -> str:
    return {"cancelled": "stop"}.get(reason, reason)


def completion_response(rid: str, model: str, choices: list[dict], prompt_tokens: int, caps_version: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "text": c["text"], "logprobs": None,
                         "finish_reason": openai_finish_reason(c["finish_reason"])} for c in choices],
            "usage": usage(prompt_tokens, sum(c["completion_tokens"] for c in choices)),
            "caps_version": caps_version}


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason: str | None,
                     caps_version: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None,
                         "finish_reason": openai_finish_reason(finish_reason) if finish_reason else None}],
            "caps_version": caps_version}


def chat_response(rid: str, model: str, choices: list[dict], prompt_tokens: int, caps_version: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                         "logprobs": None, "finish_reason": openai_finish_reason(c["finish_reason"])}
                        for c in choices],
            "usage": usage(prompt_tokens, sum(c["completion_tokens"] for c in choices)),
            "caps_version": caps_version}


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish_reason: str | None, caps_version: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None,
                         "finish_reason": openai_finish_reason(finish_reason) if finish_reason else None}],
            "caps_version": caps_version}


def models_response(local: list[dict], upstream: list[dict], caps_version: int) -> dict:
    data = [{"id": m["name"], "object": "model", "created": 0, "owned_by": "refact_lab", **m.get("extra", {})}
            for m in local]
    data += [{"id": m["name"], "object": "model", "created": 0, "owned_by": m["owner"]} for m in upstream]
    return {"object": "list", "data": data, "caps_version": caps_version}


def fim_scratchpad(fim) -> dict:
    """refact-lsp's FIM-PSM scratchpad settings for a model's FIM format."""
    extra = [t for t in fim.stop_tokens if t not in (fim.prefix, fim.suffix, fim.middle, fim.eot)]
    return {"fim_prefix": fim.prefix, "fim_suffix": fim.suffix, "fim_middle": fim.middle, "eot": fim.eot,
            "extra_stop_tokens": extra}


def refact_caps(local: list[dict], upstream_chat: list[str], default_completion: str | None,
                caps_version: int, version: str, token: str | None = None) -> dict:
    """Caps in the older flat layout refact-lsp 0.10.x reads (one provider; relative URLs join onto ours).

    `local` entries: name, n_ctx, fim. Every served model is listed as a completion model with its FIM tokens,
    because our names are unknown to refact-lsp's built-in model table.

    refact-lsp 0.10.14 downloads the tokenizer without its API key, so the tokenizer URL carries the token the
    caps request itself authenticated with (`?token=`, which jupyter_server accepts): the caller already holds
    it, and the tokenizer stays behind the token like the rest of the API.
    """
    completion_models = {}
    for m in local:
        scratchpad = "FIM-SPM" if m["fim"].order == "spm" else "FIM-PSM"
        completion_models[m["name"]] = {
            "n_ctx": m["n_ctx"], "supports_scratchpads": {scratchpad: fim_scratchpad(m["fim"])},
            "default_scratchpad": scratchpad, "similar_models": []}
    # Local models are completion models only: refact-lsp routes a model listed as a chat model to the chat
    # endpoint even for code completion. Our /v1/chat/completions still answers them for OpenAI clients.
    chat_models = {}
    for name in upstream_chat:
        chat_models[name] = {"n_ctx": 128000, "supports_scratchpads": {"PASSTHROUGH": {}},
                             "default_scratchpad": "PASSTHROUGH", "similar_models": [], "supports_tools": True}
    names = [m["name"] for m in local]
    default_chat = upstream_chat[0] if upstream_chat else ""
    return {
        "cloud_name": "refact_lab",
        "endpoint_style": "openai",
        "endpoint_template": "/v1/completions",
        "endpoint_chat_passthrough": "/v1/chat/completions",
        "tokenizer_path_template": "/tokenizer/$MODEL" + (f"?token={quote(token)}" if token else ""),
        "tokenizer_rewrite_path": {n: n for n in names},
        # empty: no telemetry leaves the machine (refact-lsp would post to smallcloud.ai by default)
        "telemetry_basic_dest": "",
        "telemetry_basic_retrieve_my_own": "",
        "telemetry_corrected_snippets_dest": "",
        "code_completion_models": completion_models,
        "code_completion_default_model": default_completion or "",
        "multiline_code_completion_default_model": default_completion or "",
        "code_completion_n_ctx": max((m["n_ctx"] for m in local), default=2048),
        "code_chat_models": chat_models,
        "code_chat_default_model": default_chat,
        "running_models": names + list(upstream_chat),
        "support_metadata": False,
        "caps_version": caps_version,
        "version": version,
    }

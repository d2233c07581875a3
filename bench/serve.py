"""Benchmark: the inference server against `model.generate` in a loop, measured in the same run.

Default mode (CPU is fine): the embedded default model if it is there, else a small random Llama.

1. Baseline: `model.generate` (greedy, 32 new tokens, KV cache) called in a loop in this process: p50/p95
   latency and tokens/s.
2. The real server (`refact-lab serve` in a subprocess, same model): p50/p95 latency of a 32-token completion
   from one client over HTTP, then total throughput with 1, 4 and 16 concurrent clients (each client sends its
   next request as soon as the previous one returns). The one-client latency is also measured on a second
   server with speculative decoding off (`--speculative-tokens 0`; the first has the default, which drafts
   tokens from the text for greedy requests, see refact_lab/serve/speculative.py): both must give the
   same completions, and the drafts accepted are reported.

Prompts are real code files cut at a random point; only prompts whose greedy completion runs the full 32
tokens without hitting a stop token are used, so both sides produce exactly the same work.

3. Keystroke replay (the engine in this process, after the server stopped): a function of a real file typed
   character by character, a FIM completion (16 tokens) requested after each character, through an engine
   with prefix reuse and one without (`prefix_cache_mib=0`), one request each in turn. Reuse is both halves of
   what the previous keystroke left in the prefix cache: its prompt's KV and its completion, which drafts the
   next one when the user typed what was suggested (serve/prefix_cache.py). The engine runs in the precision
   `--dtype` asks, as the server in 2 does (auto: fp32 weights and, on a CPU with native bf16, the bf16 copy
   that serve/bf16_twin.py times at load). The texts must match when every pass is fp32 (`--dtype fp32`); with
   bf16 passes a prompt computed in two parts rounds differently, as batching with other prompts does.
   The server keeps its default prefix cache in 2. For the throughput runs each client is a user typing through
   its own file, asking after every 10 characters: prompts share their start with that client's previous ones
   (as an IDE's do) and never repeat one; every run starts on other files.

Ends with three lines a script can read: the speed-up of the server's p50 over generate's at one client (goal
>= 2x), the keystroke replay speed-up (total time without reuse / with; goal >= 2x) and the throughput of 16
clients over 1 (goal >= 3x). `--quick` measures less of everything (about two minutes); `--threads 1` gives
steadier numbers on a busy machine.

`--compile-probe`: only the decode step, the engine's (dynamic cache, eager) against a preallocated
`StaticCache` with a `torch.compile`d forward, at batch 1 and 4: ms per step, compile time, equal tokens.

`--gpu` (for a machine with a CUDA GPU): a random-initialised model shaped like Qwen2.5-Coder-1.5B in bf16,
a 1024-token prompt and 48 new tokens, reporting ms per new token for plain `generate`, `generate` with a
static cache and a compiled decode step, and our engine (prefix reuse off, then a prompt one token longer than
the previous one with reuse on). `--gpu --dry-run` runs the same code on a tiny shape
on the CPU, to check the script itself.

    .venv/bin/python bench/serve.py [--requests 30] [--seconds 12] [--keystrokes 200] [--quick]
    .venv/bin/python bench/serve.py --gpu
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NEW_TOKENS = 32


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def code_prompts(n: int, seed: int = 0, max_chars: int = 600) -> list[str]:
    """Real code (the standard library) cut at a random point: what an IDE sends before the cursor."""
    import sysconfig

    rng = random.Random(seed)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    out = []
    while len(out) < n:
        text = rng.choice(files).read_text(encoding="utf-8", errors="replace")
        if len(text) < 2000:
            continue
        cut = rng.randrange(500, len(text) - 200)
        out.append(text[max(0, cut - max_chars):cut])
    return out


def model_folder(tmp: Path) -> tuple[str, str]:
    from refact_lab.models.registry import EMBEDDED_DIR

    if (EMBEDDED_DIR / "model.safetensors").is_file():
        return str(EMBEDDED_DIR), "the embedded default model"
    from refact_lab.models.tokenizer_build import build_tiny_model

    folder = build_tiny_model(tmp / "random-model", hidden_size=256, layers=4, heads=4, n_ctx=2048)
    return str(folder), "a random 4-layer Llama (hidden 256); the default model is not built yet"


# ---- baseline -------------------------------------------------------------------------------------------------

def load_reference(folder: str, dtype: str):
    """The same weights in this process, in the precision the server chose (bf16 on AMX CPUs, else fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refact_lab.models.registry import resolve

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    spec = resolve(folder)
    stop_ids = sorted({tok.convert_tokens_to_ids(t) for t in spec.fim.stop_tokens if t in tok.get_vocab()})
    return tok, model, stop_ids


def generate_once(tok, model, stop_ids, prompt: str, new_tokens: int = NEW_TOKENS, text: list | None = None
                  ) -> tuple[float, int]:
    import torch

    ids = tok(prompt, return_tensors="pt")
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=stop_ids,
                             pad_token_id=tok.eos_token_id)
    seconds = time.perf_counter() - t
    if text is not None:
        text.append(tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=False))
    return seconds, out.shape[1] - ids.input_ids.shape[1]


def full_length_prompts(tok, model, stop_ids, candidates: list[str], want: int) -> list[str]:
    """Prompts whose greedy completion does not stop early, so every request does NEW_TOKENS steps on both
    sides: no stop token, and no loop the server's loop guard would cut (it checks after every token)."""
    from refact_lab.serve.stops import find_loop

    out = []
    for p in candidates:
        text: list[str] = []
        _, n = generate_once(tok, model, stop_ids, p, text=text)
        if n == NEW_TOKENS and not any(find_loop(text[0][:k]) is not None for k in range(len(text[0]) + 1)):
            out.append(p)
        if len(out) == want:
            break
    return out


# ---- the server -----------------------------------------------------------------------------------------------

class Server:
    def __init__(self, folder: str, home: Path, threads: int | None = None, dtype: str = "auto",
                 speculative_tokens: int | None = None, compile_decode: str = "auto"):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.token = "bench-token"
        self.log = open(home.parent / f"server-{home.name}.log", "wb")
        self.text = ""  # the last completion's text
        spec = [] if speculative_tokens is None else ["--speculative-tokens", str(speculative_tokens)]
        spec += ["--compile-decode", compile_decode]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "refact_lab.cli", "serve", "--port", str(self.port), "--home", str(home),
             "--token", self.token, "--model", folder, "--dtype", dtype, *spec],
            stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})})
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                status = self.call("GET", "/v1/refact-lab/status")[1]
                if status.get("state") == "ready":
                    self.dtype = status["dtype"]
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.5)
        raise RuntimeError("server not ready after 180 s")

    def call(self, method: str, path: str, body: dict | None = None, conn: http.client.HTTPConnection | None = None):
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        if own:
            conn.close()
        return resp.status, data

    def complete(self, conn, prompt: str) -> tuple[float, int]:
        t = time.perf_counter()
        status, out = self.call("POST", "/v1/completions", {"prompt": prompt, "max_tokens": NEW_TOKENS,
                                                            "temperature": 0}, conn)
        if status != 200:
            raise RuntimeError(out)
        self.text = out["choices"][0]["text"]
        return time.perf_counter() - t, out["usage"]["completion_tokens"]

    def stop(self):
        import signal

        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def typing_prompts(seed: int, step: int = 10, first: int = 400, last: int = 1400):
    """Endless prompts of one user typing through real code (the standard library): from a line of a file on,
    the text up to a cursor that moves `step` characters further each time, as an IDE asks after a few
    keystrokes; then another file."""
    import sysconfig

    rng = random.Random(seed)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    while True:
        text = rng.choice(files).read_text(encoding="utf-8", errors="replace")
        if len(text) < last + 1000:
            continue
        begin = text.rfind("\n", 0, rng.randrange(0, len(text) - last)) + 1
        for cut in range(begin + first, begin + last, step):
            yield text[begin:cut]


def throughput(server: Server, clients: int, seconds: float, run: int = 0) -> tuple[float, int]:
    """Total generated tokens/s with `clients` closed-loop clients for `seconds`. Each client is a user typing
    through its own file (`typing_prompts`; other files in every run): its prompts share their start with its
    previous ones, as an IDE's do, and never repeat one."""
    streams = [typing_prompts(seed=1000 * run + i) for i in range(clients)]
    tokens = [0] * clients
    stop_at = time.perf_counter() + seconds
    errors: list[str] = []

    def client(i):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
        while time.perf_counter() < stop_at:
            try:
                tokens[i] += server.complete(conn, next(streams[i]))[1]
            except Exception as e:  # report, do not hide
                errors.append(repr(e))
                return
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} client errors, first: {errors[0]}")
    return sum(tokens) / (time.perf_counter() - start), sum(tokens)


def cpu_bench(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, what = model_folder(tmp)
        print(f"model: {what} ({folder}); torch threads: {torch.get_num_threads()} here and in the server; "
              f"cores: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.1f}")
        if os.getloadavg()[0] > os.cpu_count() / 2 and torch.get_num_threads() > 1:
            print("note: the machine is busy; torch's threads spin against other work and every number swings. "
                  "--threads 1 gives steadier numbers here.")
        server = Server(folder, tmp / "home", threads=torch.get_num_threads(), dtype=args.dtype,
                        compile_decode=args.compile_decode)
        plain = None
        try:
            # the same server with speculative decoding off (the one above has ServeSettings' default)
            plain = Server(folder, tmp / "home-plain", threads=torch.get_num_threads(), dtype=args.dtype,
                           speculative_tokens=0, compile_decode=args.compile_decode)
            tok, model, stop_ids = load_reference(folder, server.dtype)
            prompts = full_length_prompts(tok, model, stop_ids, code_prompts(200), want=args.requests)
            print(f"weights in {server.dtype} on both sides; {len(prompts)} prompts whose greedy completion runs "
                  f"the full {NEW_TOKENS} tokens (~{statistics.mean(len(tok(p).input_ids) for p in prompts):.0f} "
                  "prompt tokens on average)")
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
            plain_conn = http.client.HTTPConnection("127.0.0.1", plain.port, timeout=300)
            generate_once(tok, model, stop_ids, prompts[0])  # warm-up all three
            server.complete(conn, prompts[0])
            plain.complete(plain_conn, prompts[0])
            # interleaved, one request each in turn, so every side sees the same machine load
            base, lat, lat_plain, differ, shorter = [], [], [], 0, 0
            for p in prompts:
                seconds = [generate_once(tok, model, stop_ids, p)[0]]
                lengths = []
                for srv, c in ((server, conn), (plain, plain_conn)):
                    took, n = srv.complete(c, p)
                    seconds.append(took)
                    lengths.append(n)
                if lengths != [NEW_TOKENS, NEW_TOKENS]:
                    # the server's bf16 passes (serve/bf16_twin.py) reached a stop where fp32 generate did not:
                    # not the same work, left out
                    shorter += 1
                    continue
                if server.text != plain.text:
                    # bf16 only: drafts checked in one pass round differently; not the same work, left out
                    differ += 1
                    continue
                for out, s in zip((base, lat, lat_plain), seconds):
                    out.append(s)
            conn.close()
            plain_conn.close()
            status = server.call("GET", "/v1/refact-lab/status")[1]
            spec = status.get("speculative") or {}
            twin = status.get("bf16_twin")
            print("server's bf16 copy: " + (f"decode steps of {twin['min_rows']}+ rows, prompts of "
                                            f"{twin['min_tokens']}+ tokens (timed at load)" if twin else "none")
                  + f"; prompts left out because the server's completion stopped early: {shorter} of {len(prompts)}")
            plain.stop()
            del model  # the server gets the cores to itself for the throughput runs
            base_tps = NEW_TOKENS * len(base) / sum(base)
            print(f"model.generate loop : p50 {1000 * statistics.median(base):7.1f} ms  p95 "
                  f"{1000 * percentile(base, 0.95):7.1f} ms  {base_tps:7.1f} tokens/s")
            for label, times in (("server, 1 client    ", lat), ("  speculation off   ", lat_plain)):
                print(f"{label}: p50 {1000 * statistics.median(times):7.1f} ms  p95 "
                      f"{1000 * percentile(times, 0.95):7.1f} ms  {NEW_TOKENS * len(times) / sum(times):7.1f} tokens/s")
            if spec.get("steps"):
                print(f"  speculative decoding: {spec['tokens']} drafted tokens at most; {spec['steps']} steps, "
                      f"{spec['accepted']} of {spec['drafted']} drafted tokens accepted "
                      f"({spec['accepted'] / spec['drafted']:.0%}); completions that differ from speculation off: "
                      f"{differ} (left out of the latencies above; fp32 throughout: must be 0; bf16 passes: rounding)")
            rates = {}
            for run, clients in enumerate((1, 4, 16)):
                before = server.call("GET", "/v1/refact-lab/status")[1]
                rates[clients], total = throughput(server, clients, args.seconds, run)
                after = server.call("GET", "/v1/refact-lab/status")[1]

                def grew(part: str, key: str) -> int:
                    return after[part].get(key, 0) - before[part].get(key, 0)

                print(f"server, {clients:2d} clients  : {rates[clients]:7.1f} tokens/s total ({total} tokens in "
                      f"{args.seconds:.0f} s; {grew('counters', 'submitted')} requests, "
                      f"{grew('counters', 'joined')} of them ran their prompt's rest in a decode pass, "
                      f"{grew('speculative', 'shared')} passes where several rows drafted)")
        finally:
            server.stop()
            if plain is not None and plain.proc.poll() is None:
                plain.stop()
        # In a fresh process: torch's OpenMP threads serve the first thread that used them (here: generate's);
        # ops from any other thread (an engine's) pay a wake-up per op, about twice the time of every step here.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            slow, fast, stats = pool.submit(keystroke_replay, folder, args.dtype, tmp, args.keystrokes,
                                            args.threads, args.compile_decode).result()
        print(f"keystroke replay    : {len(fast)} keystrokes, FIM prompt up to {stats['prompt_tokens_last']} tokens, "
              f"{REPLAY_TOKENS} new tokens each")
        for label, times in (("without reuse", slow), ("with reuse", fast)):
            print(f"  {label:14s}    : p50 {1000 * statistics.median(times):7.1f} ms  p95 "
                  f"{1000 * percentile(times, 0.95):7.1f} ms  total {sum(times):6.2f} s")
        print(f"  prefix cache      : {stats['hits']} hits of {stats['lookups']} lookups, "
              f"{stats['reused_tokens']} of {stats['prompt_tokens']} prompt tokens reused, "
              f"{stats['entries']} prompts in {stats['used_mib']} MiB")
        print(f"  completions that differ: {stats['texts_differ']} (fp32 throughout: must be 0; with bf16 passes: "
              "rounding of a prompt computed in two parts, the kind of difference batching already makes); "
              f"passes in the bf16 copy: {stats['bf16_passes']}")
        speed_up = statistics.median(base) / statistics.median(lat)
        print(f"\nserver p50 at one client: {statistics.median(lat) / statistics.median(base):.2f} of generate's "
              "(goal <= 0.5)")
        print(f"16 clients / generate loop: {rates[16] / base_tps:.2f}x")
        print(f"speculation off: speed-up vs generate (p50, one client): "
              f"{statistics.median(base) / statistics.median(lat_plain):.2f}x")
        print(f"load average after: {os.getloadavg()[0]:.1f} (other work on this machine skews every number)")
        print(f"speed-up vs generate (p50, one client): {speed_up:.2f}x")
        print(f"keystroke replay speed-up: {sum(slow) / sum(fast):.2f}x")
        print(f"throughput 16 clients / 1 client: {rates[16] / rates[1]:.2f}x")


# ---- keystroke replay ------------------------------------------------------------------------------------------

REPLAY_TOKENS = 16


def replay_text(tokenize, room: int, keystrokes: int) -> tuple[str, str, str]:
    """(context, typed, suffix): textwrap.dedent's body typed after the file above it, the code after it as the
    suffix; the context starts at a line, as far back as `room` tokens allow for the whole final prompt."""
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    start = text.index("    # Look for the longest leading string")
    typed = text[start:start + keystrokes]
    suffix = text[start + keystrokes:start + keystrokes + 200]
    context = text[:start]
    while len(tokenize(context + typed + suffix)) > room:
        context = context[context.index("\n", 200) + 1:]
    return context, typed, suffix


def keystroke_replay(folder: str, dtype: str, tmp: Path, keystrokes: int, threads: int = 0,
                     compile_decode: str = "auto") -> tuple[list[float], list[float], dict]:
    """Per-keystroke latencies (without reuse, with reuse) of the same FIM requests, and the cache's stats.

    One engine serves both sides, its prefix cache swapped in and out between requests (the engine is idle then):
    two engines in one process would each drive their own OpenMP thread team, and the idle team's spinning
    threads take the cores from the busy one (that doubled every step's time on this 2-core machine)."""
    from refact_lab.home import Home
    from refact_lab.serve.engine import Engine, SamplingParams
    from refact_lab.serve.prefix_cache import PrefixCache

    if threads:
        import torch

        torch.set_num_threads(threads)
    home = Home.resolve(tmp / "replay").ensure()
    home.update_settings(model=folder, dtype=dtype)  # auto: as the server above chose (its bf16 copy included)
    engine = Engine(home, prefix_cache_mib=256, compile_decode=compile_decode).start().wait_ready(300)
    caches = [PrefixCache(0), engine.prefix_cache]
    try:
        route = engine.route(None)
        context, typed, suffix = replay_text(engine.encode, route.n_ctx - REPLAY_TOKENS - 8, keystrokes)
        params = SamplingParams(max_tokens=REPLAY_TOKENS)
        times: dict[int, list[float]] = {0: [], 1: []}
        differ = 0
        for k in range(1, len(typed) + 1):
            ids = engine.encode_fim(route.fim, context + typed[:k], suffix)
            texts = []
            for i, cache in enumerate(caches):  # one each in turn: both see the same machine load
                engine.prefix_cache = cache
                t = time.perf_counter()
                texts.append(engine.generate(list(ids), params)["text"])
                times[i].append(time.perf_counter() - t)
            differ += texts[0] != texts[1]
        stats = caches[1].stats()
        stats["prompt_tokens_last"] = len(ids)
        stats["texts_differ"] = differ
        stats["bf16_passes"] = (engine.snapshot()["bf16_twin"] or {}).get("passes", 0)
        return times[0], times[1], stats
    finally:
        engine.stop()


# ---- decode step probe: static cache + torch.compile ---------------------------------------------------------

def compile_probe(folder: str, dtype: str, batch_sizes=(1, 4), steps: int = 24) -> None:
    """The engine's decode step (dynamic cache, eager) against a preallocated cache with a compiled forward, on
    the same rows: ms per step, the compile time, and whether the greedy tokens agree. Not used by the engine
    (see the note it prints); kept so the numbers can be measured again."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache

    from refact_lab.serve.batch import Batch, new_cache

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    n_ctx = model.config.max_position_embeddings
    prompts = [tok(p).input_ids for p in code_prompts(max(batch_sizes), seed=3, max_chars=1500)]
    length = min(min(len(p) for p in prompts), n_ctx - steps - 1)

    class Row:
        def __init__(self, ids):
            self.prompt_ids, self.pos, self.last_token = ids, 0, 0

    def eager(rows):
        batch, out, times = Batch(), [], []
        logits = batch.prefill(model, rows)
        for _ in range(steps):
            nxt = logits.argmax(-1).tolist()
            out.append(nxt)
            for r, t in zip(batch.rows, nxt):
                r.last_token = t
            t0 = time.perf_counter()
            logits = batch.step(model)
            times.append(time.perf_counter() - t0)
        return out, times

    compiled = torch.compile(model.forward, dynamic=False)

    def static(rows):
        b = len(rows)
        cache = StaticCache(config=model.config, max_cache_len=n_ctx)
        ids = torch.tensor([r.prompt_ids for r in rows])
        pos = torch.arange(length)
        logits = model(input_ids=ids, position_ids=pos.expand(b, -1), cache_position=pos, use_cache=True,
                       past_key_values=cache, logits_to_keep=1).logits[:, -1]
        out, times = [], []
        for i in range(steps):
            nxt = logits.argmax(-1)
            out.append(nxt.tolist())
            t0 = time.perf_counter()
            p = torch.tensor([length + i])
            logits = compiled(input_ids=nxt[:, None], position_ids=p.expand(b, 1), cache_position=p,
                              use_cache=True, past_key_values=cache).logits[:, -1]
            times.append(time.perf_counter() - t0)
        return out, times

    print(f"decode step probe ({dtype}, prompt {length} tokens, {steps} steps):")
    with torch.inference_mode():
        for b in batch_sizes:
            rows = lambda: [Row(p[-length:]) for p in prompts[:b]]  # noqa: E731
            eager(rows())  # warm-up
            t0 = time.perf_counter()
            static(rows())  # compiles for this batch size
            warm = time.perf_counter() - t0
            a, ta = eager(rows())
            c, tc = static(rows())
            ratio = statistics.median(ta) / statistics.median(tc)
            print(f"  batch {b:2d}: eager dynamic cache {1000 * statistics.median(ta):6.2f} ms/step, static cache "
                  f"compiled {1000 * statistics.median(tc):6.2f} ms/step ({ratio:.2f}x), compile {warm:5.1f} s, "
                  f"greedy tokens equal: {a == c}")


# ---- GPU mode -------------------------------------------------------------------------------------------------

def qwen_like(dry_run: bool):
    from transformers import Qwen2Config

    if dry_run:
        return Qwen2Config(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                           tie_word_embeddings=True)
    # Qwen2.5-Coder-1.5B's shape (config.json on the hub)
    return Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)


def gpu_bench(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    prompt_len, new_tokens = (64, 8) if args.dry_run else (1024, 48)
    torch.manual_seed(0)
    config = qwen_like(args.dry_run)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(100, config.vocab_size - 100, (1, prompt_len), generator=gen).to(device)
    name = f"{'tiny dry-run' if args.dry_run else 'Qwen2.5-Coder-1.5B-shaped'} {str(dtype)[6:]} on {device}"
    print(f"{name}: prompt {prompt_len} tokens, {new_tokens} new tokens")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn, repeat=3):
        best = float("inf")
        for _ in range(repeat):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return best

    def run_generate(**kw):
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, **kw)

    def forward():
        with torch.inference_mode():
            model(ids)

    results = {}
    prefill = timed(forward)  # one forward over the prompt: the prefill every variant pays once
    run_generate()
    results["generate (dynamic cache)"] = timed(run_generate)
    try:
        # with a static cache on CUDA, transformers compiles the decode step itself (generation's auto-compile)
        kw = {"cache_implementation": "static"}
        run_generate(**kw)  # compiles on first use
        run_generate(**kw)
        results["generate (static cache, compiled decode)"] = timed(lambda: run_generate(**kw))
    except Exception as e:  # report rather than hide: compile support differs between versions
        print(f"static cache + compile failed: {type(e).__name__}: {e}")

    with tempfile.TemporaryDirectory() as tmp:
        plain, reused = engine_time(model, config, Path(tmp), ids, new_tokens, device, args.dry_run)
        results["our engine (batched, dynamic cache)"] = plain
        results["our engine, prompt + 1 token (prefix reused)"] = reused
    print(f"prefill of {prompt_len} tokens: {1000 * prefill:.1f} ms")
    for label, seconds in results.items():
        # with the prefix reused there is almost no prefill to take off
        decode = max(seconds - (0 if "reused" in label else prefill), 1e-9) / (new_tokens - 1)
        print(f"{label:44s}: {1000 * seconds / new_tokens:6.2f} ms per new token (total {1000 * seconds:7.1f} ms; "
              f"decode only ~{1000 * decode:5.2f} ms/token)")
    print("goal: under 5 ms per new token at one client; reading the weights once per token bounds it near 1 ms")


def engine_time(model, config, tmp: Path, ids, new_tokens: int, device: str, dry_run: bool) -> tuple[float, float]:
    """Our engine on the same weights: save them with a tokenizer that has FIM tokens, serve, time one request
    (seconds per `new_tokens`): the prompt computed in full (prefix reuse off, like generate), then prompts that
    add one token to the previous one (reuse on: the next keystroke)."""
    from refact_lab.home import Home
    from refact_lab.models.tokenizer_build import save_as_transformers, train_bpe_tokenizer
    from refact_lab.serve.engine import Engine, SamplingParams

    folder = tmp / "model"
    model.save_pretrained(folder)
    # any tokenizer works for timing: ids go in directly; the FIM tokens only let the registry accept the folder
    tok = train_bpe_tokenizer(["def f(x):\n    return x\n" * 50], vocab_size=300)
    save_as_transformers(tok, folder)
    home = Home.resolve(tmp / "home").ensure()
    home.update_settings(model=str(folder), device=device, dtype="fp32" if dry_run else "bf16")
    prompt = ids[0].tolist()
    params = SamplingParams(max_tokens=new_tokens)
    out = []
    for mib in (0, 256):
        engine = Engine(home, prefix_cache_mib=mib).start().wait_ready(600)
        engine.generate(prompt, params)  # warm-up
        best = float("inf")
        for i in range(3):
            t = time.perf_counter()
            done = engine.generate(prompt + [100 + i] * bool(mib), params)
            best = min(best, time.perf_counter() - t)
        engine.stop()
        if done["completion_tokens"] != new_tokens:
            print(f"(engine stopped after {done['completion_tokens']} tokens: a random model hit a stop token)")
        out.append(best * new_tokens / max(done["completion_tokens"], 1))
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30, help="sequential requests for the latency numbers")
    parser.add_argument("--seconds", type=float, default=12, help="duration of each throughput measurement")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for generate and for the server (default: torch's own choice)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                        help="the server's weights (auto: bf16 on a CPU with AMX / AVX512-BF16); generate matches it")
    parser.add_argument("--keystrokes", type=int, default=200, help="characters typed in the keystroke replay")
    parser.add_argument("--compile-decode", default="auto", choices=("auto", "on", "off"),
                        help="the server's --compile-decode (auto: on with a GPU only)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer requests, shorter throughput runs and replay (about a minute)")
    parser.add_argument("--compile-probe", action="store_true",
                        help="only measure the decode step: eager vs static cache + torch.compile (slow to compile)")
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark (Qwen2.5-Coder-1.5B shape, bf16)")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: tiny shapes on the CPU")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.seconds, args.keystrokes = min(args.requests, 10), min(args.seconds, 4), \
            min(args.keystrokes, 120)
    if args.compile_probe:
        import torch

        from refact_lab.models.loading import auto_dtype

        if args.threads:
            torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            folder, what = model_folder(Path(tmp))
            dtype = auto_dtype("cpu") if args.dtype == "auto" else {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
            print(f"model: {what}")
            compile_probe(folder, dtype)
        return
    gpu_bench(args) if args.gpu else cpu_bench(args)


if __name__ == "__main__":
    main()

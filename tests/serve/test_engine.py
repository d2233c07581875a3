"""The engine in-process: batching gives each request its own result, stop rules, failures stay contained."""

from __future__ import annotations

import queue
import threading

import pytest

from refact_lab.serve.engine import Engine, EngineError, Generation, SamplingParams
from refact_lab.serve.stops import StopRules
from tests.serve.conftest import cut_at_special


@pytest.fixture(scope="module")
def engine(tmp_path_factory, varied_model_dir):
    from refact_lab.home import Home

    home = Home.resolve(tmp_path_factory.mktemp("engine_home")).ensure()
    # fp32 and no loop guard: answers are compared with plain greedy generate in fp32
    home.update_settings(model=str(varied_model_dir), max_batch=4, dtype="fp32", loop_guard=False)
    eng = Engine(home, poll_interval=0.05).start().wait_ready(60)
    yield eng
    eng.stop()


def test_requests_joining_a_running_batch_get_their_own_greedy_text(engine, reference):
    prompts = ["a = 1\nb =", "def f(x):\n    return x *", "class Point:\n    def __init__(self, x, y):\n",
               "import json\n\ndata = json.loads(", "while i < 10:\n    i +=", "print('hello',"]
    results = {}

    def run(i):
        # staggered: later requests join while earlier ones decode, more requests than max_batch (4)
        threading.Event().wait(0.01 * i)
        results[i] = engine.generate(prompts[i], SamplingParams(max_tokens=6 + 3 * i))["text"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, p in enumerate(prompts):
        assert results[i] == cut_at_special(reference(p, 6 + 3 * i)), p


def test_stop_rules_hold_back_a_possible_stop_string():
    rules = StopRules(stop=("END",), single_line=False)
    assert rules.find("abc END x") == 4
    assert rules.safe_length("abc EN") == 4  # "EN" may become "END": not streamed yet
    assert rules.safe_length("abc E\ufffd") == 4  # incomplete UTF-8 is held back too
    assert StopRules(single_line=True).find("x = 1\ny") == 5
    assert StopRules(special_text=("<|endoftext|>",)).find("ok<|endoftext|>") == 2


def test_a_failing_request_does_not_take_the_engine_down(engine):
    events: queue.Queue = queue.Queue()
    bad = Generation([10**9], SamplingParams(max_tokens=3), events.put, route=engine.route(None))
    engine.submit(bad)
    ev = events.get(timeout=30)
    assert ev["type"] == "error" and "generation failed" in ev["message"]
    assert engine.generate("x = 1", SamplingParams(max_tokens=3))["finish_reason"] in ("stop", "length")
    assert engine.snapshot()["counters"]["errors"] >= 1


def test_unknown_model_and_cancel(engine):
    with pytest.raises(EngineError) as e:
        engine.route("nope")
    assert e.value.status == 404
    events: queue.Queue = queue.Queue()
    g = Generation(engine.encode("while True:\n    "), SamplingParams(max_tokens=900), events.put,
                   route=engine.route(None))
    engine.submit(g)
    assert events.get(timeout=30)["type"] == "text"
    g.cancel()
    while (ev := events.get(timeout=30))["type"] != "done":
        pass
    assert ev["finish_reason"] == "cancelled" and ev["completion_tokens"] < 900


def test_chat_content_that_spells_special_tokens_stays_text(engine, reference):
    """A pasted tokenizer source in a chat must not end the document (base-model transcript) or a turn (chat
    template): the template's own markers are special tokens, the messages' contents are text."""
    tok = reference.tokenizer
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    sep = tok.convert_tokens_to_ids("<|file_sep|>")
    pasted = 'EOT = "<|endoftext|>"  # and "<|file_sep|>"'
    ids, stops = engine.encode_chat([{"role": "user", "content": pasted}])
    assert eot not in ids and sep not in ids and stops == ("\nUser:", "\nSystem:")
    assert tok.decode(ids) == f"User: {pasted}\nAssistant:"

    # A chat model's template (turns end with <|file_sep|> here): its markers parse, the content does not.
    tok.chat_template = ("{% for m in messages %}<|repo_name|>{{ m['role'] }}\n{{ m['content'] }}<|file_sep|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|repo_name|>assistant\n{% endif %}")
    try:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": pasted}]
        ids = Engine._templated_chat_ids(tok, messages)
        assert ids.count(sep) == 2 and ids.count(tok.convert_tokens_to_ids("<|repo_name|>")) == 3
        assert eot not in ids
        assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # a template that rewrites the content (Llama 3 trims it) keeps its own rendering, parsed as a whole
        for rewrite in ("upper", "trim"):
            tok.chat_template = "{% for m in messages %}{{ m['content'] | " + rewrite + " }}<|file_sep|>{% endfor %}"
            ids = Engine._templated_chat_ids(tok, [{"role": "user", "content": " x "}])
            assert tok.decode(ids) == (" X " if rewrite == "upper" else "x") + "<|file_sep|>" and ids.count(sep) == 1
    finally:
        tok.chat_template = None


class CancelledWhileDropping(Generation):
    """A generation whose client cancels it while the engine is dropping another cancelled row of its batch:
    the flag turns true at the engine's second look at it after `other` was cancelled."""

    def __init__(self, *args, other: Generation, **kwargs):
        self.other, self._flag, self._looks = other, False, 0
        super().__init__(*args, **kwargs)

    @property
    def cancelled(self) -> bool:
        if self.other.cancelled and not self._flag:
            self._looks += 1
            self._flag = self._looks >= 2
        return self._flag

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        self._flag = value


def test_a_request_cancelled_between_two_steps_is_finished_and_counted(engine):
    before = engine.snapshot()["counters"]
    route = engine.route(None)
    ids = engine.encode("while True:\n    ")
    a_events, b_events = queue.Queue(), queue.Queue()
    a = Generation(ids, SamplingParams(max_tokens=900), a_events.put, route=route)
    b = CancelledWhileDropping(ids, SamplingParams(max_tokens=900), b_events.put, route=route, other=a)
    engine.submit(a)
    engine.submit(b)
    assert a_events.get(timeout=30)["type"] == "text" and b_events.get(timeout=30)["type"] == "text"
    a.cancel()
    for events in (a_events, b_events):
        while (ev := events.get(timeout=30))["type"] != "done":  # queue.Empty here: the request was lost
            pass
        assert ev["finish_reason"] == "cancelled"
    after = engine.snapshot()["counters"]
    assert after["finished"] - before.get("finished", 0) == 2
    assert after["finish_cancelled"] - before.get("finish_cancelled", 0) == 2
    assert after["submitted"] - before.get("submitted", 0) == 2

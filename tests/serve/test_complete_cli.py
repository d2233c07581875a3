"""`refact-lab complete`: one completion at a cursor in this process, with the base model or a LoRA checkpoint."""

from __future__ import annotations

import subprocess
import sys

from refact_lab.home import Home
from refact_lab.models.loading import MODEL_LOADING
from tests.serve.conftest import cut_at_special
from tests.serve.helpers import make_run


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "refact_lab.cli", "complete", *args], capture_output=True,
                          text=True, timeout=300)


def test_complete_with_the_base_model_and_a_lora(tmp_path, varied_model_dir, reference):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    home = Home.resolve(tmp_path / "home").ensure()
    # as the reference computes: fp32 (bf16 greedy answers may differ), no loop guard (plain greedy)
    home.update_settings(dtype="fp32", loop_guard=False)
    folders = make_run(home, "run-x", varied_model_dir, [3, 6], [1.0, 2.0], seed=9)
    prefix, suffix = "def mean(xs):\n    return ", "\n"
    fim = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"

    out = run_cli(prefix, "--suffix", suffix, "--home", str(home.root), "--model", str(varied_model_dir),
                  "--max-tokens", "10")
    assert out.returncode == 0, out.stderr
    assert out.stdout == cut_at_special(reference(fim, 10)) + "\n"
    assert "[tinycoder, " in out.stderr

    out = run_cli(prefix, "--suffix", suffix, "--home", str(home.root), "--model", str(varied_model_dir),
                  "--max-tokens", "10", "--lora", "run-x/step-000006")
    assert out.returncode == 0, out.stderr
    with MODEL_LOADING:
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(varied_model_dir), str(folders[1]))
    assert out.stdout == cut_at_special(reference(fim, 10, model_override=tuned.eval())) + "\n"
    assert "tinycoder:lora = run-x/step-000006" in out.stderr
    assert "lora" not in home.load_settings() and "model" not in home.load_settings()  # one-off: nothing saved


def test_complete_bad_input_exits_2(tmp_path, varied_model_dir):
    home = str(tmp_path / "home")
    out = run_cli("x", "--home", home, "--model", "no-such-model")
    assert out.returncode == 2 and "unknown model 'no-such-model'" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("x", "--home", home, "--model", str(varied_model_dir), "--lora", "run-nope")
    assert out.returncode == 2 and "no run 'run-nope'" in out.stderr
    out = run_cli("x", "--home", home, "--max-tokens", "0")
    assert out.returncode == 2 and "--max-tokens" in out.stderr
    Home.resolve(tmp_path / "home").update_settings(lora={"mode": "bestest"})
    out = run_cli("x", "--home", home, "--model", str(varied_model_dir))
    assert out.returncode == 2 and "settings.json" in out.stderr and "'bestest'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr

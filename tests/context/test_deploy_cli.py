"""`refact-lab deploy`: the Deploy panel's choices from the command line (LoRA checkpoint, repository context and
its budget), saved where a running server reads them, and what is now deployed printed."""

from __future__ import annotations

from refact_lab.cli import main
from refact_lab.home import atomic_write_json, read_json
from refact_lab.serve import state
from tests.serve.helpers import make_run


def deploy(capsys, home, *args) -> tuple[int, str, str]:
    code = main(["deploy", "--home", str(home.root), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_deploy_choices_are_saved_and_printed(home, tiny_model_dir, capsys):
    state.save(home, model=str(tiny_model_dir))   # a model that uses repository context: auto is on
    make_run(home, "run-a", tiny_model_dir, [10, 20], [1.5, 1.2])
    status = read_json(home.run_dir("run-a") / "status.json")
    atomic_write_json(home.run_dir("run-a") / "status.json", {**status, "project": "shop"})
    (home.projects_dir / "shop").mkdir(parents=True)

    code, out, _ = deploy(capsys, home, "--run", "run-a", "--checkpoint", "best")
    assert code == 0
    assert "run-a/step-000020" in out and "context:    shop (the deployed run's project)" in out
    assert state.load(home)[0].lora == state.LoraChoice("best", run_id="run-a")

    code, out, _ = deploy(capsys, home, "--run", "run-a", "--checkpoint", "step-000010", "--context", "off")
    assert code == 0 and "= run-a/step-000010" in out and "context:    off" in out
    choice = state.load(home)[0]
    assert choice.lora == state.LoraChoice("checkpoint", "run-a", "step-000010") and choice.context == "off"

    code, out, _ = deploy(capsys, home, "--checkpoint", "off", "--context", "shop", "--context-tokens", "300")
    assert code == 0 and "lora:       off" in out and "context:    shop, up to 300 tokens" in out
    assert home.load_settings()["context_tokens"] == 300

    code, out, _ = deploy(capsys, home)   # no option: prints only
    assert code == 0 and "shop, up to 300 tokens" in out


def test_bad_choices_exit_2_with_one_line(home, capsys):
    for args, words in [(["--context", "nope"], "no project 'nope'"),
                        (["--context-tokens", "-1"], "context_tokens"),
                        (["--checkpoint", "step-000010"], "give its --run"),
                        (["--run", "missing-run"], "missing-run")]:
        code, _, err = deploy(capsys, home, *args)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (args, err)


def test_auto_context_is_off_for_a_model_not_trained_to_use_it(home, capsys):
    """The embedded model's scoreboard falls with context on: auto leaves it off and says why; a project chosen
    explicitly still turns it on."""
    (home.projects_dir / "shop").mkdir(parents=True)
    code, out, _ = deploy(capsys, home)
    assert code == 0 and "context:    off" in out and "snippets of other files cost it more than they bring" in out
    code, out, _ = deploy(capsys, home, "--context", "shop")
    assert code == 0 and "context:    shop, up to" in out and "not trained" not in out

"""The memory estimate and the launch plan, without weights and without GPUs: parameter counts from configs,
the fit / switch-to-low-memory / refuse decision with its numbers, and the accelerate command a plan becomes."""

import json

import pytest

from refact_lab.config import FinetuneSettings, LaunchSettings, SettingsError
from refact_lab.finetune import memory, runs
from refact_lab.finetune.memory import (GIB, REFERENCE_SHAPES, Device, MemoryPlanError, check_fit, estimate,
                                        plan_launch, shape_from_config)
from tests.finetune.conftest import quick_settings


def _gpu(i, free_gib, total_gib=24.0):
    return Device(f"cuda:{i}", "Test GPU", int(free_gib * GIB), int(total_gib * GIB), i)


@pytest.mark.parametrize("model_type,extra", [("llama", {"tie_word_embeddings": False}),
                                              ("qwen2", {"tie_word_embeddings": True}),
                                              ("starcoder2", {"tie_word_embeddings": True})])
def test_parameter_counts_from_the_config_match_the_built_model(model_type, extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100, **extra)
    model = AutoModelForCausalLM.from_config(config)
    shape = shape_from_config(config.to_dict())
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    from peft import LoraConfig, get_peft_model

    targets = list(shape.linears())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    assert shape.lora_params(4, targets) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_a_7b_fits_a_24gb_gpu_only_in_low_memory_mode_and_34b_needs_fsdp():
    settings = FinetuneSettings(seq_len=1024, batch_size=8, micro_batch_size=1)
    qwen7 = estimate(REFERENCE_SHAPES["Qwen/Qwen2.5-Coder-7B"], settings)
    assert 14 * GIB < qwen7.weights < 15 * GIB                    # 7.6B parameters in bf16
    assert qwen7.activations_low_mem < qwen7.activations
    one_gpu = plan_launch(LaunchSettings(), [_gpu(0, 23.5)])
    decision = check_fit(qwen7, one_gpu, low_gpu_mem_mode=False)
    assert decision.low_gpu_mem_mode and "switched low_gpu_mem_mode on" in decision.message
    assert check_fit(qwen7, plan_launch(LaunchSettings(), [_gpu(0, 79, 80)]), False).low_gpu_mem_mode is False

    big = REFERENCE_SHAPES["codellama/CodeLlama-34b-hf"]
    with pytest.raises(MemoryPlanError, match=r"not enough memory: .* GiB .*cuda:0 has 23.5 GiB free"):
        check_fit(estimate(big, settings), one_gpu, False)
    four = plan_launch(LaunchSettings(fsdp=True), [_gpu(i, 23.5) for i in range(4)])
    sharded = estimate(big, settings, processes=4, fsdp=True)
    assert sharded.weights == estimate(big, settings).weights // 4
    assert check_fit(sharded, four, False).need <= 23.5 * GIB


def test_micro_batch_and_seq_len_drive_the_activations():
    shape = REFERENCE_SHAPES["Qwen/Qwen2.5-Coder-1.5B"]
    small = estimate(shape, FinetuneSettings(seq_len=512, batch_size=8, micro_batch_size=1))
    large = estimate(shape, FinetuneSettings(seq_len=1024, batch_size=8, micro_batch_size=4))
    assert large.tokens == 8 * small.tokens and large.activations > 4 * small.activations
    # batch_size is global: 2 processes each take half of it, so each needs less for the same micro batch auto
    whole = estimate(shape, FinetuneSettings(seq_len=512, batch_size=8))
    halves = estimate(shape, FinetuneSettings(seq_len=512, batch_size=8), processes=2)
    assert halves.tokens * 2 == whole.tokens


def test_cpu_processes_share_the_available_ram():
    shape = REFERENCE_SHAPES["Qwen/Qwen2.5-Coder-0.5B"]
    est = estimate(shape, FinetuneSettings(seq_len=256, batch_size=4), processes=2, cpu=True)
    ram = Device("cpu", "CPU", int(est.total(True) * 1.5), 64 * GIB)
    with pytest.raises(MemoryPlanError, match="2 processes share"):      # 0.75 of the need each
        check_fit(est, memory.LaunchPlan(2, True, (), False, (ram,)), False)
    assert check_fit(est, memory.LaunchPlan(1, True, (), False, (ram,)), True).low_gpu_mem_mode
    ram = Device("cpu", "CPU", int(est.total(False) * 2.5), 64 * GIB)
    assert check_fit(est, memory.LaunchPlan(2, True, (), False, (ram,)), False).low_gpu_mem_mode is False


def test_the_launch_plan_settles_auto_and_refuses_impossible_choices():
    two = [_gpu(0, 20), _gpu(1, 10)]
    assert plan_launch(LaunchSettings(), two).processes == 2
    assert plan_launch(LaunchSettings(gpus=[1]), two).gpus == (1,)
    assert plan_launch(LaunchSettings(cpu=True), two).cpu
    cpu_only = plan_launch(LaunchSettings(), [])
    assert cpu_only.cpu and cpu_only.processes == 1 and cpu_only.devices[0].name == "cpu"
    assert cpu_only.devices[0].total > 0                          # read from /proc/meminfo
    assert plan_launch(LaunchSettings(processes=2), []).processes == 2
    with pytest.raises(SettingsError, match="gpus: no GPU 3"):
        plan_launch(LaunchSettings(gpus=[3]), two)
    with pytest.raises(SettingsError, match="processes: 3 is more than the 2 GPUs"):
        plan_launch(LaunchSettings(processes=3), two)
    with pytest.raises(SettingsError, match="this machine has no GPU"):
        plan_launch(LaunchSettings(gpus=[0]), [])
    with pytest.raises(SettingsError, match="fsdp: needs GPUs"):
        plan_launch(LaunchSettings(fsdp=True), [])
    with pytest.raises(SettingsError, match="gpus: expected GPU ids"):
        LaunchSettings(gpus="0,x")


def test_launch_commands_for_gpus_and_fsdp(tmp_path):
    """FSDP cannot run on this CPU-only machine: what is checked here is the command accelerate receives."""
    cmd, env = runs._launch_command(tmp_path, 4, False, [0, 1, 2, 3], fsdp=True)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--multi_gpu" not in cmd
    args = " ".join(cmd)
    for flag in ("--use_fsdp", "--fsdp_sharding_strategy FULL_SHARD", "--fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP",
                 "--fsdp_use_orig_params true", "--num_processes 4"):
        assert flag in args
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and "ACCELERATE_USE_CPU" not in env
    # accelerate itself must accept every flag we pass (its parser, without launching anything)
    from accelerate.commands.launch import launch_command_parser

    parsed = launch_command_parser().parse_args(cmd[3:])
    assert parsed.use_fsdp and parsed.fsdp_sharding_strategy == "FULL_SHARD" and parsed.num_processes == 4
    cmd, env = runs._launch_command(tmp_path, 2, True)
    assert "--multi_gpu" in cmd and env["ACCELERATE_USE_CPU"] == "true"
    cmd, env = runs._launch_command(tmp_path, 1, False, [1])
    assert cmd[1:3] == ["-m", "refact_lab.finetune.worker"] and env["CUDA_VISIBLE_DEVICES"] == "1"


def test_a_run_that_cannot_fit_is_refused_and_one_that_fits_only_in_low_memory_mode_is_switched(
        home, stdlib_project, learnable_model_dir, monkeypatch, capsys):
    from refact_lab.cli import main

    model = str(learnable_model_dir)
    shape = memory.model_shape(model)
    settings = quick_settings()
    est = estimate(shape, runs.check_settings(model, settings), cpu=True)
    between = (est.total(True) + est.total(False)) // 2
    monkeypatch.setattr(memory, "cpu_device", lambda: Device("cpu", "CPU", between, 64 * GIB))
    run_id = runs.create_run(home, stdlib_project, model, settings)
    doc = json.loads((home.run_dir(run_id) / "settings.json").read_text())
    assert doc["finetune"]["low_gpu_mem_mode"] is True and doc["launch"]["memory"]["low_gpu_mem_mode"] is True
    assert "memory: switched low_gpu_mem_mode on" in runs.log_tail(home, run_id)
    assert "launch: 1 process on CPU (gloo)" in runs.log_tail(home, run_id)

    monkeypatch.setattr(memory, "cpu_device", lambda: Device("cpu", "CPU", 1024 ** 2, 64 * GIB))
    code = main(["finetune", "--home", str(home.root), "--project", stdlib_project, "--model", model,
                 "--set", "seq_len=128", "--set", "batch_size=4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not enough memory" in err[0] and "GiB" in err[0]
    assert [r["run_id"] for r in runs.list_runs(home)] == [run_id]        # nothing else was created

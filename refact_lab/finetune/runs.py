"""Runs: every fine-tuning run is a process of its own, with its whole state in `runs/<run_id>/`.

    settings.json        what to train (model, project, FinetuneSettings, how many processes)
    status.json          state (queued, running, finished, failed, stopped), step, total, ETA, error, best
    metrics.jsonl        one line per step ("train": loss, lr, tokens/s) and per evaluation ("test": test_loss),
                         starting with the test loss at step 0, before training
    log.txt              everything the run printed, tracebacks included
    checkpoints/step-NNNNNN/   adapter + settings.json + metrics.json (+ optimizer state in the latest)
    stop                 a flag file: the trainer checks it at every step boundary, saves and stops

A run is started detached (its own session, so it outlives the notebook kernel or the server that started it).
Who owns an active run is recorded from its creation on: the creating process's pid and start time when the
run folder is written, the launched process's once it is started, and the worker's own once it runs. Reading
a status checks those: a queued or running run none of whose owners is alive (killed before it was started,
or while it ran) is marked failed, its log kept, and can be resumed from its last checkpoint.

Panels and the CLI use `RunService`; the trainer never sees this module's files except through the sinks
defined here (STYLE.md points 4 and 6).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Sequence

from refact_lab.config import FinetuneSettings, LaunchSettings, SettingsError, from_dict
from refact_lab.finetune.checkpoints import latest_resumable, run_checkpoints
from refact_lab.finetune.checkpoints import best_name as _best_name
from refact_lab import job_status
from refact_lab.home import (Home, append_jsonl, atomic_write_json, atomic_write_text, file_lock, read_json,
                             read_json_object, read_jsonl)
from refact_lab.job_status import ACTIVE, RUN_OWNERS, STATES, STOP_FLAG, owner_fields  # noqa: F401 - re-exported

STATUS_WRITE_INTERVAL_S = 1.0
# A queued run that names no owner process at all (written by an older version) is failed after this long.
UNOWNED_QUEUED_GRACE_S = 120.0
# What `list_runs` says of a run folder whose status.json is missing or damaged (not a state a run is ever in):
# that run is listed with the reason as its error, and the other runs still list.
BROKEN = "broken"


class RunStateError(ValueError):
    """A run folder's status.json or settings.json is missing or damaged; the message names the file and what
    is wrong."""


# --- small helpers ---------------------------------------------------------------------------------------------

def _now() -> float:
    return time.time()


def _stamp() -> str:
    return _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def new_run_id(model_name: str = "") -> str:
    # ASCII only: a run id is a folder name that home.check_name accepts, and str.isalnum() also passes "é"
    # (a model in a folder named with accents would otherwise give a run id nothing can open)
    base = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "-"
                   for c in model_name.lower())[:24].strip("-._")
    when = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{base + '-' if base else ''}{when}-{secrets.token_hex(2)}"


# --- the run folder ----------------------------------------------------------------------------------------------

def run_dir(home: Home, run_id: str) -> Path:
    path = home.run_dir(run_id)
    if not (path / "settings.json").is_file():
        raise FileNotFoundError(f"no run {run_id!r} in {home.runs_dir}")
    return path


def read_run_settings(path: Path) -> dict:
    """The run's settings.json (what to train and how it is launched); RunStateError when it is damaged."""
    try:
        return read_json_object(Path(path) / "settings.json")
    except ValueError as e:
        raise RunStateError(str(e)) from None


def update_status(path: Path, **changes) -> dict:
    """Read-modify-write status.json under a lock (the run process and readers may both write)."""
    with file_lock(path / ".status.lock"):
        status = read_json(path / "status.json", {}) or {}
        status.update(changes)
        status["updated_at"] = _now()
        atomic_write_json(path / "status.json", status)
        return status


def append_log(path: Path, message: str) -> None:
    with open(path / "log.txt", "a", encoding="utf-8") as f:
        f.write(f"[{_stamp()}] {message}\n")


def one_line(error: BaseException) -> str:
    """An exception as the one line a user reads first (a settings error already names its field)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, KeyboardInterrupt):   # its bare name tells a user nothing
        return ("interrupted (Ctrl-C twice, SIGINT twice or a kernel interrupt) before the run could stop "
                "cleanly; resume continues from the last checkpoint")
    if isinstance(error, SettingsError):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def check_settings(model: str, settings: FinetuneSettings) -> FinetuneSettings:
    """Refuse settings that cannot work with this model, before a run exists: the settings with the sequence
    length the run will use. Raises ValueError (unknown model) or SettingsError (one line naming the field)."""
    from refact_lab.finetune.schedule import fit_to_model
    from refact_lab.models.registry import resolve

    if not isinstance(settings, FinetuneSettings):
        raise TypeError("settings must be a FinetuneSettings")
    return fit_to_model(settings, resolve(model).n_ctx)


def create_run(home: Home, project: str, model: str, settings: FinetuneSettings, *, num_processes: int = 1,
               cpu: bool = False, run_id: str | None = None, launch: LaunchSettings | None = None,
               gpus: list | None = None, init_adapter: str | None = None) -> str:
    """Check the inputs and write a queued run folder, owned by this process until it is started.

    `init_adapter`: an adapter folder whose weights the run starts from (update-and-retrain continues the
    deployed adapter); recorded in settings.json, the trainer's log says so.

    `launch` (else `num_processes` and `cpu`) says how the run is launched; it is settled on this machine
    (memory.plan_launch; `gpus` replaces the GPU listing, for tests) and the run's memory need is estimated
    against the free memory of its devices: a run that cannot fit is refused (MemoryPlanError, with the
    numbers), one that fits only with low_gpu_mem_mode gets it, and the run's log says which."""
    from refact_lab.finetune.dataset import accepted_path
    from refact_lab.models.registry import resolve

    check_settings(model, settings)
    spec = resolve(model)   # ValueError with a clear message for an unknown model
    if not accepted_path(home, project).is_file():
        raise FileNotFoundError(f"project {project!r} has no scanned dataset: run a scan first")
    if num_processes < 1:
        raise SettingsError("num_processes must be at least 1")
    launch_plan, decision, settings = plan_run(model, settings, launch or LaunchSettings(processes=num_processes,
                                                                                          cpu=cpu), gpus)
    home.ensure()
    run_id = run_id or new_run_id(spec.name)
    path = home.run_dir(run_id)
    if path.exists():
        raise FileExistsError(f"run {run_id!r} already exists")
    path.mkdir(parents=True)
    memory = None if decision is None else {"need_gib": round(decision.need / 2 ** 30, 2),
                                            "free_gib": round(decision.free / 2 ** 30, 2),
                                            "low_gpu_mem_mode": decision.low_gpu_mem_mode,
                                            "message": decision.message}
    # status.json before settings.json: a folder is a run once its settings.json exists (`run_dir`), and a
    # reader must never find a run without its status (that is a damaged run folder)
    atomic_write_json(path / "status.json", {
        "run_id": run_id, "state": "queued", "step": 0, "total": settings.train_steps, "eta_s": None,
        "error": None, "best": None, "last_checkpoint": None, "created_at": _now(),
        # the creator owns the queued run until a process is started for it: if the creator dies first,
        # readers see a queued run with no live owner and mark it failed (resumable)
        **owner_fields(),
        "updated_at": _now(), "model": spec.name, "project": project, "world_size": launch_plan.processes,
        "launch": launch_plan.describe()})
    atomic_write_json(path / "settings.json", {
        "run_id": run_id, "project": project, "model": model, "model_name": spec.name,
        "finetune": asdict(settings), "launch": {**launch_plan.to_dict(), "memory": memory},
        **({"init_adapter": str(init_adapter)} if init_adapter else {}), "created_at": _now()})
    (path / "log.txt").touch()
    append_log(path, f"launch: {launch_plan.describe()}; "
               + ", ".join(d.describe() for d in launch_plan.devices))
    append_log(path, memory_line(spec.source, decision))
    return run_id


def plan_run(model: str, settings: FinetuneSettings, launch: LaunchSettings, gpus: list | None = None):
    """How a run would launch here and whether it fits: (memory.LaunchPlan, memory.FitDecision or None, the
    settings it will use, low_gpu_mem_mode switched on when only that fits). Raises SettingsError (MemoryPlanError
    with the numbers when it cannot fit)."""
    from refact_lab.finetune.memory import memory_check, plan_launch
    from refact_lab.models.registry import resolve

    fitted = check_settings(model, settings)
    spec = resolve(model)
    launch_plan = plan_launch(launch, gpus)
    if settings.batch_size % launch_plan.processes:
        raise SettingsError(f"batch_size: {settings.batch_size} (the global batch) does not divide evenly over "
                            f"{launch_plan.processes} processes")
    decision = memory_check(spec.source, fitted, launch_plan, spec.lora_targets)
    if decision is not None and decision.low_gpu_mem_mode != settings.low_gpu_mem_mode:
        settings = replace(settings, low_gpu_mem_mode=decision.low_gpu_mem_mode)
    return launch_plan, decision, settings


def memory_line(source: str, decision) -> str:
    return decision.message if decision else \
        f"memory: no estimate (the config of {source} is not available here); starting anyway"


# accelerate's FSDP flags (1.x names; `accelerate launch --help`): full sharding of every decoder layer,
# original parameters kept so LoRA's trainable and frozen tensors can share a shard, full state dicts for
# the adapter checkpoints. Each process loads the model into CPU RAM (the trainer moves only shards to its
# GPU): rank-0-only loading would need meta-device loading the shared model loader does not do.
FSDP_FLAGS = ("--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
              "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_use_orig_params", "true",
              "--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false",
              "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_backward_prefetch", "BACKWARD_PRE")


def _launch_command(path: Path, num_processes: int, cpu: bool, gpus=(), fsdp: bool = False) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if gpus and not cpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    worker = ["-m", "refact_lab.finetune.worker", str(path)]
    if num_processes <= 1 and not fsdp:
        return [sys.executable, *worker], env
    import socket

    with socket.socket() as s:   # a free rendezvous port, so runs (and tests) never collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if cpu:
        # accelerate's --cpu launcher needs MPI for several processes; torchrun-style launching with this
        # variable gives the same gloo-backed multi-CPU setup
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", "1")
    mode = list(FSDP_FLAGS) if fsdp else ["--multi_gpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes",
            str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), *worker], env


def _claim(home: Home, run_id: str, resume: bool) -> None:
    """Under the start lock: refuse a run that is active (or, to resume, not stopped or failed)."""
    status = read_status(home, run_id)
    if resume and status["state"] not in ("stopped", "failed"):
        raise RuntimeError(f"run {run_id} is {status['state']}: only a stopped or failed run can be resumed")
    if status["state"] in ACTIVE and _owner_alive(status) and status.get("pid") != os.getpid():
        raise RuntimeError(f"run {run_id} is already {status['state']} (pid {status['pid']})")
    if resume:
        path = home.run_dir(run_id)
        job_status.clear_stop(path)
        ckpt = latest_resumable(path)
        append_log(path, f"resume requested: continuing from {ckpt.name if ckpt else 'the start (no checkpoint)'}")


def start_run(home: Home, run_id: str, *, resume: bool = False) -> subprocess.Popen:
    """Start the run's process, detached; record its pid. Returns the Popen (callers may keep it to reap it)."""
    path = run_dir(home, run_id)
    doc = read_run_settings(path)
    launch = doc.get("launch") or {}
    cmd, env = _launch_command(path, int(launch.get("processes") or launch.get("num_processes") or 1),
                               bool(launch.get("cpu")), launch.get("gpus") or (), bool(launch.get("fsdp")))
    with file_lock(path / ".start.lock"):
        _claim(home, run_id, resume)
        _own(path)    # queued and owned by this process until the child's pid is known
        try:
            with open(path / "log.txt", "a", encoding="utf-8") as log:
                log.write(f"[{_stamp()}] starting: {' '.join(cmd)}\n")
                log.flush()
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=str(path), env=env, start_new_session=True, close_fds=True)
        except Exception as e:
            # this process now owns the run and may live on (a server, a kernel): left queued, the run would
            # neither start nor read as failed, and could not be resumed
            _fail_start(path, e)
            raise
        # only the owner changes: the child may already have written "running"
        update_status(path, **owner_fields(proc.pid))
    return proc


def _fail_start(path: Path, error: BaseException) -> None:
    update_status(path, state="failed", error=f"could not start: {one_line(error)}", finished_at=_now())
    append_log(path, f"could not start: {one_line(error)}")


def _own(path: Path) -> None:
    """Mark the run queued and owned by this process, forgetting the previous attempt's processes and end."""
    update_status(path, state="queued", **owner_fields(), worker_pid=None, worker_started=None, error=None, finished_at=None, stop_reason=None)


def stop_run(home: Home, run_id: str) -> dict:
    """Ask a run to stop: it saves a checkpoint at the next step boundary and ends as "stopped"."""
    path = run_dir(home, run_id)
    status = read_status(home, run_id)
    if status["state"] not in ACTIVE:
        raise RuntimeError(f"run {run_id} is {status['state']}, not running")
    request_stop(path)
    return status


def request_stop(path: Path) -> None:
    """Write the stop flag that the trainer checks at every step boundary."""
    job_status.request_stop(path)


def resume_run(home: Home, run_id: str, *, detach: bool = True) -> subprocess.Popen | None:
    """Continue a stopped or failed run from its latest checkpoint (from the start if it has none).

    Detached: starts the run's process and returns it. Otherwise the run is claimed for this process (queued,
    owned by it) and the caller trains it in the foreground with `execute_run`."""
    if detach:
        return start_run(home, run_id, resume=True)
    path = run_dir(home, run_id)
    with file_lock(path / ".start.lock"):
        _claim(home, run_id, resume=True)
        _own(path)
    return None


def _owner_alive(status: dict) -> bool:
    """Whether a process that owns the run is alive: its creator or launcher (pid), or the worker training it."""
    return job_status.owner_alive(status, RUN_OWNERS)


def _orphaned(status: dict) -> bool:
    if job_status.has_owner(status, RUN_OWNERS):
        return job_status.orphaned(status, RUN_OWNERS)
    # no owner recorded at all (a run folder from an older version): failed once it has waited too long
    return status.get("state") == "queued" and _now() - float(status.get("created_at") or 0) > UNOWNED_QUEUED_GRACE_S


def _status_problem(status) -> str | None:
    """What is wrong with a parsed run status.json (job_status.status_problem, and the best checkpoint's record);
    None when the fields readers use are sound."""
    problem = job_status.status_problem(status, ("step", "total", "created_at"))
    if problem:
        return problem
    best = status.get("best")
    loss = best.get("test_loss") if isinstance(best, dict) else None
    if best is not None and not (isinstance(best, dict) and isinstance(best.get("checkpoint"), str)
                                 and (loss is None or isinstance(loss, (int, float)) and not isinstance(loss, bool))):
        return f"best: expected an object with a checkpoint name (and a test_loss number), got {json.dumps(best)[:60]}"
    return None


def _load_status(path: Path) -> dict:
    """The run's status.json with the defaults of a run nothing has started yet; RunStateError naming the file
    when it is missing or damaged."""
    file = path / "status.json"
    if not file.exists():
        raise RunStateError(f"{file} is missing")
    try:
        status = read_json(file)
    except ValueError as e:
        raise RunStateError(str(e)) from None
    problem = _status_problem(status)
    if problem:
        raise RunStateError(f"{file} is damaged: {problem}")
    status.setdefault("run_id", path.name)
    status.setdefault("state", "queued")
    return status


def _broken(run_id: str, error: RunStateError) -> dict:
    """The status a damaged run folder reads as: BROKEN, with the reason as its error."""
    return {"run_id": run_id, "state": BROKEN, "error": str(error)}


def read_status(home: Home, run_id: str) -> dict:
    """status.json, after checking that an active run still has a live owner process (else it is marked failed).
    Raises RunStateError when it is missing or damaged."""
    path = run_dir(home, run_id)
    status = _load_status(path)
    if _orphaned(status):
        with file_lock(path / ".status.lock"):
            again = _load_status(path)
            # re-check under the lock: the process may have written its final state (or a new owner) meanwhile
            if _orphaned(again):
                who = again.get("worker_pid") or again.get("pid")
                if again.get("state") == "queued":
                    error = (f"the run's owner process{f' (pid {who})' if who else ''} ended before the run "
                             "started (killed or crashed); resume starts it")
                else:
                    error = (f"the run process (pid {who}) ended without finishing (killed or crashed) at step "
                             f"{again.get('step', 0)}; see the log. Resume continues from the last checkpoint.")
                again.update(state="failed", error=error, finished_at=_now(), updated_at=_now(), eta_s=None)
                atomic_write_json(path / "status.json", again)
                append_log(path, error)
            status = again
    return status


def list_runs(home: Home) -> list[dict]:
    """Every run's status, newest first."""
    if not home.runs_dir.is_dir():
        return []
    out = []
    for path in home.runs_dir.iterdir():
        if (path / "settings.json").is_file():
            try:
                out.append(read_status(home, path.name))
            except RunStateError as e:
                # one damaged run folder is listed as broken, with why; the other runs still list and work
                out.append(_broken(path.name, e))
            except (ValueError, FileNotFoundError):
                continue   # not a run id (a stray folder), or a run folder deleted while we looked
    return sorted(out, key=lambda s: s.get("created_at") or 0, reverse=True)


def read_metrics(home: Home, run_id: str) -> list[dict]:
    return read_jsonl(run_dir(home, run_id) / "metrics.jsonl")


def list_checkpoints(home: Home, run_id: str) -> list[dict]:
    """Checkpoints with step, test loss and whether each is the best (lowest test loss)."""
    path = run_dir(home, run_id)
    cks = run_checkpoints(path, run_id)
    try:
        status = read_json(path / "status.json", {})
    except ValueError:   # a broken run (listed as such with its reason): its checkpoints are still listed
        status = {}
    best = _best_name(status if isinstance(status, dict) else {}, cks)
    return [{"name": c.name, "path": str(c.path), "step": c.step, "test_loss": c.test_loss,
             "train_loss": c.train_loss, "best": c.name == best} for c in cks]


def log_tail(home: Home, run_id: str, lines: int = 40) -> str:
    try:
        text = (run_dir(home, run_id) / "log.txt").read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- what the run process does -------------------------------------------------------------------------------

class MetricsFileSink:
    """Train and test records to metrics.jsonl. When training (re)starts it first drops the records past the
    checkpoint it starts from, so the curve has no duplicate or orphan points from steps trained again."""

    def __init__(self, path: Path):
        self.file = path / "metrics.jsonl"

    def __call__(self, record: dict) -> None:
        kind = record.get("kind")
        if kind == "start" and self.file.exists():
            # resumed from step K: steps up to K stand; a fresh start (an out-of-memory retry) keeps nothing
            resumed = record.get("resumed_from")
            keep = [r for r in read_jsonl(self.file) if resumed is not None and r.get("step", 0) <= resumed]
            atomic_write_text(self.file, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
        elif kind in ("train", "test"):
            append_jsonl(self.file, {k: v for k, v in record.items() if k not in ("schedule",)})


class StatusSink:
    """Progress into status.json (step, total, ETA, losses, best, last checkpoint), at most once a second for
    step records so a fast run is not slowed by fsyncs."""

    def __init__(self, path: Path):
        self.path = path
        self._last_write = 0.0

    def __call__(self, record: dict) -> None:
        kind = record.get("kind")
        if kind == "start":
            update_status(self.path, state="running", step=record["step"], total=record["total"],
                          schedule=record["schedule"], plan=record["plan"], world_size=record["world_size"],
                          low_gpu_mem_mode=record["low_gpu_mem_mode"])
        elif kind == "train":
            if _now() - self._last_write >= STATUS_WRITE_INTERVAL_S or record["step"] >= record["total"]:
                update_status(self.path, step=record["step"], total=record["total"], eta_s=record["eta_s"],
                              train_loss=record["loss"], tokens_per_s=record["tokens_per_s"], lr=record["lr"])
                self._last_write = _now()
        elif kind == "test":
            update_status(self.path, step=record["step"], test_loss=record["test_loss"])
        elif kind == "checkpoint":
            update_status(self.path, step=record["step"], last_checkpoint=record["checkpoint"], best=record["best"])
        elif kind == "info":
            status = read_json(self.path / "status.json", {}) or {}
            update_status(self.path, notes=[*(status.get("notes") or []), record["message"]],
                          **({"low_gpu_mem_mode": True} if record.get("low_gpu_mem_mode") else {}))


def execute_run(path: Path, *, log: Callable[[str], None] | None = None, extra_sinks: Sequence = (),
                pid: int | None = None):
    """Train the run in `path` in this process (the worker's body; the CLI calls it in the foreground).

    Returns the FitResult, or None when the run failed (status "failed", the traceback in log.txt).
    In a multi-process launch every process calls this; only rank 0 writes status and metrics.
    """
    from refact_lab.finetune.dataset import load_dataset
    from refact_lab.finetune.trainer import fit

    path = Path(path).resolve()
    is_main = int(os.environ.get("RANK", "0")) == 0
    home = Home(path.parent.parent)

    def default_log(message: str) -> None:
        print(f"[{_stamp()}] {message}", flush=True)

    log = log or default_log
    if is_main:
        changes = {"state": "running", **owner_fields(keys=RUN_OWNERS[1]), "started_at": _now(), "error": None, "finished_at": None, "stop_reason": None}
        if pid is not None:  # in the foreground (CLI) the run's process is this one
            changes.update(owner_fields(pid))
        update_status(path, **changes)
    try:
        doc = read_run_settings(path)   # in here: a damaged one fails the run with the reason, as any failure
        settings = from_dict(FinetuneSettings, doc.get("finetune") or {})
        dataset = load_dataset(home, doc["project"])
        sinks = [MetricsFileSink(path), StatusSink(path), *extra_sinks] if is_main else []
        result = fit(doc["model"], dataset, settings, path, sinks=sinks, should_stop=lambda: job_status.stop_requested(path),
                     log=log, extra_record={"run_id": doc.get("run_id"), "project": doc.get("project")},
                     init_adapter=doc.get("init_adapter"))
    except BaseException as e:  # noqa: BLE001 - a failed run must say why, whatever it was
        if is_main:
            error = one_line(e)
            if int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(
                    word in error for word in ("closed by peer", "Connection reset", "DistBackendError")):
                # gloo / NCCL name the socket, not the reason: a peer process died (the launcher's lines follow)
                error = ("another training process of this run ended (killed or crashed); see the log. Resume "
                         f"continues from the last checkpoint. ({error[:160]})")
            # the reason first, on one line; the traceback (for whoever debugs it) below
            log(f"run failed: {error}")
            if not isinstance(e, SettingsError):
                log("traceback of the failure:\n" + traceback.format_exc())
            update_status(path, state="failed", error=error, finished_at=_now(), eta_s=None)
        if isinstance(e, KeyboardInterrupt):
            raise
        return None
    if is_main:
        job_status.clear_stop(path)
        update_status(path, state=result.state, step=result.step, total=result.total, best=result.best,
                      early_stopped=result.early_stopped, stop_reason=result.stop_reason,
                      eta_s=0 if result.state == "finished" else None,
                      finished_at=_now(), low_gpu_mem_mode=result.low_gpu_mem_mode,
                      **({"last_checkpoint": result.last_checkpoint} if result.last_checkpoint else {}))
        best = result.best
        log(f"run {result.state} at step {result.step}/{result.total}"
            + (f" ({result.stop_reason})" if result.stop_reason else "")
            + (f"; best checkpoint {best['checkpoint']} (test loss {best['test_loss']:.4f})" if best else ""))
    return result


def install_stop_on_signal(path: Path, signals=(signal.SIGTERM, signal.SIGINT)) -> None:
    """Turn a signal into a clean stop: the flag file is written and the trainer stops at the next step.
    SIGINT (`kill -INT`, Ctrl-C where the run shares a terminal) stops cleanly the first time, as Ctrl-C does
    in the foreground CLI; a second one interrupts at once (the run then fails, resumable)."""
    def handler(signum, frame):
        request_stop(path)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in signals:
        signal.signal(sig, handler)


def preview(home: Home, project: str, model: str, settings: FinetuneSettings, *, tokenizer=None,
            processes: int = 1) -> dict:
    """The numbers a run would use, before it starts: the schedule with "auto" resolved, and the data plan."""
    from refact_lab.finetune.dataset import load_dataset
    from refact_lab.finetune.trainer import plan
    from refact_lab.models.loading import load_tokenizer
    from refact_lab.models.registry import resolve

    spec = resolve(model)
    dataset = load_dataset(home, project)
    the_plan = plan(dataset, tokenizer or load_tokenizer(spec), spec, settings, processes)
    return {"schedule": the_plan.schedule.to_dict(), "explanation": the_plan.schedule.explanation,
            "summary": the_plan.summary, "dataset": dataset.summary(), "notes": list(dataset.notes),
            "train_tokens": the_plan.schedule.train_tokens}


# Only these settings change what the data becomes; the others change just the schedule, which is cheap.
_DATA_SETTINGS = ("seq_len", "fim_rate", "context_rate", "seed", "max_test_rows")


# --- the service panels and the CLI use ------------------------------------------------------------------------

class RunService:
    """Runs of one state directory: start, stop, resume, and read what they wrote.

    Holds the Popen handles of the runs it started, only to reap them; every fact comes from the run folders,
    so a new service (a reloaded page, a restarted server) sees exactly the same runs.
    """

    def __init__(self, home: Home | str | None = None):
        self.home = home if isinstance(home, Home) else Home.resolve(home).ensure()
        self._procs: dict[str, subprocess.Popen] = {}
        self._tokenizers: dict[str, object] = {}
        self._previews: dict[tuple, dict] = {}

    # choices for the form
    def models(self) -> list[str]:
        from refact_lab.models.registry import KNOWN_MODELS

        names = list(KNOWN_MODELS)
        from refact_lab.serve.state import active_model

        try:
            active = active_model(self.home)
        except SettingsError:
            return names   # a damaged settings.json: the form still offers the known models (serving reports it)
        if active and active not in names:
            names.insert(0, active)
        return names

    def datasets(self) -> list[str]:
        from refact_lab.finetune.dataset import available_projects

        return available_projects(self.home)

    def default_settings(self) -> FinetuneSettings:
        return FinetuneSettings()

    def preview(self, project: str, model: str, settings: FinetuneSettings, processes: int = 1) -> dict:
        """`preview`, remembering the tokenized dataset: a form edit that only touches the schedule (batch
        size, epochs, steps) is answered without tokenizing the dataset again."""
        from refact_lab.finetune.dataset import accepted_path
        from refact_lab.finetune.schedule import resolve as resolve_schedule
        from refact_lab.models.loading import load_tokenizer
        from refact_lab.models.registry import resolve

        spec = resolve(model)
        accepted = accepted_path(self.home, project)
        stamp = accepted.stat().st_mtime_ns if accepted.is_file() else None
        key = (project, spec.source, stamp, *(getattr(settings, name) for name in _DATA_SETTINGS))
        cached = self._previews.get(key)
        if cached is None:
            if spec.source not in self._tokenizers:  # loading a tokenizer takes a while; previews repeat
                self._tokenizers[spec.source] = load_tokenizer(spec)
            cached = preview(self.home, project, model, settings, tokenizer=self._tokenizers[spec.source])
            self._previews = {key: cached}          # one dataset at a time is enough for a form
        schedule = resolve_schedule(settings, cached["train_tokens"], spec.n_ctx, processes)
        return {**cached, "schedule": schedule.to_dict(), "explanation": schedule.explanation}

    # lifecycle
    def devices(self) -> list:
        """The GPUs a run can train on, with their free memory (memory.Device); [] on a CPU-only machine."""
        from refact_lab.finetune.memory import gpu_devices

        return gpu_devices()

    def launch_preview(self, model: str, settings: FinetuneSettings, launch: LaunchSettings,
                       gpus: list | None = None) -> str:
        """One line: how a run with these settings would launch here and its memory estimate against free
        memory. Raises SettingsError (MemoryPlanError with the numbers when it cannot fit)."""
        from refact_lab.models.registry import resolve

        launch_plan, decision, _ = plan_run(model, settings, launch, gpus)
        return f"{launch_plan.describe()}; {memory_line(resolve(model).source, decision)}"

    def start(self, project: str, model: str, settings: FinetuneSettings, *, num_processes: int = 1,
              cpu: bool = False, launch: LaunchSettings | None = None) -> str:
        run_id = create_run(self.home, project, model, settings, num_processes=num_processes, cpu=cpu,
                            launch=launch)
        try:
            self._procs[run_id] = start_run(self.home, run_id)
        except Exception as e:
            # this process owns the queued run and stays alive: it must not stay queued (start_run has failed it
            # already when the process itself could not be started)
            path = self.home.run_dir(run_id)
            if (read_json(path / "status.json", {}) or {}).get("state") == "queued":
                _fail_start(path, e)
            raise
        return run_id

    def stop(self, run_id: str) -> dict:
        return stop_run(self.home, run_id)

    def resume(self, run_id: str) -> None:
        self._procs[run_id] = resume_run(self.home, run_id)

    def wait(self, run_id: str, timeout: float = 600, states: Sequence[str] = ("finished", "failed", "stopped"),
             poll_s: float = 0.3) -> dict:
        """Block until the run reaches one of `states` (for notebooks and tests)."""
        deadline = time.time() + timeout
        while True:
            proc = self._procs.get(run_id)
            if proc is not None:
                proc.poll()
            status = self.status(run_id)
            if status["state"] in states:
                return status
            if time.time() > deadline:
                raise TimeoutError(f"run {run_id} still {status['state']} after {timeout}s:\n"
                                   + self.log_tail(run_id, 20))
            time.sleep(poll_s)

    # reading
    def status(self, run_id: str) -> dict:
        """The run's status; a damaged run folder reads as BROKEN with the reason as its error, as `runs` lists it
        (a panel shows it and goes on)."""
        proc = self._procs.get(run_id)
        if proc is not None:
            proc.poll()
        try:
            return read_status(self.home, run_id)
        except RunStateError as e:
            return _broken(run_id, e)

    def runs(self) -> list[dict]:
        for proc in self._procs.values():
            proc.poll()
        return list_runs(self.home)

    def metrics(self, run_id: str) -> list[dict]:
        return read_metrics(self.home, run_id)

    def checkpoints(self, run_id: str) -> list[dict]:
        return list_checkpoints(self.home, run_id)

    def log_tail(self, run_id: str, lines: int = 40) -> str:
        return log_tail(self.home, run_id, lines)

    def settings(self, run_id: str) -> dict:
        return read_run_settings(run_dir(self.home, run_id))

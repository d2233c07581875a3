"""The `refact-lab` command line: serve | host | scan | finetune | resume | runs | complete | eval | deploy | update |
export.

Each subcommand parses its flags, builds the same settings dataclass the UI uses, and calls a service.
Heavy imports (torch, jupyter_server) happen inside the handlers so `refact-lab --help` is instant.
Exit codes: 0 success, 1 failure while working, 2 bad input (argument, source, setting).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys

from refact_lab import __version__
from refact_lab.config import SettingsError

EXIT_BAD_INPUT = 2
# serving settings `serve` takes as flags and remembers in settings.json, like --model
SERVE_REMEMBERED = ("device", "dtype", "max_batch")
SERVE_OPTIONS = ("prefix_cache_mib", "speculative_tokens")   # the engine's options for this start only (not saved)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"refact-lab: error: {message}", file=sys.stderr)
    return code


# --- serve -----------------------------------------------------------------------------------------------

def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="start the workbench: the app, JupyterLab and the inference API on one port")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8008, help="port (default 8008)")
    p.add_argument("--home", help="state directory (default $REFACT_LAB_HOME or ~/.refact_lab)")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", help="API and login token (default: $REFACT_LAB_TOKEN, else generated)")
    auth.add_argument("--no-auth", action="store_true", help="no token (only on a loopback address)")
    p.add_argument("--model", action="append",
                   help="model to host: registry name, hub id or local folder (remembered). Repeat it to host "
                        "several at once: the first is the completion default, the others are hosted beside it "
                        "(they replace the hosting list; `refact-lab host` edits it while the server runs)")
    from refact_lab.config import ServeSettings, field_specs

    specs = {f["name"]: f for f in field_specs(ServeSettings)}
    for name in SERVE_REMEMBERED:
        spec = specs[name]
        p.add_argument(f"--{name.replace('_', '-')}", type=spec["type"] if spec["type"] in (int, str) else str,
                       choices=spec.get("choices"), help=f"{spec['help']} (remembered)")
    for name in SERVE_OPTIONS:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=specs[name]["help"])
    p.add_argument("--compile-decode", choices=specs["compile_decode"]["choices"],
                   help=specs["compile_decode"]["help"])
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args) -> int:
    from refact_lab.config import ServeSettings

    given = {k: getattr(args, k) for k in SERVE_REMEMBERED if getattr(args, k) is not None}
    models = args.model or []
    try:
        settings = ServeSettings(host=args.host, port=args.port, home=args.home,
                                 token=None if args.no_auth else (args.token or os.environ.get("REFACT_LAB_TOKEN")),
                                 no_auth=args.no_auth, model=models[0] if models else None, **given,
                                 **{k: getattr(args, k) for k in (*SERVE_OPTIONS, "compile_decode")
                                    if getattr(args, k) is not None})
        hosted = _hosted_from_flags(models, given) if len(models) > 1 else None
    except (SettingsError, ValueError) as e:
        return _fail(str(e))
    from refact_lab.serve.server import run_server

    return run_server(settings, remember=given, hosted=hosted)


def _hosted_from_flags(models: list[str], given: dict) -> list:
    """The models after the first --model as hosting list entries, named as the registry names them (the first
    is entry one, the server's first model)."""
    from refact_lab.models.registry import resolve
    from refact_lab.serve.state import HostedModel

    entries, names = [], {resolve(models[0]).name}
    for model in models[1:]:
        name = resolve(model).name
        if name in names:
            raise ValueError(f"--model {model}: the model {name!r} is given twice")
        names.add(name)
        entries.append(HostedModel(name=name, model=model, dtype=given.get("dtype", "auto"),
                                   max_batch=given.get("max_batch", 16)))
    return entries


# --- host ------------------------------------------------------------------------------------------------

def _add_host(sub) -> None:
    import dataclasses

    from refact_lab.serve.state import ROLES, HostedModel

    p = sub.add_parser("host", help="the models a server hosts at once: list, add, remove, role, load, unload",
                       description="Edits the hosting list in the state directory's settings.json; a running "
                                   "server applies a change within a second, without a restart (a removed model "
                                   "finishes its in-flight requests first). Entry one is the server's first model "
                                   "(`serve --model`).")
    hsub = p.add_subparsers(dest="host_command", metavar="ACTION")
    specs = {f.name: f.metadata for f in dataclasses.fields(HostedModel)}

    def common(q):
        q.add_argument("--home", help="state directory (default $REFACT_LAB_HOME or ~/.refact_lab)")
        q.add_argument("--url", help="the running server, for live state (default $REFACT_LAB_URL)")
        q.add_argument("--token", help="its token (default $REFACT_LAB_TOKEN)")

    q = hsub.add_parser("list", help="the hosting list with each model's state, placement and memory")
    common(q)
    q.add_argument("--json", action="store_true", help="print JSON")
    q = hsub.add_parser("add", help="host another model beside the first")
    common(q)
    q.add_argument("model", help=specs["model"]["help"])
    q.add_argument("--name", help=specs["name"]["help"] + " (default: the model's registry name)")
    q.add_argument("--placement", default="auto", help=specs["placement"]["help"])
    q.add_argument("--dtype", default="auto", choices=specs["dtype"]["choices"], help=specs["dtype"]["help"])
    q.add_argument("--role", default="none", choices=ROLES, help=specs["role"]["help"])
    q.add_argument("--memory-share", type=float, default=1.0, help=specs["memory_share"]["help"])
    q.add_argument("--max-batch", type=int, help=specs["max_batch"]["help"])
    q.add_argument("--no-memory-check", action="store_true", help="save it even if the memory plan says it "
                                                                   "does not fit now")
    q.add_argument("--wait", action="store_true", help="wait until the server has loaded it (needs --url)")
    q = hsub.add_parser("role", help="make a hosted model the completion or chat default (no reload)")
    common(q)
    q.add_argument("name", help="the hosted model's name")
    q.add_argument("role", choices=ROLES, help=specs["role"]["help"])
    for action, text in (("remove", "stop hosting a model (its in-flight requests finish first)"),
                         ("load", "load an unloaded model again"),
                         ("unload", "free a model's memory, keeping it in the list")):
        q = hsub.add_parser(action, help=text)
        common(q)
        q.add_argument("name", help="the hosted model's name")
    p.set_defaults(handler=_cmd_host)


def _cmd_host(args) -> int:
    import json

    from refact_lab.home import Home
    from refact_lab.serve import state
    from refact_lab.serve.client import HttpInference, LocalInference
    from refact_lab.serve.hosting import HostingService

    if not args.host_command:
        return _fail("host: say what to do: list, add, remove, role, load or unload")
    home = Home.resolve(args.home).ensure()
    state.load_checked(home)   # a damaged settings.json: one line naming it, before anything is shown or saved
    url = args.url or os.environ.get("REFACT_LAB_URL")
    inference = HttpInference(url, args.token or os.environ.get("REFACT_LAB_TOKEN", ""), timeout=10) if url \
        else LocalInference(home)  # not started: without a server, the list shows what settings.json says
    service = HostingService(home, inference=inference)
    if args.host_command == "list":
        rows = service.hosted()
        if args.json:
            print(json.dumps(rows, sort_keys=True))
            return 0
        for r in rows:
            mem = f"{r['weights_mb']:.0f} MiB" if r.get("weights_mb") else "-"
            print(f"{r['name']:<28} {r.get('state', '?'):<9} {r['placement']:<12} {r['dtype']:<5} "
                  f"role={r['role']:<10} weights={mem:<9} {r['model']}"
                  + (f"  ({r['error']})" if r.get("error") else ""))
        return 0
    if args.host_command == "add":
        entry = service.add_hosted(args.model, args.name, args.placement, args.dtype, args.role, args.memory_share,
                                   args.max_batch, check_memory=not args.no_memory_check)
        print(f"hosting {entry['name']} ({entry['model']} on {entry['placement']}, role {entry['role']})")
        if args.wait and url:
            row = service.wait_hosted(entry["name"])
            print(f"{entry['name']}: {row.get('state')}" + (f" ({row['error']})" if row.get("error") else ""))
            return 0 if row.get("state") == "ready" else 1
        return 0
    if args.host_command == "role":
        entry = service.set_role(args.name, args.role)
        print(f"{entry['name']}: role {entry['role']}")
        return 0
    if args.host_command == "remove":
        service.remove_hosted(args.name)
        print(f"{args.name} removed; the server stops it once its in-flight requests finish")
        return 0
    entry = service.set_loaded(args.name, args.host_command == "load")
    print(f"{entry['name']}: {'loading' if entry['loaded'] else 'unloaded'}")
    return 0


# --- scan ------------------------------------------------------------------------------------------------

def _add_scan(sub) -> None:
    p = sub.add_parser(
        "scan", help="add sources and filter them into a train/test dataset",
        description="Add (or refresh) the given sources in the project, then scan all of the project's sources: "
                    "every file is accepted or rejected with a reason, and the accepted ones are split into "
                    "train and test. Logs go to <home>/projects/<project>/scan/. A token for private https "
                    "repositories is read from $REFACT_LAB_GIT_TOKEN.")
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="git URL (https, ssh, file://), archive (.zip .tar .tar.gz .tgz .tar.bz2 .tar.xz), file or "
                        "folder")
    p.add_argument("--project", default="default")
    p.add_argument("--home")
    p.add_argument("--test", nargs="*", default=[], metavar="SOURCE", help="sources held out as the test set")
    p.add_argument("--exclude", nargs="*", default=[], metavar="PATTERN", help="gitignore-style patterns")
    p.add_argument("--no-lm-filter", action="store_true", help="skip stage 2 (per-file loss)")
    p.add_argument("--model", help="base model for the loss filter")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any scan setting, e.g. max_file_kib=256, file_types=Python,Go, near_dup=true (repeatable)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(handler=_cmd_scan)


def _scan_progress():
    """A tqdm bar on stderr per stage of the scan; returns (callback, close)."""
    from tqdm import tqdm

    from refact_lab.data.jobs import STAGE_LABELS

    state = {"stage": None, "bar": None}

    def close():
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "done":
            close()
            return
        if stage != state["stage"]:
            close()
            state["stage"] = stage
            state["bar"] = tqdm(total=total or None, desc=STAGE_LABELS.get(stage, stage), unit="file",
                                file=sys.stderr, dynamic_ncols=True, leave=False)
        bar = state["bar"]
        if total and bar.total != total:
            bar.total = total
        bar.update(max(0, done - bar.n))

    return progress, close


def _cmd_scan(args) -> int:
    import json

    from refact_lab.config import ScanSettings, with_overrides
    from refact_lab.data.lossfilter import LossFilterError
    from refact_lab.data.pipeline import ScanCancelled, ScanError, ScanWriteError, human_size, scan_files
    from refact_lab.data.service import ProjectService
    from refact_lab.data.sources import SourceError
    from refact_lab.home import Home
    from refact_lab.serve.state import active_model

    try:
        settings = with_overrides(ScanSettings(exclude=list(args.exclude), lm_filter=not args.no_lm_filter,
                                               model=args.model), args.overrides)
    except SettingsError as e:
        return _fail(str(e))
    home = Home.resolve(args.home).ensure()
    if settings.lm_filter and not settings.model:
        # the loss filter's model comes from settings.json: a damaged one is refused now, not after stage 1
        active_model(home)
    service = ProjectService(home, args.project)
    token = os.environ.get("REFACT_LAB_GIT_TOKEN") or None
    try:
        for spec in args.sources:
            service.sources.ensure(spec, token=token)
        for spec in args.test:
            service.sources.ensure(spec, test=True, token=token)
    except SourceError as e:
        return _fail(str(e))
    progress, close = (None, lambda: None) if args.json else _scan_progress()
    try:
        stats = service.job.run(settings, progress=progress)
    except ScanWriteError as e:  # a full disk: a failure while working, not bad input
        return _fail(str(e), 1)
    except (ScanError, LossFilterError) as e:
        return _fail(str(e))
    except ScanCancelled:
        return _fail("scan stopped", 130)
    finally:
        close()
    paths = scan_files(home, args.project)
    logs = {k: str(paths[k]) for k in ("accepted", "rejected", "stats")}
    if args.json:
        summary = {k: v for k, v in stats.items() if k != "settings"}
        print(json.dumps({**summary, "home": str(home.root), "logs": logs}, sort_keys=True))
    else:
        print(f"Scanned {len(stats['sources'])} source(s), {stats['files']} files in {stats['elapsed_s']:.1f} s "
              f"(project {args.project!r})")
        for s in stats["sources"]:
            print(f"  {s['id']}: {s['kind']} {s['origin']}{' [test]' if s['test'] else ''} - {s['files']} files")
        print(f"accepted {stats['accepted']:>7}   train {stats['train']['files']} files "
              f"({human_size(stats['train']['bytes'])}), test {stats['test']['files']} files "
              f"({human_size(stats['test']['bytes'])})")
        print(f"rejected {stats['rejected']:>7}")
        for reason, n in sorted(stats["reasons"].items(), key=lambda kv: -kv[1]):
            print(f"  {reason:<16} {n:>7}")
        others = [f"{t} {n}" for t, n in stats["types"].items() if t not in stats["types_on"]][:6]
        print(f"file types on: {', '.join(stats['types_on']) or 'none'}"
              + (f" (also found: {', '.join(others)}; change with --set file_types=...)" if others else ""))
        if stats.get("loss"):
            print(f"loss filter: {stats['loss']['model']}, {stats['loss']['computed']} computed, "
                  f"{stats['loss']['cached']} cached")
        index = stats.get("index") or {}
        if index:
            print(f"retrieval index: {index['error']}" if index.get("error") else
                  f"retrieval index: {index['files']} files, {index['chunks']} chunks, {human_size(index['bytes'])}, "
                  f"built in {index['build_s']:.1f} s ({index.get('chunked_files', 0)} files chunked, "
                  f"{index['reused_files']} unchanged files reused)")
        print(f"logs: {paths['dir']}/{{accepted.jsonl, rejected.jsonl, stats.json}}")
    if stats["reasons"].get("loss_too_high") and stats["accepted"] == 0:
        print(f"refact-lab: every file that reached stage 2 is above loss_threshold "
              f"{stats['loss']['threshold']:g} under {stats['loss']['model']!r}: that model may be too weak "
              "for this code; use a stronger --model, raise --set loss_threshold=..., or --no-lm-filter",
              file=sys.stderr)
    if stats.get("split_warning"):
        print(f"refact-lab: warning: {stats['split_warning']}", file=sys.stderr)
    if stats.get("split_error"):
        return _fail(stats["split_error"], 1)
    return 0


# --- finetune --------------------------------------------------------------------------------------------

def _finetune_settings_help() -> str:
    """The hyperparameters, from the same field metadata the panel's form is built from."""
    from refact_lab.config import FinetuneSettings, field_specs

    lines = ["hyperparameters (--set KEY=VALUE; 'auto' where allowed):"]
    for spec in field_specs(FinetuneSettings):
        default = "auto" if spec["default"] is None and spec["auto"] else spec["default"]
        bounds = f" [{spec['min']:g}..{spec['max']:g}]" if spec["min"] is not None and spec["max"] is not None else ""
        choices = f" {{{','.join(spec['choices'])}}}" if spec["choices"] else ""
        lines.append(f"  {spec['name']} = {default}{bounds}{choices}\n      {spec['help']}")
    return "\n".join(lines)


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a LoRA adapter on the scanned dataset",
                       epilog=_finetune_settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", default="default", help="the scanned dataset to train on (default: default)")
    p.add_argument("--home", help="state directory (default $REFACT_LAB_HOME or ~/.refact_lab)")
    p.add_argument("--model", help="base model: registry name, hub id or local folder (default: the active model)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a hyperparameter (repeatable; listed below)")
    p.add_argument("--detach", action="store_true", help="start the run in the background and return")
    from refact_lab.config import LaunchSettings, field_specs

    launch = {spec["name"]: spec["help"] for spec in field_specs(LaunchSettings)}   # the panel's tooltips too
    p.add_argument("--processes", default="auto", metavar="N|auto",
                   help=f"{launch['processes']}; batch_size stays the global batch")
    p.add_argument("--gpus", metavar="0,1,...", help=launch["gpus"])
    p.add_argument("--cpu", action="store_true", help=launch["cpu"])
    p.add_argument("--fsdp", action="store_true", help=launch["fsdp"])
    p.set_defaults(handler=_cmd_finetune)


def _launch_settings(args):
    """--processes/--gpus/--cpu/--fsdp as the LaunchSettings the panel also builds (SettingsError when bad)."""
    from refact_lab.config import LaunchSettings, parse_value

    return LaunchSettings(processes=parse_value(LaunchSettings, "processes", args.processes),
                          gpus=args.gpus, cpu=args.cpu, fsdp=args.fsdp)


def _cmd_finetune(args) -> int:
    from refact_lab.config import FinetuneSettings, with_overrides
    from refact_lab.home import Home

    try:
        settings = with_overrides(FinetuneSettings(), args.overrides)
        launch = _launch_settings(args)
    except (SettingsError, TypeError) as e:
        return _fail(str(e))
    from refact_lab.finetune import runs
    from refact_lab.serve.state import active_model

    home = Home.resolve(args.home).ensure()
    model = args.model or active_model(home)
    run_id = runs.create_run(home, args.project, model, settings, launch=launch)
    block = runs.read_run_settings(home.run_dir(run_id)).get("launch") or {}
    memory = (block.get("memory") or {}).get("message")
    if memory and "switched" in memory:
        print(f"refact-lab: {memory}", file=sys.stderr)
    if args.detach:
        proc = runs.start_run(home, run_id)
        print(run_id)
        print(f"started in the background (pid {proc.pid}); follow it with `refact-lab runs` or in "
              f"{home.run_dir(run_id) / 'log.txt'}", file=sys.stderr)
        return 0
    if block.get("processes", 1) > 1 or block.get("fsdp") or launch.gpus is not None:
        # several processes (or chosen GPUs: CUDA_VISIBLE_DEVICES) need the launcher: start it, follow its files
        return _follow_launched(home, run_id, runs.start_run(home, run_id))
    return _finetune_foreground(home, run_id)


def _follow_launched(home, run_id: str, proc, log_from: int = 0) -> int:
    """A launched run in the foreground: its log from byte `log_from` on and a progress bar from its status;
    Ctrl-C asks it to stop cleanly."""
    import signal
    import time

    from tqdm import tqdm

    from refact_lab.finetune import runs

    path = runs.run_dir(home, run_id)
    bar = tqdm(total=None, unit="step", desc=run_id, dynamic_ncols=True, file=sys.stderr)

    ended_at: float | None = None   # when the run's state ended (its process may work on: the scoreboard)
    said_waiting = False

    def on_interrupt(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if ended_at is not None:   # nothing left to stop: stop following (the process finishes its work detached)
            raise KeyboardInterrupt
        runs.request_stop(path)
        bar.write("stopping after this step (Ctrl-C again to abort)...", file=sys.stderr)

    log_file, offset = path / "log.txt", log_from

    def echo_log() -> None:
        # the run's own log lines (process 0's messages, the launcher's), as the in-process run shows them
        nonlocal offset
        with open(log_file, "rb") as f:
            f.seek(offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        offset += len(complete)
        for line in complete.decode("utf-8", errors="replace").splitlines():
            if line.strip() and "it/s]" not in line:    # not the loaders' progress bars
                bar.write(line, file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        while True:
            ended = proc.poll() is not None
            echo_log()
            status = runs.read_status(home, run_id)
            if status.get("total") and bar.total != status["total"]:
                bar.reset(total=status["total"])
            bar.update(max(0, (status.get("step") or 0) - bar.n))
            if status.get("train_loss") is not None:
                bar.set_postfix(loss=f"{status['train_loss']:.3f}", refresh=False)
            if ended:
                echo_log()
                break
            if status["state"] not in runs.ACTIVE:
                # the run has ended but its process may still work for minutes (a finished run's scoreboard
                # runs in the worker): keep showing its log until it exits, rather than give up after a while
                ended_at = time.monotonic() if ended_at is None else ended_at
                if not said_waiting and time.monotonic() - ended_at > 5:
                    said_waiting = True
                    bar.write(f"the run has {status['state']}; its process is still at work (the scoreboard of a "
                              "finished run): waiting for it (Ctrl-C stops waiting, it carries on in the "
                              "background)...", file=sys.stderr)
            time.sleep(0.5)
    except KeyboardInterrupt:
        if ended_at is None:
            raise
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    return _report_end(home, run_id, path)


def _add_resume(sub) -> None:
    p = sub.add_parser("resume", help="continue a stopped or failed fine-tuning run from its last checkpoint")
    p.add_argument("run", metavar="RUN", help="the run id (as `refact-lab runs` lists it)")
    p.add_argument("--home", help="state directory (default $REFACT_LAB_HOME or ~/.refact_lab)")
    p.add_argument("--detach", action="store_true", help="continue the run in the background and return")
    p.set_defaults(handler=_cmd_resume)


def _cmd_resume(args) -> int:
    from refact_lab.finetune import runs
    from refact_lab.home import Home

    home = Home.resolve(args.home)
    try:
        path = runs.run_dir(home, args.run)
        block = runs.read_run_settings(path).get("launch") or {}
        if not args.detach and (block.get("processes", 1) > 1 or block.get("fsdp") or block.get("gpus")):
            # launched as several processes: resumed the same way, followed here
            size = (path / "log.txt").stat().st_size if (path / "log.txt").exists() else 0
            return _follow_launched(home, args.run, runs.resume_run(home, args.run), log_from=size)
        proc = runs.resume_run(home, args.run, detach=args.detach)
    except RuntimeError as e:   # not stopped or failed: nothing to resume
        return _fail(str(e))
    if proc is not None:
        print(args.run)
        print(f"resumed in the background (pid {proc.pid}); follow it with `refact-lab runs` or in "
              f"{home.run_dir(args.run) / 'log.txt'}", file=sys.stderr)
        return 0
    return _finetune_foreground(home, args.run)


def _finetune_foreground(home, run_id: str) -> int:
    """The same trainer as a detached run, in this process, with a progress bar; Ctrl-C or SIGTERM stops it
    cleanly."""
    import signal

    from tqdm import tqdm

    from refact_lab.finetune import runs

    path = runs.run_dir(home, run_id)
    bar = tqdm(total=None, unit="step", desc=run_id, dynamic_ncols=True, file=sys.stderr)

    def progress(record: dict) -> None:
        kind = record.get("kind")
        if kind == "start":
            bar.reset(total=record["total"])
            bar.update(record["step"])
        elif kind == "train":
            bar.update(record["step"] - bar.n)
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
        elif kind == "test":
            bar.set_postfix(test_loss=f"{record['test_loss']:.3f}")

    def log(message: str) -> None:
        runs.append_log(path, message)
        bar.write(message, file=sys.stderr)

    def on_interrupt(signum, frame):
        # first Ctrl-C: a clean stop at the next step (checkpoint written); a second one aborts
        signal.signal(signal.SIGINT, signal.default_int_handler)
        runs.request_stop(path)
        bar.write("stopping after this step (Ctrl-C again to abort)...", file=sys.stderr)

    def on_terminate(signum, frame):
        # SIGTERM (`timeout`, a CI job cancelled, `kill`) stops cleanly too, as it does a detached run's worker:
        # this process is the run's worker here
        runs.request_stop(path)
        bar.write("terminated: stopping after this step...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    previous_term = signal.signal(signal.SIGTERM, on_terminate)
    try:
        runs.execute_run(path, log=log, extra_sinks=[progress], pid=os.getpid())
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)   # the scoreboard below can be ended by a plain SIGTERM
        bar.close()
    from refact_lab.scoreboard.service import after_run

    report = after_run(path)  # the scoreboard of the best checkpoint, as a detached run's worker does
    for m in (report or {}).get("models", []):
        print(f"scoreboard ({report['cursors']} held-out cursors): {m['name']}: edit similarity "
              f"{m['overall']['edit_similarity']:.3f}, exact match {m['overall']['exact_match']:.3f}", file=sys.stderr)
    return _report_end(home, run_id, path)


def _report_end(home, run_id: str, path) -> int:
    from refact_lab.finetune import runs

    status = runs.read_status(home, run_id)
    best = status.get("best")
    print(f"{run_id}: {status['state']} at step {status.get('step')}/{status.get('total')}"
          + (f" ({status['stop_reason']})" if status.get("stop_reason") else "")
          + (f", best checkpoint {_best_text(best, 'test loss ')}" if best else ""))
    if status["state"] == "failed":
        return _fail(f"run failed: {status.get('error')} (log: {path / 'log.txt'})", 1)
    return 0


def _best_text(best: dict, label: str = "") -> str:
    """A status's best checkpoint, with its test loss when it has one (a run made by hand may not)."""
    loss = best.get("test_loss")
    return best["checkpoint"] + (f" ({label}{loss:.4f})" if loss is not None else "")


# --- runs ------------------------------------------------------------------------------------------------

def _add_runs(sub) -> None:
    p = sub.add_parser("runs", help="list fine-tuning runs with their state and best checkpoint")
    p.add_argument("--home", help="state directory (default $REFACT_LAB_HOME or ~/.refact_lab)")
    p.add_argument("--json", action="store_true", help="print the runs' status as a JSON list")
    p.set_defaults(handler=_cmd_runs)


def _cmd_runs(args) -> int:
    import json

    from refact_lab.finetune import runs
    from refact_lab.home import Home

    home = Home.resolve(args.home)
    items = runs.list_runs(home)
    if args.json:
        print(json.dumps(items, indent=2, sort_keys=True, default=str))
        return 0
    if not items:
        print(f"no runs in {home.runs_dir}")
        return 0
    rows = [("RUN", "STATE", "STEP", "BEST CHECKPOINT", "MODEL", "PROJECT")]
    for st in items:
        best = st.get("best")
        step = "-" if st["state"] == runs.BROKEN else f"{st.get('step') or 0}/{st.get('total') or '?'}"
        rows.append((st["run_id"], st["state"], step,
                     _best_text(best) if best else "-",
                     str(st.get("model") or ""), str(st.get("project") or "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r, st in zip(rows, [{}, *items]):
        line = "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
        # a broken run folder says why on its own row (its reason is too long for a column)
        print(f"{line}  {st['error']}" if st.get("state") == runs.BROKEN else line)
    return 0


# --- complete --------------------------------------------------------------------------------------------

def _add_complete(sub) -> None:
    p = sub.add_parser("complete", help="complete code at a cursor with the chosen model (and LoRA)")
    p.add_argument("prefix", help="code before the cursor ('-' reads stdin)")
    p.add_argument("--suffix", default="", help="code after the cursor")
    p.add_argument("--home")
    p.add_argument("--model")
    p.add_argument("--lora", help="run_id[/checkpoint], 'best', 'latest' or 'off'")
    p.add_argument("--max-tokens", type=int, default=32)
    p.set_defaults(handler=_cmd_complete)


def _cmd_complete(args) -> int:
    """Complete once in this process with the saved model and LoRA choice, or the --model / --lora given
    (those apply to this call only; the server's choice in settings.json is left alone)."""
    from refact_lab.home import Home
    from refact_lab.models.registry import resolve
    from refact_lab.serve import checkpoints
    from refact_lab.serve.client import InferenceError, LocalInference
    from refact_lab.serve import state
    from refact_lab.serve.state import LoraChoice, lora_model_name

    prefix = sys.stdin.read() if args.prefix == "-" else args.prefix
    if args.max_tokens < 1:
        return _fail(f"--max-tokens must be at least 1, got {args.max_tokens}")
    home = Home.resolve(args.home).ensure()
    overrides = {}
    if args.model:
        resolve(args.model)  # unknown model: exit 2 with the registry's message
        overrides["model"] = args.model
    if args.lora:
        overrides["lora"] = LoraChoice.parse(args.lora).to_dict()
    saved = state.load_checked(home, overrides)   # what --model / --lora do not replace comes from settings.json
    if not args.model:
        try:
            resolve(saved.model or "default")   # checked here, not by the engine, whose log would add a traceback
        except ValueError as e:
            return _fail(f"{home.settings_file}: model: {e}")
    choice = saved.lora
    if choice.mode != "off":
        checkpoints.resolve(home, choice)  # no such run or checkpoint: exit 2 saying what exists
    inference = LocalInference(home, overrides)
    try:
        engine = inference.start()
        engine.wait_ready(600)
        snap = engine.snapshot()
        model = lora_model_name(snap["model"]) if choice.mode != "off" else snap["model"]
        if choice.mode != "off" and model not in snap["models"]:
            return _fail(f"the LoRA checkpoint could not be loaded: {snap['lora']['error']}", 1)
        out = inference.complete(prefix, args.suffix, model=model, max_tokens=args.max_tokens)
    except (InferenceError, RuntimeError, TimeoutError) as e:
        return _fail(str(e), 1)
    finally:
        inference.stop()
    sys.stdout.write(out["text"] + "\n")
    deployed = snap["lora"]["deployed"]
    print(f"[{out['model']}" + (f" = {deployed['run_id']}/{deployed['checkpoint']}" if deployed and choice.mode != "off"
                                else "") + f", {out['finish_reason']}]", file=sys.stderr)
    return 0


# --- deploy ----------------------------------------------------------------------------------------------

def _add_deploy(sub) -> None:
    p = sub.add_parser("deploy", help="choose what the server offers: the LoRA checkpoint and repository context",
                       description="Makes the Deploy panel's choices (saved in settings.json: a running server "
                                   "applies them without a restart) and prints what is now deployed. "
                                   "With no option it only prints.")
    p.add_argument("--home", help="state directory (default $REFACT_LAB_HOME or ~/.refact_lab)")
    p.add_argument("--run", help="the fine-tuning run (default: the most recent)")
    p.add_argument("--checkpoint", help="'best', 'latest', a checkpoint name of --run, or 'off' (base model only)")
    p.add_argument("--context", help="project whose files give completions context, 'off', or 'auto' (the "
                                     "deployed run's project)")
    p.add_argument("--context-tokens", type=int, help="at most this many prompt tokens of repository context")
    p.set_defaults(handler=_cmd_deploy)


def _cmd_deploy(args) -> int:
    from refact_lab.home import Home, check_name
    from refact_lab.serve import state
    from refact_lab.serve.deploy import DeployService
    from refact_lab.serve.state import LoraChoice

    home = Home.resolve(args.home).ensure()
    state.load_checked(home)   # what is deployed is read from settings.json: a damaged one is not "off"
    service = DeployService(home, inference=False)   # only saves: no engine is started here
    if args.run is not None:
        check_name(args.run, "run id")
    if args.checkpoint is not None or args.run is not None:
        ck = args.checkpoint or "best"
        if ck == "off":
            if args.run:
                return _fail("--checkpoint off deploys no run: leave out --run")
            choice = LoraChoice("off")
        elif ck in ("best", "latest"):
            choice = LoraChoice(ck, run_id=args.run)
        elif args.run:
            choice = LoraChoice("checkpoint", args.run, ck)
        else:
            return _fail(f"--checkpoint {ck} names a checkpoint: give its --run too")
        service.deploy(choice, start=False, by="cli")
    if args.context is not None or args.context_tokens is not None:
        service.set_context(args.context, args.context_tokens)
    now = service.summary()
    print(f"model:      {now['model']}")
    print(f"lora:       {now['lora']}" + (f" = {now['checkpoint']}" if now["checkpoint"] else "")
          + (f" (cannot be served: {now['lora_error']})" if now["lora_error"] else ""))
    print(f"context:    {now['context']}" + (" (the deployed run's project)" if now["context_choice"] == "auto"
                                              and now["context"] != "off" else "")
          + f", up to {now['context_tokens']} tokens" + (f" ({now['context_note']})" if now["context_note"] else ""))
    return 0


# --- eval ------------------------------------------------------------------------------------------------

def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="the completion scoreboard: base model vs checkpoints at seeded cursors of the held-out files",
        description="Complete seeded cursors from the project's held-out test files through the serving engine "
                    "(prompt building, token healing, stop rules, loop guard) with the base model (LoRA off) and "
                    "each checkpoint asked for; print exact match, edit similarity, identifier F1, degenerate "
                    "share and p50 latency per kind of cursor. Results are saved under the run (eval.json) and "
                    "the project (eval/history.jsonl).")
    p.add_argument("--project", default="default", help="the scanned project (default: default)")
    p.add_argument("--home", help="state directory (default $REFACT_LAB_HOME or ~/.refact_lab)")
    p.add_argument("--run", help="the run whose checkpoints to evaluate (default: the project's newest)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="best|latest|NAME|off",
                   help="a checkpoint of the run (repeatable; default: best when the project has a run, else off)")
    p.add_argument("--cursors", type=int, default=None, help="number of cursors (default 200)")
    p.add_argument("--seed", type=int, default=None, help="cursor sampling seed (default 1234)")
    p.add_argument("--context", choices=("on", "off"), default="off",
                   help="repository context: snippets retrieved from the project's index (never the cursor's own "
                        "file), as served (default off, comparable with earlier scores)")
    p.add_argument("--context-tokens", type=int, default=None, metavar="N",
                   help="context budget in tokens when --context on (default: the serving default)")
    p.add_argument("--json", action="store_true", help="print the scoreboard as one JSON object")
    p.set_defaults(handler=_cmd_eval)


def _cmd_eval(args) -> int:
    import json

    from refact_lab.home import Home
    from refact_lab.scoreboard import cursors as sc
    from refact_lab.scoreboard import results, runner
    from refact_lab.serve import state

    n = sc.DEFAULT_CURSORS if args.cursors is None else args.cursors
    if n < 1:
        return _fail(f"--cursors must be at least 1, got {n}")
    if args.context_tokens is not None and not 1 <= args.context_tokens <= 32768:
        return _fail(f"--context-tokens must be from 1 to 32768, got {args.context_tokens}")
    seed = sc.DEFAULT_SEED if args.seed is None else args.seed
    home = Home.resolve(args.home)
    state.load_checked(home)   # the engine that completes the cursors runs with settings.json's choices
    if not (home.project_dir(args.project) / "scan").is_dir():
        return _fail(f"project {args.project!r} has not been scanned in {home.root}")
    choices = args.checkpoint or (["best"] if args.run or any(r.checkpoints for r in
                                                                runner.project_runs(home, args.project)) else [])
    try:
        model, label = runner.run_model(home, args.project)
        targets = runner.resolve_targets(home, args.project, label, args.run, choices)
        cursors = runner.project_cursors(home, args.project, n, seed)
    except runner.EvalError as e:
        return _fail(str(e))
    # the scan's bar per stage serves as one bar per evaluated model
    progress, close = (None, lambda: None) if args.json else _scan_progress()
    try:
        report, details = runner.evaluate(home, args.project, targets, cursors=cursors, progress=progress,
                                          model=model, context=args.context == "on",
                                          context_tokens=args.context_tokens)
    except (runner.EvalError, RuntimeError, TimeoutError) as e:
        return _fail(str(e), 1)
    finally:
        close()
    results.save(home, report, details, seed=seed)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print(runner.format_table(report))
    return 0


# --- export ----------------------------------------------------------------------------------------------

def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a checkpoint as a PEFT adapter folder or a merged transformers model, with a card",
        description="peft: adapter_config.json + adapter_model.safetensors (peft.PeftModel.from_pretrained, vLLM "
                    "--lora-modules); merged: the base model with the adapter merged (safetensors, tokenizer, "
                    "generation config). Both carry README.md (base model, sources and commits, training files and "
                    "their sha256 manifest, filter stats, settings, metrics, scoreboard).")
    p.add_argument("--run", required=True, help="the run id (see `refact-lab runs`)")
    p.add_argument("--checkpoint", default="best", metavar="best|latest|NAME",
                   help="which checkpoint (default best: the lowest test loss)")
    p.add_argument("--format", dest="fmt", default="peft", choices=("peft", "merged"), help="default peft")
    p.add_argument("--out", required=True, help="a new or empty folder to write")
    p.add_argument("--home", help="state directory (default $REFACT_LAB_HOME or ~/.refact_lab)")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args) -> int:
    from refact_lab.finetune.export import ExportError, export_checkpoint
    from refact_lab.home import Home

    try:
        result = export_checkpoint(Home.resolve(args.home), args.run, args.checkpoint, args.fmt, args.out,
                                   log=lambda m: print(m, file=sys.stderr))
    except ExportError as e:
        return _fail(str(e))
    except OSError as e:   # a full disk, a read-only folder: nothing was left behind
        return _fail(f"cannot write the export to {args.out}: {e.strerror or e}", 1)
    print(result.out)
    return 0


# --- update ----------------------------------------------------------------------------------------------

def _add_update(sub) -> None:
    p = sub.add_parser(
        "update", help="fetch new commits, rescan, retrain from the deployed adapter, deploy if not worse",
        description="Keep the model current: fetch the project's git sources, rescan (unchanged files from the "
                    "cache), fine-tune a new run starting from the deployed adapter, score base, deployed and new "
                    "checkpoint on the same held-out cursors, and deploy the new one only when its edit "
                    "similarity is not lower (beyond 0.005) and its exact match not lower. --history lists the "
                    "deploys with their scores; --rollback N re-deploys entry N.")
    p.add_argument("--project", default="default", help="the scanned project (default: default)")
    p.add_argument("--home", help="state directory (default $REFACT_LAB_HOME or ~/.refact_lab)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a fine-tuning setting of the new run (repeatable), e.g. train_steps=200")
    p.add_argument("--cursors", type=int, default=None, help="scoreboard cursors (default: the run's eval_cursors)")
    p.add_argument("--history", action="store_true", help="list the project's deploys with their scores")
    p.add_argument("--rollback", type=int, metavar="N", help="re-deploy entry N of --history")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)  # launched by the schedule/app
    p.set_defaults(handler=_cmd_update)


def _cmd_update(args) -> int:
    import json

    from refact_lab.home import Home
    from refact_lab.keep_current import deploys, schedule, update

    home = Home.resolve(args.home)
    if args.history or args.rollback is not None:
        if args.rollback is not None:
            entry = deploys.rollback(home, args.project, args.rollback)
            print(json.dumps(entry, sort_keys=True) if args.json else f"deployed {entry['checkpoint'] or 'off'} "
                  f"({entry['note']})")
            return 0
        entries = deploys.history(home, args.project)
        print(json.dumps(entries, sort_keys=True) if args.json else deploys.format_history(entries))
        return 0
    if not (home.project_dir(args.project) / "scan").is_dir():
        return _fail(f"project {args.project!r} has not been scanned in {home.root}")
    if args.cursors is not None and args.cursors < 1:
        return _fail(f"--cursors must be at least 1, got {args.cursors}")

    def work(should_stop=None, on_run=None):
        return update.run_update(home, args.project, overrides=args.set, cursors=args.cursors,
                                 log=lambda m: print(m, file=sys.stderr, flush=True), should_stop=should_stop,
                                 on_run=on_run)
    try:
        # from a terminal too the update is the project's job: one at a time, shown in the app
        result = (schedule.run_as_job if args.job else schedule.run_in_foreground)(home, args.project, work)
    except (update.UpdateStopped, schedule.UpdateBusy) as e:
        return _fail(str(e), 1)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"{result['changed_files']} changed file(s); run {result['run'] or '-'}; "
              + ("deployed" if result["deployed"] else "not deployed") + f": {result['reason']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refact-lab",
        description="Fine-tune a code-completion model on your repositories and serve it to your IDE.")
    parser.add_argument("--version", action="version", version=f"refact-lab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_serve, _add_host, _add_scan, _add_finetune, _add_resume, _add_runs, _add_complete, _add_deploy,
                _add_eval, _add_export, _add_update):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        code = args.handler(args)
        sys.stdout.flush()   # here, where a closed pipe is caught, rather than at exit
        return code
    except (SettingsError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("refact-lab: stopped (Ctrl-C)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode):
            raise   # not our output's reader going away: a real failure
        # the reader stopped reading (`refact-lab runs --json | head -1`): stop quietly, and point stdout at
        # /dev/null so the flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The `refact-lab` command line: serve | scan | finetune | runs | complete.

Each subcommand parses its flags, builds the same settings dataclass the UI uses, and calls a service.
Heavy imports (torch, jupyter_server) happen inside the handlers so `refact-lab --help` is instant.
Exit codes: 0 success, 1 failure while working, 2 bad input (argument, source, setting).
"""

from __future__ import annotations

import argparse
import sys

from refact_lab import __version__
from refact_lab.config import SettingsError

EXIT_BAD_INPUT = 2


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
    p.add_argument("--model", help="base model: registry name, hub id or local folder (remembered)")
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args) -> int:
    import os

    from refact_lab.config import ServeSettings

    try:
        settings = ServeSettings(host=args.host, port=args.port, home=args.home,
                                 token=None if args.no_auth else (args.token or os.environ.get("REFACT_LAB_TOKEN")),
                                 no_auth=args.no_auth, model=args.model)
    except SettingsError as e:
        return _fail(str(e))
    from refact_lab.serve.server import run_server

    return run_server(settings)


# --- scan ------------------------------------------------------------------------------------------------

def _add_scan(sub) -> None:
    p = sub.add_parser("scan", help="add sources and filter them into a train/test dataset")
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="git URL, archive, file or folder")
    p.add_argument("--project", default="default")
    p.add_argument("--home")
    p.add_argument("--test", nargs="*", default=[], metavar="SOURCE", help="sources held out as the test set")
    p.add_argument("--exclude", nargs="*", default=[], metavar="PATTERN", help="gitignore-style patterns")
    p.add_argument("--no-lm-filter", action="store_true", help="skip stage 2 (per-file loss)")
    p.add_argument("--model", help="base model for the loss filter")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(handler=_cmd_scan)


def _cmd_scan(args) -> int:
    return _fail("scan is not available yet (issue: Sources and scan)", 1)


# --- finetune --------------------------------------------------------------------------------------------

def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a LoRA adapter on the scanned dataset")
    p.add_argument("--project", default="default")
    p.add_argument("--home")
    p.add_argument("--model")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a hyperparameter (repeatable)")
    p.add_argument("--detach", action="store_true", help="start the run in the background and return")
    p.set_defaults(handler=_cmd_finetune)


def _cmd_finetune(args) -> int:
    return _fail("finetune is not available yet (issue: Fine-tuning)", 1)


# --- runs ------------------------------------------------------------------------------------------------

def _add_runs(sub) -> None:
    p = sub.add_parser("runs", help="list fine-tuning runs with their state and best checkpoint")
    p.add_argument("--home")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_runs)


def _cmd_runs(args) -> int:
    return _fail("runs is not available yet (issue: Fine-tuning)", 1)


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
    return _fail("complete is not available yet (issue: Serving and deployment)", 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refact-lab",
        description="Fine-tune a code-completion model on your repositories and serve it to your IDE.")
    parser.add_argument("--version", action="version", version=f"refact-lab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_serve, _add_scan, _add_finetune, _add_runs, _add_complete):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.handler(args)
    except (SettingsError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Start one jupyter_server that carries the Voilà app at `/`, JupyterLab at `/lab` and our API at `/v1`.

Standalone `voila` does not load server extensions, so we start a jupyter_server with the voila, jupyterlab
and refact_lab extensions and point its default URL at the rendered workbench notebook.
"""

from __future__ import annotations

import os
import secrets
import signal
from pathlib import Path

from refact_lab import __version__
from refact_lab.config import ServeSettings
from refact_lab.home import Home
from refact_lab.serve import shutdown
from refact_lab.serve.log_masking import mask_secrets_in_logs

APP_NOTEBOOK = "workbench.ipynb"


def notebooks_dir() -> Path:
    """The notebooks folder: the repository's in a source checkout, the copy inside the wheel otherwise."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package.parent / "notebooks", package / "_notebooks"):
        if (candidate / APP_NOTEBOOK).is_file():
            return candidate
    raise FileNotFoundError(f"cannot find {APP_NOTEBOOK} next to the refact_lab package")


def server_argv(settings: ServeSettings, home: Home, token: str) -> list[str]:
    """The jupyter_server command line for these settings (traitlets flags)."""
    extensions = {"voila": True, "jupyterlab": True, "refact_lab": True}
    argv = [
        f"--ServerApp.ip={settings.host}",
        f"--ServerApp.port={settings.port}",
        "--ServerApp.port_retries=0",
        "--ServerApp.open_browser=False",
        f"--ServerApp.root_dir={notebooks_dir()}",
        f"--ServerApp.default_url=/voila/render/{APP_NOTEBOOK}",
        f"--ServerApp.jpserver_extensions={extensions!r}",
        f"--ServerApp.max_body_size={settings.max_body_mb * 1024 * 1024}",
        f"--IdentityProvider.token={token}",
        f"--RefactLabExtension.home={home.root}",
        f"--RefactLabExtension.max_body_mb={settings.max_body_mb}",
        f"--RefactLabExtension.load_wait_s={settings.load_wait_s}",
        f"--RefactLabExtension.prefix_cache_mib={settings.prefix_cache_mib}",
        f"--RefactLabExtension.speculative_tokens={settings.speculative_tokens}",
        f"--RefactLabExtension.compile_decode={settings.compile_decode}",
        # the shipped walk-throughs are saved from /lab without outputs, so the checkout stays clean
        "--ContentsManager.pre_save_hook=refact_lab.serve.notebook_saving.strip_outputs",
        "--VoilaConfiguration.show_tracebacks=True",
    ]
    if settings.model:
        argv.append(f"--RefactLabExtension.model={settings.model}")
    if settings.no_auth:
        # Without a token, POSTs from API clients carry no XSRF cookie; the host is loopback-only (checked).
        argv.append("--ServerApp.disable_check_xsrf=True")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--ServerApp.allow_root=True")
    return argv


def _make_server_app():
    from jupyter_server.serverapp import ServerApp

    class RefactLabServerApp(ServerApp):
        """SIGTERM or Ctrl-C stops cleanly within seconds (no interactive 'Shut down?' prompt); a second one
        exits at once. See refact_lab.serve.shutdown for why the end of the process needs a watchdog."""

        name = "refact-lab"
        _stop_signals = 0

        def init_signal(self):
            super().init_signal()
            # jupyter_server only handles SIGINT on a tty, and then asks for confirmation; we always stop.
            signal.signal(signal.SIGINT, self._signal_stop)
            signal.signal(signal.SIGTERM, self._signal_stop)

        def _handle_sigint(self, sig, frame):
            self._signal_stop(sig, frame)

        def _signal_stop(self, sig, frame):
            self._stop_signals += 1
            if self._stop_signals > 1:
                # the second Ctrl-C: the user does not want to wait for kernels to say goodbye
                shutdown.kill_children(getattr(self, "kernel_manager", None))
                shutdown.hard_exit(0, "refact_lab stopped (second signal).")
            self.log.critical("received signal %s, stopping (again to exit at once)", sig)
            shutdown.start_watchdog(lambda: getattr(self, "kernel_manager", None))
            self.stop(from_signal=True)

    return RefactLabServerApp


def run_server(settings: ServeSettings, remember: dict | None = None, hosted: list | None = None) -> int:
    """Serve until SIGTERM or Ctrl-C, then end the process with status 0 (it does not return). `remember`:
    serving fields given on the command line (device, dtype, max_batch), saved to settings.json like --model
    so the next start and the Settings tab see them. `hosted`: the models to host beside the first (the CLI's
    second and later --model), saved as the hosting list; None leaves the saved list alone."""
    home = Home.resolve(settings.home).ensure()
    token = "" if settings.no_auth else (settings.token or secrets.token_urlsafe(24))
    if settings.model:
        from refact_lab.models.registry import resolve

        resolve(settings.model)  # fail fast with a clear message on an unknown model
        home.update_settings(model=settings.model)
    if remember:
        home.update_settings(**remember)
    if hosted is not None:
        from refact_lab.serve import state

        state.save_hosted(home, hosted)
    # Kernels (the Voilà app, notebooks) inherit these, so panels find the same state and can show the URL.
    base = f"http://{'127.0.0.1' if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}"
    os.environ["REFACT_LAB_HOME"] = str(home.root)
    os.environ["REFACT_LAB_URL"] = base
    os.environ["REFACT_LAB_TOKEN"] = token

    app_cls = _make_server_app()
    app = app_cls.instance()
    app.initialize(argv=server_argv(settings, home, token))
    mask_secrets_in_logs()  # every handler the server and its extensions set up is in place now
    query = f"?token={token}" if token else ""
    print(f"\nrefact_lab {__version__} on {base}\n"
          f"  App:        {base}/{query}\n"
          f"  JupyterLab: {base}/lab{query}\n"
          f"  API:        {base}/v1  (Authorization: Bearer {token or '<none: --no-auth>'})\n"
          f"  Token:      {token or '(auth disabled)'}\n"
          f"  State:      {home.root}\n"
          "Press Ctrl-C to stop.\n", flush=True)
    try:
        app.start()
    except KeyboardInterrupt:
        pass
    # The loop has stopped and the kernels were asked to shut down. Kill what is left (a kernel that started
    # while the others were shut down) and leave at once. A plain return hung (issue 17): when the signal came
    # while a Voilà page's kernel was starting, the heartbeat thread of the client Voilà had opened to it (a
    # non-daemon jupyter_client thread) never ended, and Python's exit waited for it on a lock forever.
    shutdown.kill_children(getattr(app, "kernel_manager", None))
    shutdown.hard_exit(0)
    return 0  # not reached

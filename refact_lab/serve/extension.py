"""Our jupyter_server extension: the inference API beside Voilà and JupyterLab, on the app's port.

Server options are traitlets here, set by `refact-lab serve` (or a jupyter_server config file) and turned
once into the state the handlers read from `self.settings["refact_lab"]`: the state directory, the fleet of
engines (entry one's engine and one per hosted model, see refact_lab.serve.fleet; started here, so the models
load in the background while the app is already answering) and the upstream directory. Which models and LoRA
are served afterwards is read from settings.json (see refact_lab.serve.state).
"""

from __future__ import annotations

import asyncio
import logging

from jupyter_server.extension.application import ExtensionApp
from traitlets import Float, Int, Unicode

from refact_lab import __version__
from refact_lab.config import ServeSettings
from refact_lab.home import Home
from refact_lab.serve.log_masking import mask_secrets_in_logs
from refact_lab.serve.page_kernels import cull_unattended_kernels, set_xsrf_cookie_on_voila_pages


class RefactLabExtension(ExtensionApp):
    name = "refact_lab"
    description = "refact_lab inference API"
    load_other_extensions = True

    home = Unicode("", config=True, help="State directory (default: $REFACT_LAB_HOME or ~/.refact_lab)")
    model = Unicode("", config=True, help="Base model to serve (registry name, hub id or local folder)")
    max_body_mb = Int(16, config=True, help="Largest API request body, in MiB")
    poll_interval = Float(0.2, config=True, help="Seconds between checks of settings.json for a new model or LoRA")
    load_wait_s = Float(ServeSettings.load_wait_s, config=True,
                        help="Seconds a request that needs the model waits while it loads, before a 503")
    prefix_cache_mib = Int(ServeSettings.prefix_cache_mib, config=True,
                           help="MiB of recent prompts' KV kept per hosted model, so the next keystroke's "
                                "request computes only what is new (0: off)")
    speculative_tokens = Int(ServeSettings.speculative_tokens, config=True,
                             help="Tokens drafted from the text per decode step of a greedy request (0: off)")
    compile_decode = Unicode(ServeSettings.compile_decode, config=True,
                             help="Compile the decode step at model load: auto (with a GPU), on, off")
    kernel_idle_timeout = Int(600, config=True,
                              help="Seconds an idle kernel with no open page lives before it is shut down (0: never; "
                                   "ignored when MappingKernelManager.cull_idle_timeout is set)")
    kernel_cull_interval = Int(30, config=True, help="Seconds between checks for such kernels")
    update_check_interval = Int(300, config=True, help="Seconds between checks whether a scheduled update "
                                                       "(settings.json update_schedule) is due (0: never check)")

    def initialize_settings(self):
        from refact_lab.serve.engine import Engine
        from refact_lab.serve.fleet import Fleet
        from refact_lab.serve.upstream import Directory

        home = Home.resolve(self.home or None).ensure()
        options = {"prefix_cache_mib": self.prefix_cache_mib, "speculative_tokens": self.speculative_tokens,
                   "compile_decode": self.compile_decode}
        engine = Engine(home, model=self.model or None, poll_interval=self.poll_interval, **options)
        fleet = Fleet(home, engine, poll_interval=max(self.poll_interval, 0.2), engine_options=options)
        # model loading, LoRA switches and failures show in the server's output
        logger = logging.getLogger("refact_lab")
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[%(levelname).1s %(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        mask_secrets_in_logs()
        # before any kernel starts: the first start_kernel starts the culler with these settings
        cull_unattended_kernels(self.serverapp.kernel_manager, self.kernel_idle_timeout, self.kernel_cull_interval)
        self.settings["refact_lab"] = {"home": home, "version": __version__, "max_body_mb": self.max_body_mb,
                                       "load_wait_s": self.load_wait_s,
                                       "model": self.model or None, "engine": engine, "fleet": fleet,
                                       "upstream_directory": Directory()}
        fleet.start()
        self.log.info("refact_lab %s: state directory %s; model loading in the background", __version__, home.root)

    def initialize_handlers(self):
        from refact_lab.serve.handlers import handlers

        self.handlers.extend(handlers())

    async def _start_jupyter_server_extension(self, serverapp):
        # every extension has added its routes and log handlers by now (Voilà's render route among them)
        set_xsrf_cookie_on_voila_pages(serverapp.web_app)
        mask_secrets_in_logs()
        if self.update_check_interval > 0:
            from tornado.ioloop import PeriodicCallback

            # the scheduled update runs as its own detached process; this only launches it when due
            self._update_timer = PeriodicCallback(self._check_update_schedule, self.update_check_interval * 1000)
            self._update_timer.start()

    def _check_update_schedule(self):
        from refact_lab.keep_current.schedule import tick

        home = self.settings["refact_lab"]["home"]
        try:
            project = tick(home)
        except (RuntimeError, ValueError, OSError) as e:
            self.log.warning("refact_lab: the scheduled update could not start: %s", e)
            return
        if project:
            self.log.info("refact_lab: scheduled update of project %s started", project)

    async def stop_extension(self):
        if getattr(self, "_update_timer", None) is not None:
            self._update_timer.stop()
        fleet = self.settings.get("refact_lab", {}).get("fleet")
        if fleet is not None:
            # off the event loop: while the engines finish (they tell waiting clients the server is stopping),
            # the loop must stay free to write those last events; bounded, a model load is not interruptible
            await asyncio.to_thread(fleet.stop, 3)

"""Our jupyter_server extension: the inference API beside Voilà and JupyterLab, on the app's port.

Server options are traitlets here, set by `refact-lab serve` (or a jupyter_server config file) and turned
once into the state the handlers read from `self.settings["refact_lab"]`: the state directory, the engine
(started here, so the model loads in the background while the app is already answering) and the upstream
directory. Which model and LoRA are served afterwards is read from settings.json (see refact_lab.serve.state).
"""

from __future__ import annotations

import logging

from jupyter_server.extension.application import ExtensionApp
from traitlets import Float, Int, Unicode

from refact_lab import __version__
from refact_lab.home import Home


class RefactLabExtension(ExtensionApp):
    name = "refact_lab"
    description = "refact_lab inference API"
    load_other_extensions = True

    home = Unicode("", config=True, help="State directory (default: $REFACT_LAB_HOME or ~/.refact_lab)")
    model = Unicode("", config=True, help="Base model to serve (registry name, hub id or local folder)")
    max_body_mb = Int(16, config=True, help="Largest API request body, in MiB")
    poll_interval = Float(0.2, config=True, help="Seconds between checks of settings.json for a new model or LoRA")

    def initialize_settings(self):
        from refact_lab.serve.engine import Engine
        from refact_lab.serve.upstream import Directory

        home = Home.resolve(self.home or None).ensure()
        engine = Engine(home, model=self.model or None, poll_interval=self.poll_interval)
        # model loading, LoRA switches and failures show in the server's output
        logger = logging.getLogger("refact_lab")
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[%(levelname).1s %(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
        self.settings["refact_lab"] = {"home": home, "version": __version__, "max_body_mb": self.max_body_mb,
                                       "model": self.model or None, "engine": engine,
                                       "upstream_directory": Directory()}
        engine.start()
        self.log.info("refact_lab %s: state directory %s; model loading in the background", __version__, home.root)

    def initialize_handlers(self):
        from refact_lab.serve.handlers import handlers

        self.handlers.extend(handlers())

    async def stop_extension(self):
        engine = self.settings.get("refact_lab", {}).get("engine")
        if engine is not None:
            engine.stop(timeout=5)

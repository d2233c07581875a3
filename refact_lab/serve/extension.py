"""Our jupyter_server extension: the inference API beside Voilà and JupyterLab, on the app's port.

Server options are traitlets here, set by `refact-lab serve` (or a jupyter_server config file) and turned
once into the state the handlers read from `self.settings["refact_lab"]`.
"""

from __future__ import annotations

from jupyter_server.extension.application import ExtensionApp
from traitlets import Int, Unicode

from refact_lab import __version__
from refact_lab.home import Home


class RefactLabExtension(ExtensionApp):
    name = "refact_lab"
    description = "refact_lab inference API"
    load_other_extensions = True

    home = Unicode("", config=True, help="State directory (default: $REFACT_LAB_HOME or ~/.refact_lab)")
    model = Unicode("", config=True, help="Base model to serve (registry name, hub id or local folder)")
    max_body_mb = Int(16, config=True, help="Largest API request body, in MiB")

    def initialize_settings(self):
        home = Home.resolve(self.home or None).ensure()
        self.settings["refact_lab"] = {"home": home, "version": __version__, "max_body_mb": self.max_body_mb,
                                       "model": self.model or None}
        self.log.info("refact_lab %s: state directory %s", __version__, home.root)

    def initialize_handlers(self):
        from refact_lab.serve.handlers import handlers

        self.handlers.extend(handlers())

"""The Workbench: one ipywidgets object with a tab per step of the journey.

The same object displays in a JupyterLab notebook and, through Voilà, as the web app at `/`.
Tabs are built lazily from panel factories so one broken panel shows its error instead of a blank app.
"""

from __future__ import annotations

import html
import traceback

import ipywidgets as w

from refact_lab.home import Home
from refact_lab.ui.placeholder import PlaceholderPanel


def _hosting(home: Home):
    from refact_lab.serve.hosting import HostingService
    from refact_lab.ui.hosting_panel import HostingPanel

    return HostingPanel(HostingService(home))


def _sources(home: Home):
    from refact_lab.ui.project import project_service
    from refact_lab.ui.sources_panel import SourcesPanel

    return SourcesPanel(project_service(home))


def _scan(home: Home):
    from refact_lab.ui.project import project_service
    from refact_lab.ui.scan_panel import ScanPanel

    return ScanPanel(project_service(home))


def _finetune(home: Home):
    from refact_lab.finetune.runs import RunService
    from refact_lab.ui.finetune_panel import FinetunePanel

    return FinetunePanel(RunService(home))


def _deploy(home: Home):
    from refact_lab.serve.deploy import DeployService
    from refact_lab.ui.deploy_panel import DeployPanel

    return DeployPanel(DeployService(home))


def _settings(home: Home):
    from refact_lab.ui.project import project_service
    from refact_lab.ui.settings_panel import SettingsPanel

    return SettingsPanel(project_service(home))


TABS = [
    ("Model hosting", _hosting),
    ("Sources", _sources),
    ("Scan", _scan),
    ("Fine-tune", _finetune),
    ("Deploy", _deploy),
    ("Settings", _settings),
]


def _error_panel(title: str, exc: BaseException) -> w.Widget:
    detail = html.escape("".join(traceback.format_exception(exc))[-4000:])
    return w.HTML(f"<b>The {html.escape(title)} panel failed to load:</b><pre>{detail}</pre>")


class Workbench:
    """The app: `Workbench()` as the last line of a notebook cell displays it."""

    def __init__(self, home: Home | str | None = None):
        self.home = home if isinstance(home, Home) else Home.resolve(home).ensure()
        self.panels: dict[str, object] = {}
        children = []
        for title, factory in TABS:
            try:
                panel = factory(self.home)
                self.panels[title] = panel
                children.append(panel.widget)
            except Exception as exc:  # one broken panel must not take the whole app down
                children.append(_error_panel(title, exc))
        header = w.HTML("<h2 style='margin:4px 0'>refact_lab</h2>")
        self.tabs = w.Tab(children=children, titles=[t for t, _ in TABS])
        self.tabs.add_class("refact-lab-tabs")
        self.widget = w.VBox([header, self.tabs])

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

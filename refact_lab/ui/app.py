"""The Workbench: one ipywidgets object with a tab per step of the journey.

The same object displays in a JupyterLab notebook and, through Voilà, as the web app at `/`.
Tabs are built lazily from panel factories so one broken panel shows its error instead of a blank app.
"""

from __future__ import annotations

import html
import traceback

import ipywidgets as w

from refact_lab.home import Home


class AppServices:
    """The services one Workbench's panels share, passed to every tab factory (no module-level state).

    Sources, Scan and Settings share one ProjectService: a source added in Sources appears in Scan at once,
    and an Update in Sources starts the scan the Scan tab shows. Services are created on first use.
    """

    def __init__(self, home: Home):
        self.home = home
        self._project = None

    @property
    def project(self):
        if self._project is None:
            from refact_lab.data.service import ProjectService

            self._project = ProjectService(self.home)
        return self._project


def _hosting(services: AppServices):
    from refact_lab.serve.hosting import HostingService
    from refact_lab.ui.hosting_panel import HostingPanel

    return HostingPanel(HostingService(services.home))


def _sources(services: AppServices):
    from refact_lab.ui.sources_panel import SourcesPanel

    return SourcesPanel(services.project)


def _scan(services: AppServices):
    from refact_lab.ui.scan_panel import ScanPanel

    return ScanPanel(services.project)


def _finetune(services: AppServices):
    from refact_lab.finetune.runs import RunService
    from refact_lab.ui.finetune_panel import FinetunePanel

    return FinetunePanel(RunService(services.home))


def _deploy(services: AppServices):
    from refact_lab.serve.deploy import DeployService
    from refact_lab.ui.deploy_panel import DeployPanel

    return DeployPanel(DeployService(services.home))


def _settings(services: AppServices):
    from refact_lab.ui.settings_panel import SettingsPanel

    return SettingsPanel(services.project)


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
        self.services = AppServices(self.home)
        self.panels: dict[str, object] = {}
        children = []
        for title, factory in TABS:
            try:
                panel = factory(self.services)
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

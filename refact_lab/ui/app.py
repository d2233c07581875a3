"""The Workbench: one ipywidgets object with a tab per step of the journey.

The same object displays in a JupyterLab notebook and, through Voilà, as the web app at `/`.
Tabs are built lazily from panel factories so one broken panel shows its error instead of a blank app.
Above the tabs a journey bar (1 Model, 2 Sources, 3 Scan, 4 Fine-tune, 5 Deploy) tells a newcomer where to
start and where each step leads; its buttons open the tabs. Opening a tab calls its panel's `on_show()` (if it
has one) so lists read on an earlier visit (runs, checkpoints, datasets) are re-read from the services.
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

    return FinetunePanel(RunService(services.home), projects=services.project)


def _deploy(services: AppServices):
    from refact_lab.serve.deploy import DeployService
    from refact_lab.ui.deploy_panel import DeployPanel

    return DeployPanel(DeployService(services.home))


def _settings(services: AppServices):
    from refact_lab.ui.settings_panel import SettingsPanel

    return SettingsPanel(services.project)


# (step title on the journey bar, tab title, what the step does)
JOURNEY = [
    ("Model", "Model hosting", "pick the base model and where it runs"),
    ("Sources", "Sources", "add your repositories, folders or archives"),
    ("Scan", "Scan", "filter them into a train/test dataset"),
    ("Fine-tune", "Fine-tune", "train a LoRA adapter on it"),
    ("Deploy", "Deploy", "serve it and connect your IDE"),
]

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
        header = w.HTML("<h2 style='margin:4px 0'>refact_lab</h2>"
                        "<div style='color:#555'>Fine-tune a code-completion model on your own code and serve it "
                        "to your IDE, in five steps (hover a step for what it does):</div>")
        self.tabs = w.Tab(children=children, titles=[t for t, _ in TABS])
        self.tabs.add_class("refact-lab-tabs")
        titles = [t for t, _ in TABS]
        self.steps = []
        for i, (step, tab, what) in enumerate(JOURNEY, 1):
            button = w.Button(description=f"{i} {step}", tooltip=f"{i}. {step}: {what}",
                              layout=w.Layout(width="auto"))
            button.add_class("refact-lab-journey-step")
            button.on_click(lambda _, index=titles.index(tab): setattr(self.tabs, "selected_index", index))
            self.steps.append(button)
        arrows = [w.HTML("<span style='padding:4px;color:#777'>→</span>") for _ in self.steps[1:]]
        journey = w.HBox([x for pair in zip(self.steps, arrows + [None]) for x in pair if x is not None])
        journey.add_class("refact-lab-journey")
        self.tabs.observe(lambda ch: self._opened(ch["new"]), "selected_index")
        self._opened(self.tabs.selected_index or 0)
        self.widget = w.VBox([header, journey, self.tabs])

    def _opened(self, index: int | None) -> None:
        """A tab was opened: mark its step on the journey bar and let its panel re-read what it shows."""
        if index is None:
            return
        title = TABS[index][0]
        for button, (_, tab, _) in zip(self.steps, JOURNEY):
            button.button_style = "info" if tab == title else ""
        panel = self.panels.get(title)
        on_show = getattr(panel, "on_show", None)
        if on_show is not None:
            try:
                on_show()
            except Exception as exc:  # a failed refresh must not break tab switching; the panel keeps its view
                import logging

                logging.getLogger(__name__).warning("refreshing the %s tab failed: %s", title, exc)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

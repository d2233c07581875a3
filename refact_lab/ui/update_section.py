"""The "Keep current" section of the Settings tab: the update schedule, Update now / Stop, the job's status line,
and the deploy history with Roll back. A view over `refact_lab.keep_current.service.UpdateService`."""

from __future__ import annotations

import html

import ipywidgets as w

from refact_lab.keep_current.schedule import CHOICES


class UpdateSection:
    def __init__(self, service):
        self.service = service
        self.last_error: str | None = None
        hours = service.schedule()["every_hours"]
        options = list(CHOICES) if any(h == hours for _, h in CHOICES) else [*CHOICES, (f"every {hours} hours", hours)]
        self.schedule = w.Dropdown(options=options, value=hours, description="Update", layout=w.Layout(width="260px"))
        self.schedule.add_class("refact-lab-update-schedule")
        self.schedule.observe(lambda ch: self._call(self.service.set_schedule, ch["new"]), names="value")
        self.update_button = w.Button(description="Update now", icon="refresh", layout=w.Layout(width="auto"))
        self.update_button.add_class("refact-lab-update-now")
        self.update_button.on_click(lambda _: self._call(self.service.start))
        self.stop_button = w.Button(description="Stop", icon="stop", layout=w.Layout(width="auto"))
        self.stop_button.add_class("refact-lab-update-stop")
        self.stop_button.on_click(lambda _: self._call(self.service.stop))
        self.status = w.HTML()
        self.status.add_class("refact-lab-update-status")
        self.history = w.Dropdown(options=[], description="Deploys", layout=w.Layout(width="520px"))
        self.rollback_button = w.Button(description="Roll back to this", icon="undo", layout=w.Layout(width="auto"))
        self.rollback_button.add_class("refact-lab-update-rollback")
        self.rollback_button.on_click(lambda _: self._call(self.service.rollback, self.history.value))
        self.widget = w.VBox([
            w.HTML(f"<b>Keep current</b> (project <code>{html.escape(service.project)}</code>)<br>"
                   "<span style='color:#777'>An update fetches new commits, rescans, fine-tunes from the deployed "
                   "adapter and deploys the result only if the scoreboard says it is not worse.</span>"),
            w.HBox([self.schedule, self.update_button, self.stop_button]), self.status,
            w.HBox([self.history, self.rollback_button])])
        self.widget.add_class("refact-lab-update")
        self.refresh()

    def _call(self, fn, *args) -> None:
        try:
            fn(*args)
            self.last_error = None
        except Exception as e:  # shown, not raised into the kernel
            self.last_error = str(e)
        self.refresh()

    def refresh(self) -> None:
        line = html.escape(self.service.summary())
        if self.last_error:
            line += f"<br><span style='color:#b00'>{html.escape(self.last_error)}</span>"
        self.status.value = line
        entries = self.service.history()
        self.history.options = [(f"{e['n']}: {e['checkpoint'] or 'off'} ({e['by']})", e["n"])
                                for e in reversed(entries)]
        self.rollback_button.disabled = len(entries) < 2

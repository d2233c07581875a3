"""What the app's update section calls: the schedule, the update job (start, stop, status) and the deploy
history with rollback, for one project. No widgets here; the panel only calls these methods."""

from __future__ import annotations

import dataclasses

from refact_lab.home import Home
from refact_lab.keep_current import deploys, schedule


class UpdateService:
    def __init__(self, home: Home | str | None = None, project: str = "default"):
        self.home = home if isinstance(home, Home) else Home.resolve(home)
        self.project = project

    # the schedule (settings.json)
    def schedule(self) -> dict:
        return dataclasses.asdict(schedule.load_schedule(self.home))

    def set_schedule(self, every_hours: int) -> dict:
        """Schedule this project's update every `every_hours` hours (0: off)."""
        from refact_lab.config import UpdateSchedule

        return dataclasses.asdict(schedule.save_schedule(self.home, UpdateSchedule(int(every_hours), self.project)))

    # the job
    def status(self) -> dict:
        return schedule.read_status(self.home, self.project)

    def start(self) -> int:
        """Launch an update now (detached); returns its pid. RuntimeError while one runs."""
        return schedule.launch(self.home, self.project)["pid"]

    def stop(self) -> dict:
        return schedule.stop(self.home, self.project)

    def log_tail(self, lines: int = 20) -> str:
        return schedule.log_tail(self.home, self.project, lines)

    def summary(self) -> str:
        """The status line: state, the run being trained, or the outcome."""
        s = self.status()
        state = s.get("state", "idle")
        if state == "idle":
            return "no update has run yet"
        if state in schedule.ACTIVE:
            return f"update {state}" + (f": training run {s['run']}" if s.get("run") else "")
        result = s.get("result") or {}
        if state == "finished":
            return ("update finished: " + ("deployed " + str(result.get("checkpoint")) if result.get("deployed")
                                           else "nothing deployed") + f" ({result.get('reason')})")
        return f"update {state}: {s.get('error')}"

    # the history
    def history(self) -> list[dict]:
        return deploys.history(self.home, self.project)

    def rollback(self, n: int | None = None) -> dict:
        return deploys.rollback(self.home, self.project, n)

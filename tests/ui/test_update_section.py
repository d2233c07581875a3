"""The Keep current section of the Settings tab: its controls call the update service and show its answers."""

from __future__ import annotations

from refact_lab.data.service import ProjectService
from refact_lab.keep_current.service import UpdateService
from refact_lab.ui.settings_panel import SettingsPanel


def test_schedule_update_now_and_stop_call_the_service(home):
    service = UpdateService(home, "proj")
    started = []
    service.start = lambda: started.append(1) or 123
    panel = SettingsPanel(ProjectService(home, "proj"), updates=service).updates
    assert panel.schedule.value == 0 and "no update has run yet" in panel.status.value   # off by default

    panel.schedule.value = 24                                    # "daily"
    assert home.load_settings()["update_schedule"] == {"every_hours": 24, "project": "proj"}
    panel.update_button.click()
    assert started == [1]
    panel.stop_button.click()                                    # nothing running: said, not raised
    assert panel.last_error == "no update of 'proj' is running" and "is running" in panel.status.value
    assert panel.rollback_button.disabled                        # no earlier deploy to roll back to

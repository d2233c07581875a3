"""The one `ProjectService` that the Sources, Scan and Settings tabs of a Workbench share.

Sharing it is what makes a source added in Sources appear in Scan at once, and what lets an Update in Sources
start the scan that the Scan tab then shows. The services are kept per `Home` object (weakly: they go when
the Workbench that holds the Home goes), so two Workbenches on different state directories never mix.
"""

from __future__ import annotations

import weakref

from refact_lab.data.service import ProjectService
from refact_lab.home import DEFAULT_PROJECT, Home

_SERVICES: "weakref.WeakKeyDictionary[Home, ProjectService]" = weakref.WeakKeyDictionary()


def project_service(home: Home, project: str = DEFAULT_PROJECT) -> ProjectService:
    service = _SERVICES.get(home)
    if service is None or service.project != project:
        service = ProjectService(home, project)
        _SERVICES[home] = service
    return service

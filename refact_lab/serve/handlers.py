"""HTTP handlers of the inference API: parse, call the service from the server settings, write JSON.

Every error, including a missing or wrong token, is answered as JSON with a message that names the problem.
"""

from __future__ import annotations

import json
from http.client import responses

from jupyter_server.base.handlers import APIHandler
from tornado import web


class ApiHandler(APIHandler):
    """Base for our API: JSON errors in the OpenAI shape, clear auth failures."""

    @property
    def lab(self) -> dict:
        return self.settings["refact_lab"]

    def check_xsrf_cookie(self):
        # API clients (IDE plugins, the openai package) send a bearer token, never an XSRF cookie; a token-
        # authenticated request skips the check in jupyter_server, and with --no-auth the server disables it.
        return super().check_xsrf_cookie()

    def write_json(self, obj, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj))

    def write_error(self, status_code: int, **kwargs) -> None:
        message = responses.get(status_code, "error")
        exc = (kwargs.get("exc_info") or (None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        if status_code == 403 and not self.current_user:
            status_code, message = 401, ("missing or wrong token: send 'Authorization: Bearer <token>' "
                                         "(the token is printed when the server starts)")
            self.set_status(401)
            self.set_header("WWW-Authenticate", 'Bearer realm="refact_lab"')
        elif not isinstance(exc, web.HTTPError) and exc is not None:
            message = f"internal error: {type(exc).__name__}: {exc}"
        self.set_header("Content-Type", "application/json")
        kind = "authentication_error" if status_code == 401 else (
            "invalid_request_error" if 400 <= status_code < 500 else "server_error")
        self.finish(json.dumps({"error": {"message": message, "type": kind, "code": status_code},
                                "detail": message}))


class HealthHandler(ApiHandler):
    @web.authenticated
    def get(self):
        self.write_json({"status": "ok", "version": self.lab["version"], "home": str(self.lab["home"].root)})


def handlers() -> list[tuple]:
    return [(r"/v1/health", HealthHandler)]

"""A Voilà page's kernel ends with its page: reloads and closed tabs must not pile up kernels (issue 11.9).

Two mechanisms, the first immediate, the second a backstop:

1. Voilà's page posts `/voila/api/shutdown/<kernel>` on `beforeunload`, with the `_xsrf` cookie's value as the
   form's `_xsrf`. Voilà 0.5 streams the page before anything asks tornado for the XSRF token, so the cookie
   is never set, the post carries an empty value and is refused with 403 (voila-dashboards/voila#1458): every
   reload left its kernel running (4 kernels, 1.6 GB after three reloads). The render handler is given a
   `prepare` that sets the cookie before the first byte is sent; the XSRF check itself stays as it is.
2. A kernel with no open connection (its page is gone without a word: a crash, a killed browser) and idle
   for `timeout` seconds is shut down by jupyter_server's culler. Connected kernels are never culled (an open
   page idle for hours keeps its kernel) and neither are busy ones.
"""

from __future__ import annotations

import inspect

VOILA_RENDER_PATTERN = "/voila/render/"


def _rules(router):
    """Every rule of a tornado router tree (the application nests routers per host)."""
    for rule in getattr(router, "rules", []):
        yield rule
        yield from _rules(rule.target)


def _with_xsrf_cookie(handler_class):
    class XsrfCookieHandler(handler_class):
        """The Voilà page handler, which sets the `_xsrf` cookie while headers can still change."""

        async def prepare(self, *args, **kwargs):
            result = super().prepare(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            # after authentication (the cookie's lifetime depends on the user), before the first byte
            if not self._finished:
                self.xsrf_token  # noqa: B018 - reading it sets the cookie (tornado does it lazily)
            return result

    XsrfCookieHandler.__name__ = XsrfCookieHandler.__qualname__ = f"XsrfCookie{handler_class.__name__}"
    XsrfCookieHandler._refact_lab_xsrf = True
    return XsrfCookieHandler


def set_xsrf_cookie_on_voila_pages(web_app) -> int:
    """Wrap the handler of Voilà's render route(s) in `web_app`; returns how many routes were changed."""
    changed = 0
    for rule in _rules(web_app.default_router):
        pattern = getattr(getattr(rule.matcher, "regex", None), "pattern", "")
        target = rule.target
        if (VOILA_RENDER_PATTERN in pattern and isinstance(target, type)
                and not getattr(target, "_refact_lab_xsrf", False)):
            rule.target = _with_xsrf_cookie(target)
            changed += 1
    return changed


def cull_unattended_kernels(kernel_manager, timeout: int, interval: int) -> bool:
    """Turn on jupyter_server's culler for kernels with no connection, unless the operator configured culling
    (then theirs wins). Must run before the first kernel starts, which starts the culler."""
    if timeout <= 0 or getattr(kernel_manager, "cull_idle_timeout", 1) > 0:
        return False
    kernel_manager.cull_idle_timeout = timeout
    kernel_manager.cull_interval = interval
    kernel_manager.cull_connected = False
    kernel_manager.cull_busy = False
    return True

"""Keep the server's token out of its logs.

jupyter_server masks `token=` in its own access log lines, but tornado's warning for a refused request
("403 GET /voila/static/?token=... : is not a file") and a handler's messages print the URL as it came. One
filter, set on every log handler of the server process, rewrites `token=...`, `Bearer ...` and
`Authorization: token ...` to `[secret]` in whatever line passes through it, whichever logger wrote it.
"""

from __future__ import annotations

import logging
import re

SECRET = "[secret]"
_PATTERNS = [
    # query strings and form bodies: token=..., _xsrf is not a secret worth hiding but a token may be its value
    re.compile(r"(?i)(\btoken=)(?!\[secret\])[^&\s'\"#;,)]+"),
    # Authorization headers, as printed in a debug dump or an error message
    re.compile(r"(?i)(\bbearer\s+)(?!\[secret\])[^\s'\",;]+"),
    re.compile(r"(?i)(\bauthorization:?\s*['\"]?token\s+)(?!\[secret\])[^\s'\",;]+"),
]


def mask_secrets(text: str) -> str:
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + SECRET, text)
    return text


class SecretMaskFilter(logging.Filter):
    """Rewrites the record's message with its secrets masked; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string is logging's to report, not ours
            return True
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            # formatters reuse exc_text when it is set: format the traceback here, masked
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        return True


def mask_secrets_in_logs() -> int:
    """Put the filter on every handler of every logger that exists now (idempotent). Returns how many
    handlers got it. Handlers, not loggers: a logger's filters do not see records its children propagate."""
    loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger)]
    added = 0
    for lg in loggers:
        for handler in list(lg.handlers):
            if not any(isinstance(f, SecretMaskFilter) for f in handler.filters):
                handler.addFilter(SecretMaskFilter())
                added += 1
    return added

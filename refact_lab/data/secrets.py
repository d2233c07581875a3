"""Stage 1's secrets rule: find credentials in a file with detect-secrets, and redact them.

A model trained on private code memorises what it sees, credentials included, so a file holding one is either
rejected (reason `secret`) or, with `ScanSettings.secrets = "redact"`, accepted with every secret replaced by a
placeholder (`REDACTED_AWS_ACCESS_KEY`, ...) in the copy training reads. What is found is described by kind and
line only: the secret's value lives in memory for the redaction and is never written, logged or returned in a
detail.

Detection is detect-secrets' plugins and filters, in process (cloud and service keys, private keys, tokens,
passwords in URLs, keyword assignments such as `password = "..."` and config `password: ...`, high-entropy
quoted strings). On top of it two narrow regexes: whole PEM private-key blocks, so a redaction removes the
key's body and not only its `BEGIN` line, and passwords in URLs with characters detect-secrets' form stops at.

detect-secrets costs about 0.3 ms per line (every plugin and filter is called per line), so `SecretScanner`
first runs a prefilter: cheap gates over the whole text, then, on the lines they mark, the plugins' own
patterns (their deny-lists, the keyword list, quoted strings long enough to pass the entropy limits). Only
lines that pass both go to detect-secrets. It is a superset by construction: a plugin can only report a line
its own pattern matches; a plugin whose shape is unknown turns the prefilter off (every line is checked).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

_RULES_VERSION = 1   # bump when the plugins chosen or the extra patterns change (cached findings expire)
# Not credentials: a public IP address is a fact about a network, and flagging it would reject most configs.
_SKIPPED_PLUGINS = {"IPPublicDetector"}
# Whole PEM private-key blocks (detect-secrets reports the BEGIN line only). Also finds a block written on
# one line with literal "\n" escapes, as keys stored in JSON or code strings are. Without its END line a block
# runs on over the lines that look like a key's body (base64) or its headers ("Proc-Type: 4,ENCRYPTED").
_PEM_BLOCK = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?)-----"
    r"(?:.*?-----END \1-----|(?:(?:\\n|\r?\n)(?:[A-Za-z0-9+/=]{16,}|[A-Za-z-]+: [A-Za-z0-9,-]+))*)", re.DOTALL)
_PEM_BEGIN = r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY"
_PEM_KIND = "Private Key"     # detect-secrets' own name for its PrivateKeyDetector
# Credentials in a URL. detect-secrets' BasicAuthDetector stops at characters such as "!" that RFC 3986 allows
# in a password (postgres://admin:s3cret!@db), so this wider form runs beside it. Templates ("{password}",
# "$PASS", "%(pw)s", "<password>") and placeholder words are not credentials.
_URL_PASSWORD = re.compile(r"://[^\s/:@'\"]+:([^\s/@'\"]+)@")   # led by "://": a fast scan
_URL_KIND = "Basic Auth Credentials"   # detect-secrets' name for the same kind
_NOT_A_PASSWORD = re.compile(r"[{}$<>%*]|^(?:x+|pass(?:word)?|passwd|pwd|secret|token|user|\.\.\.)$", re.I)
# Cheap supersets of the slow plugins' patterns, for the prefilter's first step: words looked up in the
# lower-cased text (a plain substring scan), or a simpler pattern. Every pattern of the keyword family
# (KeywordDetector, Cloudant, IBM Cloud IAM, IBM COS HMAC, SoftLayer) holds one of these words ("api_?key" has
# "key", "pwd" has "pw", "contraseña" has "contrase"), or, for their URL forms, the host's name.
_KEYWORD_WORDS = ("key", "pw", "pass", "token", "secret", "contrase", "cloudant.com", "softlayer.com")
_WORD_GATES = {"KeywordDetector": _KEYWORD_WORDS, "CloudantDetector": _KEYWORD_WORDS,
               "IbmCloudIamDetector": _KEYWORD_WORDS, "IbmCosHmacDetector": _KEYWORD_WORDS,
               "SoftlayerDetector": _KEYWORD_WORDS,
               "AWSKeyDetector": ("a3t", "abia", "acca", "akia", "asia", "aws"),
               "SlackDetector": ("xox", "hooks.slack.com"), "StripeDetector": ("k_live_",),
               # patterns led by fixed text: their prefixes, lower-cased
               "AzureStorageKeyDetector": ("accountkey=",), "BasicAuthDetector": ("://",),
               "GitHubTokenDetector": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
               "GitLabTokenDetector": ("glpat-", "gldt-", "glft-", "glsoat-", "glrt-", "gr1348941", "glcbt-",
                                       "glimt-", "glptt-", "glagent-", "gloas-"),
               "JwtTokenDetector": ("eyj",), "NpmDetector": ("_authtoken=",), "OpenAIDetector": ("t3blbkfj",),
               "PrivateKeyDetector": ("private key", "putty-user-key-file-2"), "PypiTokenDetector": ("pypi-",),
               "SendGridDetector": ("sg.",), "SquareOAuthDetector": ("sq0csp-",)}
_LEADING_LOOKBEHIND = r"(?:(?<=\W)|(?<=^))"
_PATTERN_GATES = {"ArtifactoryDetector": r"AKC|AP[0-9A-F]", "MailchimpDetector": r"-us[0-9]"}
# A value this short is replaced only on the line where it was found, not everywhere in the file.
_SHORT_VALUE = 6


@dataclass(frozen=True)
class Finding:
    """One secret: its kind and 1-based line. `value` is for redaction only and never leaves this module's
    callers in a record, a detail or a log."""

    kind: str
    line: int
    value: str = field(repr=False, compare=False)


@dataclass
class SecretReport:
    findings: list[Finding]
    redacted: str | None = None    # the text with every finding replaced, when asked for and clean afterwards

    def describe(self, limit: int = 4) -> str:
        """"AWS Access Key on line 3; Private Key on line 7 (+2 more)" — kinds and lines, never values."""
        seen, parts = set(), []
        for f in sorted(self.findings, key=lambda f: (f.line, f.kind)):
            if (f.kind, f.line) not in seen:
                seen.add((f.kind, f.line))
                parts.append(f"{f.kind} on line {f.line}")
        more = f" (+{len(parts) - limit} more)" if len(parts) > limit else ""
        return "; ".join(parts[:limit]) + more

    @property
    def kinds(self) -> list[str]:
        return sorted({f.kind for f in self.findings})


_PLACEHOLDER = "REDACTED_"


def placeholder(kind: str) -> str:
    return _PLACEHOLDER + re.sub(r"[^A-Z0-9]+", "_", kind.upper()).strip("_")


class SecretScanner:
    """Finds secrets in texts. Use it as a context manager around a batch of files: detect-secrets keeps its
    plugin choice in a process-wide settings object, set here for the batch and restored after it."""

    def __init__(self):
        self._settings = None
        self._groups: list[tuple] = []   # (kind "words" | "re", the gate, the exact patterns' search)
        self._check_all = False
        self.lines_checked = 0     # lines detect-secrets saw (after the prefilter), for the stats
        self.files_scanned = 0
        self.version = ""          # detect-secrets' version and our rules': what a cache of findings is valid for

    def __enter__(self) -> "SecretScanner":
        shown = warnings.showwarning
        import detect_secrets.core.log  # noqa: F401 - its import turns logging.captureWarnings on process-wide
        warnings.showwarning = shown     # ... which is not ours to change
        from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
        from detect_secrets.settings import get_plugins, transient_settings

        plugins = [{"name": cls.__name__} for cls in get_mapping_from_secret_type_to_class().values()
                   if cls.__name__ not in _SKIPPED_PLUGINS]
        self._settings = transient_settings({"plugins_used": plugins})
        self._settings.__enter__()
        self._build_prefilter(get_plugins())
        from detect_secrets.__version__ import VERSION

        self.version = f"detect-secrets {VERSION}, rules {_RULES_VERSION}"
        return self

    def __exit__(self, *exc) -> None:
        if self._settings is not None:
            self._settings.__exit__(*exc)
            self._settings = None

    # --- the prefilter --------------------------------------------------------------------------------

    def _build_prefilter(self, plugins) -> None:
        """Two steps, each a superset of the next. Gates run over the whole text: words found in the
        lower-cased text (a plain substring scan) or cheap patterns, one at a time (a literal-led pattern is
        a fast C scan; one big alternation, or a pattern led by a lookbehind, is tried at every position
        and cost 70 us per line). Each line a gate marks is then matched against the exact patterns of the
        plugins behind that gate, and only lines that pass go to detect-secrets."""
        from detect_secrets.plugins import keyword
        from detect_secrets.plugins.high_entropy_strings import HighEntropyStringsPlugin

        groups: dict[tuple, list[str]] = {("words", ("private key",)): [_PEM_BEGIN],   # ours: PEM blocks,
                                          ("words", ("://",)): [_URL_PASSWORD.pattern]}  # URL passwords
        for plugin in plugins:
            name = type(plugin).__name__
            if isinstance(plugin, HighEntropyStringsPlugin):
                # Shannon entropy over n characters is at most log2(n): shorter strings can never pass.
                if math.log2(len(set(plugin.charset))) <= plugin.entropy_limit:
                    continue   # the charset cannot reach the limit at any length
                n = math.floor(2 ** plugin.entropy_limit) + 1
                cs = re.escape(plugin.charset)
                mine = [f"'[{cs}]{{{n},}}'|\"[{cs}]{{{n},}}\""]
            elif name == "KeywordDetector":
                # its words alone: every assignment pattern of the plugin contains one of them
                mine = [f"(?i:{'|'.join(keyword.DENYLIST)})"]
            elif getattr(plugin, "denylist", None):
                mine = []
                for rx in plugin.denylist:
                    if re.search(r"\\[1-9]|\(\?P=", rx.pattern):
                        self._check_all = True   # a back-reference cannot be renumbered into one alternation
                        return
                    # Dropping a leading lookbehind only widens the pattern, and it makes the search
                    # ten times faster (a lookbehind is tried at every position).
                    pattern = rx.pattern.removeprefix(_LEADING_LOOKBEHIND)
                    flags = "".join(f for f, bit in (("i", re.I), ("m", re.M), ("s", re.S), ("x", re.X))
                                    if rx.flags & bit)
                    mine.append(f"(?{flags}:{pattern})" if flags else f"(?:{pattern})")
            else:
                self._check_all = True   # a plugin of unknown shape: check every line
                return
            if name in _WORD_GATES:
                key = ("words", _WORD_GATES[name])
            else:
                key = ("re", _PATTERN_GATES.get(name) or "|".join(f"(?:{p})" for p in mine))
            groups.setdefault(key, []).extend(mine)
        self._groups = [(kind, gate if kind == "words" else re.compile(gate),
                         re.compile("|".join(f"(?:{p})" for p in exact)).search)
                        for (kind, gate), exact in groups.items()]

    def _candidate_lines(self, text: str, lines: list[str]) -> list[int]:
        """0-based indexes of the lines detect-secrets must see."""
        if self._check_all:
            return list(range(len(lines)))
        hits: list[tuple[int, int, int]] = []       # (start, end, group) of every gate match
        low = text.lower()
        same_offsets = len(low) == len(text)        # a few characters lower-case to two ("İ")
        for g, (kind, gate, _) in enumerate(self._groups):
            if kind == "re":
                hits += [(m.start(), m.end(), g) for m in gate.finditer(text)]
            elif not same_offsets:
                rx = re.compile("|".join(map(re.escape, gate)), re.IGNORECASE)
                hits += [(m.start(), m.end(), g) for m in rx.finditer(text)]
            else:
                for word in gate:
                    at = low.find(word)
                    while at >= 0:
                        hits.append((at, at + len(word), g))
                        nl = low.find("\n", at)   # the rest of a marked line adds nothing: next line
                        at = low.find(word, nl + 1) if nl >= 0 else -1
        # offsets to line numbers in one pass over the text, however many matches
        hits.sort()
        marked: dict[int, set[int]] = {}
        line = pos = 0
        for start, end, g in hits:
            line += text.count("\n", pos, start)
            pos = start
            for i in range(line, line + text.count("\n", start, end) + 1):   # \s can match a newline
                marked.setdefault(i, set()).add(g)
        return [i for i in sorted(marked) if any(self._groups[g][2](lines[i]) for g in marked[i])]

    # --- detection ------------------------------------------------------------------------------------

    def find(self, text: str, path: str) -> list[Finding]:
        """Every secret in `text`; `path` (its extension) tells detect-secrets the file type, which decides
        how the keyword plugin reads assignments (quotes required in code, not in YAML/INI)."""
        from detect_secrets.core.scan import _is_filtered_out, _scan_line
        from detect_secrets.settings import get_plugins
        from detect_secrets.util.code_snippet import get_code_snippet

        if self._settings is None:
            raise RuntimeError("SecretScanner must be used inside `with`")
        found: list[Finding] = []
        for m in _PEM_BLOCK.finditer(text):
            found.append(Finding(_PEM_KIND, text.count("\n", 0, m.start()) + 1, m.group(0)))
        for m in _URL_PASSWORD.finditer(text):
            if not _NOT_A_PASSWORD.search(m.group(1)):
                found.append(Finding(_URL_KIND, text.count("\n", 0, m.start(1)) + 1, m.group(1)))
        found = [f for f in found if _PLACEHOLDER not in f.value]   # our own placeholders are not secrets
        lines = text.split("\n")
        # What detect-secrets' own scan_file does per line (scan._process_line_based_plugins), for the
        # prefiltered lines only, with the context of the whole file.
        for idx in self._candidate_lines(text, lines):
            line, number = lines[idx].rstrip(), idx + 1
            self.lines_checked += 1
            context = get_code_snippet(lines=lines, line_number=number)
            if _is_filtered_out(required_filter_parameters=["line"], filename=path, line=line, context=context):
                continue
            for plugin in get_plugins():
                for s in _scan_line(plugin=plugin, filename=path, line=line, line_number=number, context=context):
                    if s.secret_value and not _is_filtered_out(
                            required_filter_parameters=["context"], filename=path, secret=s.secret_value,
                            plugin=plugin, line=line, context=context):
                        if _PLACEHOLDER not in s.secret_value:
                            found.append(Finding(s.type, number, s.secret_value))
        return found

    def check(self, text: str, path: str, *, redact: bool = False) -> SecretReport:
        """Find the secrets; with `redact`, also the text with each replaced. A redaction that still shows
        a secret when scanned again (a value the placeholder did not cover) is not offered: reject instead."""
        self.files_scanned += 1
        report = SecretReport(self.find(text, path))
        if redact and report.findings:
            clean = redact_text(text, report.findings)
            if not self.find(clean, path):
                report.redacted = clean
        return report


def redact_text(text: str, findings: list[Finding]) -> str:
    """Replace every finding by its placeholder. Values go everywhere they occur (the same key is often
    repeated in a comment or a second config), except very short ones, which are replaced on their own line
    only so an "x" password does not rewrite the whole file. PEM blocks go whole, last, so the line numbers
    of the other findings still hold while they are replaced."""
    lines = text.split("\n")
    # longest first: a token inside a URL is replaced before a shorter value that is part of it
    for value, kind, line in sorted({(f.value, f.kind, f.line) for f in findings if f.kind != _PEM_KIND},
                                    key=lambda t: -len(t[0])):
        if len(value) >= _SHORT_VALUE:
            lines = [ln.replace(value, placeholder(kind)) for ln in lines]
        elif 0 < line <= len(lines):
            lines[line - 1] = lines[line - 1].replace(value, placeholder(kind))
    return _PEM_BLOCK.sub(lambda m: placeholder(_PEM_KIND), "\n".join(lines))

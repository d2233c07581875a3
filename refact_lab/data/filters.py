"""Stage 1 of the scan: one small rule per reason code, the one function that reads a file, and the one that
decodes it (`decode_text`, which training uses too, so it trains on the text the scan judged).

Every rule looks at one `FileEntry` (and the scan's `RuleContext`) and returns `None` to keep the file or a
`(reason_code, human detail)` pair to reject it. Rules never log, count or write: the pipeline runner does the
bookkeeping (STYLE.md point 1).

Rules come in lists so the cheap ones run first:

* `NAME_RULES` and `SELECT_RULES` decide from the path and the size alone (masks, vendored folders, lock
  files, binary extensions, file type, size) — a file they reject is never opened;
* `CONTENT_RULES` use the `Facts` that `read_facts` measured in one read of the file (decoding, binary
  bytes, emptiness, "generated" headers, digit share) and, last, the duplicate check.

`Facts` hold only settings-independent measurements (counts, not verdicts), so the scan can cache them per
file and re-apply changed thresholds without reading anything again.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Tuple

from refact_lab.data import archives, languages

Verdict = Optional[Tuple[str, str]]  # None keeps the file; (reason_code, detail) rejects it

# Reason codes, in the order a file meets them. The UI and the stats use these strings.
LINGUIST_ERROR = "linguist_error"
NOT_TEXT = "not_text"
EMPTY = "empty"
TOO_LARGE = archives.TOO_LARGE   # also what an archive reports of a member it did not extract for its size
GENERATED = "generated"
VENDORED = "vendored"
EXCLUDED_BY_MASK = "excluded_by_mask"
TYPE_OFF = "type_off"
LOTS_OF_DIGITS = "lots_of_digits"
DUPLICATE = "duplicate"
SECRET = "secret"
LOSS_TOO_HIGH = "loss_too_high"
FILTER_EMPTY = "filter_empty"
FORCED_EXCLUDE = "forced_exclude"
# Not files at all: recorded by the listing (sources.walk_files, archives), never read. The listing also records
# folders and files it cannot look at, as linguist_error, and archive members too large to extract, as too_large.
SYMLINK, SPECIAL_FILE = archives.SYMLINK, archives.SPECIAL_FILE

REASONS = (EXCLUDED_BY_MASK, VENDORED, GENERATED, NOT_TEXT, TYPE_OFF, TOO_LARGE, LINGUIST_ERROR, EMPTY,
           LOTS_OF_DIGITS, DUPLICATE, SECRET, LOSS_TOO_HIGH, FILTER_EMPTY, FORCED_EXCLUDE, SYMLINK, SPECIAL_FILE)


class Facts(NamedTuple):
    """What one read of a file tells; independent of the scan settings so it can be cached."""

    sha256: str
    size: int
    error: str | None = None        # could not read or decode: the message
    binary: bool = False            # NUL bytes near the start (git's own heuristic)
    digits: int = 0                 # counted over bytes: non-ASCII characters count once per byte
    nonspace: int = 0
    generated: str | None = None    # the header line that says the file is generated, or "minified ..."


@dataclass(slots=True)
class FileEntry:
    """One file of one source, as it moves through the scan."""

    source: str
    path: str                       # relative to the source root, '/'-separated
    file: str                       # absolute path on disk
    size: int
    mtime_ns: int = 0
    test: bool = False              # held out: its source or the file itself is marked test
    language: str | None = None
    facts: Facts | None = None
    loss: float | None = None
    loss_error: str | None = None
    sketch: object = None           # MinHash of the content, only when near-dup detection is on
    forced: bool = False            # force-included by the user: verdicts are recorded, not applied
    redaction: object = None        # secrets.SecretReport with the redacted text, until the runner stores it
    redacted: dict | None = None    # the stored copy training reads instead: {"file", "sha256", "secrets", "detail"}

    @property
    def key(self) -> str:
        return f"{self.source}/{self.path}"

    @property
    def sha256(self) -> str | None:
        return self.facts.sha256 if self.facts else None


@dataclass
class RuleContext:
    """What the rules need besides the file: thresholds, compiled masks, selected types, seen hashes."""

    max_bytes: int
    digit_share: float
    include_spec: object | None = None      # pathspec.GitIgnoreSpec
    exclude_spec: object | None = None
    types_on: frozenset | None = None       # None: every type is on
    seen: dict = field(default_factory=dict)  # sha256 -> key of the first file with that content
    loss_threshold: float = 3.0
    force_exclude: frozenset = frozenset()  # "source/path" keys the user excluded
    near_index: object | None = None        # dedup.NearDupIndex when near-dup detection is on
    source_names: dict = field(default_factory=dict)  # source id -> the name people know it by
    secret_scanner: object | None = None    # secrets.SecretScanner while the secrets rule runs
    secrets_mode: str = "reject"            # ScanSettings.secrets
    secret_cache: dict = field(default_factory=dict)  # "sha256:.ext" -> [[kind, line], ...] of earlier scans

    def describe(self, key: str) -> str:
        """A "source_id/path" key as people read it: the path, and the source by its name, not its id."""
        source, _, path = key.partition("/")
        return f"{path} in {self.source_names.get(source, source)}"

    @classmethod
    def from_settings(cls, settings, types_on=None) -> "RuleContext":
        import pathspec

        return cls(
            max_bytes=settings.max_file_kib * 1024,
            digit_share=settings.digit_share,
            include_spec=pathspec.GitIgnoreSpec.from_lines(settings.include) if settings.include else None,
            exclude_spec=pathspec.GitIgnoreSpec.from_lines(settings.exclude) if settings.exclude else None,
            types_on=frozenset(types_on) if types_on is not None else None,
            loss_threshold=settings.loss_threshold if settings.loss_threshold is not None else 3.0,
        )


# --- reading a file once ---------------------------------------------------------------------------------

_DIGITS = b"0123456789"
_SPACE = bytes(range(33))   # whitespace and control characters
_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
_BOM_FIRST = frozenset(bom[:1] for bom, _ in _BOMS)   # most files start with none of these bytes

# Markers that mean "a tool wrote this file" wherever they sit in the header.
# "do not edit" counts only as an instruction about the file ("DO NOT EDIT.", "Do not edit this file manually",
# "DO NOT EDIT UNLESS YOU ARE SURE"), not in prose like "we do not edit the tree in place".
_GENERATED_ANYWHERE = re.compile(
    rb"@generated\b|made by gnu bison|generated by the protocol buffer compiler"
    rb"|do not (?:edit|modify)(?:\s*[.!:;,)*/-]|\s*$|\s+(?:this|the file|the generated|manually|by hand|unless"
    rb"|directly|it\b))", re.MULTILINE)
# Weaker phrases, trusted only on a comment line near the top ("# Generated by Django 4.2", "/* Generated by
# Cython 3.0 */", "// Generated from Expr.g4 by ANTLR 4.13", " * Autogenerated by Thrift Compiler").
_GENERATED_HEADER = re.compile(
    rb"\bgenerated (?:by|from|with|using)\b|\bauto-?generated\b|\bautomatically generated\b"
    rb"|\bmachine[- ]generated\b|\bcode generated\b")
_COMMENT_START = (b"#", b"//", b"/*", b"*", b"--", b";", b"<!--", b'"""', b"'''", b"%", b"{-", b"(*", b"'", b"rem ")
_HEADER_BYTES = 1024
_HEADER_LINES = 10
# Average line length above which text is minified or machine-written (linguist uses 110 for JS/CSS).
MINIFIED_AVG_LINE = 200


def _generated_marker(data: bytes) -> str | None:
    head = data[:_HEADER_BYTES]
    low = head.lower()
    # Most files say none of this: one substring test each spares them the line-by-line regexes.
    if b"generat" in low or b"do not" in low or b"bison" in low:
        # The first line that says so, so the detail names the tool ("Autogenerated by Thrift") when it can.
        for line in head.split(b"\n", _HEADER_LINES)[:_HEADER_LINES]:
            lowline = line.strip().lower()
            if _GENERATED_ANYWHERE.search(lowline) or (lowline.startswith(_COMMENT_START)
                                                       and _GENERATED_HEADER.search(lowline)):
                return _snippet(line)
        m = _GENERATED_ANYWHERE.search(low)
        if m:
            start = low.rfind(b"\n", 0, m.start()) + 1
            end = low.find(b"\n", m.end())
            return _snippet(head[start:end if end >= 0 else len(head)])
    # Judged on the first 4 KiB: minified bundles and one-line data dumps show it from the start (after a
    # license comment of a few lines at most), and counting newlines in all of a file would cost a pass.
    n = min(len(data), 4096)
    if n > 1024:
        avg = n // (data.count(b"\n", 0, 4096) + 1)   # no copy of the sample
        if avg > MINIFIED_AVG_LINE:
            return f"minified or machine-written: average line {avg} characters"
    return None


def _count(data: bytes) -> tuple[int, int]:
    """(digits, non-space characters), counted over bytes; "space" is every byte up to 0x20 (whitespace and
    the rare control character). numpy's vectorised compares are several times faster than bytes.translate on
    large files; below 2 KiB its call overhead loses, so small files stay in bytes."""
    n = len(data)
    if n < 2048:
        return n - len(data.translate(None, _DIGITS)), len(data.translate(None, _SPACE))
    import numpy as np

    a = np.frombuffer(data, np.uint8)
    digits = int(np.count_nonzero((a - np.uint8(48)) < 10))          # '0'..'9'; uint8 wraps below '0'
    return digits, n - int(np.count_nonzero(a <= 32))


def _snippet(line: bytes) -> str:
    text = line.decode("utf-8", "replace").strip().strip("/*#;-<>!' \t\"").strip()
    return f"header says {text[:80]!r}"


def _read(file: str, limit: int, listed: int) -> bytes:
    """At most `limit` bytes of a file. Unbuffered, and one read() call where it returns all the listing
    promised (a regular file's always does): a buffered read would add a second call per file just to see
    the end. A short read (a network file system may return less) goes on until the end or the limit."""
    with open(file, "rb", buffering=0) as f:
        data = f.read(limit)
        if len(data) < min(limit, listed):
            parts = [data]
            got = len(data)
            while got < limit:
                more = f.read(limit - got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
    return data


def text_codec(data: bytes) -> str:
    """The codec a file is read with: the one its byte-order mark names, else UTF-8."""
    for bom, codec in (_BOMS if data[:1] in _BOM_FIRST else ()):
        if data.startswith(bom):
            return codec
    return "utf-8"


def decode_text(data: bytes, errors: str = "strict") -> str:
    """A file's bytes as text, the one way the scan, the secrets rule and training all read it: decoded by
    its byte-order mark (UTF-8, UTF-16, UTF-32), else as UTF-8, the mark itself dropped. Training must see
    the text the scan judged, not a UTF-16 file's bytes read as UTF-8."""
    return data.decode(text_codec(data), errors)


def read_facts(file: str, max_bytes: int, listed: int | None = None) -> Facts:
    """Read a file once (at most max_bytes + 1 bytes) and measure everything the content rules need.
    `listed` is the size the listing saw (None: unknown, read until the end or the limit)."""
    limit = max_bytes + 1
    try:
        data = _read(file, limit, limit if listed is None else listed)
    except OSError as e:
        return Facts("", 0, error=f"cannot read: {e.strerror or e}")
    sha = hashlib.sha256(data).hexdigest()
    size = len(data)
    codec = text_codec(data)
    if codec != "utf-8":
        try:
            data = decode_text(data).encode("utf-8")   # measured as the UTF-8 text training will see
        except UnicodeDecodeError as e:
            return Facts(sha, size, error=f"cannot decode as {codec}: {e.reason} at byte {e.start}")
    else:
        if data.find(b"\0", 0, 8000) >= 0:
            return Facts(sha, size, binary=True)
        if not data.isascii():
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                return Facts(sha, size, error=f"not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}")
    digits, nonspace = _count(data)
    return Facts(sha, size, None, False, digits, nonspace, _generated_marker(data))


def read_facts_batch(jobs: list[tuple[str, int, int]]) -> list[Facts]:
    """For a worker process: many files in one call, so the pickling cost is per batch, not per file.
    A job is (file, max_bytes, listed size)."""
    return [read_facts(*job) for job in jobs]


# --- path rules (no reading) -----------------------------------------------------------------------------

def forced_exclude(e: FileEntry, ctx: RuleContext) -> Verdict:
    if e.key in ctx.force_exclude:
        return FORCED_EXCLUDE, "force-excluded by the user"
    return None


def excluded_by_mask(e: FileEntry, ctx: RuleContext) -> Verdict:
    if ctx.include_spec is not None and not ctx.include_spec.match_file(e.path):
        return EXCLUDED_BY_MASK, "not matched by any include pattern"
    if ctx.exclude_spec is not None:
        r = ctx.exclude_spec.check_file(e.path)
        if r.include:
            return EXCLUDED_BY_MASK, f"matches exclude pattern {ctx.exclude_spec.patterns[r.index].pattern!r}"
    return None


# Folders of other people's code (GitHub linguist's vendor.yml, trimmed to what shows up in practice).
VENDOR_DIRS = frozenset("""
vendor vendors vendored _vendor third_party third-party thirdparty 3rdparty 3rd_party external externals extern
node_modules bower_components jspm_packages web_modules Pods Carthage .venv venv virtualenv site-packages
dist-packages .tox .nox .eggs .bundle .yarn .pnpm-store Godeps .cargo deps_vendor __pypackages__ .gradle
""".split())
# Bundled copies of well-known libraries dropped into a project's static folder.
_BUNDLED_LIB = re.compile(
    r"^(?:jquery|jquery-ui|bootstrap|popper|lodash|underscore|backbone|angular|ember|knockout|handlebars"
    r"|mustache|moment|require|modernizr|d3|react|react-dom|vue|socket\.io"
    r"|codemirror|tinymce|ckeditor|mathjax|fontawesome|font-awesome|normalize|html5shiv|respond)"
    r"(?:[.-][\w.-]*)?\.(?:js|css)$", re.IGNORECASE)


_VENDOR_DIRS_LOWER = frozenset(d.lower() for d in VENDOR_DIRS)


def vendored(e: FileEntry, ctx: RuleContext) -> Verdict:
    parts = e.path.split("/")
    for d in parts[:-1]:
        if d.lower() in _VENDOR_DIRS_LOWER:
            return VENDORED, f"inside {d}/"
    name = parts[-1]
    if name.lower().endswith((".js", ".css")) and _BUNDLED_LIB.match(name):
        return VENDORED, f"bundled copy of a library ({name})"
    return None


LOCK_FILES = frozenset("""
package-lock.json npm-shrinkwrap.json yarn.lock pnpm-lock.yaml bun.lockb poetry.lock Pipfile.lock pdm.lock uv.lock
Cargo.lock Gemfile.lock composer.lock go.sum go.work.sum mix.lock pubspec.lock Podfile.lock packages.lock.json
paket.lock flake.lock gradle.lockfile Package.resolved deno.lock conda-lock.yml
""".split())
GENERATED_SUFFIXES = (
    ".min.js", ".min.css", ".min.mjs", "-min.js", "-min.css", ".js.map", ".css.map", ".map", ".bundle.js",
    ".chunk.js",
    # protobuf / gRPC / flatbuffers / thrift outputs
    "_pb2.py", "_pb2.pyi", "_pb2_grpc.py", ".pb.go", "_grpc.pb.go", ".pb.gw.go", ".pb.cc", ".pb.h", "_pb.js",
    "_pb.d.ts", "_grpc_pb.js", "_grpc_pb.d.ts", ".pb.swift", ".grpc.swift", "_generated.h", ".pb.dart",
    ".pbenum.dart", ".pbjson.dart", ".pbgrpc.dart",
    # code generators of IDEs and build tools
    ".designer.cs", ".designer.vb", ".g.cs", ".g.i.cs", ".g.dart", ".freezed.dart", ".gr.dart", ".mocks.dart",
    ".generated.cs", ".generated.ts", ".generated.js", ".generated.go",
    # ANTLR's side outputs
    ".interp", ".tokens",
)
GENERATED_DIRS = frozenset("__generated__ gen-py gen-java gen-cpp gen-go gen-js gen-rb gen-php .next .nuxt "
                           "__snapshots__ .docusaurus .svelte-kit dist".split())


def generated_by_name(e: FileEntry, ctx: RuleContext) -> Verdict:
    parts = e.path.split("/")
    name = parts[-1]
    if name in LOCK_FILES:
        return GENERATED, f"lock file ({name})"
    low = name.lower()
    if low.endswith(GENERATED_SUFFIXES):
        suffix = next(s for s in GENERATED_SUFFIXES if low.endswith(s))
        return GENERATED, f"generated file type (*{suffix})"
    for d in parts[:-1]:
        if d in GENERATED_DIRS:
            return GENERATED, f"inside generated folder {d}/"
    return None


def binary_by_name(e: FileEntry, ctx: RuleContext) -> Verdict:
    if languages.is_binary_name(e.path):
        ext = e.path.rsplit(".", 1)[-1] if "." in e.path.rsplit("/", 1)[-1] else e.path
        return NOT_TEXT, f"binary file type (.{ext.lower()})"
    return None


def type_off(e: FileEntry, ctx: RuleContext) -> Verdict:
    if ctx.types_on is None:
        return None
    if e.language is None:
        name = e.path.rsplit("/", 1)[-1]
        ext = name[name.rfind("."):] if "." in name[1:] else "no extension"
        return TYPE_OFF, f"unknown file type ({ext})"
    if e.language not in ctx.types_on:
        return TYPE_OFF, f"{e.language} is not among the selected types"
    return None


def too_large(e: FileEntry, ctx: RuleContext) -> Verdict:
    if e.size > ctx.max_bytes:
        return TOO_LARGE, f"{_kib(e.size)} > {ctx.max_bytes // 1024} KiB"
    return None


# Rules on the name alone; the file types offered for selection are counted over the files they keep.
NAME_RULES: list[Callable] = [forced_exclude, excluded_by_mask, vendored, generated_by_name, binary_by_name]
# Then the selection and the size, still without opening the file.
SELECT_RULES: list[Callable] = [type_off, too_large]


# --- content rules (after one read) ----------------------------------------------------------------------

def linguist_error(e: FileEntry, ctx: RuleContext) -> Verdict:
    if e.facts.error:
        return LINGUIST_ERROR, e.facts.error
    return None


def not_text(e: FileEntry, ctx: RuleContext) -> Verdict:
    if e.facts.binary:
        return NOT_TEXT, "binary content (NUL bytes)"
    return None


def too_large_now(e: FileEntry, ctx: RuleContext) -> Verdict:
    # The file grew between listing and reading: the read stopped one byte past the limit.
    if e.facts.size > ctx.max_bytes:
        return TOO_LARGE, f"more than {ctx.max_bytes // 1024} KiB"
    return None


def empty(e: FileEntry, ctx: RuleContext) -> Verdict:
    # Nothing to learn from, and every other empty file would be rejected as its duplicate.
    if not e.facts.nonspace:
        return EMPTY, "empty file" if not e.facts.size else "only whitespace"
    return None


def generated(e: FileEntry, ctx: RuleContext) -> Verdict:
    if e.facts.generated:
        return GENERATED, e.facts.generated
    return None


def lots_of_digits(e: FileEntry, ctx: RuleContext) -> Verdict:
    f = e.facts
    if f.nonspace and f.digits / f.nonspace > ctx.digit_share:
        return LOTS_OF_DIGITS, f"{f.digits / f.nonspace:.0%} of non-space characters are digits " \
                               f"(limit {ctx.digit_share:.0%})"
    return None


def duplicate(e: FileEntry, ctx: RuleContext) -> Verdict:
    """Exact duplicates: the first file with this content (in scan order) wins. Runs last, so it only ever
    registers files that every other rule kept."""
    first = ctx.seen.get(e.facts.sha256)
    if first is not None:
        return DUPLICATE, f"same content as {ctx.describe(first)}"
    ctx.seen[e.facts.sha256] = e.key
    return None


CONTENT_RULES: list[Callable] = [linguist_error, not_text, too_large_now, empty, generated, lots_of_digits, duplicate]


def near_duplicate(e: FileEntry, ctx: RuleContext) -> Verdict:
    if ctx.near_index is None:
        return None
    hit = ctx.near_index.check_and_add(e.key, e.sketch)
    if hit is not None:
        return DUPLICATE, f"near-duplicate of {ctx.describe(hit[0])} (similarity {hit[1]:.2f})"
    return None


def secret_cache_key(e: FileEntry) -> str:
    """Findings depend on the content and on the file type (how keyword assignments are read), nothing else."""
    return f"{e.facts.sha256}:{e.path.rsplit('/', 1)[-1].rpartition('.')[2].lower()}"


def secret(e: FileEntry, ctx: RuleContext) -> Verdict:
    """Credentials in the file (secrets.py). Runs after every other stage-1 rule, on what they kept, because
    the detector is slow. With secrets = redact (and for a force-included file, which is never trained on with
    its secrets) the file is kept and `e.redaction` holds the redacted text for the runner to store; a file
    that cannot be redacted cleanly is rejected. The detail names kinds and lines, never a value."""
    if ctx.secret_scanner is None:
        return None
    from refact_lab.data.secrets import Finding, SecretReport

    # The cache holds kinds and lines only, so a redaction (which needs the values) always reads the file.
    key = secret_cache_key(e)
    redact = ctx.secrets_mode == "redact" or e.forced
    known = ctx.secret_cache.get(key)
    if known == []:
        return None
    if known and not redact:
        return SECRET, SecretReport([Finding(kind, line, "") for kind, line in known]).describe()
    try:
        with open(e.file, "rb") as f:
            text = decode_text(f.read(), errors="replace")   # as training will read it
    except OSError as err:
        return LINGUIST_ERROR, f"cannot read: {err.strerror or err}"
    report = ctx.secret_scanner.check(text, e.path, redact=redact)
    ctx.secret_cache[key] = [[f.kind, f.line] for f in report.findings]
    if not report.findings:
        return None
    if redact and report.redacted is not None:
        e.redaction = report
        return None
    return SECRET, report.describe() + (" (could not be redacted cleanly)" if redact else "")


# --- stage 2 rules (after the loss filter) ---------------------------------------------------------------

def filter_empty(e: FileEntry, ctx: RuleContext) -> Verdict:
    if e.loss is None:
        return FILTER_EMPTY, e.loss_error or "the loss could not be computed"
    return None


def loss_too_high(e: FileEntry, ctx: RuleContext) -> Verdict:
    if e.loss is not None and e.loss > ctx.loss_threshold:
        return LOSS_TOO_HIGH, f"loss {e.loss:.2f} > {ctx.loss_threshold:g}"
    return None


LOSS_RULES: list[Callable] = [filter_empty, loss_too_high]


def first_rejection(rules: list[Callable], e: FileEntry, ctx: RuleContext):
    for rule in rules:
        verdict = rule(e, ctx)
        if verdict is not None:
            return verdict
    return None


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n >= 10 * 1024 else f"{n / 1024:.1f} KiB"

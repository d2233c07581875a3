"""Git sources through GitPython: clone (branch, shallow), fetch new commits, and what changed between them.

Only three transports are allowed: https, ssh (`ssh://` or `user@host:path`) and file (`file://` or a local
path). Anything else — `ext::` (runs a command), `fd::`, `git://` (unauthenticated), `http://` (a token in
clear text) — is refused before git runs, and `GIT_ALLOW_PROTOCOL` holds git itself (submodules, redirects)
to the same list.

Credentials never land in a file git reads or in the repository's config:

* an https token is handed to git by a one-line credential helper that reads it from the environment of
  that one git process (`GIT_CONFIG_COUNT`/`KEY`/`VALUE` env config, git >= 2.31);
* an ssh deploy key goes in through `GIT_SSH_COMMAND`, with host keys remembered in the state directory.

No git command may prompt (the kernel has no terminal), so prompts are off and a missing credential fails
with git's own message.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ALLOWED_SCHEMES = ("https", "ssh", "git+ssh", "ssh+git", "file")
TOKEN_ENV = "REFACT_LAB_GIT_TOKEN"
_HELPER = ('!f() { test "$1" = get || exit 0; echo "username=${REFACT_LAB_GIT_USER:-x-access-token}"; '
           f'echo "password=${TOKEN_ENV}"; }}; f')
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HELPER_TRANSPORT = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)::")
_SCP_LIKE = re.compile(r"^(?:[^@/\s]+@)?[A-Za-z0-9_.-]+:(?!//)[^\s]")


class GitSourceError(ValueError):
    """A git URL is refused or git failed; the message is one line a user can act on."""


@dataclass(frozen=True)
class GitUrl:
    url: str            # what git is given (credentials stripped, local paths as file:// URIs)
    transport: str      # https | ssh | file
    token: str | None   # a password found in the URL's userinfo, moved out of it


def parse_url(url: str) -> GitUrl:
    """Check a git URL against the allowed transports. Raises GitSourceError naming what is not allowed."""
    url = (url or "").strip()
    if not url:
        raise GitSourceError("empty git URL")
    if url.startswith("-"):
        raise GitSourceError(f"{url!r} is not a URL (it would be read as a git option)")
    m = _HELPER_TRANSPORT.match(url)
    if m:
        raise GitSourceError(f"transport '{m.group(1)}::' is not allowed: only https://, ssh:// (or user@host:path) "
                             "and file:// URLs can be cloned")
    m = _SCHEME.match(url)
    if m:
        scheme = m.group(1).lower()
        if scheme not in ALLOWED_SCHEMES:
            raise GitSourceError(f"transport '{scheme}://' is not allowed: only https://, ssh:// "
                                 "(or user@host:path) and file:// URLs can be cloned")
        transport = "ssh" if "ssh" in scheme else scheme
        token = None
        if transport == "https":
            parts = urlsplit(url)
            if parts.password:
                token = parts.password
                host = parts.hostname or ""
                netloc = host + (f":{parts.port}" if parts.port else "")
                url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        return GitUrl(url, transport, token)
    path = Path(url).expanduser()
    if path.exists():
        if not path.is_dir():
            raise GitSourceError(f"{url}: a file, not a git repository")
        return GitUrl(path.resolve().as_uri(), "file", None)
    if _SCP_LIKE.match(url):
        return GitUrl(url, "ssh", None)
    raise GitSourceError(f"{url}: not a git URL (https://, ssh://, user@host:path, file://) nor an existing folder")


def is_git_dir(path: Path) -> bool:
    """Whether `path` is a repository's git directory itself (a bare repository, or a checkout's .git folder):
    the files in it are git's objects, not code, so it is cloned like a file:// URL, never scanned as a folder.
    The test is git's own (setup.c): a HEAD file, an objects/ and a refs/ folder. os.path, not pathlib, so an
    unreadable folder is "no" rather than an error."""
    return (os.path.isfile(os.path.join(path, "HEAD")) and os.path.isdir(os.path.join(path, "objects"))
            and os.path.isdir(os.path.join(path, "refs")))


def git_env(transport: str, *, token: str | None = None, ssh_key: Path | None = None,
            known_hosts: Path | None = None, username: str | None = None) -> dict[str, str]:
    """Environment for one git process: no prompts, allowed protocols only, credentials if any."""
    env = {
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ALLOW_PROTOCOL": "https:ssh:file",
        # A stalled https transfer (under 1 KB/s for 60 s) fails instead of hanging the scan.
        "GIT_HTTP_LOW_SPEED_LIMIT": "1000",
        "GIT_HTTP_LOW_SPEED_TIME": "60",
        "GIT_ASKPASS": "",
        "SSH_ASKPASS": "",
    }
    if transport == "https" and token:
        # Reset inherited helpers first (empty value), then ours, which reads the token from our env only.
        env.update({"GIT_CONFIG_COUNT": "2", "GIT_CONFIG_KEY_0": "credential.helper", "GIT_CONFIG_VALUE_0": "",
                    "GIT_CONFIG_KEY_1": "credential.helper", "GIT_CONFIG_VALUE_1": _HELPER, TOKEN_ENV: token})
        if username:
            env["REFACT_LAB_GIT_USER"] = username
    if transport == "ssh":
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-o", "StrictHostKeyChecking=accept-new"]
        if known_hosts:
            cmd += ["-o", f"UserKnownHostsFile={known_hosts}"]
        if ssh_key:
            cmd += ["-i", str(ssh_key), "-o", "IdentitiesOnly=yes"]
        env["GIT_SSH_COMMAND"] = " ".join(shlex.quote(c) for c in cmd)
    return env


def _one_line(e: Exception) -> str:
    """git's last `fatal:`/`error:` line (what a user needs), without GitPython's command dump."""
    stderr = getattr(e, "stderr", "") or str(e)
    lines = [ln.strip().strip("'").strip() for ln in str(stderr).splitlines() if ln.strip()]
    for ln in reversed(lines):
        low = ln.lower()
        if low.startswith(("fatal:", "error:", "stderr: 'fatal:", "remote:")) or "fatal:" in low:
            return ln[ln.lower().find("fatal:"):] if "fatal:" in low else ln
    return lines[-1] if lines else type(e).__name__


def clone(parsed: GitUrl, dest: Path, *, branch: str | None = None, shallow: bool = False,
          env: dict[str, str]) -> str:
    """Clone into `dest` (must not exist). Returns the checked-out commit. Raises GitSourceError."""
    import git

    kwargs: dict = {}
    if branch:
        kwargs["branch"] = branch
    if shallow:
        kwargs["depth"] = 1
    try:
        repo = git.Repo.clone_from(parsed.url, str(dest), env=env, **kwargs)
    except git.GitCommandError as e:
        raise GitSourceError(f"cannot clone {parsed.url}: {_one_line(e)}") from None
    except git.exc.UnsafeProtocolError as e:  # GitPython's own guard; parse_url should have caught it
        raise GitSourceError(f"{parsed.url}: {e}") from None
    with repo:
        # git clones an empty repository, or one whose HEAD names a branch nobody pushed, with a warning only;
        # the clone's HEAD then names a branch that does not exist.
        if not repo.head.is_valid():
            branches = [ref.remote_head for ref in repo.remote().refs if ref.remote_head != "HEAD"]
            if not branches:
                raise GitSourceError(f"{parsed.url} has no commits: there is nothing to scan until one is pushed")
            raise GitSourceError(f"{parsed.url}: its default branch {repo.head.ref.name!r} does not exist; choose "
                                 f"one of its branches: {', '.join(sorted(branches))}")
        return repo.head.commit.hexsha


def fetch_and_reset(repo_dir: Path, *, branch: str | None, shallow: bool,
                    env: dict[str, str]) -> tuple[str, str, list[str]]:
    """Fetch the branch's new commits and move the work tree to them.

    Returns (old commit, new commit, changed paths). The clone is ours alone, so a hard reset loses nothing.
    """
    import git

    try:
        repo = git.Repo(str(repo_dir))
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise GitSourceError(f"{repo_dir} is not a git repository any more; remove the source and add it again") \
            from None
    with repo:
        old = repo.head.commit.hexsha
        ref = branch or (repo.active_branch.name if not repo.head.is_detached else "HEAD")
        args = ["origin", ref]
        if shallow:
            args.insert(0, "--depth=1")
        try:
            with repo.git.custom_environment(**env):
                repo.git.fetch(*args)
                repo.git.reset("--hard", "FETCH_HEAD")
        except git.GitCommandError as e:
            raise GitSourceError(f"cannot update: {_one_line(e)}") from None
        new = repo.head.commit.hexsha
        changed: list[str] = []
        if new != old:
            out = repo.git.diff("--name-only", "--no-renames", "-z", old, new)
            changed = [p for p in out.split("\0") if p]
        return old, new, changed


# git lists what it can and only warns about a folder it cannot open (GitPython runs git with LC_ALL=C).
_UNLISTABLE = re.compile(r"^warning: could not open directory '(.+?)/?': (.+)$", re.MULTILINE)


def tracked_and_untracked(folder: Path, unreadable: list | None = None) -> list[str] | None:
    """For a local folder that is a git work tree: the files git would see (tracked plus untracked, minus
    .gitignore'd), as relative paths. None when the folder is not a work tree or git cannot tell.
    Folders git could not open are appended to `unreadable` as (relative path, why)."""
    import git

    try:
        repo = git.Repo(str(folder))
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    with repo:
        if repo.bare or Path(repo.working_tree_dir).resolve() != folder.resolve():
            return None
        try:
            _, out, err = repo.git.ls_files("-z", "--cached", "--others", "--exclude-standard",
                                            with_extended_output=True)
        except git.GitCommandError:
            return None
    if unreadable is not None:
        unreadable.extend(m.groups() for m in _UNLISTABLE.finditer(err))
    return [p for p in out.split("\0") if p]

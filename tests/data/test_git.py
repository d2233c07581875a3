"""Git sources with a real repository made in the test: clone, branch, shallow, update, transports, credentials."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from refact_lab.data import gitsource, sshkeys
from refact_lab.data.sources import SourceError, SourceStore
from tests.data.conftest import commit, good_py, make_git_repo, scan_folder  # noqa: F401

pytest.importorskip("git")


@pytest.fixture
def upstream(tmp_path):
    files = {f"app/m{i}.py": good_py(i) for i in range(5)}
    repo = make_git_repo(tmp_path / "upstream", files)
    return repo


def _scan(home, **settings):
    from refact_lab.config import ScanSettings
    from refact_lab.data.pipeline import load_results, run_scan

    stats = run_scan(home, settings=ScanSettings(lm_filter=False, **settings))
    accepted, rejected, _ = load_results(home)
    return {r["path"]: r for r in accepted}, {r["path"]: r for r in rejected}, stats


def test_clone_file_url_scan_update_rescans_only_changed(home, upstream):
    store = SourceStore(home)
    url = Path(upstream.working_tree_dir).as_uri()
    src = store.add_git(url)
    assert src.kind == "git" and src.commit == upstream.head.commit.hexsha
    assert (Path(src.root) / "app/m0.py").read_text() == good_py(0)
    accepted, _, stats = _scan(home)
    assert len(accepted) == 5 and stats["files_read"] == 5
    assert stats["sources"][0]["commit"] == src.commit

    new = commit(upstream, {"app/m1.py": good_py(101), "app/new.py": good_py(102)}, "second")
    updated = store.update(src.id)
    assert updated.commit == new
    assert updated.last_update["changed"] == 2 and set(updated.last_update["paths"]) == {"app/m1.py", "app/new.py"}
    accepted, _, stats = _scan(home)
    assert len(accepted) == 6
    # Only the two changed files were read again; the other four came from the cache.
    assert stats["files_read"] == 2 and stats["files_cached"] == 4
    assert (Path(src.root) / "app/new.py").read_text() == good_py(102)


def test_clone_local_path_with_branch_and_shallow(home, upstream):
    upstream.git.checkout("-b", "feature")
    commit(upstream, {"app/feature.py": good_py(50)}, "feature work")
    commit(upstream, {"app/feature2.py": good_py(51)}, "more feature work")
    upstream.git.checkout("main")
    store = SourceStore(home)
    src = store.add_git(upstream.working_tree_dir, branch="feature", shallow=True)
    root = Path(src.root)
    assert (root / "app/feature2.py").is_file()
    import git

    with git.Repo(src.root) as clone:
        assert clone.active_branch.name == "feature"
        assert len(list(clone.iter_commits())) == 1  # shallow: the tip only
    upstream.git.checkout("feature")
    commit(upstream, {"app/feature3.py": good_py(52)}, "even more")
    updated = store.update(src.id)
    assert (root / "app/feature3.py").is_file() and updated.last_update["changed"] == 1


def test_unknown_branch_is_a_clear_error_and_leaves_nothing(home, upstream):
    store = SourceStore(home)
    with pytest.raises(SourceError, match="cannot clone .*nope"):
        store.add_git(upstream.working_tree_dir, branch="nope")
    assert store.list() == [] and list(store.dir.iterdir()) == []


@pytest.mark.parametrize("url,what", [
    ("ext::sh -c touch% /tmp/refact-lab-pwned", "'ext::'"),
    ("fd::17", "'fd::'"),
    ("git://example.com/repo.git", "'git://'"),
    ("http://example.com/repo.git", "'http://'"),
    ("ftp://example.com/repo.git", "'ftp://'"),
    ("--upload-pack=touch /tmp/refact-lab-pwned", "git option"),
])
def test_other_transports_are_refused(home, url, what):
    store = SourceStore(home)
    with pytest.raises(SourceError, match=what):
        store.add_git(url)
    assert not os.path.exists("/tmp/refact-lab-pwned")
    assert store.list() == []


def test_allowed_transports_parse():
    assert gitsource.parse_url("https://github.com/a/b.git").transport == "https"
    assert gitsource.parse_url("ssh://git@github.com/a/b.git").transport == "ssh"
    assert gitsource.parse_url("git@github.com:a/b.git").transport == "ssh"
    assert gitsource.parse_url("file:///srv/repo").transport == "file"


def test_token_in_url_is_moved_out_of_it():
    parsed = gitsource.parse_url("https://user:s3cret@git.example.com/team/repo.git")
    assert parsed.url == "https://git.example.com/team/repo.git" and parsed.token == "s3cret"


def test_unreachable_https_url_is_one_clear_line(home):
    store = SourceStore(home)
    with pytest.raises(SourceError) as info:
        store.add_git("https://127.0.0.1:9/team/repo.git")
    message = str(info.value)
    assert message.startswith("cannot clone https://127.0.0.1:9/team/repo.git: fatal:")
    assert "\n" not in message
    assert store.list() == []


def test_token_is_never_written_where_git_or_the_ui_reads(home, upstream):
    store = SourceStore(home)
    src = store.add_git(Path(upstream.working_tree_dir).as_uri(), token="tok-123")
    assert src.auth is None  # a file:// clone has no use for the token, so it is not kept at all
    assert "tok-123" not in (store.dir / src.id / "source.json").read_text()
    assert "tok-123" not in (Path(src.root) / ".git/config").read_text()
    assert not (store.dir / src.id / "secret.json").exists()


def test_https_token_env_uses_a_credential_helper_not_the_url():
    env = gitsource.git_env("https", token="tok-123")
    assert env[gitsource.TOKEN_ENV] == "tok-123"
    assert "tok-123" not in env["GIT_CONFIG_VALUE_1"]
    assert env["GIT_TERMINAL_PROMPT"] == "0" and env["GIT_ALLOW_PROTOCOL"] == "https:ssh:file"


def test_failed_https_clone_leaves_no_token_behind(home):
    # No https server is reachable here; the failed clone must still leave no token anywhere.
    store = SourceStore(home)
    with pytest.raises(SourceError):
        store.add_git("https://tok-999@127.0.0.1:9/team/repo.git")
    assert not any("tok-999" in p.read_text(errors="ignore") for p in Path(home.root).rglob("*") if p.is_file())


def test_ssh_uses_the_deploy_key(home):
    pub = sshkeys.generate_deploy_key(home)
    key = sshkeys.private_key_path(home)
    assert pub.startswith("ssh-ed25519 ") and stat.S_IMODE(key.stat().st_mode) == 0o600
    env = SourceStore(home)._git_env("ssh", None)
    assert f"-i {key}" in env["GIT_SSH_COMMAND"] and "BatchMode=yes" in env["GIT_SSH_COMMAND"]
    store = SourceStore(home)
    with pytest.raises(SourceError, match="cannot clone ssh://git@127.0.0.1:9/repo.git"):
        store.add_git("ssh://git@127.0.0.1:9/repo.git")


def test_deploy_key_is_stable_and_valid_openssh(home):
    from cryptography.hazmat.primitives import serialization

    first = sshkeys.generate_deploy_key(home)
    assert sshkeys.generate_deploy_key(home) == first  # not regenerated
    key = serialization.load_ssh_private_key(sshkeys.private_key_path(home).read_bytes(), password=None)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert first.startswith(pub.decode())
    assert sshkeys.generate_deploy_key(home, overwrite=True) != first


def test_local_folder_that_is_a_work_tree_respects_gitignore(home, tmp_path):
    repo = make_git_repo(tmp_path / "wt", {"src/a.py": good_py(1), ".gitignore": "build/\n*.log\n"})
    (Path(repo.working_tree_dir) / "build").mkdir()
    (Path(repo.working_tree_dir) / "build/out.py").write_text(good_py(2))
    (Path(repo.working_tree_dir) / "debug.log").write_text("log\n")
    (Path(repo.working_tree_dir) / "src/untracked.py").write_text(good_py(3))
    accepted, rejected, stats = scan_folder(home, Path(repo.working_tree_dir))
    listed = set(accepted) | set(rejected)
    assert "src/untracked.py" in listed and "src/a.py" in listed
    assert "build/out.py" not in listed and "debug.log" not in listed
    assert json.dumps(stats)  # serialisable


def test_the_same_repository_and_branch_twice_is_an_error_another_branch_is_not(home, upstream):
    upstream.git.branch("feature")
    store = SourceStore(home)
    first = store.add_git(upstream.working_tree_dir)
    with pytest.raises(SourceError, match=f"is already a source of this project .*id {first.id}"):
        store.add_git(Path(upstream.working_tree_dir).as_posix() + "/")
    assert store.add_git(upstream.working_tree_dir, branch="feature").id != first.id
    assert len(store.list()) == 2


def test_a_symlink_committed_in_a_work_tree_folder_is_rejected_as_such(home, tmp_path):
    repo = make_git_repo(tmp_path / "wt", {"src/a.py": good_py(1)})
    root = Path(repo.working_tree_dir)
    (root / "src/alias.py").symlink_to("a.py")
    repo.index.add(["src/alias.py"])
    repo.index.commit("a link")
    accepted, rejected, _ = scan_folder(home, root)
    assert "src/a.py" in accepted
    assert rejected["src/alias.py"]["reason"] == "symlink"
    assert rejected["src/alias.py"]["detail"] == "symbolic link to 'a.py', not followed"


def test_a_bare_repository_path_is_a_git_source_a_checkout_stays_a_folder(home, upstream, tmp_path):
    import git

    bare = git.Repo.init(str(tmp_path / "bare.git"), bare=True, initial_branch="main")
    upstream.git.push(bare.git_dir, "main")
    store = SourceStore(home)
    src = store.add(bare.git_dir)
    assert src.kind == "git" and src.origin == Path(bare.git_dir).as_uri()
    assert src.commit == upstream.head.commit.hexsha
    accepted, rejected, _ = _scan(home)
    assert set(accepted) == {f"app/m{i}.py" for i in range(5)} and not rejected
    assert store.ensure(bare.git_dir).id == src.id   # a re-scan finds it again
    assert store.add(upstream.working_tree_dir).kind == "folder"
    assert store.add(upstream.git_dir).kind == "git"   # a checkout's .git folder is git's, not code


def test_an_empty_repository_is_an_error_naming_it(home, tmp_path):
    import git

    empty = git.Repo.init(str(tmp_path / "empty.git"), bare=True)
    store = SourceStore(home)
    with pytest.raises(SourceError, match=rf"^{Path(empty.git_dir).as_uri()} has no commits"):
        store.add(empty.git_dir)
    assert store.list() == [] and list(store.dir.iterdir()) == []


def test_a_repository_whose_head_names_a_missing_branch_is_an_error_naming_its_branches(home, upstream, tmp_path):
    import git

    bare = git.Repo.init(str(tmp_path / "bare.git"), bare=True, initial_branch="master")
    upstream.git.push(bare.git_dir, "main")   # main is pushed, master (its HEAD) never was
    store = SourceStore(home)
    with pytest.raises(SourceError, match="default branch 'master' does not exist; choose one of its branches: main"):
        store.add(bare.git_dir)
    assert store.add(bare.git_dir, branch="main").commit == upstream.head.commit.hexsha

"""What each record and the stats tell the Scan panel: every file (links and FIFOs too) is accepted or rejected
with a reason and the source's name; a source cannot be added twice; results say when they are stale."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile

import pytest

from refact_lab.config import ScanSettings
from refact_lab.data.service import ProjectService
from refact_lab.data.sources import SourceError, SourceStore
from tests.data.conftest import good_py, scan_folder, write_tree

FILES = {f"pkg/m{i}.py": good_py(i) for i in range(6)}


def test_links_and_fifos_in_a_folder_source_are_rejected_with_reasons(home, tmp_path):
    root = write_tree(tmp_path / "proj", FILES)
    outside = write_tree(tmp_path / "secret", {"id_rsa": "KEY\n"})
    (root / "pkg/key.py").symlink_to(outside / "id_rsa")
    (root / "linked").symlink_to(outside)
    os.mkfifo(root / "pkg/pipe")
    accepted, rejected, stats = scan_folder(home, root)
    assert rejected["pkg/key.py"]["reason"] == "symlink"
    assert rejected["pkg/key.py"]["detail"] == f"symbolic link to {str(outside / 'id_rsa')!r}, not followed"
    assert rejected["linked"]["reason"] == "symlink"
    assert rejected["pkg/pipe"] == {**rejected["pkg/pipe"], "reason": "special_file",
                                    "detail": "FIFO, not a regular file", "source_name": "proj"}
    assert stats["reasons"] == {"symlink": 2, "special_file": 1}
    assert stats["files"] == len(accepted) + len(rejected) == 9


def test_a_symlink_member_of_an_archive_source_is_recorded(home, tmp_path):
    path = tmp_path / "code.zip"
    link = zipfile.ZipInfo("pkg/alias.py")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in FILES.items():
            zf.writestr(name, text)
        zf.writestr(link, "m0.py")
    tar = tmp_path / "more.tar"
    with tarfile.open(tar, "w") as tf:
        ok = tarfile.TarInfo("lib/x.py")
        data = good_py(40).encode()
        ok.size = len(data)
        tf.addfile(ok, io.BytesIO(data))
        fifo = tarfile.TarInfo("lib/pipe")
        fifo.type = tarfile.FIFOTYPE
        tf.addfile(fifo)
    service = ProjectService(home)
    service.add_archive(str(path))
    service.add_archive(str(tar))
    service.run_scan(ScanSettings(lm_filter=False))
    rejected = {r["path"]: r for r in service.results().rejected}
    assert rejected["pkg/alias.py"]["reason"] == "symlink" and rejected["pkg/alias.py"]["source_name"] == "code.zip"
    assert rejected["lib/pipe"]["reason"] == "special_file" and rejected["lib/pipe"]["source_name"] == "more.tar"


def test_records_name_their_source_and_duplicates_name_the_other_source(home, tmp_path):
    a = write_tree(tmp_path / "app", FILES)
    b = write_tree(tmp_path / "lib", {"copy.py": good_py(3)})
    store = SourceStore(home)
    src_a, src_b = store.add_folder(a), store.add_folder(b)
    accepted, rejected, stats = scan_folder(home, a)
    assert all(r["source"] == src_a.id and r["source_name"] == "app" for r in accepted.values())
    dup = rejected["copy.py"]
    assert (dup["source"], dup["source_name"], dup["reason"]) == (src_b.id, "lib", "duplicate")
    assert dup["detail"] == "same content as pkg/m3.py in app"
    assert [s["display_name"] for s in stats["sources"]] == ["app", "lib"]


def test_two_sources_with_the_same_name_are_told_apart_by_origin(home, tmp_path):
    one = write_tree(tmp_path / "x" / "src", {"a.py": good_py(1), "b.py": good_py(2)})
    two = write_tree(tmp_path / "y" / "src", {"c.py": good_py(1)})
    store = SourceStore(home)
    store.add_folder(one)
    store.add_folder(two)
    _, rejected, _ = scan_folder(home, one)
    assert rejected["c.py"]["detail"] == f"same content as a.py in src ({one.resolve()})"


def test_adding_the_same_source_twice_is_an_error_naming_the_existing_one(home, tmp_path):
    folder = write_tree(tmp_path / "proj", FILES)
    single = folder / "pkg/m0.py"
    archive, upload = tmp_path / "code.zip", io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.py", good_py(1))
    with zipfile.ZipFile(upload, "w") as zf:
        zf.writestr("b.py", good_py(2))
    service = ProjectService(home)
    added = [service.add_folder(str(folder)), service.add(str(single)), service.add_archive(str(archive)),
             service.add_uploads([("up.zip", upload.getvalue())])[0]]
    for again, first in ((lambda: service.add_folder(str(folder) + "/")), added[0]), \
                        ((lambda: service.add(str(single))), added[1]), \
                        ((lambda: service.add(str(archive))), added[2]), \
                        ((lambda: service.add_uploads([("up.zip", upload.getvalue())])), added[3]), \
                        ((lambda: service.add_uploads([("renamed.zip", archive.read_bytes())])), added[2]):
        with pytest.raises(SourceError, match=f"is already a source of this project .*id {first.id}"):
            again()
    assert len(service.list_sources()) == 4
    # ensure() (what `refact-lab scan SOURCE` uses) still refreshes the known source instead
    assert SourceStore(home).ensure(str(folder)).id == added[0].id


def test_results_say_when_sources_changed_since_the_scan(home, tmp_path):
    root = write_tree(tmp_path / "proj", FILES)
    service = ProjectService(home)
    assert service.stale_reasons() == [] and not service.results_stale()   # nothing scanned yet
    src = service.add_folder(str(root))
    service.run_scan(ScanSettings(lm_filter=False))
    assert service.stale_reasons() == []
    service.set_source_test(src.id, True)
    assert service.stale_reasons() == ["source 'proj' changed (test mark)"]
    service.set_source_test(src.id, False)
    assert not service.results_stale()
    extra = service.add_folder(str(write_tree(tmp_path / "more", {"z.py": good_py(77)})))
    assert service.stale_reasons() == ["source 'more' was added"]
    service.remove_source(extra.id)
    service.force_exclude(f"{src.id}/pkg/m1.py")
    assert service.stale_reasons() == ["files were force-included, excluded or marked test"]
    service.run_scan(ScanSettings(lm_filter=False))
    assert not service.results_stale()
    service.remove_source(src.id)
    assert service.stale_reasons() == ["source 'proj' was removed"]


def test_small_test_sets_are_warned_about_in_the_stats(home, tmp_path):
    _, _, stats = scan_folder(home, write_tree(tmp_path / "proj", FILES))
    assert stats["split_warning"].startswith(f"only {stats['test']['files']} test file")
    assert "the test loss will be noisy" in stats["split_warning"]
    assert stats["loss_threshold"] is None   # stage 2 was off: no threshold applied


def _refuse_listing(monkeypatch, folder) -> None:
    """Listing `folder` fails as it does without read permission (what root cannot see with chmod 000)."""
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_a_folder_that_cannot_be_listed_is_rejected_with_the_reason(home, tmp_path, monkeypatch):
    root = write_tree(tmp_path / "proj", {**FILES, "noread/x.py": good_py(60)})
    _refuse_listing(monkeypatch, root / "noread")
    accepted, rejected, stats = scan_folder(home, root)
    assert rejected["noread"] == {**rejected["noread"], "reason": "linguist_error",
                                  "detail": "cannot list: Permission denied", "source_name": "proj"}
    assert stats["reasons"] == {"linguist_error": 1}
    assert stats["files"] == len(accepted) + len(rejected) == len(FILES) + 1


def test_a_source_folder_that_cannot_be_listed_is_an_error_that_says_so(home, tmp_path, monkeypatch):
    from refact_lab.data.pipeline import ScanError

    root = write_tree(tmp_path / "proj", FILES)
    _refuse_listing(monkeypatch, root)
    with pytest.raises(ScanError, match=f"cannot list {root}: Permission denied"):
        scan_folder(home, root)


def _as_a_user(cmd: list[str]) -> list[str]:
    """Root reads a chmod 000 folder anyway: run `cmd` without the capabilities that let it."""
    if os.geteuid() != 0:
        return cmd
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv to drop the read-anything capabilities")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]


@pytest.mark.parametrize("work_tree", [False, True], ids=["folder", "git-work-tree"])
def test_an_unreadable_folder_is_rejected_by_the_installed_command(home, tmp_path, work_tree):
    root = write_tree(tmp_path / "proj", {**FILES, "noread/x.py": good_py(60)})
    if work_tree:   # git lists the files, and only warns about a folder it cannot open
        from tests.data.conftest import make_git_repo

        make_git_repo(root, {"pkg/m0.py": good_py(0)})
    (root / "noread").chmod(0)
    try:
        run = subprocess.run(_as_a_user([sys.executable, "-m", "refact_lab.cli", "scan", str(root), "--home",
                                         str(home.root), "--no-lm-filter", "--json"]),
                             capture_output=True, text=True, timeout=300)
    finally:
        (root / "noread").chmod(0o755)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    rejected = {r["path"]: r for r in map(json.loads, open(data["logs"]["rejected"]))}
    assert rejected["noread"]["reason"] == "linguist_error"
    assert rejected["noread"]["detail"] == "cannot list: Permission denied"
    assert data["files"] == data["accepted"] + data["rejected"] == len(FILES) + 1


def test_an_archive_member_over_the_size_limit_stays_packed_until_a_scan_wants_it(home, tmp_path):
    from refact_lab.data.pipeline import set_override

    big = "".join(f"def function_{i}(value):\n    return value * 2 + {i % 7}\n\n" for i in range(12000))
    assert 512 * 1024 < len(big) < 1024 * 1024
    path = tmp_path / "code.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in {**FILES, "pkg/big.py": big}.items():
            zf.writestr(name, text)
    service = ProjectService(home)
    src = service.add_archive(str(path))
    on_disk = os.path.join(src.root, "pkg/big.py")

    stats = service.run_scan(ScanSettings(lm_filter=False))
    rejected = {r["path"]: r for r in service.results().rejected}
    assert rejected["pkg/big.py"]["reason"] == "too_large" and "> 512 KiB" in rejected["pkg/big.py"]["detail"]
    assert stats["reasons"] == {"too_large": 1} and not os.path.exists(on_disk)

    # A scan that allows bigger files gets it; so does a force-include under the default limit.
    service.run_scan(ScanSettings(lm_filter=False, max_file_kib=1024))
    assert "pkg/big.py" in {r["path"] for r in service.results().accepted}
    service.remove_source(src.id)
    src = service.add_archive(str(path))   # extracted afresh, under the default 512 KiB
    on_disk = os.path.join(src.root, "pkg/big.py")
    assert not os.path.exists(on_disk)
    set_override(home, "default", f"{src.id}/pkg/big.py", include=True)
    service.run_scan(ScanSettings(lm_filter=False))
    accepted = {r["path"]: r for r in service.results().accepted}
    assert accepted["pkg/big.py"]["forced"] and os.path.getsize(on_disk) == len(big)

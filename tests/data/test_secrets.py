"""The secrets rule: credentials of each kind are rejected as `secret` (or redacted), and no file under the state
directory, no training example and no scoreboard cursor ever holds one."""

from __future__ import annotations

import glob
import logging
from pathlib import Path

import pytest

from refact_lab.data import secrets
from refact_lab.data.pipeline import set_override
from refact_lab.data.service import ProjectService
from refact_lab.data.sources import SourceStore
from tests.data.conftest import good_py, scan_folder

# Fake credentials, assembled here so this test file itself holds none in one piece.
AWS_KEY = "AKIA" + "Q7ZV3MX9TB2K4WRN"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYzQ8v2LmW4kTd"
GH_TOKEN = "ghp_" + "7rT2mKq9Zx4Lw8Nv3Bc6Hy1Pd5Fs0Ja2QeXu"
URL_PASSWORD = "Tr0ub4dor" + "-n1ne!x"
CONFIG_PASSWORD = "hunter" + "2-prod-Zq81"
ENTROPY = "9f2bX7qLm4Rt8Vz1" + "Kp6Ns3Wd0Hy5Jc2Ge"
KEY_BODY = ["MIIEpAIBAAKCAQEA3Tz2mJ9x8Yq4Lk7Vn1Bw5Rs6Hf0Ga2Pd3Jc8Ke4Mt7Nz9Qx1Ry5Sb6Uw2Vv0Ta3",
            "Lq8Xk2Jm5Nf7Rb1Pc4Hd9Ge6Wa3Ys0Zt2Vu8Qx5Kw1Mn7Jr4Lb9Pf6Hc3Gd0Ea2Sy5Tz8Ux1Vw4Rq7"]
SECRET_VALUES = [AWS_KEY, AWS_SECRET, GH_TOKEN, URL_PASSWORD, CONFIG_PASSWORD, ENTROPY, *KEY_BODY]

PLANTED = {
    "app/aws.py": f'import boto3\n\nclient = boto3.client("s3", aws_access_key_id="{AWS_KEY}",\n'
                  f'                      aws_secret_access_key="{AWS_SECRET}")\n',
    "app/deploy_key.py": 'DEPLOY_KEY = """-----BEGIN RSA PRIVATE KEY-----\n' + "\n".join(KEY_BODY)
                         + '\n-----END RSA PRIVATE KEY-----\n"""\n\n\ndef key():\n    return DEPLOY_KEY\n',
    "app/github.py": f'import requests\n\nHEADERS = {{"Authorization": "token {GH_TOKEN}"}}\n',
    "app/db.py": f'import sqlalchemy\n\nENGINE = sqlalchemy.create_engine(\n'
                 f'    "postgresql://admin:{URL_PASSWORD}@db.internal:5432/app")\n',
    "app/settings.yaml": f"database:\n  host: db.internal\n  password: {CONFIG_PASSWORD}\n",
    "app/signing.py": f'SIGNING_SALT = "{ENTROPY}"\n',
}
KINDS = {"app/aws.py": "AWS Access Key", "app/deploy_key.py": "Private Key", "app/github.py": "GitHub Token",
         "app/db.py": "Basic Auth Credentials", "app/settings.yaml": "Secret Keyword",
         "app/signing.py": "High Entropy String"}
CLEAN = {f"app/mod_{i}.py": good_py(i) for i in range(4)}
TYPES = ["Python", "YAML"]


def _leaks(root: Path) -> list[str]:
    """Every file under `root` holding any of the secrets (read as bytes, so nothing is skipped)."""
    hits = []
    for path in Path(root).rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path}: {v[:6]}..." for v in SECRET_VALUES if v.encode() in data]
    return hits


@pytest.fixture
def planted(tree):
    return tree({**PLANTED, **CLEAN})


def test_each_kind_is_rejected_with_kind_and_line_never_the_value(home, planted):
    accepted, rejected, stats = scan_folder(home, planted, file_types=TYPES)
    for path, kind in KINDS.items():
        assert rejected[path]["reason"] == "secret", path
        assert kind in rejected[path]["detail"] and "on line " in rejected[path]["detail"], rejected[path]
    assert "line 3" in rejected["app/settings.yaml"]["detail"] and "line 1" in rejected["app/deploy_key.py"]["detail"]
    assert set(CLEAN) <= set(accepted)
    assert stats["reasons"]["secret"] == len(PLANTED)
    assert stats["secrets"]["files_with_secrets"] == len(PLANTED) and stats["secrets"]["mode"] == "reject"
    assert not _leaks(home.root)


def test_redact_keeps_the_files_and_nothing_training_reads_holds_a_secret(home, planted, caplog, capsys):
    from refact_lab.finetune.dataset import load_dataset
    from refact_lab.finetune.packing import test_examples, train_examples
    from refact_lab.scoreboard.cursors import sample_cursors

    # hold the planted files out, so the scoreboard's cursors are drawn from them
    SourceStore(home).add_folder(planted)
    src = SourceStore(home).list()[0].id
    for path in PLANTED:
        set_override(home, "default", f"{src}/{path}", test=True)
    caplog.set_level(logging.DEBUG)
    accepted, rejected, stats = scan_folder(home, planted, file_types=TYPES, secrets="redact")
    assert not {p for p, r in rejected.items() if r["reason"] == "secret"}
    for path in PLANTED:
        rec = accepted[path]
        assert rec["redacted"]["secrets"] >= 1 and KINDS[path] in rec["redacted"]["detail"]
        assert Path(rec["file"]).parent == home.scan_dir() / "redacted"   # training reads the copy
        assert rec["set"] == "test"
    text = Path(accepted["app/db.py"]["file"]).read_text()
    assert "postgresql://admin:REDACTED_BASIC_AUTH_CREDENTIALS@db.internal" in text
    assert "REDACTED_PRIVATE_KEY" in Path(accepted["app/deploy_key.py"]["file"]).read_text()
    assert stats["secrets"]["redacted"] == len(PLANTED)

    dataset = load_dataset(home, "default")
    assert not dataset.skipped, dataset.skipped
    texts = [f.text for f in dataset.train + dataset.test]
    assert any("REDACTED_AWS_ACCESS_KEY" in t for t in texts)
    examples = (train_examples(dataset.pairs("train"), seed=0, epoch=0, max_chars=400, fim_rate=0.9)
                + test_examples(dataset.pairs("test"), max_chars=400, fim_rate=0.9))
    cursors = sample_cursors(dataset.pairs("test"), n=400, seed=1)
    assert cursors and any(c.file.endswith("app/aws.py") for c in cursors)
    seen = texts + [e.source for e in examples] + [c.prefix + c.expected + c.suffix for c in cursors]
    assert not [v for v in SECRET_VALUES for t in seen if v in t]
    assert not _leaks(home.root)
    printed = caplog.text + "".join(capsys.readouterr())      # no log line either
    assert not [v for v in SECRET_VALUES if v in printed]


def test_force_include_never_trains_on_a_secret(home, planted):
    SourceStore(home).add_folder(planted)
    src = SourceStore(home).list()[0].id
    ProjectService(home).force_include(f"{src}/app/github.py")
    accepted, rejected, _ = scan_folder(home, planted, file_types=TYPES)
    assert accepted["app/github.py"]["redacted"]["secrets"] == 1     # kept, but as the redacted copy
    assert rejected["app/aws.py"]["reason"] == "secret"
    assert not _leaks(home.root)


def test_a_rescan_takes_unchanged_files_from_the_cache_and_rereads_changed_ones(home, planted):
    _, before, first = scan_folder(home, planted, file_types=TYPES)
    assert first["secrets"]["from_cache"] == 0
    (planted / "app/mod_0.py").write_text(CLEAN["app/mod_0.py"] + f'\nGITHUB = "{GH_TOKEN}"\n')
    _, rejected, again = scan_folder(home, planted, file_types=TYPES)
    assert again["secrets"]["from_cache"] == again["secrets"]["files_checked"] - 1     # only the changed file
    assert rejected["app/mod_0.py"]["reason"] == "secret"
    assert all(rejected[p]["detail"] == before[p]["detail"] for p in PLANTED)        # the cache says the same
    assert not _leaks(home.root)                 # the cache holds kinds and lines, never a value


def test_off_keeps_files_as_they_are(home, planted):
    accepted, rejected, stats = scan_folder(home, planted, file_types=TYPES, secrets="off")
    assert set(PLANTED) <= set(accepted) and "redacted" not in accepted["app/aws.py"]
    assert stats["secrets"] is None


def test_bad_mode_is_a_clear_error():
    from refact_lab.config import ScanSettings, SettingsError

    with pytest.raises(SettingsError, match="secrets: 'maybe' is not one of reject, redact, off"):
        ScanSettings(secrets="maybe")


def test_stale_redacted_copies_are_pruned(home, tree):
    root = tree({"app/github.py": PLANTED["app/github.py"], **CLEAN})
    accepted, _, _ = scan_folder(home, root, secrets="redact")
    first = Path(accepted["app/github.py"]["file"])
    (root / "app/github.py").write_text(PLANTED["app/github.py"] + "\nTIMEOUT = 3\n")
    scan_folder(home, root, secrets="redact")
    assert first.is_file()            # the previous set still points to it
    accepted, _, _ = scan_folder(home, root, secrets="redact")
    assert not first.is_file() and Path(accepted["app/github.py"]["file"]).is_file()


def test_prefilter_loses_nothing_detect_secrets_finds():
    """The prefilter sends detect-secrets only some lines; on planted secrets and on real files it must
    report exactly what checking every line reports."""
    corpus = dict(PLANTED)
    for path in sorted(glob.glob(str(Path(glob.__file__).parent / "*.py")))[:40] + \
            [str(Path(glob.__file__).parent / name) for name in ("base64.py", "smtplib.py", "netrc.py", "hmac.py")]:
        corpus[path] = Path(path).read_text(encoding="utf-8", errors="replace")
    with secrets.SecretScanner() as fast:
        got = {p: sorted((f.kind, f.line) for f in fast.find(t, p)) for p, t in corpus.items()}
        checked = fast.lines_checked
    with secrets.SecretScanner() as slow:
        slow._check_all = True
        want = {p: sorted((f.kind, f.line) for f in slow.find(t, p)) for p, t in corpus.items()}
        assert slow.lines_checked > 10 * checked      # the prefilter did skip most lines
    assert got == want
    assert all(want[p] for p in PLANTED)


def test_redaction_of_a_short_value_stays_on_its_line():
    text = 'password = "abc"\nlabel = "abc"\n'
    out = secrets.redact_text(text, [secrets.Finding("Secret Keyword", 1, "abc")])
    assert out == 'password = "REDACTED_SECRET_KEYWORD"\nlabel = "abc"\n'
    assert "abc" not in repr(secrets.Finding("Secret Keyword", 1, "abc"))   # values never print


def test_key_blocks_go_whole_with_or_without_their_end_line():
    escaped = 'K = "-----BEGIN PRIVATE KEY-----\\n' + KEY_BODY[0] + '\\n-----END PRIVATE KEY-----\\n"\nx = 1\n'
    assert secrets.redact_text(escaped, []) == 'K = "REDACTED_PRIVATE_KEY\\n"\nx = 1\n'
    cut = "-----BEGIN EC PRIVATE KEY-----\n" + "\n".join(KEY_BODY) + "\ndef key():\n    return None\n"
    assert secrets.redact_text(cut, []) == "REDACTED_PRIVATE_KEY\ndef key():\n    return None\n"


def test_a_utf16_file_is_checked_as_the_text_training_reads(home, tree):
    """Training decodes a UTF-16 file by its byte-order mark, so the secrets rule must look at that text too."""
    root = tree({**CLEAN, "app/aws.py": PLANTED["app/aws.py"].encode("utf-16")})
    accepted, rejected, _ = scan_folder(home, root)
    assert rejected["app/aws.py"]["reason"] == "secret" and "AWS Access Key" in rejected["app/aws.py"]["detail"]

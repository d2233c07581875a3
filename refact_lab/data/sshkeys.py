"""The SSH deploy key: an ed25519 key pair in the state directory for cloning private repositories over ssh.

The user pastes the public key (OpenSSH format) into GitHub/GitLab as a read-only deploy key; git sources
with ssh URLs then use the private key through GIT_SSH_COMMAND. The private key is written 0600, atomically,
and never shown.
"""

from __future__ import annotations

import socket
from pathlib import Path

from refact_lab.home import Home, atomic_write_bytes

KEY_NAME = "id_ed25519"


def ssh_dir(home: Home) -> Path:
    return home.root / "ssh"


def private_key_path(home: Home) -> Path:
    return ssh_dir(home) / KEY_NAME


def known_hosts_path(home: Home) -> Path:
    return ssh_dir(home) / "known_hosts"


def public_key(home: Home) -> str | None:
    """The OpenSSH public key line, or None when no key has been generated."""
    pub = ssh_dir(home) / f"{KEY_NAME}.pub"
    if not private_key_path(home).is_file() or not pub.is_file():
        return None
    return pub.read_text(encoding="utf-8").strip()


def generate_deploy_key(home: Home, *, overwrite: bool = False, comment: str | None = None) -> str:
    """Create the key pair (or keep the existing one unless overwrite) and return the public key line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    existing = public_key(home)
    if existing and not overwrite:
        return existing
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = public.decode("ascii") + " " + (comment or f"refact-lab@{socket.gethostname()}")
    folder = ssh_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    # ssh refuses a private key that others can read, hence 0600 (the temp file is created 0600 already).
    atomic_write_bytes(private_key_path(home), private, mode=0o600)
    atomic_write_bytes(folder / f"{KEY_NAME}.pub", (line + "\n").encode("ascii"), mode=0o644)
    return line

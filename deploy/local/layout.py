"""Where the stack's processes keep their files, and as whom they run.

Elasticsearch and Postgres refuse to run as root. As root they run as the system user
``sparseingest`` (``ES_USER``, created with ``useradd`` if missing), and since root's home is
not readable by other users, their files live under ``/var/lib/sparse-ingest``
(``$SPARSE_INGEST_ES_BASE``): distributions staged with hard links (``stage_tree``), per-run
folders ``runs/<name>-<hash>[-suffix]`` (``run_work_dir``), linked from the run dir
(``replace_with_link``).

Also the small helpers the service modules share: ``slug``, ``prop`` (a ``.properties``
value), ``child_env`` (the environment a child starts with).
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from deploy.local.errors import StackError

ES_USER = "sparseingest"
ES_BASE_ENV = "SPARSE_INGEST_ES_BASE"
DEFAULT_ES_BASE = Path("/var/lib/sparse-ingest")


def running_as_root() -> bool:
    return os.geteuid() == 0


def slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_.-]+", "-", text).strip("-")[:40] or "stack"


def prop(value: Any) -> str:
    """A server.properties value (booleans as Java writes them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def child_env() -> dict[str, str]:
    """Our environment without ``JAVA_HOME``/``JAVA_TOOL_OPTIONS`` (each service is given its
    own Java), the base of the environments set for Elasticsearch and its tools."""
    return {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "JAVA_TOOL_OPTIONS")}


def ensure_system_user(name: str, home: Path) -> tuple[int, int]:
    """The uid/gid of system user ``name``, creating it (``useradd --system``) if needed."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        cmd = [useradd, "--system", "--user-group", "--no-create-home"]
        cmd += ["--home-dir", str(home), "--shell", "/usr/sbin/nologin", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode not in (0, 9):  # 9: exists (a concurrent creation)
            raise StackError(
                f"Elasticsearch refuses to run as root and creating the user {name!r} failed "
                f"({' '.join(cmd)}: {proc.stderr.strip()}). Create it yourself or run as a "
                "normal user."
            ) from None
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def system_base() -> tuple[Path, tuple[int, int]]:
    """As root: the base folder for the service user's files (created, mode 755) and that
    user's (uid, gid), the user created if needed."""
    base = Path(os.environ.get(ES_BASE_ENV) or DEFAULT_ES_BASE)
    uid, gid = ensure_system_user(ES_USER, base)
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    return base, (uid, gid)


def run_work_dir(base: Path, name: str, run_dir: Path, suffix: str = "") -> Path:
    """``<base>/runs/<name>-<hash of run_dir><suffix>`` (its parent created)."""
    digest = hashlib.sha1(str(run_dir).encode()).hexdigest()[:10]
    work = base / "runs" / f"{slug(name)}-{digest}{suffix}"
    work.parent.mkdir(parents=True, exist_ok=True)
    return work


def replace_with_link(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to the folder ``target``, whatever was there before."""
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=True)


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` with hard links where possible, its parent made readable."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.parent.chmod(0o755)
    shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)


def chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def readable_by_others(path: Path) -> bool:
    """Can any user reach ``path`` (every ancestor directory has o+x)?"""
    for parent in [path, *path.parents]:
        try:
            if not parent.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True

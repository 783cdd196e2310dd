"""Fixes which relay a run measures: a copy taken when the run starts, of the working tree or of
one commit, so that edits made while a run is under way (others work in this tree) cannot give
one measurement one version of the relay and the next another. Nothing here touches the repository.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from bench.processes import ROOT

_NOT_RELAY = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "node_modules", "results")


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True)


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """``--relay-dir`` and ``--relay-ref``: which relay a bench tool measures (default: this working tree)."""
    parser.add_argument("--relay-dir", type=Path, default=ROOT, help="the relay checkout to measure (default: this one)")
    parser.add_argument("--relay-ref", help="measure this commit of --relay-dir (default: its working tree as the run starts)")


def snapshot_in_new_workdir(args: argparse.Namespace, name: str) -> tuple[Path, dict]:
    """A fresh work folder for a bench tool, with the relay ``add_source_options`` chose copied into
    its ``relay`` folder; the folder, and what was copied (``describe``)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"chat-relay-{name}-"))
    return workdir, snapshot(args.relay_dir.resolve(), workdir / "relay", args.relay_ref)


def snapshot(repo: Path, dest: Path, ref: str | None) -> dict:
    """Copy the relay into ``dest``: the working tree as it is now, or the commit ``ref``."""
    if ref is None:
        shutil.copytree(repo, dest, ignore=_NOT_RELAY)
    else:
        archive = _git(repo, "archive", "--format=tar", ref)
        if archive.returncode != 0:
            raise SystemExit(f"cannot read {ref!r} from {repo}: {archive.stderr.decode().strip()}")
        dest.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(dest, filter="data")
    return describe(repo, dest, ref)


def describe(repo: Path, copy: Path, ref: str | None) -> dict:
    """What was measured: the commit, the files that differed from it, and a digest of the copy."""
    commit = _git(repo, "rev-parse", "--short", ref or "HEAD").stdout.decode().strip() or "unknown"
    modified = []
    if ref is None:
        status = _git(repo, "status", "--porcelain", "--untracked-files=no").stdout.decode()
        modified = [line[3:] for line in status.splitlines() if len(line) > 3]
    digest = hashlib.sha256()
    for path in sorted(copy.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return {
        "source": str(repo),
        "ref": ref or "working tree",
        "commit": commit,
        "modified_files": modified,
        "python_digest": digest.hexdigest()[:16],
    }

"""The wiki's files on disk: atomic writes, per-page locks that hold across processes, and git.

Layout of the root (a git repository):
  raw/<source_id>.md      the source text as ingested (never edited; a new version is a new commit)
  raw/<source_id>.json    what is known about it: title, origin, sha256, version, ingested, flags, terms
  pages/<slug>.md         compiled or written pages with front matter
  index.md, log.md        the catalogue and the append-only log
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from hydrabrain.servers.wiki.markdown import check_slug
from hydrabrain.shared.auth import current_caller

SOURCE_ID_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-"


class WikiPathError(ValueError):
    """A name that would reach outside the wiki."""


class GitError(RuntimeError):
    """git refused a command; the message carries its output."""


def now_iso() -> str:
    # Milliseconds, so a page written and a source re-ingested within one second still order correctly.
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it: readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class WikiFiles:
    """Paths, locks and git for one wiki root."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.raw_dir = self.root / "raw"
        self.pages_dir = self.root / "pages"
        self.index_file = self.root / "index.md"
        self.log_file = self.root / "log.md"
        self._lock_dir = self.root / ".git" / "hydrabrain-locks"
        self._thread_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._init_repo()

    # --- repository -----------------------------------------------------------------------------

    def _init_repo(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.raw_dir.mkdir(exist_ok=True)
        self.pages_dir.mkdir(exist_ok=True)
        if not (self.root / ".git").exists():
            self.git("init", "-q")
        self.git("config", "user.name", "hydrabrain wiki")
        self.git("config", "user.email", "wiki@hydrabrain.invalid")
        self.git("config", "commit.gpgsign", "false")
        self._lock_dir.mkdir(parents=True, exist_ok=True)
        with self.lock("repo"):
            if not self.log_file.exists():
                atomic_write(self.log_file, "# Log\n\nAppend-only record of what happened to this wiki.\n")
            if not self.index_file.exists():
                atomic_write(self.index_file, "# Index\n\nNo pages yet.\n")
            ignore = self.root / ".gitignore"
            if not ignore.exists():
                atomic_write(ignore, ".*.tmp\n")

    def git(self, *args: str) -> str:
        result = subprocess.run(["git", *args], cwd=self.root, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise GitError(f"git {' '.join(args)} failed: {(result.stderr or result.stdout).strip()}")
        return result.stdout

    def commit(self, message: str, paths: Sequence[Path] | None = None) -> str | None:
        """Commit the given paths (or everything) under the repository lock; None when nothing changed."""
        with self.lock("repo"):
            if paths:
                rel = [str(p.relative_to(self.root)) for p in paths]
                self.git("add", "-A", "--", *rel)
            else:
                self.git("add", "-A")
            if not self.git("diff", "--cached", "--name-only").strip():
                return None
            caller = current_caller()
            if caller is None:
                self.git("commit", "-q", "--no-verify", "-m", message)
            else:
                # Who wrote it is the token's user, so `git log` and `git blame` answer "who changed this page".
                name = "".join(ch for ch in caller.user if ch.isprintable() and ch not in "<>") or "unknown"
                mailbox = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in caller.user) or "unknown"
                self.git("commit", "-q", "--no-verify", f"--author={name} <{mailbox}@users.hydrabrain.invalid>", "-m", message)
            return self.git("rev-parse", "HEAD").strip()

    # --- locks ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """An exclusive lock on `name`, held against threads of this process and other processes."""
        with self._guard:
            thread_lock = self._thread_locks.setdefault(name, threading.Lock())
        with thread_lock:
            with open(self._lock_dir / f"{name}.lock", "a+") as handle:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    # --- names ----------------------------------------------------------------------------------

    def page_path(self, slug: str) -> Path:
        check_slug(slug)
        path = self.pages_dir / f"{slug}.md"
        self._confine(path, self.pages_dir, f"page {slug!r}")
        return path

    def raw_path(self, source_id: str, suffix: str = ".md") -> Path:
        check_source_id(source_id)
        path = self.raw_dir / f"{source_id}{suffix}"
        self._confine(path, self.raw_dir, f"source {source_id!r}")
        return path

    @staticmethod
    def _confine(path: Path, folder: Path, what: str) -> None:
        if path.is_symlink():
            raise WikiPathError(f"{what} is a symbolic link; the wiki refuses to follow links out of its folder")
        resolved = path.resolve()
        if resolved.parent != folder.resolve():
            raise WikiPathError(f"{what} resolves outside {folder.name}/")

    # --- sources --------------------------------------------------------------------------------

    def source_ids(self) -> list[str]:
        return sorted(p.stem for p in self.raw_dir.glob("*.json"))

    def source_meta(self, source_id: str) -> dict | None:
        path = self.raw_path(source_id, ".json")
        if not path.exists():
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    def source_text(self, source_id: str) -> str | None:
        path = self.raw_path(source_id)
        return path.read_text(encoding="utf-8") if path.exists() else None

    def write_source(self, source_id: str, text: str, meta: dict) -> list[Path]:
        # Text first, metadata last: a source only counts once its metadata exists.
        text_path, meta_path = self.raw_path(source_id), self.raw_path(source_id, ".json")
        atomic_write(text_path, text)
        atomic_write(meta_path, json.dumps(meta, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
        return [text_path, meta_path]

    # --- pages ----------------------------------------------------------------------------------

    def page_slugs(self) -> list[str]:
        return sorted(p.stem for p in self.pages_dir.glob("*.md") if not p.is_symlink())

    def read_page(self, slug: str) -> str | None:
        path = self.page_path(slug)
        return path.read_text(encoding="utf-8") if path.exists() else None

    def append_log(self, kind: str, title: str, details: Sequence[str] = ()) -> None:
        """Append `## [YYYY-MM-DD] kind | title` (plus detail lines); the file only ever grows."""
        with self.lock("log"):
            current = self.log_file.read_text(encoding="utf-8") if self.log_file.exists() else "# Log\n"
            day = datetime.now(UTC).strftime("%Y-%m-%d")
            entry = f"\n## [{day}] {kind} | {' '.join(title.split())}\n"
            entry += "".join(f"- {' '.join(d.split())}\n" for d in details)
            atomic_write(self.log_file, current.rstrip("\n") + "\n" + entry)


def check_source_id(source_id: str) -> str:
    if not source_id or len(source_id) > 100 or any(c not in SOURCE_ID_CHARS for c in source_id) or source_id[0] == "-":
        raise WikiPathError(f"invalid source id {source_id!r}: source ids are lowercase letters, digits and hyphens")
    return source_id

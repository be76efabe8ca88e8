"""Git plumbing for the loop: which repo, is it clean, and one worktree per finding.

Every call passes git an argument list; nothing is ever interpreted by a shell.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .process import scrubbed_env

TASK_FILE = ".loop-task.md"
BRANCH_PREFIX = "loop/"
# Files a test run leaves behind that are nobody's change.
JUNK = ("__pycache__/", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/", ".coverage", TASK_FILE)
IDENTITY = ["-c", "user.name=hydrabrain loop", "-c", "user.email=loop@hydrabrain.invalid"]


class GitError(RuntimeError):
    """A git command failed; the message carries git's own words and what to do."""


class NotARepo(GitError):
    pass


class DirtyWorktree(GitError):
    pass


class WorktreeMissing(GitError):
    pass


def git(args: list[str], cwd: Path, check: bool = True) -> str:
    # A repository's config can make git run commands (core.fsmonitor, hooks): they get no secrets,
    # and the fsmonitor hook is switched off outright.
    env = scrubbed_env({"GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"})
    proc = subprocess.run(["git", "-c", "core.fsmonitor=false", *args], cwd=cwd, capture_output=True, encoding="utf-8", errors="replace", env=env, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise GitError(f"git {' '.join(args[:3])} failed in {cwd}: {proc.stderr.strip()}")
    return proc.stdout


def repo_root(path: str | Path) -> Path:
    """The top folder of the git repository at `path`, with a clear error when there is none."""
    try:
        folder = Path(path).expanduser()
        is_dir = folder.is_dir()
    except (OSError, ValueError, RuntimeError) as exc:  # too long, NUL bytes, an unknown ~user
        shown = str(path) if len(str(path)) <= 80 else str(path)[:77] + "..."
        raise NotARepo(f"{shown!r} cannot be a folder ({getattr(exc, 'strerror', None) or exc}); pass the path of a git repository") from None
    if not str(path).strip() or not is_dir:
        raise NotARepo(f"{folder} is not a folder; pass the path of a git repository")
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NotARepo(f"{folder} is not a git repository — run `git init` there or pass the repository's folder")
    root = Path(proc.stdout.strip()).resolve()
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True).returncode != 0:
        raise NotARepo(f"{root} has no commits yet — commit something so worktrees have a base")
    return root


def head(root: Path) -> str:
    return git(["rev-parse", "HEAD"], root).strip()


def dirty_files(root: Path) -> list[str]:
    """Tracked files with uncommitted changes in the main worktree (untracked files do not count)."""
    out = git(["status", "--porcelain", "--untracked-files=no"], root)
    return [line[3:] for line in out.splitlines() if line.strip()]


def require_clean(root: Path) -> None:
    dirty = dirty_files(root)
    if dirty:
        shown = ", ".join(dirty[:5]) + (f" and {len(dirty) - 5} more" if len(dirty) > 5 else "")
        raise DirtyWorktree(
            f"the main worktree of {root} has uncommitted changes ({shown}); worktrees branch from HEAD and would "
            "not see them — commit or stash them, then try again"
        )


def repo_slug(root: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", root.name).strip("-") or "repo"
    return f"{name}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"


def branch_for(finding_id: str) -> str:
    return f"{BRANCH_PREFIX}{finding_id}"


@dataclass(frozen=True)
class Worktree:
    path: Path
    branch: str
    created: bool  # False when it already existed (handoff is idempotent)
    recreated: bool = False  # True when it had been deleted by hand and was put back


def registered_worktrees(root: Path) -> dict[Path, str | None]:
    """Worktree path -> branch, as git knows them (a deleted folder stays listed until pruned)."""
    out = git(["worktree", "list", "--porcelain"], root)
    found: dict[Path, str | None] = {}
    current: Path | None = None
    for line in out.splitlines():
        if line.startswith("worktree "):
            current = Path(line[len("worktree "):]).resolve()
            found[current] = None
        elif line.startswith("branch ") and current is not None:
            found[current] = line[len("branch "):].removeprefix("refs/heads/")
    return found


def _is_worktree_of(path: Path, branch: str) -> bool:
    """The cheap check a cycle makes for every finding: read git's own pointer files, start no process."""
    try:
        pointer = (path / ".git").read_text(encoding="utf-8").strip()
        if not pointer.startswith("gitdir: "):
            return False
        head_ref = (Path(pointer[len("gitdir: "):]) / "HEAD").read_text(encoding="utf-8").strip()
    except OSError:
        return False
    return head_ref == f"ref: refs/heads/{branch}"


def is_ancestor(root: Path, commit: str) -> bool:
    """True when `commit` is reachable from HEAD, i.e. it has been merged."""
    return subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=root, capture_output=True).returncode == 0


def branch_exists(root: Path, branch: str) -> bool:
    return bool(git(["branch", "--list", branch], root).strip())


def ensure_worktree(root: Path, path: Path, branch: str, base: str) -> Worktree:
    """Put a worktree for `branch` at `path`, reusing what is there; never touches another finding's."""
    path = path.resolve()
    if _is_worktree_of(path, branch):
        return Worktree(path, branch, created=False)
    known = registered_worktrees(root)
    if path in known and path.is_dir():
        if known[path] != branch:
            raise GitError(f"{path} is a worktree of branch {known[path]}, not {branch}; remove it with `git worktree remove {path}`")
        return Worktree(path, branch, created=False)
    recreated = path in known or branch_exists(root, branch)
    if path.exists():
        raise GitError(f"{path} exists but is not a worktree of {root}; move it away so the loop can use that place")
    git(["worktree", "prune"], root)
    path.parent.mkdir(parents=True, exist_ok=True)
    if branch_exists(root, branch):
        git(["worktree", "add", str(path), branch], root)
    else:
        git(["worktree", "add", "-b", branch, str(path), base], root)
    return Worktree(path, branch, created=True, recreated=recreated)


def remove_worktree(root: Path, path: Path) -> None:
    if path.resolve() in registered_worktrees(root):
        git(["worktree", "remove", "--force", str(path)], root, check=False)
    git(["worktree", "prune"], root)


def exclude_task_file(root: Path) -> None:
    """Keep the task file out of `git status` in every worktree, via the repo's own info/exclude."""
    common = Path(git(["rev-parse", "--path-format=absolute", "--git-common-dir"], root).strip())
    exclude = common / "info" / "exclude"
    existing = exclude.read_text(encoding="utf-8") if exclude.exists() else ""
    if f"/{TASK_FILE}" not in existing.splitlines():
        exclude.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(exclude, existing + ("" if existing.endswith("\n") or not existing else "\n") + f"/{TASK_FILE}\n")


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_junk(name: str) -> bool:
    return any(name == j or name.startswith(j) or f"/{j}" in f"/{name}" for j in JUNK) or name.endswith(".pyc")


def changed_files(worktree: Path, base: str) -> list[str]:
    """Files the finding's change touches: committed or not, tracked or new, against the base commit."""
    tracked = git(["diff", "--name-only", "--no-renames", base], worktree).splitlines()
    untracked = git(["ls-files", "--others", "--exclude-standard"], worktree).splitlines()
    return sorted({f for f in tracked + untracked if f and not _is_junk(f)})


def fingerprint(worktree: Path, base: str) -> str:
    """A hash of the change itself, so an unchanged worktree is never verified twice."""
    digest = hashlib.sha256()
    digest.update(subprocess.run(["git", "diff", "--binary", base], cwd=worktree, capture_output=True).stdout)
    for name in git(["ls-files", "--others", "--exclude-standard"], worktree).splitlines():
        if name and not _is_junk(name):
            digest.update(name.encode())
            try:
                digest.update((worktree / name).read_bytes())
            except OSError:
                pass
    return digest.hexdigest()[:16]


def diff_text(worktree: Path, base: str, max_chars: int = 20_000) -> str:
    text = git(["diff", base], worktree)
    for name in git(["ls-files", "--others", "--exclude-standard"], worktree).splitlines():
        if name and not _is_junk(name):
            try:
                body = (worktree / name).read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            text += f"\n--- /dev/null\n+++ b/{name}\n" + "".join(f"+{line}\n" for line in body.splitlines())
    return text if len(text) <= max_chars else text[:max_chars] + f"\n[... diff cut at {max_chars} characters]"


def commit_all(worktree: Path, message: str) -> str:
    """Commit everything in the worktree (task file and test junk excluded) and return the commit."""
    for name in changed_files(worktree, "HEAD"):
        git(["add", "--", name], worktree, check=False)
    if git(["diff", "--cached", "--name-only"], worktree).strip():
        git([*IDENTITY, "commit", "-q", "-m", message], worktree)
    return head(worktree)


def attempt_ref(owner_id: str, number: int) -> str:
    """Every attempt keeps a ref, so it can be inspected or restored even after its branch moves on."""
    return f"refs/loop/{owner_id}/attempt-{number}"


def set_ref(cwd: Path, ref: str, commit: str) -> None:
    git(["update-ref", ref, commit], cwd)


def diffstat(cwd: Path, old: str, new: str) -> str:
    """'calc.py +1 -1, util.py +4 -0' between two commits; '' when they hold the same tree."""
    parts = []
    for line in git(["diff", "--numstat", "--no-renames", old, new], cwd).splitlines():
        added, deleted, name = line.split("\t", 2)
        parts.append(f"{name} +{added} -{deleted}" if added != "-" else f"{name} (binary)")
    return ", ".join(parts)

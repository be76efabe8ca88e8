"""Finding work worth doing: failing tests, open issues, and what recent commits left behind.

Each source returns plain `Found` records keyed so that the same problem gets the same key on
every run; the orchestrator turns keys into stable finding ids and deduplicates. Issue text is only
ever stored and quoted, never executed or interpolated into a command.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from hydrabrain.shared.config import LoopConfig

from .process import CommandResult, run_command
from .worktrees import git

# Base scores: a red test blocks everyone, an issue is asked-for work, the rest is hygiene.
SCORES = {"failing_test": 100.0, "issue": 60.0, "todo": 30.0, "untested_change": 20.0}
TEST_GLOBS = ["tests/**", "test/**", "**/test_*", "**/*_test.*", "**/*.test.*", "**/*.spec.*", "test_*", "conftest.py", "**/conftest.py"]
SOURCE_SUFFIXES = {".py", ".js", ".ts", ".tsx", ".go", ".rs", ".java", ".rb", ".c", ".cc", ".cpp", ".h"}
MARKER = re.compile(r"\b(TODO|FIXME|XXX)\b[:(\s]*(.*)")
PATH_TOKEN = re.compile(r"[\w./-]+\.[A-Za-z0-9]{1,6}")


@dataclass
class Found:
    kind: str
    key: str
    title: str
    detail: str = ""
    source_url: str | None = None
    scope: list[str] = field(default_factory=lambda: ["**"])
    protected: list[str] = field(default_factory=list)
    score: float = 0.0


@dataclass
class SourceReport:
    """What one source contributed; `complete` False means its absences prove nothing."""

    name: str
    kinds: list[str]
    found: list[Found]
    complete: bool = True
    note: str = ""
    command: CommandResult | None = None


def finding_id(repo: str, kind: str, key: str) -> str:
    return "f-" + hashlib.sha256(f"{repo}\0{kind}\0{key}".encode()).hexdigest()[:12]


def is_test_path(path: str) -> bool:
    return any(fnmatch.fnmatchcase(path, g) for g in TEST_GLOBS)


# --- (a) CI results -------------------------------------------------------------------------


def detect_test_command(root: Path, cfg: LoopConfig, main_root: Path | None = None) -> list[str] | None:
    """The configured test command, else what a user of this kind of repo would run.

    `main_root` is the main checkout when `root` is a worktree: a repo's own .venv lives only there."""
    if cfg.test_command:
        return list(cfg.test_command)
    tracked = git(["ls-files"], root).splitlines()
    python_markers = {"pyproject.toml", "setup.py", "setup.cfg", "pytest.ini", "tox.ini"}
    has_py_tests = any(Path(p).name.startswith("test_") and p.endswith(".py") or p.endswith("_test.py") for p in tracked)
    if has_py_tests or (python_markers & set(tracked) and any(p.endswith(".py") for p in tracked)):
        own = (main_root or root) / ".venv" / "bin" / "python"
        python = str(own) if own.exists() else sys.executable
        return [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if "package.json" in tracked:
        return ["npm", "test", "--silent"]
    if "Cargo.toml" in tracked:
        return ["cargo", "test", "-q"]
    if "go.mod" in tracked:
        return ["go", "test", "./..."]
    return None


def with_junit(command: list[str], junit: Path) -> list[str]:
    """pytest writes JUnit XML when asked; other runners are judged by exit code alone."""
    if any("pytest" in Path(part).name for part in command):
        return [*command, f"--junitxml={junit}", "-o", "junit_family=xunit1"]
    return command


def junit_cases(path: Path) -> dict[str, tuple[bool, str | None, str]]:
    """Test id -> (failed, file, failure text) for every test case in a JUnit XML report."""
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError):
        return {}
    cases = {}
    for case in tree.iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        classname, name = case.get("classname", ""), case.get("name", "?")
        test_id = f"{classname}::{name}" if classname else name
        text = "" if problem is None else ((problem.get("message") or "") + "\n" + (problem.text or "")).strip()[:4000]
        cases[test_id] = (problem is not None, case.get("file"), text)
    return cases


def parse_junit(path: Path) -> list[tuple[str, str | None, str]]:
    """(test id, file, failure text) for every failed or errored test case in a JUnit XML report."""
    return [(test_id, file, text) for test_id, (failed, file, text) in junit_cases(path).items() if failed]


def _test_findings(failures: list[tuple[str, str | None, str]]) -> list[Found]:
    out = []
    for test_id, file, text in failures:
        protected = [file] if file else []
        out.append(Found(
            kind="failing_test", key=test_id, title=f"failing test {test_id}", detail=text,
            scope=["**"], protected=protected, score=SCORES["failing_test"],
        ))
    return out


def discover_tests(root: Path, cfg: LoopConfig, log_dir: Path, budget_s: float) -> SourceReport:
    if cfg.junit_paths:
        failures = []
        for pattern in cfg.junit_paths:
            for report in sorted(root.glob(pattern)):
                failures.extend(parse_junit(report))
        return SourceReport("junit", ["failing_test"], _test_findings(failures), note=f"read {', '.join(cfg.junit_paths)}")
    command = detect_test_command(root, cfg)
    if command is None:
        return SourceReport("tests", ["failing_test"], [], complete=False,
                            note="no test command configured or detected; set loop.test_command")
    junit = log_dir / "junit-discover.xml"
    junit.unlink(missing_ok=True)
    result = run_command(with_junit(command, junit), cwd=root, log_path=log_dir / "discover-tests.log",
                         timeout_s=min(cfg.test_timeout_s, budget_s))
    found = _test_findings(parse_junit(junit)) if junit.exists() else []
    if result.timed_out:
        found.append(Found(kind="failing_test", key="<test command hangs>", title="the test command hangs",
                           detail=result.describe(" ".join(command)) + "\n" + result.tail(), score=SCORES["failing_test"] + 10))
    elif not result.ok and not found:
        found.append(Found(kind="failing_test", key="<test command fails>", title="the test command fails",
                           detail=result.describe(" ".join(command)) + "\n" + result.tail(), score=SCORES["failing_test"]))
    # A hung run proves nothing about the tests it never reached.
    return SourceReport("tests", ["failing_test"], found, complete=not result.timed_out, note=result.describe(" ".join(command)), command=result)


# --- (b) issues -----------------------------------------------------------------------------


def _scope_from_text(root: Path, text: str, tracked: set[str]) -> list[str]:
    named = sorted({tok.removeprefix("./") for tok in PATH_TOKEN.findall(text)} & tracked)
    return [*named, *TEST_GLOBS] if named else ["**"]


def github_slug(root: Path, cfg: LoopConfig) -> str | None:
    if cfg.github_repo:
        return cfg.github_repo
    url = git(["config", "--get", "remote.origin.url"], root, check=False).strip()
    match = re.search(r"github\.com[:/]([^/]+/[^/]+?)(?:\.git)?$", url)
    return match.group(1) if match else None


def discover_github(root: Path, cfg: LoopConfig, slug: str, token: str, tracked: set[str]) -> SourceReport:
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}
    url: str | None = f"{cfg.github_api_url.rstrip('/')}/repos/{slug}/issues"
    params: dict[str, str] | None = {"state": "open", "per_page": "100"}
    found: list[Found] = []
    try:
        with httpx.Client(timeout=30, headers=headers, follow_redirects=True) as client:
            for _ in range(20):  # 2,000 open issues is plenty for one cycle
                if url is None:
                    break
                response = client.get(url, params=params)
                if response.status_code in (401, 403):
                    return SourceReport("github", ["issue"], [], complete=False,
                                        note=f"GitHub refused the token in {cfg.github_token_env} ({response.status_code}): check its scopes")
                response.raise_for_status()
                for item in response.json():
                    if "pull_request" in item:
                        continue
                    labels = [lab["name"] if isinstance(lab, dict) else str(lab) for lab in item.get("labels", [])]
                    body = item.get("body") or ""
                    bonus = 20.0 if any(lab.lower() in {"bug", "regression"} for lab in labels) else 0.0
                    found.append(Found(
                        kind="issue", key=f"gh:{slug}#{item['number']}", title=f"#{item['number']} {item['title']}",
                        detail=body[:8000] + (f"\n\nlabels: {', '.join(labels)}" if labels else ""),
                        source_url=item.get("html_url"), scope=_scope_from_text(root, body, tracked),
                        score=SCORES["issue"] + bonus,
                    ))
                url = response.links.get("next", {}).get("url")
                params = None  # the next link carries them
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return SourceReport("github", ["issue"], found, complete=False, note=f"GitHub issues unavailable: {exc}")
    return SourceReport("github", ["issue"], found, note=f"{len(found)} open issues on {slug}")


def discover_markdown_issues(root: Path, cfg: LoopConfig, tracked: set[str]) -> SourceReport:
    folder = root / cfg.issues_dir
    if not folder.is_dir():
        return SourceReport("issues", ["issue"], [], note=f"no {cfg.issues_dir}/ folder")
    found = []
    for path in sorted(folder.rglob("*.md")):
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        heading = next((line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")), path.stem)
        closed = re.search(r"^status:\s*(closed|done)\s*$", text, re.IGNORECASE | re.MULTILINE)
        if closed:
            continue
        found.append(Found(
            kind="issue", key=f"md:{rel}", title=heading, detail=text[:8000],
            scope=_scope_from_text(root, text, tracked), protected=[f"{cfg.issues_dir}/**"],
            score=SCORES["issue"] + (20.0 if re.search(r"\bbug\b", text, re.IGNORECASE) else 0.0),
        ))
    return SourceReport("issues", ["issue"], found, note=f"{len(found)} open issues in {cfg.issues_dir}/")


def discover_issues(root: Path, cfg: LoopConfig, tracked: set[str]) -> SourceReport:
    token = os.environ.get(cfg.github_token_env)
    slug = github_slug(root, cfg)
    if token and slug:
        return discover_github(root, cfg, slug, token, tracked)
    return discover_markdown_issues(root, cfg, tracked)


# --- (c) recent commits ---------------------------------------------------------------------


def discover_commits(root: Path, cfg: LoopConfig, tracked: set[str]) -> SourceReport:
    if cfg.commit_scan_depth == 0:
        return SourceReport("commits", ["todo", "untested_change"], [], note="commit scan disabled")
    log = git(["log", f"-n{cfg.commit_scan_depth}", "--no-merges", "--no-color", "--no-ext-diff",
               "--format=%x1e%h%x1f%s", "-p", "--unified=0"], root)
    test_files = [p for p in tracked if is_test_path(p)]
    found: dict[str, Found] = {}
    head_text: dict[str, str] = {}

    def still_there(path: str, line: str) -> bool:
        if path not in head_text:
            try:
                head_text[path] = (root / path).read_text(encoding="utf-8", errors="replace") if path in tracked else ""
            except OSError:
                head_text[path] = ""
        return line in head_text[path]

    for record in log.split("\x1e")[1:]:
        header, _, body = record.partition("\n")
        sha, _, subject = header.partition("\x1f")
        current: str | None = None
        touched: list[str] = []
        for line in body.splitlines():
            if line.startswith("+++ "):
                current = line[6:] if line.startswith("+++ b/") else None
                if current:
                    touched.append(current)
            elif line.startswith("+") and current:
                added = line[1:]
                match = MARKER.search(added)
                if match and still_there(current, added):
                    text = match.group(2).strip() or "(no text)"
                    key = f"{current}:{match.group(1)}:{text}"
                    found.setdefault(key, Found(
                        kind="todo", key=key, title=f"{match.group(1)} in {current}: {text}"[:200],
                        detail=f"commit {sha} ({subject}) added:\n{added.strip()}",
                        scope=[current, *TEST_GLOBS], score=SCORES["todo"] + (5.0 if match.group(1) == "FIXME" else 0.0),
                    ))
        if touched and not any(is_test_path(p) for p in touched):
            for path in touched:
                if Path(path).suffix not in SOURCE_SUFFIXES or path not in tracked or is_test_path(path):
                    continue
                stem = Path(path).stem
                if any(stem in Path(t).name for t in test_files):
                    continue
                key = f"untested:{path}"
                found.setdefault(key, Found(
                    kind="untested_change", key=key, title=f"{path} changed without tests",
                    detail=f"commit {sha} ({subject}) changed {path} and no test; no test file names {stem}",
                    scope=[*TEST_GLOBS], protected=[path], score=SCORES["untested_change"],
                ))
    return SourceReport("commits", ["todo", "untested_change"], list(found.values()),
                        note=f"scanned {cfg.commit_scan_depth} commits")

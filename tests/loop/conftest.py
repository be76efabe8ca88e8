"""Real git repositories with real failing tests, and a real issues server speaking GitHub's REST shape."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

IDENTITY = ["-c", "user.name=Test Author", "-c", "user.email=author@example.com"]

BUGGY = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"
FIXED = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"
TESTS = (
    "from calc import add, mul\n\n\n"
    "def test_add():\n    assert add(2, 3) == 5\n\n\n"
    "def test_mul():\n    assert mul(2, 3) == 6\n"
)


def run_git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *IDENTITY, *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def commit_file(repo: Path, rel: str, text: str, message: str) -> None:
    path = repo / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    run_git(repo, "add", rel)
    run_git(repo, "commit", "-q", "-m", message)


@pytest.fixture
def make_repo(tmp_path: Path) -> Callable[..., Path]:
    """A git repo with calc.py whose add() is wrong and a pytest suite that catches it."""

    def make(name: str = "repo", buggy: bool = True) -> Path:
        repo = tmp_path / name
        repo.mkdir()
        run_git(repo, "init", "-q", "-b", "main")
        (repo / "pyproject.toml").write_text('[tool.pytest.ini_options]\npythonpath = ["."]\n')
        (repo / "calc.py").write_text(BUGGY if buggy else FIXED)
        (repo / "tests").mkdir()
        (repo / "tests" / "test_calc.py").write_text(TESTS)
        run_git(repo, "add", "-A")
        run_git(repo, "commit", "-q", "-m", "calculator")
        return repo

    return make


class IssuesAPI:
    """A loopback HTTP server answering GET /repos/{owner}/{name}/issues like GitHub's REST API."""

    def __init__(self, token: str, per_page: int = 2) -> None:
        self.token = token
        self.per_page = per_page
        self.issues: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlparse(self.path)
                query = parse_qs(url.query)
                api.requests.append({"path": url.path, "query": query, "auth": self.headers.get("Authorization")})
                if self.headers.get("Authorization") != f"Bearer {api.token}":
                    self._send(401, {"message": "Bad credentials"})
                    return
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "repos" or parts[3] != "issues":
                    self._send(404, {"message": "Not Found"})
                    return
                state = query.get("state", ["open"])[0]
                items = [i for i in api.issues if state == "all" or i["state"] == state]
                page = int(query.get("page", ["1"])[0])
                chunk = items[(page - 1) * api.per_page: page * api.per_page]
                headers = {}
                if page * api.per_page < len(items):
                    host = f"http://127.0.0.1:{api.port}"
                    headers["Link"] = f'<{host}{url.path}?state={state}&per_page={api.per_page}&page={page + 1}>; rel="next"'
                self._send(200, chunk, headers)

            def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def add(self, number: int, title: str, body: str, labels: list[str] | None = None, pull: bool = False) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "number": number, "title": title, "body": body, "state": "open",
            "labels": [{"name": n} for n in labels or []],
            "html_url": f"https://github.com/acme/calc/issues/{number}",
        }
        if pull:
            issue["pull_request"] = {"url": f"https://api.github.com/repos/acme/calc/pulls/{number}"}
        self.issues.append(issue)
        return issue


@pytest.fixture
def issues_api() -> Iterator[IssuesAPI]:
    api = IssuesAPI(token="ghp_test_token")
    thread = threading.Thread(target=api.httpd.serve_forever, daemon=True)
    thread.start()
    yield api
    api.httpd.shutdown()
    api.httpd.server_close()


class Kit:
    """Helpers the tests share (fixtures rather than imports: test folders are not packages)."""

    buggy = BUGGY
    fixed = FIXED
    tests = TESTS
    run_git = staticmethod(run_git)
    commit_file = staticmethod(commit_file)


@pytest.fixture
def kit() -> type[Kit]:
    return Kit


@pytest.fixture(autouse=True)
def no_memory_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lessons need the memory server and its embedding model; only the tests about lessons turn it on."""
    monkeypatch.setenv("HYDRABRAIN_LOOP_MEMORY", "off")


@pytest.fixture(autouse=True)
def no_llm_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain mode unless a test configures a provider itself: a key in the shell must not reach a paid API."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "GITHUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)


class ChatAPI:
    """A loopback server speaking the OpenAI chat-completions shape, answering with queued replies."""

    def __init__(self) -> None:
        self.replies: list[str] = []
        self.prompts: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                api.prompts.append(body["messages"][-1]["content"])
                content = api.replies.pop(0) if api.replies else '{"verdict": "FAIL", "reasons": ["no reply queued"]}'
                data = json.dumps({
                    "id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.fixture
def chat_api() -> Iterator[ChatAPI]:
    api = ChatAPI()
    thread = threading.Thread(target=api.httpd.serve_forever, daemon=True)
    thread.start()
    yield api
    api.httpd.shutdown()
    api.httpd.server_close()

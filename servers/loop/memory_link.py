"""The loop's link to the memory server: attempts and outcomes go in, lessons come back out.

The loop speaks to memory as any MCP client does (no server imports another): by default the suite's
memory server is built in process and reached through the SDK's in-memory transport, as the router
mounts it; `loop.memory` may instead name the URL of a memory server already running, or `off`.
Each repository is one memory "user" (its project key), so lessons never leak between repos.

Memory is a helper, never a gate: when it cannot be reached the loop goes on and logs why.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
from mcp import Client

from hydrabrain.shared.config import Settings
from hydrabrain.shared.telemetry import get_logger, log_event

from .store import Attempt
from .worktrees import repo_slug

log = get_logger("loop.memory")
_LESSON_LINE = re.compile(r"^- (Dead end|Works|Mixed results)\b")


def project_key(repo: str) -> str:
    """The memory 'user' a repository's attempts are filed under (memory allows letters, digits and . _ @ : + -)."""
    from pathlib import Path

    return f"repo:{repo_slug(Path(repo))[-100:]}"


def attempt_text(kind: str, title: str, attempt: Attempt) -> str:
    return f"For '{title}' ({kind.replace('_', ' ')}) the loop tried: {attempt.summary}."


def outcome_text(kind: str, title: str, attempt: Attempt) -> str:
    """Worded so memory reads its polarity right: 'passed' and 'improved' count as worked, 'failed' as a dead end."""
    if attempt.verdict == "PASS":
        return f"That change ({attempt.summary}) fixed {kind.replace('_', ' ')} '{title}': verification passed."
    if attempt.verdict in ("baseline", "gain"):
        return f"That change ({attempt.summary}) improved {title}: {attempt.reasons[-1] if attempt.reasons else attempt.verdict}."
    if attempt.verdict in ("within noise", "worse"):
        return f"That change ({attempt.summary}) failed to beat the best beyond the noise: {attempt.reasons[-1]}."
    # The first objection is what a later finding most needs to know; the rest is in the loop's own store.
    why = next((r for r in attempt.reasons if not r.startswith(("scope ok", "tests pass"))), "the verifier said no")
    return f"That change ({attempt.summary}) failed verification: {why}."


class MemoryLink:
    """Writes `attempt` / `outcome` episodes and reads the briefing's lessons, through the MCP client."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.target = settings.loop.memory

    @property
    def enabled(self) -> bool:
        return self.target != "off"

    def _client(self) -> Client:
        if self.target.startswith(("http://", "https://")):
            return Client(self.target)
        from hydrabrain.shared import serving

        return Client(serving.build("memory", self.settings))

    def _run(self, work: Any) -> Any:
        """Open a client, run `work(call)`, close it; None (and a log line) when memory cannot be reached."""

        async def session() -> Any:
            async with self._client() as client:

                async def call(tool: str, **arguments: Any) -> dict[str, Any]:
                    result = await client.call_tool(tool, arguments)
                    if result.is_error:
                        raise RuntimeError(f"memory.{tool}: {result.content[0].text if result.content else 'error'}")
                    return result.structured_content or {}

                return await work(call)

        try:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return anyio.run(session)
            # Called from inside an event loop (an async caller of the sync API): a loop of our own needs its own thread.
            with ThreadPoolExecutor(1) as pool:
                return pool.submit(anyio.run, session).result()
        except Exception as exc:  # noqa: BLE001 - any transport or server fault: the loop goes on without memory
            log_event(log, "memory unavailable", level=30, target=self.target, error=f"{type(exc).__name__}: {exc}")
            return None

    def record_attempt(self, repo: str, kind: str, title: str, attempt: Attempt) -> None:
        """One session per attempt: what was tried, what came of it; ending it lets memory consolidate lessons."""
        if not self.enabled:
            return

        async def work(call: Any) -> None:
            session = await call("start_session", user=project_key(repo), task=f"{kind}: {title}")
            await call("remember", session_id=session["session_id"], text=attempt_text(kind, title, attempt), kind="attempt")
            await call("remember", session_id=session["session_id"], text=outcome_text(kind, title, attempt), kind="outcome")
            await call("end_session", session_id=session["session_id"])

        self._run(work)

    def lessons(self, repo: str, kind: str, title: str) -> list[str]:
        """The lesson lines of memory's briefing for a task on this repo (dead ends first), or none."""
        if not self.enabled:
            return []

        async def work(call: Any) -> str:
            brief = await call("briefing", task=f"{kind}: {title}", user=project_key(repo), token_budget=400)
            return str(brief.get("text", ""))

        text = self._run(work) or ""
        return [line for line in text.splitlines() if _LESSON_LINE.match(line)]

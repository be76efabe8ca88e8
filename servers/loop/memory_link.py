"""The loop's link to the memory server: attempts and outcomes go in, lessons come back out.

The loop speaks to memory as any MCP client does (no server imports another): by default the suite's
memory server is built in process and reached through the SDK's in-memory transport, as the router
mounts it; `loop.memory` may instead name the URL of a memory server already running, or `off`.
Each repository is one memory "user" (its project key), so lessons never leak between repos.

Memory is a helper, never a gate: when it cannot be reached the loop goes on and logs why.
"""

from __future__ import annotations

import re
from typing import Any

import anyio
from mcp import Client

from hydrabrain.shared.config import Settings
from hydrabrain.shared.telemetry import get_logger, log_event

from .store import Attempt, Finding
from .worktrees import repo_slug

log = get_logger("loop.memory")
_LESSON_LINE = re.compile(r"^- (Dead end|Works|Mixed results)\b")


def project_key(repo: str) -> str:
    """The memory 'user' a repository's attempts are filed under (memory allows letters, digits and . _ @ : + -)."""
    from pathlib import Path

    return f"repo:{repo_slug(Path(repo))[-100:]}"


def attempt_text(finding: Finding, attempt: Attempt) -> str:
    return f"On {finding.kind.replace('_', ' ')} '{finding.title}' the loop tried: {attempt.summary}."


def outcome_text(finding: Finding, attempt: Attempt) -> str:
    if attempt.verdict == "PASS":
        return f"That change ({attempt.summary}) fixed {finding.kind.replace('_', ' ')} '{finding.title}': verification passed."
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
            return anyio.run(session)
        except Exception as exc:  # noqa: BLE001 - any transport or server fault: the loop goes on without memory
            log_event(log, "memory unavailable", level=30, target=self.target, error=f"{type(exc).__name__}: {exc}")
            return None

    def record_attempt(self, finding: Finding, attempt: Attempt) -> None:
        """One session per attempt: what was tried, what came of it; ending it lets memory consolidate lessons."""
        if not self.enabled:
            return

        async def work(call: Any) -> None:
            user = project_key(finding.repo)
            session = await call("start_session", user=user, task=f"{finding.kind}: {finding.title}")
            await call("remember", session_id=session["session_id"], text=attempt_text(finding, attempt), kind="attempt")
            await call("remember", session_id=session["session_id"], text=outcome_text(finding, attempt), kind="outcome")
            await call("end_session", session_id=session["session_id"])

        self._run(work)

    def lessons(self, finding: Finding) -> list[str]:
        """The lesson lines of memory's briefing for this finding (dead ends first), or none."""
        if not self.enabled:
            return []

        async def work(call: Any) -> str:
            brief = await call("briefing", task=f"{finding.kind}: {finding.title}", user=project_key(finding.repo), token_budget=400)
            return str(brief.get("text", ""))

        text = self._run(work) or ""
        return [line for line in text.splitlines() if _LESSON_LINE.match(line)]

"""The memory server's MCP surface: sessions, remember, recall, consolidate, briefing, forget."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from pydantic import BaseModel, Field

from hydrabrain.servers.memory.core import ConsolidationResult, MemoryInputError, MemoryService, RecallItem
from hydrabrain.servers.memory.episodes import Lesson
from hydrabrain.servers.memory.facts import Fact
from hydrabrain.servers.memory.timeutil import to_iso
from hydrabrain.shared.auth import PermissionDenied, ToolScopes, user_for
from hydrabrain.shared.config import Settings
from hydrabrain.shared.graph import GraphError
from hydrabrain.shared.serving import new_server
from hydrabrain.shared.telemetry import get_logger, log_event

log = get_logger("memory.server")

INSTRUCTIONS = """Long-term memory for a coding agent, per user.
Start a session for each task, remember what you observe, try and find out (with the facts you
extracted as {subject, predicate, object}), and end the session to distil lessons. For a
conversation, start a session per conversation session and send its turns with remember_turns
({speaker, text, at?} each, in order). Before a task, call briefing; during it, recall. A new fact for the same subject and predicate supersedes the old
one, which stays queryable with as_of. forget deletes for real."""

Kind = Literal["observation", "attempt", "outcome", "fact", "preference"]
RecallKind = Literal["observation", "attempt", "outcome", "fact", "preference", "turn", "lesson"]


@dataclass
class MemoryState:
    service: MemoryService
    llm: Any | None


class FactIn(BaseModel):
    subject: str = Field(description="Who or what the fact is about, e.g. 'staging database'")
    predicate: str = Field(description="The relation, e.g. 'runs on' or 'owner'")
    object: str = Field(description="The value, e.g. 'Postgres 16'")


class FactOut(BaseModel):
    fact_id: str
    subject: str
    predicate: str
    object: str
    valid_from: str = Field(description="When it became true")
    valid_to: str | None = Field(description="When it stopped being true; null while current")
    recorded_at: str = Field(description="When the server learned it")
    invalidated_at: str | None = Field(description="When the server learned it stopped being true")
    source_memory_id: str | None = Field(description="The memory that stated it")
    current: bool


class TurnIn(BaseModel):
    speaker: str = Field(description="Who said it, e.g. 'Ana' or 'user'")
    text: str = Field(description="What was said, verbatim")
    at: str | None = Field(None, description="When it was said, ISO 8601 (default: the previous turn's time, else now)")


class RememberTurnsOut(BaseModel):
    session_id: str
    memory_ids: list[str] = Field(description="One per turn, in the order sent")
    dates_resolved: int = Field(description="Relative dates ('yesterday', 'last Friday') resolved against their turn's time")
    names_linked: int = Field(description="Name mentions linked across sessions in the graph")


class SessionOut(BaseModel):
    session_id: str
    user: str
    task: str | None
    started_at: str
    ended_at: str | None = None


class LessonOut(BaseModel):
    lesson_id: str
    text: str
    polarity: str = Field(description="dead_end, works or mixed")
    support: int = Field(description="Episodes that back it")
    failed: int
    worked: int
    evidence: list[str] = Field(description="memory_ids of the supporting episodes")
    updated_at: str


class EndSessionOut(BaseModel):
    session: SessionOut
    lessons_created: list[LessonOut]
    lessons_updated: list[LessonOut]


class RememberOut(BaseModel):
    memory_id: str
    at: str
    facts: list[FactOut] = Field(description="Facts stored (or already known) from this memory")
    invalidated: list[FactOut] = Field(description="Facts this memory superseded; still queryable with as_of")
    extracted: bool = Field(False, description="True when the facts came from the configured LLM")


class RecallItemOut(BaseModel):
    type: str = Field(description="episode, fact or lesson")
    id: str
    text: str
    score: float
    kind: str | None = Field(None, description="Episode kind, or a lesson's polarity")
    at: str | None = Field(None, description="When it happened (facts: valid_from; lessons: last update)")
    session_id: str | None = None
    source_memory_ids: list[str] = Field(default_factory=list, description="Where it came from")
    fact: FactOut | None = None
    speaker: str | None = Field(None, description="Turns: who said it")
    dates: list[str] = Field(default_factory=list, description="Turns: relative dates in it, resolved against when it was said")
    superseded_by: str | None = Field(None, description="Set when every fact of this episode was superseded: the memory_id that states what is true now")
    current: list[str] = Field(default_factory=list, description="What is true now, for a superseded episode")


class RecallOut(BaseModel):
    items: list[RecallItemOut] = Field(description="Best first; empty means nothing relevant is remembered")
    as_of: str | None = None


class ConsolidateOut(BaseModel):
    created: list[LessonOut]
    updated: list[LessonOut]
    episodes_considered: int


class BriefingOut(BaseModel):
    text: str
    tokens: int = Field(description="Tokens in text, counted with the MiniLM tokenizer")
    token_budget: int
    lessons: int
    facts: int
    preferences: int
    omitted: int = Field(description="Lines left out to fit the budget")


class ForgetOut(BaseModel):
    episodes: int
    facts: int
    lessons_deleted: int
    lessons_rewritten: int


def fact_out(f: Fact) -> FactOut:
    return FactOut(**f.as_dict())  # type: ignore[arg-type]


def lesson_out(x: Lesson) -> LessonOut:
    return LessonOut(lesson_id=x.id, text=x.text, polarity=x.polarity, support=x.support, failed=x.failed, worked=x.worked,
                     evidence=list(x.evidence), updated_at=to_iso(x.updated_at) or "")


def item_out(i: RecallItem) -> RecallItemOut:
    return RecallItemOut(type=i.type, id=i.id, text=i.text, score=round(i.score, 5), kind=i.kind, at=i.at, session_id=i.session_id,
                         source_memory_ids=i.source_memory_ids, fact=FactOut(**i.fact) if i.fact else None,
                         speaker=i.speaker, dates=i.dates, superseded_by=i.superseded_by, current=i.current)


def consolidation_out(r: ConsolidationResult) -> ConsolidateOut:
    return ConsolidateOut(created=[lesson_out(x) for x in r.created], updated=[lesson_out(x) for x in r.updated], episodes_considered=r.episodes_considered)


USER_HELP = ("Whose memory (one user never sees another's). Over HTTP with [auth] it defaults to the token's user, "
             "and naming another user needs the admin scope; over stdio it must be given")

EXTRACT_SCHEMA = {
    "type": "object",
    "properties": {"facts": {"type": "array", "items": {
        "type": "object",
        "properties": {"subject": {"type": "string"}, "predicate": {"type": "string"}, "object": {"type": "string"}},
        "required": ["subject", "predicate", "object"],
    }}},
    "required": ["facts"],
}


async def extract_facts(llm: Any, text: str, user: str) -> list[dict[str, str]]:
    """Facts the configured LLM reads in `text`; none when it fails (the memory is kept regardless)."""
    prompt = (
        "Extract durable facts from this note as subject/predicate/object triples. Use short noun phrases; "
        "only facts stated in the note; an empty list if none.\n\nNote:\n" + text
    )
    try:
        result = await llm.complete(prompt=prompt, task="extract", max_tokens=400, json_schema=EXTRACT_SCHEMA, tenant=user, feature="memory.extract")
        facts = (result.parsed or {}).get("facts", [])
        return [f for f in facts if isinstance(f, dict)][:20]
    except Exception as exc:  # noqa: BLE001 - extraction is optional; report and go on
        log_event(log, "fact extraction skipped", level=30, error=str(exc))
        return []


def build_server(settings: Settings) -> MCPServer:
    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[MemoryState]:
        service = await anyio.to_thread.run_sync(MemoryService, settings)
        llm = None
        if settings.memory.extract_facts:
            from hydrabrain.shared.llm import llm_from_settings

            llm = llm_from_settings(settings)
        try:
            yield MemoryState(service, llm)
        finally:
            await anyio.to_thread.run_sync(service.close)

    scopes = ToolScopes("memory", resources="memory:read")
    server = new_server("memory", instructions=INSTRUCTIONS, lifespan=lifespan, settings=settings, scopes=scopes)

    def state(ctx: Context) -> MemoryState:
        return ctx.request_context.lifespan_context

    async def run(fn: Any, *args: Any) -> Any:
        # The SDK hides a plain exception's text from the client; ToolError carries it to the model.
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args), abandon_on_cancel=True)  # a caller's timeout must not wait
        except (MemoryInputError, GraphError) as exc:
            raise ToolError(str(exc)) from None

    def whose(user: str | None, error: type[Exception] = ToolError) -> str:
        # The token decides whose memory this is; naming another user needs the admin scope.
        try:
            return user_for(user)
        except PermissionDenied as exc:
            raise error(str(exc)) from None

    async def own_session(ctx: Context, session_id: str) -> None:
        session = await run(state(ctx).service.session, session_id)
        whose(session.user)

    async def read(fn: Any, *args: Any) -> Any:
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args), abandon_on_cancel=True)  # a caller's timeout must not wait
        except (MemoryInputError, GraphError) as exc:
            raise ResourceError(str(exc)) from None

    @server.tool()
    @scopes.need("memory:write")
    async def start_session(
        ctx: Context,
        user: Annotated[str | None, Field(description=USER_HELP)] = None,
        task: Annotated[str | None, Field(description="What this session is about")] = None,
        team: Annotated[str | None, Field(description="Optional team the records also belong to")] = None,
    ) -> SessionOut:
        """Start a session that groups what you remember during one task."""
        s = await run(state(ctx).service.start_session, whose(user), task, team)
        return SessionOut(session_id=s.id, user=s.user, task=s.task, started_at=to_iso(s.started_at) or "")

    @server.tool()
    @scopes.need("memory:write")
    async def end_session(
        session_id: Annotated[str, Field(description="From start_session")],
        ctx: Context,
    ) -> EndSessionOut:
        """End a session and distil its attempts and outcomes into lessons."""
        await own_session(ctx, session_id)
        s, result = await run(state(ctx).service.end_session, session_id)
        return EndSessionOut(
            session=SessionOut(session_id=s.id, user=s.user, task=s.task, started_at=to_iso(s.started_at) or "", ended_at=to_iso(s.ended_at)),
            lessons_created=[lesson_out(x) for x in result.created], lessons_updated=[lesson_out(x) for x in result.updated],
        )

    @server.tool()
    @scopes.need("memory:write")
    async def remember(
        session_id: Annotated[str, Field(description="From start_session")],
        text: Annotated[str, Field(description="What happened, in one or a few sentences")],
        ctx: Context,
        kind: Annotated[Kind, Field(description="observation, attempt (something tried), outcome (what came of it), fact, or preference")] = "observation",
        facts: Annotated[list[FactIn] | None, Field(description="Facts you read in the text, as {subject, predicate, object}")] = None,
        at: Annotated[str | None, Field(description="When it happened, ISO 8601 (default now)")] = None,
    ) -> RememberOut:
        """Store one memory; its facts supersede older facts with the same subject and predicate."""
        st = state(ctx)
        await own_session(ctx, session_id)
        given: list[Any] = list(facts or [])
        extracted = False
        if not given and st.llm is not None and isinstance(text, str) and 0 < len(text) <= settings.memory.max_text_chars:
            session = await run(st.service.session, session_id)
            given = await extract_facts(st.llm, text, session.user)
            extracted = bool(given)
        r = await run(st.service.remember, session_id, text, kind, given, at)
        return RememberOut(memory_id=r.memory_id, at=r.at, facts=[fact_out(f) for f in r.facts], invalidated=[fact_out(f) for f in r.invalidated], extracted=extracted)

    @server.tool()
    @scopes.need("memory:write")
    async def remember_turns(
        session_id: Annotated[str, Field(description="From start_session; one session per conversation session")],
        turns: Annotated[list[TurnIn], Field(description="The turns in the order they were said: {speaker, text, at?}")],
        ctx: Context,
    ) -> RememberTurnsOut:
        """Store a conversation's turns verbatim in one call (hundreds at once); no facts needed."""
        await own_session(ctx, session_id)
        given = [t.model_dump(exclude_none=True) for t in turns]
        r = await run(state(ctx).service.remember_turns, session_id, given)
        return RememberTurnsOut(session_id=r.session_id, memory_ids=r.memory_ids, dates_resolved=r.dates_resolved, names_linked=r.names_linked)

    @server.tool()
    @scopes.need("memory:read")
    async def recall(
        query: Annotated[str, Field(description="What you want to know")],
        ctx: Context,
        user: Annotated[str | None, Field(description=USER_HELP)] = None,
        k: Annotated[int, Field(ge=1, le=100, description="Most items to return")] = 8,
        as_of: Annotated[str | None, Field(description="ISO 8601 time: answer with what was true and known then")] = None,
        kinds: Annotated[list[RecallKind] | None, Field(description="Only these kinds (episode kinds, 'fact', 'lesson')")] = None,
        session_id: Annotated[str | None, Field(description="Only this session's memories")] = None,
    ) -> RecallOut:
        """Recall episodes, current facts and lessons relevant to a query, best first."""
        who = whose(user)
        if session_id:
            await own_session(ctx, session_id)
        items = await run(state(ctx).service.recall, query, who, k, as_of, kinds, session_id)
        return RecallOut(items=[item_out(i) for i in items], as_of=as_of)

    @server.tool()
    @scopes.need("memory:write")
    async def consolidate(
        ctx: Context,
        user: Annotated[str | None, Field(description=USER_HELP)] = None,
        session_id: Annotated[str | None, Field(description="Only this session's episodes (default: all)")] = None,
    ) -> ConsolidateOut:
        """Distil similar attempts and outcomes into lessons that cite them; episodes are kept."""
        return consolidation_out(await run(state(ctx).service.consolidate, whose(user), session_id))

    @server.tool()
    @scopes.need("memory:read")
    async def briefing(
        task: Annotated[str, Field(description="The task you are about to start")],
        ctx: Context,
        user: Annotated[str | None, Field(description=USER_HELP)] = None,
        token_budget: Annotated[int, Field(ge=20, le=32000, description="Most tokens the briefing may take")] = 800,
    ) -> BriefingOut:
        """What to know before a task: lessons (dead ends first), then current facts and preferences."""
        b = await run(state(ctx).service.briefing, task, whose(user), token_budget)
        return BriefingOut(text=b.text, tokens=b.tokens, token_budget=b.token_budget, lessons=b.lessons, facts=b.facts, preferences=b.preferences, omitted=b.omitted)

    @server.tool()
    @scopes.need("memory:write")
    async def forget(
        ctx: Context,
        user: Annotated[str | None, Field(description=USER_HELP)] = None,
        memory_id: Annotated[str | None, Field(description="One memory to delete, with the facts it stated")] = None,
        subject: Annotated[str | None, Field(description="Delete everything about this entity: its facts and the memories that mention it")] = None,
        everything: Annotated[bool, Field(description="Delete all of this user's memories")] = False,
    ) -> ForgetOut:
        """Delete memories for real, from every store (for privacy requests)."""
        r = await run(state(ctx).service.forget, whose(user), memory_id, subject, everything)
        return ForgetOut(episodes=r.episodes, facts=r.facts, lessons_deleted=r.lessons_deleted, lessons_rewritten=r.lessons_rewritten)

    @server.resource("memory://user/{user}/lessons", mime_type="application/json", description="The user's lessons, best supported first")
    async def user_lessons(user: str, ctx: Context) -> str:
        lessons = await read(state(ctx).service.lessons, whose(user, ResourceError))
        return json.dumps([lesson_out(x).model_dump() for x in lessons], indent=2)

    @server.resource("memory://user/{user}/facts", mime_type="application/json", description="The user's current facts")
    async def user_facts(user: str, ctx: Context) -> str:
        facts = await read(state(ctx).service.facts, whose(user, ResourceError))
        return json.dumps([fact_out(f).model_dump() for f in facts], indent=2)

    @server.resource("memory://session/{session_id}", mime_type="application/json", description="A session and its episodes in order")
    async def session_record(session_id: str, ctx: Context) -> str:
        s, episodes = await read(state(ctx).service.session_view, session_id)
        whose(s.user, ResourceError)
        return json.dumps({
            "session_id": s.id, "user": s.user, "team": s.team, "task": s.task,
            "started_at": to_iso(s.started_at), "ended_at": to_iso(s.ended_at),
            "episodes": [e.as_dict() for e in episodes],
        }, indent=2)

    return server

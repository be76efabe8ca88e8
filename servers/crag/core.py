"""Corrective RAG: retrieve, judge the retrieval, correct it with the web, and rebuild clean context.

After Yan et al., "Corrective Retrieval Augmented Generation" (arXiv 2401.15884): an evaluator
scores every retrieved document; Correct (some document passes the upper threshold) refines the
internal knowledge, Incorrect (every document below the lower threshold) replaces it with web
search on a rewritten query, Ambiguous does both. Refinement is decompose-then-recompose: kept
documents are cut into strips, each strip is scored, noise is dropped, and the best strips within a
token budget are put back in reading order with citations.

No server imports another, so the wiki's index is read through the shared stores using the wiki's
layout: vector collection and lexical namespace ``wiki``, ids ``chunk:<source_id>:<n>`` and
``page:<slug>:<n>``, payload ``kind``, ``source_id`` / ``sources``, ``slug``, ``title``, ``text``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from hydrabrain.shared.config import Settings
from hydrabrain.shared.embeddings import Embedder
from hydrabrain.shared.lexical import LexicalIndex, open_lexical_index
from hydrabrain.shared.retrieval import HybridRetriever
from hydrabrain.shared.safety import injection_flags
from hydrabrain.shared.telemetry import get_logger, log_event
from hydrabrain.shared.vectors import VectorStore, open_vector_store

from hydrabrain.servers.crag import websearch
from hydrabrain.servers.crag.evaluator import Evaluator, LLMJudgeEvaluator, MiniLMEvaluator, decide, describe_minilm, load_calibration
from hydrabrain.servers.crag.models import (
    Citation,
    DocumentScore,
    EvaluateResult,
    EvaluatorInfo,
    KeptStrip,
    RetrieveResult,
    TraceStep,
)
from hydrabrain.servers.crag.strips import Strip, decompose, select

log = get_logger("crag")

WIKI = "wiki"
MEMORY = "memory"
WIKI_INDEXED = ("kind", "source_id", "slug")
MEMORY_INDEXED = ("user",)
TEXT_FIELDS = ("text", "content", "page_content", "document", "body")
MAX_K = 50
MIN_BUDGET = 32
# A strip must score at least this share of the best strip's score: the tail of a relevant document
# passes the absolute floor on its topic words alone, and would eat the budget.
RELATIVE_STRIP_FLOOR = 0.6


@dataclass
class Document:
    id: str
    text: str
    citation: Citation
    retrieval_score: float = 0.0

    @property
    def judged_text(self) -> str:
        """What the evaluator reads: the title gives the topic a bare chunk may only imply."""
        title = self.citation.title
        return f"{title}. {self.text}" if title and title.lower() not in self.text[:200].lower() else self.text


def parse_sources(sources: Sequence[str] | None) -> list[str]:
    """Validated source names; None or empty means the wiki."""
    if not sources:
        return [WIKI]
    out: list[str] = []
    for raw in sources:
        name = raw.strip()
        if name in (WIKI, MEMORY):
            out.append(name)
        elif name.startswith("qdrant:") and re.fullmatch(r"[A-Za-z0-9_-]+", name.removeprefix("qdrant:")):
            out.append(name)
        else:
            raise ValueError(f"unknown source {raw!r}; use 'wiki', 'memory' or 'qdrant:<collection>' (letters, digits, '-' and '_')")
    return list(dict.fromkeys(out))


class Sources:
    """The internal retrievals CRAG can judge, opened on first use and closed together."""

    def __init__(self, settings: Settings, embedder: Embedder) -> None:
        self.settings = settings
        self.embedder = embedder
        self._vectors: dict[str, VectorStore] = {}
        self._lexical: dict[str, LexicalIndex] = {}

    def _store(self, collection: str, indexed: Sequence[str] = ()) -> VectorStore:
        if collection not in self._vectors:
            self._vectors[collection] = open_vector_store(self.settings, collection, self.embedder.dim, indexed)
        return self._vectors[collection]

    def _retriever(self, name: str, indexed: Sequence[str]) -> HybridRetriever:
        if name not in self._lexical:
            self._lexical[name] = open_lexical_index(self.settings, name)
        return HybridRetriever(self.embedder, self._store(name, indexed), self._lexical[name])

    def retrieve(self, source: str, question: str, k: int, user: str | None = None) -> list[Document]:
        """Documents for `question` from one source; memory only ever yields `user`'s own memories."""
        if source in (MEMORY, f"qdrant:{MEMORY}"):
            if not user:
                raise ValueError("searching memory needs the user whose memory it is (the token's user over HTTP; pass user= over stdio)")
            only = {"user": user}
        if source == WIKI:
            return [_wiki_document(h.id, h.text, h.payload, h.score) for h in self._retriever(WIKI, WIKI_INDEXED).search(question, k)]
        if source == MEMORY:
            return [
                Document(h.id, h.text, Citation(source=f"memory:{h.id}", origin=MEMORY, title=str(h.payload.get("title", ""))), h.score)
                for h in self._retriever(MEMORY, MEMORY_INDEXED).search(question, k, where=only)
            ]
        collection = source.removeprefix("qdrant:")
        hits = self._store(collection).search(self.embedder.embed_one(question), k, only if collection == MEMORY else None)
        docs = []
        for hit in hits:
            text = next((str(hit.payload[f]) for f in TEXT_FIELDS if isinstance(hit.payload.get(f), str)), "")
            if text:
                cite = str(hit.payload.get("url") or hit.payload.get("source") or f"{collection}:{hit.id}")
                docs.append(Document(hit.id, text, Citation(source=cite, origin=source, title=str(hit.payload.get("title", ""))), hit.score))
        return docs

    def close(self) -> None:
        for store in self._vectors.values():
            store.close()
        for index in self._lexical.values():
            index.close()
        self._vectors.clear()
        self._lexical.clear()


def _wiki_document(item_id: str, text: str, payload: dict[str, Any], score: float) -> Document:
    if payload.get("kind") == "page" or item_id.startswith("page:"):
        slug = payload.get("slug") or item_id.split(":")[1]
        source = f"page:{slug}"
    else:
        source = str(payload.get("source_id") or item_id.split(":")[1])
    return Document(item_id, text, Citation(source=source, origin=WIKI, title=str(payload.get("title", ""))), score)


class Crag:
    """The pipeline; `llm` (shared.llm contract) is optional and only rewrites web queries."""

    def __init__(self, settings: Settings, embedder: Embedder, evaluator: Evaluator, llm: Any = None) -> None:
        self.settings = settings
        self.cfg = settings.crag
        self.embedder = embedder
        self.evaluator = evaluator
        self.llm = llm
        self.sources = Sources(settings, embedder)

    def close(self) -> None:
        self.sources.close()

    async def evaluate(self, question: str, documents: Sequence[str]) -> EvaluateResult:
        question = _check_question(question)
        if not documents:
            raise ValueError("documents is empty; pass the texts to judge")
        scores = await self.evaluator.score(question, list(documents))
        ev = self.evaluator
        return EvaluateResult(scores=[round(s, 4) for s in scores], action=decide(scores, ev.upper, ev.lower), upper_threshold=ev.upper, lower_threshold=ev.lower, evaluator=ev.name)

    async def retrieve(
        self,
        question: str,
        k: int = 5,
        sources: Sequence[str] | None = None,
        allow_web: bool = True,
        token_budget: int = 1500,
        user: str | None = None,
    ) -> RetrieveResult:
        """Retrieve, judge, correct. `user` is whose memory a memory source searches (no one else's)."""
        question = _check_question(question)
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
        if token_budget < MIN_BUDGET:
            raise ValueError(f"token_budget must be at least {MIN_BUDGET} tokens, got {token_budget}")
        names = parse_sources(sources)
        trace: list[TraceStep] = []
        ev = self.evaluator

        internal: list[Document] = []
        for name in names:
            try:
                found = await anyio.to_thread.run_sync(self.sources.retrieve, name, question, k, user, abandon_on_cancel=True)
            except Exception as exc:  # noqa: BLE001 - one broken source must not hide the others
                trace.append(TraceStep(step="retrieve", detail=f"{name}: failed ({exc})"))
                continue
            trace.append(TraceStep(step="retrieve", detail=f"{name}: {len(found)} document(s)" + ("" if found else " (the index is empty or nothing matched)")))
            internal.extend(found)
        internal.sort(key=lambda d: d.retrieval_score, reverse=True)
        internal = internal[: k * len(names)]

        internal_scores = await ev.score(question, [d.judged_text for d in internal]) if internal else []
        action = decide(internal_scores, ev.upper, ev.lower)
        best = max(internal_scores, default=0.0)
        trace.append(TraceStep(step="evaluate", detail=f"{ev.name}: best {best:.3f} vs upper {ev.upper:.3f} / lower {ev.lower:.3f} -> {action}"))

        judged = [(d, s) for d, s in zip(internal, internal_scores, strict=True)]
        kept: list[tuple[Document, float]] = [(d, s) for d, s in judged if s >= ev.lower] if action != "incorrect" else []
        rewritten: str | None = None
        web_error: str | None = None
        web_used = False
        floor = ev.lower

        if action != "correct":
            if not allow_web:
                web_error = "the web step was not allowed (allow_web=false)"
            else:
                rewritten, web_docs, web_error = await self._web(question, trace)
                if web_docs:
                    web_scores = await ev.score(question, [d.judged_text for d in web_docs])
                    judged += list(zip(web_docs, web_scores, strict=True))
                    good = [(d, s) for d, s in zip(web_docs, web_scores, strict=True) if s >= ev.lower]
                    trace.append(TraceStep(step="evaluate", detail=f"web: {len(good)} of {len(web_docs)} page(s) at or above the lower threshold"))
                    kept += good
                    web_used = True
            if web_error:
                trace.append(TraceStep(step="search", detail=f"web step could not run: {web_error}"))
                if action == "incorrect":
                    # Nothing better is coming: hand back the best internal context, marked uncertain.
                    kept = list(judged)
                    floor = 0.0
                    trace.append(TraceStep(step="refine", detail="falling back to the best internal context, flagged uncertain"))

        strips = await self._refine(question, kept, token_budget, floor, trace)
        uncertain = action == "ambiguous" or (web_error is not None and action == "incorrect") or not strips
        confidence = best if action == "correct" else (1.0 - best if action == "incorrect" else 0.5)
        context, tokens = _recompose(strips, self.embedder)
        trace.append(TraceStep(step="recompose", detail=f"{len(strips)} strip(s), {tokens} of {token_budget} tokens"))
        log_event(log, "crag.retrieve", action=action, strips=len(strips), tokens=tokens, web_used=web_used, web_error=web_error)
        return RetrieveResult(
            action=action,
            confidence=round(confidence, 4),
            uncertain=uncertain,
            strips=strips,
            context=context,
            context_tokens=tokens,
            documents=[DocumentScore(id=d.id, score=round(s, 4), citation=d.citation) for d, s in judged],
            rewritten_query=rewritten,
            web_used=web_used,
            web_error=web_error,
            trace=trace,
        )

    async def rewrite(self, question: str, trace: list[TraceStep]) -> str:
        """A web-search query: an LLM rewrite when one is configured, keyword extraction otherwise."""
        if self.llm is not None:
            try:
                result = await self.llm.complete(
                    prompt=(
                        "Rewrite the question as a short web-search query of at most 8 keywords. "
                        f"Reply with the query only.\n\nQuestion: {question}\nQuery:"
                    ),
                    task="rewrite",
                    max_tokens=32,
                    feature="crag.rewrite",
                )
                line = next((ln.strip().strip('"') for ln in result.text.splitlines() if ln.strip()), "")
                if line:
                    trace.append(TraceStep(step="rewrite", detail=f"LLM ({result.model}): {line}"))
                    return line[:200]
            except Exception as exc:  # noqa: BLE001 - the keyword rewrite always works
                trace.append(TraceStep(step="rewrite", detail=f"LLM rewrite failed ({exc}); using keywords"))
        query = websearch.keyword_query(question)
        trace.append(TraceStep(step="rewrite", detail=f"keywords: {query}"))
        return query

    async def _web(self, question: str, trace: list[TraceStep]) -> tuple[str | None, list[Document], str | None]:
        problem = websearch.provider_status(self.cfg)
        if problem:
            return None, [], problem
        query = await self.rewrite(question, trace)
        try:
            results = await websearch.search(self.cfg, query, self.cfg.web_results)
        except websearch.WebSearchError as exc:
            return query, [], str(exc)
        trace.append(TraceStep(step="search", detail=f"{len(results)} result(s) for {query!r}"))
        pages: list[tuple[str, str | None]] = [("", None)] * len(results)

        async def fetch(i: int) -> None:
            pages[i] = await websearch.fetch_page(self.cfg, results[i])

        async with anyio.create_task_group() as group:
            for i in range(len(results)):
                group.start_soon(fetch, i)
        docs: list[Document] = []
        for result, (text, problem) in zip(results, pages, strict=True):
            if problem:
                trace.append(TraceStep(step="fetch", detail=f"{result.url}: {problem}; using the search snippet"))
            if text.strip():
                docs.append(Document(result.url, text, Citation(source=result.url, origin="web", title=result.title)))
        return query, docs, None

    async def _refine(self, question: str, kept: list[tuple[Document, float]], budget: int, floor: float, trace: list[TraceStep]) -> list[KeptStrip]:
        if not kept:
            return []
        docs = [d for d, _ in kept]
        strips: list[Strip] = []
        for i, doc in enumerate(docs):
            strips.extend(decompose(doc.text, i, self.cfg.strip_sentences))
        if not strips:
            return []
        judged = [_strip_context(docs[s.doc_index], s) for s in strips]
        scores = await self.evaluator.score(question, judged)
        costs = [self.embedder.count_tokens(s.text) for s in strips]
        # With no floor (the uncertain fallback) every strip competes for the budget on score alone.
        chosen = select(strips, scores, costs, budget, floor, RELATIVE_STRIP_FLOOR if floor > 0 else 0.0)
        trace.append(TraceStep(step="refine", detail=f"{len(docs)} document(s) -> {len(strips)} strip(s); kept {len(chosen)} (floor {floor:.3f}, budget {budget})"))
        out: list[KeptStrip] = []
        for i in chosen:
            flags = injection_flags(strips[i].text)
            if flags:
                trace.append(TraceStep(step="refine", detail=f"strip from {docs[strips[i].doc_index].citation.source} flagged: {'; '.join(flags)}"))
            out.append(KeptStrip(text=strips[i].text, score=round(scores[i], 4), citation=docs[strips[i].doc_index].citation, flags=flags))
        return out


def _strip_context(doc: Document, strip: Strip) -> str:
    """A strip as the evaluator reads it: with its section heading and document title for context."""
    prefix = " — ".join(p for p in (doc.citation.title, strip.heading) if p)
    return f"{prefix}. {strip.text}" if prefix else strip.text


def _recompose(strips: Sequence[KeptStrip], embedder: Embedder) -> tuple[str, int]:
    numbers: dict[str, int] = {}
    parts: list[str] = []
    for strip in strips:
        n = numbers.setdefault(strip.citation.source, len(numbers) + 1)
        parts.append(f"{strip.text} [{n}]")
    refs = [f"[{n}] {source}" for source, n in numbers.items()]
    context = "\n".join(parts) + ("\n\n" + "\n".join(refs) if refs else "")
    return context, sum(embedder.count_tokens(s.text) for s in strips)


def _check_question(question: str) -> str:
    question = question.strip()
    if not question:
        raise ValueError("question is empty; pass the question the context is for")
    if len(question) > 2000:
        raise ValueError(f"question is {len(question)} characters; keep it under 2000 (pass the question, not the documents)")
    return question


# --- wiring -----------------------------------------------------------------------------------


def load_llm(settings: Settings) -> Any:
    """The shared LLM client when a provider is configured, else None (plain mode)."""
    try:
        from hydrabrain.shared.llm import llm_from_settings
    except ImportError:
        return None
    return llm_from_settings(settings)


def _backend_complete(settings: Settings) -> Callable[[str], Awaitable[str]]:
    """Chat completion against the local inference backend's OpenAI-compatible API."""
    base = f"http://{settings.backend.host}:{settings.backend.port}/v1"
    timeout = settings.crag.web_timeout_s * 3

    async def complete(prompt: str) -> str:
        body = {"model": settings.backend.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "temperature": 0}
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                response = await client.post(f"{base}/chat/completions", json=body)
            response.raise_for_status()
            return str(response.json()["choices"][0]["message"]["content"])
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise RuntimeError(
                f"the backend evaluator at {base} failed ({exc}); start it with `hydrabrain backend serve` or set crag.evaluator = \"minilm\""
            ) from None

    return complete


def build_evaluator(settings: Settings, embedder: Embedder, llm: Any = None) -> Evaluator:
    cfg = settings.crag
    if cfg.evaluator == "backend":
        return LLMJudgeEvaluator("backend", _backend_complete(settings), cfg.upper_threshold, cfg.lower_threshold)
    if cfg.evaluator == "router":
        if llm is None:
            raise ValueError("crag.evaluator = \"router\" needs an LLM provider (router.providers, or OPENAI_*/ANTHROPIC_* variables); or set it to \"minilm\"")

        async def complete(prompt: str) -> str:
            result = await llm.complete(prompt=prompt, task="classify", max_tokens=4, feature="crag.evaluate")
            return str(result.text)

        return LLMJudgeEvaluator("router", complete, cfg.upper_threshold, cfg.lower_threshold)
    return MiniLMEvaluator(embedder, load_calibration(cfg.thresholds_file), cfg.upper_threshold, cfg.lower_threshold)


def evaluator_info(settings: Settings) -> EvaluatorInfo:
    """The evaluator in force and its thresholds, without loading any model."""
    cfg = settings.crag
    if cfg.evaluator == "minilm":
        calibration = load_calibration(cfg.thresholds_file)
        upper = calibration.upper if cfg.upper_threshold is None else cfg.upper_threshold
        lower = calibration.lower if cfg.lower_threshold is None else cfg.lower_threshold
        return EvaluatorInfo(evaluator="minilm", description=describe_minilm(calibration, upper, lower), upper_threshold=upper, lower_threshold=lower, calibration=calibration.to_json())
    judge = LLMJudgeEvaluator(cfg.evaluator, _backend_complete(settings), cfg.upper_threshold, cfg.lower_threshold)
    return EvaluatorInfo(evaluator=cfg.evaluator, description=judge.describe(), upper_threshold=judge.upper, lower_threshold=judge.lower)

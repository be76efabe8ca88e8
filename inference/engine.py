"""The engine: continuous batching over the paged cache, chunked prefill, sampling, compaction.

Each ``step()`` admits waiting requests while the pool can hold their worst case, runs one prefill
chunk, decodes every running sequence in one batch, compacts sequences that are over their KV
budget, and returns what each request produced. Requests join and leave between steps; a
cancelled or finished request gives its blocks back at once. The engine is single-threaded; the
HTTP layer drives it from one worker thread (``cancel`` is safe to call from any thread).
"""

from __future__ import annotations

import inspect
import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch

from hydrabrain.inference.kv_cache import BLOCK_SIZE, HostKV
from hydrabrain.inference.policies import H2O, Heads, Policy, PolicyState, Recent, SnapKV, TriAttention, UnknownPolicy, attention_mass, parse_policy, pool_votes, rope
from hydrabrain.inference.scoring import QueryStats, select_keep

FinishReason = Literal["stop", "length", "cancelled"]


class RequestRejected(ValueError):
    """The request can never run as asked (too long, too large for the pool, bad parameters)."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param  # the request field at fault, when one is


@dataclass
class SamplingParams:
    max_tokens: int = 128  # completion tokens at most
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept
    seed: int | None = None  # same seed, same prompt, same params: same tokens
    stop: list[str] = field(default_factory=list)  # text that ends the completion (not included)
    kv_budget: int | None = None  # tokens of K/V the sequence may keep; None keeps them all
    kv_policy: str | None = None  # which tokens survive compaction (policies.POLICY_NAMES); None: the engine's default
    # The first N prompt tokens are a document read before any question: prompt-end policies select
    # there, so the question that follows cannot guide them (one cached document, several questions).
    kv_document_tokens: int | None = None
    # The prompt's K/V goes to a host tier as it is read, and prefill reads its history from there: the
    # pool holds one chunk until the prompt-end pass chooses the survivors from every token, so the
    # peak is bounded as a streaming policy's while the choice is the prompt-end one. With
    # kv_document_tokens the choice made where the document ends is not final either: once the
    # question has been read, the rows it attends to most are recalled (Engine.spill_recall budgets of
    # them), it is read anew over them, and the cache is cut to the budget. Needs a query-aware policy
    # (snapkv, heads) and a runner that can re-read.
    kv_spill: bool = False
    ignore_eos: bool = False  # keep going past the end-of-sequence token (benchmarks)


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    stats: RequestStats | None = None  # on the last output of a request


@dataclass
class RequestStats:
    policy: str | None = None  # the compaction policy that ran (None: full cache)
    compactions: int = 0
    blocks_freed: int = 0
    peak_blocks: int = 0  # most blocks held at once, reserved whole-K/V blocks included
    steady_blocks: int = 0  # most blocks held once the prompt had been read (while decoding)
    whole_blocks: int = 0  # blocks reserved for whole-K/V heads (the heads policy)
    compaction_s: float = 0.0
    host_bytes: int = 0  # host memory the prompt's K/V took while it was read, until the last choice (kv_spill)


@dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    need_blocks: int  # worst case blocks held at once (drops to the steady case once a prompt-end policy has compacted)
    policy: Policy | None = None
    pstate: PolicyState | None = None
    budget: int | None = None  # tokens the compacted cache keeps (the KV budget less the whole-K/V heads' share)
    end_point: int = 0  # prompt tokens read before the prompt-end pass (the prompt, or the document)
    steady_need: int = 0
    whole: list[list[int]] | None = None  # per layer, KV heads kept whole
    prompt_read: bool = False
    spill: bool = False  # kv_spill: the prompt's K/V is kept in the host tier
    spill_window: list | None = None  # per layer, the question's last queries (post-RoPE), for the re-selection
    reread_logits: torch.Tensor | None = None  # the last prompt token's logits after the spill re-selection
    output: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already through the model
    next_position: int = 0  # logical position of the next token fed (never shrinks)
    since_compaction: int = 0
    text: str = ""
    emitted: int = 0  # characters of text already returned
    finish_reason: FinishReason | None = None
    stats: RequestStats = field(default_factory=RequestStats)


class Engine:
    """Continuous batching over one model runner (``PagedLlama`` or anything with its interface)."""

    def __init__(
        self,
        runner,
        tokenizer=None,
        *,
        num_blocks: int = 1024,
        max_batch: int = 8,
        prefill_chunk: int = 256,
        compaction_interval: int = 128,
        sinks: int = 4,
        recent: int = 32,
        stats: QueryStats | None = None,
        max_context: int | None = None,
        max_prefill_tokens: int = 1024,
        eos_token_ids: list[int] | None = None,
        kv_policy: str = "auto",
        head_ranking: list[tuple[int, int]] | None = None,
        whole_heads: int = 3,
        snapkv_window: int = 32,
        snapkv_pool: int = 7,
        snapkv_chunk: int = 16,
        spill_rounds: int = 1,
        spill_recall: int = 3,
        spill_format: str = "float16",
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.cache = runner.new_cache(num_blocks)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_prefill_tokens = max_prefill_tokens  # prompt tokens one step may prefill (at least one chunk)
        self.compaction_interval = compaction_interval
        self.sinks = sinks
        self.recent = recent
        self.stats = stats
        self.head_ranking = head_ranking
        self.whole_heads = whole_heads
        if snapkv_chunk < 0:
            raise ValueError(f"snapkv_chunk={snapkv_chunk}: use 0 (single tokens) or a chunk size in tokens")
        # snapkv and heads choose whole chunks of this many tokens by their mean vote (0: single tokens)
        self.snapkv_window, self.snapkv_pool, self.snapkv_chunk = snapkv_window, snapkv_pool, snapkv_chunk
        if spill_rounds < 1 or spill_recall < 1:
            raise ValueError(f"spill_rounds={spill_rounds}, spill_recall={spill_recall}: both count, so both are at least 1")
        self.spill_rounds = spill_rounds  # readings of a question that follows a spilled document over rows it recalled
        # those readings go over this many times the budget, recalled from the host tier; then the cache
        # is cut to the budget and the question keeps the K/V (and the answer the logits) of that reading
        self.spill_recall = spill_recall
        self.spill_format = spill_format  # how the host tier stores K/V: float16, or int8 with per-row scales
        HostKV(self.cache.kv_heads, self.cache.head_dim, 0, spill_format)  # an unknown format fails at start-up
        self._policies: dict[str, Policy] = {}
        self._decode_hook = "query_hook" in inspect.signature(runner.decode).parameters
        self.kv_policy = kv_policy
        self.policy(kv_policy)  # an unknown default fails at start-up, not at the first request
        self.max_context = max_context or runner.max_position
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [eos] if eos is not None else []
        self.eos = set(eos_token_ids)
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self._ids = itertools.count()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self.decode_s = 0.0
        self.decode_tokens = 0
        self.compaction_s = 0.0
        self.blocks_freed = 0
        self.finished_stats: dict[str, RequestStats] = {}

    # --- requests ---------------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None, request_id: str | None = None) -> str:
        params = params or SamplingParams()
        if not prompt_ids:
            raise RequestRejected("the prompt is empty; send at least one token of text")
        if params.max_tokens < 1:
            raise RequestRejected("max_tokens must be at least 1")
        if params.temperature < 0 or not 0 < params.top_p <= 1:
            raise RequestRejected("temperature must be >= 0 and top_p in (0, 1]")
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise RequestRejected(
                f"this model's maximum context length is {self.max_context} tokens; the prompt has "
                f"{len(prompt_ids)} and max_tokens asks for {params.max_tokens} more: shorten the prompt or lower max_tokens",
                code="context_length_exceeded",
            )
        total = len(prompt_ids) + params.max_tokens
        budget = params.kv_budget
        spec = params.kv_policy or self.kv_policy
        policy = self.policy(spec) if budget is not None or params.kv_policy else None
        doc = params.kv_document_tokens
        if policy is not None and params.kv_spill and doc is not None and doc < len(prompt_ids) and parse_policy(spec).name == "auto":
            # Measured with a question after the document (benchmarks/kv_compaction.md): snapkv re-selects
            # better than heads there, whose whole heads leave the other heads less of the budget, and
            # half-size chunks keep more single pass keys (13/15 with 8 tokens, 11/15 with 16).
            policy = self.policy(f"snapkv:{policy.granularity}", chunk=self.snapkv_chunk // 2)
        if doc is not None and not 0 < doc <= len(prompt_ids):
            raise RequestRejected(f"kv_document_tokens must lie in [1, {len(prompt_ids)}] (the prompt's length)", param="kv_document_tokens")
        spill = params.kv_spill
        if spill:
            if budget is None:
                raise RequestRejected("kv_spill keeps evicted K/V aside for a later selection, so it needs a kv_budget", param="kv_spill")
            if not isinstance(policy, SnapKV):
                raise RequestRejected("kv_spill selects again by the attention the question pays, which only the snapkv and heads "
                                      "policies (and auto) do: choose one of them or drop kv_spill", param="kv_spill")
            if not getattr(self.runner, "reread_supported", False):
                raise RequestRejected("kv_spill reads the question again after its selection, which this model's runner cannot do "
                                      "(its linear-attention state cannot be rewound): drop kv_spill", param="kv_spill")
        end_point = doc or len(prompt_ids)
        whole: list[list[int]] | None = None
        whole_blocks = 0
        if budget is not None:
            if budget < self.sinks + self.recent:
                raise RequestRejected(f"kv_budget must be at least {self.sinks + self.recent} tokens (sinks plus the recent window)", param="kv_budget")
            if isinstance(policy, Heads):
                whole = policy.whole_by_layer(len(self.cache.k))
                whole_blocks = self.cache.whole_blocks_needed(whole, total)
                if budget - whole_blocks * BLOCK_SIZE < self.sinks + self.recent:
                    raise RequestRejected(
                        f"kv_budget {budget} is too small for the heads policy: the whole K/V of {len(policy.whole_heads)} KV heads over "
                        f"{total} tokens takes {whole_blocks * BLOCK_SIZE} tokens of it; ask for at least "
                        f"{whole_blocks * BLOCK_SIZE + self.sinks + self.recent} or another kv_policy", param="kv_budget")
        main = None if budget is None else budget - whole_blocks * BLOCK_SIZE
        if main is None or policy is None:
            worst = steady = total
        elif policy.streaming:
            worst = steady = min(total, main + max(self.compaction_interval, self.prefill_chunk) + 1)
        else:  # holds everything read until the end of the prompt, then the budget plus what arrives between passes
            # after the pass only decode tokens arrive, one a step, unless a question follows the document:
            # its prefill chunks can land just before a pass is due
            follows = min(self.prefill_chunk, len(prompt_ids) - end_point)
            steady = min(total, main + self.compaction_interval + follows + 1)
            # a spilling request reads its prompt a chunk at a time against the host tier
            worst = max(min(total, self.prefill_chunk if spill else end_point), steady)
            if spill and follows:  # the question is read over a wider recall before the cut to the budget
                worst = max(worst, min(total, self.spill_recall * main))
        need = math.ceil(worst / BLOCK_SIZE) + whole_blocks
        if need > self.cache.pool.num_blocks:
            raise RequestRejected(
                f"the request may need {need} KV blocks but the pool has {self.cache.pool.num_blocks}: lower max_tokens, shorten the prompt or set a kv budget"
            )
        rid = request_id or f"req-{next(self._ids)}"
        gen = torch.Generator()
        gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        r = _Request(rid, list(prompt_ids), params, gen, need, policy=policy, budget=main, end_point=end_point,
                     steady_need=math.ceil(steady / BLOCK_SIZE) + whole_blocks, whole=whole, spill=spill)
        if policy is not None and budget is not None:
            r.pstate = policy.new_state(len(self.cache.k))
            r.stats.policy = policy.label
            r.stats.whole_blocks = whole_blocks
        self.waiting.append(r)
        return rid

    def policy(self, spec: str, chunk: int | None = None) -> Policy:
        """The compaction policy a request names (``auto`` resolved), choosing chunks of ``chunk`` tokens
        (default: the engine's ``snapkv_chunk``); RequestRejected naming kv_policy if none fits."""
        try:
            parsed = parse_policy(spec)
        except UnknownPolicy as exc:
            raise RequestRejected(str(exc), param="kv_policy") from None
        name = parsed.name
        if name == "auto":
            name = self.auto_policy
        chunk = self.snapkv_chunk if chunk is None else chunk
        key = f"{name}:{parsed.granularity}:{chunk}"
        if key in self._policies:
            return self._policies[key]
        common = {"sinks": self.sinks, "recent": self.recent, "granularity": parsed.granularity,
                  "scale": getattr(self.runner, "scale", self.runner.head_dim**-0.5), "inv_freq": self.runner.inv_freq}
        snap = {"window": self.snapkv_window, "pool": self.snapkv_pool, "chunk": chunk}
        if name == "recent":
            policy: Policy = Recent(**common)
        elif name == "h2o":
            policy = H2O(**common)
        elif name == "snapkv":
            policy = SnapKV(**snap, **common)
        elif name == "triattention":
            if self.stats is None:
                raise RequestRejected("this engine was started without query statistics, so it cannot run the triattention policy", param="kv_policy")
            policy = TriAttention(stats=self.stats, **common)
        else:  # heads
            if not self.head_ranking or not getattr(self.runner, "whole_heads_supported", False):
                raise RequestRejected("the heads policy needs a head ranking (causal patching) and a model runner that keeps whole K/V heads; "
                                      "this engine has none: choose another kv_policy", param="kv_policy")
            policy = Heads(whole_heads=self.head_ranking[: self.whole_heads], **snap, **common)
        self._policies[key] = policy
        return policy

    @property
    def auto_policy(self) -> str:
        """What ``auto`` means here: the policy the KV benchmark found best (benchmarks/kv_compaction.md)."""
        if self.head_ranking and getattr(self.runner, "whole_heads_supported", False):
            return "heads"
        return "snapkv"

    def cancel(self, request_id: str) -> None:
        """Stop a request; its blocks go back to the pool at the start of the next step."""
        with self._lock:
            self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._cancelled)

    # --- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        outputs += self._apply_cancellations()
        self._admit()
        produced: dict[str, int] = {}

        # Prefill chunks of several requests share a step up to a token budget, so requests that
        # arrive together start decoding together; a long prompt still yields between its chunks.
        prefill_tokens = 0
        for r in [r for r in self.running if r.prefilled < len(r.prompt)]:
            if prefill_tokens >= self.max_prefill_tokens:
                break
            stop = r.prefilled + self.prefill_chunk
            if r.prefilled < r.end_point:
                stop = min(stop, r.end_point)  # the prompt-end pass runs exactly where the document ends
            chunk = r.prompt[r.prefilled : stop]
            prefill_tokens += len(chunk)
            queries: list = [None] * len(self.cache.k)
            hook = queries.__setitem__ if r.policy is not None and r.policy.needs_queries and r.pstate is not None else None
            logits = self.runner.prefill(self.cache, r.id, torch.tensor(chunk), r.prefilled, query_hook=hook)
            if hook is not None:
                r.policy.observe(r.pstate, self.cache, r.id, queries, torch.arange(r.prefilled, r.prefilled + len(chunk)), r.prompt_read)
            if r.spill:
                self.cache.spill_newest(r.id, r.prefilled, len(chunk))
                if r.prefilled >= r.end_point:  # a question chunk: its queries choose the survivors again
                    self._keep_window(r, queries, torch.arange(r.prefilled, r.prefilled + len(chunk)))
            r.prefilled += len(chunk)
            r.next_position = r.prefilled
            r.since_compaction += len(chunk)
            self._maybe_compact(r, after_prefill_chunk=True)
            if r.prefilled == len(r.prompt):
                if r.reread_logits is not None:  # the question was read again over the re-selected cache
                    logits, r.reread_logits = r.reread_logits, None
                produced[r.id] = self._sample(r, logits)

        decoding = [r for r in self.running if r.prefilled == len(r.prompt) and r.output and r.id not in produced]
        if decoding:
            started = time.perf_counter()
            tokens = torch.tensor([r.output[-1] for r in decoding])
            positions = torch.tensor([r.next_position for r in decoding])
            watched = [row for row, r in enumerate(decoding) if r.policy is not None and r.policy.needs_queries and r.pstate is not None]
            queries: list = [None] * len(self.cache.k)
            kwargs = {"query_hook": queries.__setitem__} if watched and self._decode_hook else {}
            logits = self.runner.decode(self.cache, [r.id for r in decoding], tokens, positions, **kwargs)
            self.decode_s += time.perf_counter() - started
            self.decode_tokens += len(decoding)
            if kwargs:
                for row in watched:
                    r = decoding[row]
                    rows = [q[row : row + 1] if q is not None else None for q in queries]
                    r.policy.observe(r.pstate, self.cache, r.id, rows, positions[row : row + 1], r.prompt_read)
            for row, r in enumerate(decoding):
                r.next_position += 1
                r.since_compaction += 1
                produced[r.id] = self._sample(r, logits[row])
                self._maybe_compact(r, after_prefill_chunk=False)

        for r in list(self.running):
            held = self.cache.blocks_held(r.id)
            r.stats.peak_blocks = max(r.stats.peak_blocks, held)
            if r.output or r.id in produced:
                r.stats.steady_blocks = max(r.stats.steady_blocks, held)
            if r.id in produced:
                outputs.append(self._emit(r, produced[r.id]))
        return outputs

    def _apply_cancellations(self) -> list[RequestOutput]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        outputs = []
        for r in [r for r in self.waiting if r.id in cancelled]:
            self.waiting.remove(r)
            outputs.append(RequestOutput(r.id, [], "", True, "cancelled", len(r.prompt), 0))
        for r in [r for r in self.running if r.id in cancelled]:
            r.finish_reason = "cancelled"
            self._finish(r)
            outputs.append(RequestOutput(r.id, [], "", True, "cancelled", len(r.prompt), len(r.output)))
        return outputs

    def _outstanding_blocks(self) -> int:
        return sum(max(0, r.need_blocks - self.cache.blocks_held(r.id)) for r in self.running)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            r = self.waiting[0]
            if self.cache.pool.num_free - self._outstanding_blocks() < r.need_blocks:
                return  # it waits for blocks; FIFO so a large request is not starved
            self.waiting.popleft()
            self.cache.add(r.id)
            if r.whole:
                self.cache.add_whole(r.id, r.whole, len(r.prompt) + r.params.max_tokens)
            if r.spill:
                r.stats.host_bytes = self.cache.add_host(r.id, len(r.prompt), self.spill_format)
                self.cache.host_reading.add(r.id)
            self.running.append(r)

    def _maybe_compact(self, r: _Request, after_prefill_chunk: bool) -> None:
        """Streaming policies compact after every prefill chunk once over budget; prompt-end policies once
        the prompt (or document) has been read; both then every ``compaction_interval`` tokens."""
        r.stats.peak_blocks = max(r.stats.peak_blocks, self.cache.blocks_held(r.id))
        ended_now = not r.prompt_read and r.prefilled >= r.end_point
        r.prompt_read = r.prompt_read or ended_now
        budget, policy = r.budget, r.policy
        if budget is None or policy is None or r.pstate is None:
            return
        if r.spill:
            self._spill_pass(r, ended_now, after_prefill_chunk)
            return
        if ended_now:
            policy.end_of_prompt(r.pstate, self.cache, r.id)
            if not policy.streaming:
                r.since_compaction = 0  # decode-time passes count from the end of the prompt
        due = False
        if self.cache.length(r.id) > budget:
            if ended_now and not policy.streaming:
                due = True
            elif policy.streaming:
                due = after_prefill_chunk or r.since_compaction >= self.compaction_interval
            else:
                due = r.prompt_read and r.since_compaction >= self.compaction_interval
        if due:
            started = time.perf_counter()
            keep = policy.plan(r.pstate, self.cache, r.id, r.next_position, budget)
            self._record_pass(r, started, self.cache.compact(r.id, keep))
        if ended_now:
            r.need_blocks = min(r.need_blocks, r.steady_need)  # the prompt-end peak is over: others may use it

    def _spill_pass(self, r: _Request, ended_now: bool, after_prefill_chunk: bool) -> None:
        """A spilling request's passes: while the document is read the pool lets each chunk go (the host
        tier has it); where it ends, the survivors are chosen from every token; a question read after
        it chooses them again (``_reselect``); decode-time passes are the policy's own."""
        budget, policy, state, cache = r.budget, r.policy, r.pstate, self.cache
        assert budget is not None and policy is not None and state is not None
        started = time.perf_counter()
        if ended_now:
            cache.host_reading.discard(r.id)
            rows, state.scores = self._choose(r, state.window, r.end_point, budget)
            freed = cache.refill(r.id, rows)
            state.window, state.window_len = [None] * len(state.window), 0
            r.need_blocks = min(r.need_blocks, r.steady_need)
            if r.end_point == len(r.prompt):
                cache.host.pop(r.id)  # no question follows: the choice is final and the host copy goes
        elif r.id in cache.host_reading:
            cache.refill(r.id, [[] for _ in cache.k])  # not a selection: the chunk is kept in the host tier
            return
        elif r.id in cache.host and after_prefill_chunk and r.prefilled == len(r.prompt):
            freed = self._reselect(r)
            cache.host.pop(r.id)  # the question has chosen: nothing will be chosen again
        elif r.prompt_read and cache.length(r.id) > budget and r.since_compaction >= self.compaction_interval:
            freed = cache.compact(r.id, policy.plan(state, cache, r.id, r.next_position, budget))
        else:
            return
        self._record_pass(r, started, max(0, freed))

    def _record_pass(self, r: _Request, started: float, freed: int) -> None:
        took = time.perf_counter() - started
        r.since_compaction = 0
        r.stats.compactions += 1
        r.stats.blocks_freed += freed
        r.stats.compaction_s += took
        self.compaction_s += took
        self.blocks_freed += freed

    def _keep_window(self, r: _Request, queries: list, positions: torch.Tensor) -> None:
        """Keep the last ``window`` queries (post-RoPE) of the question, per layer."""
        assert isinstance(r.policy, SnapKV)
        w = r.policy.window
        new = self._roped(r.policy, queries, positions)
        old = r.spill_window or [None] * len(new)
        r.spill_window = [None if q is None else (q if o is None else torch.cat([o, q]))[-w:] for o, q in zip(old, new, strict=True)]

    def _roped(self, policy: SnapKV, queries: list, positions: torch.Tensor) -> list:
        """Per layer, pre-RoPE queries rotated to their positions (None where a layer holds no K/V)."""
        return [rope(q, positions, policy.inv_freq) if q is not None and self.cache.kv_heads[layer] else None for layer, q in enumerate(queries)]

    def _reselect(self, r: _Request) -> int:
        """Recall from every prompt token in the host tier the rows the question's last ``window`` tokens
        attend to most, ``spill_recall`` times the budget of them, and read those tokens again over them
        (their first reading saw only what the document-end pass kept); each further round votes with
        the queries of the latest reading. A wider recall is then cut to the budget by the same votes,
        and the question keeps the K/V and logits of its reading over the wider one: the answer is read
        from more of the document than it decodes against. Returns blocks freed."""
        policy, state, cache = r.policy, r.pstate, self.cache
        assert isinstance(policy, SnapKV) and state is not None and r.budget is not None
        n = len(r.prompt)
        assert r.spill_window is not None
        reread = max(0, min(policy.window, r.budget - self.sinks - self.recent, n - r.end_point))
        first = n - reread
        window = r.spill_window
        held = len(cache.seqs[r.id].blocks)
        wide = min(self.spill_recall * r.budget, first + reread) if reread else r.budget
        for _ in range(self.spill_rounds if reread else 1):
            rows, kept_scores = self._choose(r, window, first, wide - reread)
            cache.refill(r.id, rows)
            if not reread:
                break
            cache.rewind_whole(r.id, first)
            queries: list = [None] * len(cache.k)
            r.reread_logits = self.runner.prefill(cache, r.id, torch.tensor(r.prompt[first:]), first, query_hook=queries.__setitem__)
            cache.spill_newest(r.id, first, reread)
            window = self._roped(policy, queries, torch.arange(first, n))
            r.stats.peak_blocks = max(r.stats.peak_blocks, cache.blocks_held(r.id))  # a wider recall peaks here
        if reread and wide > r.budget:  # cut to the budget; the question's rows stay as just read
            rows, kept_scores = self._choose(r, window, first, r.budget - reread)
            tail = list(range(first, n))
            cache.refill(r.id, [[[*h, *tail] for h in k] if k and not isinstance(k[0], int) else [*k, *tail] for k in rows])
        state.scores, r.spill_window = kept_scores, None
        if reread:  # decode-time passes add attention mass to the scores, as after any prompt-end pass
            policy.observe(state, cache, r.id, queries, torch.arange(first, n), prompt_read=True)
        return held - len(cache.seqs[r.id].blocks)

    def _choose(self, r: _Request, window: list, first: int, keep_n: int) -> tuple[list, list]:
        """Per layer, the host rows before ``first`` that the window's queries (post-RoPE, at the prompt's
        last positions) attend to most, pooled over neighbours as SnapKV does; and their scores."""
        policy, cache = r.policy, self.cache
        assert isinstance(policy, SnapKV)
        host = cache.host[r.id]
        n = host.length
        rows: list = []
        kept_scores: list[torch.Tensor | None] = []
        for layer, q in enumerate(window):
            if q is None or not cache.kv_heads[layer]:
                rows.append(None)
                kept_scores.append(None)
                continue
            votes = attention_mass(q, host.keys(layer, slice(0, n)), n - q.shape[0], policy.scale)  # (Hkv, n)
            pooled = pool_votes(votes, policy.pool, policy.chunk)[:, :first]
            if policy.granularity == "head":
                keep = [select_keep(s, keep_n, self.sinks, self.recent) for s in pooled]
                rows.append(keep)
            else:
                keep = [select_keep(policy._combine(pooled), keep_n, self.sinks, self.recent)] * pooled.shape[0]
                rows.append(keep[0])
            kept_scores.append(torch.stack([pooled[h, kh] for h, kh in enumerate(keep)]))
        size = next(len(k if isinstance(k[0], int) else k[0]) for k in rows if k is not None)
        return [k if k is not None else list(range(size)) for k in rows], kept_scores

    # --- sampling and output ------------------------------------------------------------------------

    def _sample(self, r: _Request, logits: torch.Tensor) -> int:
        p = r.params
        if p.temperature == 0:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=r.generator).item())

    def _emit(self, r: _Request, token: int) -> RequestOutput:
        p = r.params
        new_ids = [token]
        finished = False
        if token in self.eos and not p.ignore_eos:
            new_ids, finished, r.finish_reason = [], True, "stop"
        else:
            r.output.append(token)
        if self.tokenizer is not None and new_ids:
            r.text = self.tokenizer.decode(r.output, skip_special_tokens=True)
        if p.stop and not finished:
            window_start = max(0, r.emitted - max(len(s) for s in p.stop))
            hits = [i for i in (r.text.find(s, window_start) for s in p.stop) if i >= 0]
            if hits:
                r.text = r.text[: min(hits)]
                finished, r.finish_reason = True, "stop"
        if not finished and len(r.output) >= p.max_tokens:
            finished, r.finish_reason = True, "length"
        # Hold back text that may still grow into a stop string or is a split multi-byte character.
        safe = len(r.text)
        if not finished:
            if r.text.endswith("\ufffd"):
                safe = len(r.text.rstrip("\ufffd"))
            for s in p.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if r.text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        safe = max(safe, r.emitted)
        new_text = r.text[r.emitted : safe]
        r.emitted = safe
        if finished:
            self._finish(r)
        return RequestOutput(r.id, new_ids, new_text, finished, r.finish_reason, len(r.prompt), len(r.output), r.stats if finished else None)

    def _finish(self, r: _Request) -> None:
        self.running.remove(r)
        self.cache.release(r.id)
        self.finished_stats[r.id] = r.stats

    # --- convenience ------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion together; returns each one's generated token ids."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        out: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_work:
            for o in self.step():
                if o.request_id in out:
                    out[o.request_id].extend(o.new_token_ids)
        return [out[i] for i in ids]

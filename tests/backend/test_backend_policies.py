"""KV compaction policies on a tiny Llama whose every query attends to one planted token."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from hydrabrain.inference.engine import Engine, RequestRejected, SamplingParams
from hydrabrain.inference.kv_cache import BLOCK_SIZE
from hydrabrain.inference.llama import PagedLlama
from hydrabrain.inference.policies import H2O, TriAttention
from hydrabrain.inference.scoring import calibrate

PLANT = 777  # the token id every query attends to
PAIR = 7  # the lowest RoPE frequency pair of a 16-dim head (dims 7 and 15): nearly position-free


@dataclass
class Planted:
    runner: PagedLlama
    hf: object
    stats: object


@pytest.fixture(scope="module")
def planted(tiny) -> Planted:
    """The tiny model rewired so that hidden dim 0 marks the planted token and dim 1 is on for every token.

    Every query gets a large component on the slow RoPE pair from dim 1, and only the planted token's
    key has one (from dim 0), so every head of every layer attends to it wherever it sits.
    """
    return _rewire(tiny, asking=None)


QUESTION = range(49100, 49150)  # token ids of the question in the spill tests


@pytest.fixture(scope="module")
def asked(tiny) -> Planted:
    """As ``planted``, but only question tokens look for the planted token: a document's own queries
    ignore it, so a selection made where the document ends has no reason to keep it."""
    return _rewire(tiny, asking=QUESTION)


def _rewire(tiny, asking: range | None) -> Planted:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(tiny.hf.config)
    hf.load_state_dict(tiny.hf.state_dict())
    D = hf.config.head_dim
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[:, 1] = 0.05 if asking is None else 0.0
        if asking is not None:
            emb[asking.start : asking.stop, 1] = 0.05
        emb[PLANT, 0] = 1.0
        for layer in hf.model.layers:
            a = layer.self_attn
            for h in range(hf.config.num_attention_heads):
                a.q_proj.weight[h * D + PAIR] = 0.0
                a.q_proj.weight[h * D + PAIR + D // 2] = 0.0
                a.q_proj.weight[h * D + PAIR, 1] = 3.0
            for g in range(hf.config.num_key_value_heads):
                a.k_proj.weight[g * D + PAIR] = 0.0
                a.k_proj.weight[g * D + PAIR + D // 2] = 0.0
                a.k_proj.weight[g * D + PAIR, 0] = 3.0
            a.o_proj.weight[:2] = 0.0  # dims 0 and 1 of the residual stream stay the embedding's
            layer.mlp.down_proj.weight[:2] = 0.0
    hf.eval()
    runner = PagedLlama(hf)
    stats = calibrate(runner, torch.randint(5, 49000, (256,), generator=torch.Generator().manual_seed(1)))
    return Planted(runner, hf, stats)


def _engine(planted: Planted, **kwargs) -> Engine:
    kwargs.setdefault("num_blocks", 128)
    return Engine(planted.runner, None, stats=planted.stats, prefill_chunk=64, compaction_interval=32, eos_token_ids=[], **kwargs)


def _prompt(n: int, plant_at: int) -> list[int]:
    ids = torch.randint(5, 49000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    ids = [t if t != PLANT else 5 for t in ids]
    ids[plant_at] = PLANT
    return ids


def _run_until(engine: Engine, rid: str, tokens: int) -> None:
    done = 0
    while done < tokens:
        done += sum(len(o.new_token_ids) for o in engine.step() if o.request_id == rid)


def _planted_survives(engine: Engine, rid: str) -> bool:
    """Every KV head of every layer still holds the planted token's key (the only one big on the slow pair)."""
    for layer in range(len(engine.cache.k)):
        keys, _ = engine.cache.gather(layer, rid)  # (L, Hkv, D)
        marker = keys[..., PAIR].abs() + keys[..., PAIR + keys.shape[-1] // 2].abs()  # (L, Hkv)
        if not bool((marker.max(0).values > 10).all()):
            return False
    return True


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "triattention", "heads", "h2o:layer", "snapkv:layer", "triattention:head"])
def test_every_policy_keeps_the_planted_high_attention_token_through_prefill_and_decode_passes(planted, policy):
    engine = _engine(planted, head_ranking=[(1, 0), (0, 1)], whole_heads=1)
    budget = 160  # the heads policy spends 96 of it on one KV head's whole K/V
    rid = engine.add_request(_prompt(300, 150), SamplingParams(max_tokens=80, temperature=0, ignore_eos=True, kv_budget=budget, kv_policy=policy))
    _run_until(engine, rid, 70)  # the prompt is compacted, then two decode-time passes
    [r] = engine.running
    assert r.stats.compactions >= 2 and engine.cache.length(rid) <= budget + 32
    assert _planted_survives(engine, rid)


def test_recent_is_the_floor_it_keeps_only_the_sinks_and_the_newest_tokens(planted):
    engine = _engine(planted)
    rid = engine.add_request(_prompt(300, 150), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, kv_budget=96, kv_policy="recent"))
    _run_until(engine, rid, 1)
    assert not _planted_survives(engine, rid)
    keys, _ = engine.cache.gather(0, rid)
    with torch.inference_mode():
        full = planted.runner.new_cache(32)
        full.add("s")
        planted.runner.prefill(full, "s", torch.tensor(_prompt(300, 150)), 0)
    expected, _ = full.gather(0, "s")
    kept = torch.cat([expected[:4], expected[-(96 - 4) :]])
    torch.testing.assert_close(keys, kept)


def test_the_heads_policy_gives_whole_heads_their_whole_history_exactly(planted, tiny):
    """With every KV head kept whole, compaction of the blocks changes no token of a greedy continuation."""
    heads = [(layer, g) for layer in range(2) for g in range(2)]
    engine = Engine(tiny.runner, None, stats=tiny.stats, num_blocks=256, prefill_chunk=64, compaction_interval=32, eos_token_ids=[],
                    head_ranking=heads, whole_heads=len(heads))
    prompt = torch.randint(5, 49000, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    [plain] = engine.generate([prompt], params)
    whole_tokens = engine.cache.whole_blocks_needed([[0, 1], [0, 1]], 260) * BLOCK_SIZE
    [compacted] = engine.generate([prompt], SamplingParams(**{**vars(params), "kv_budget": whole_tokens + 40, "kv_policy": "heads"}))
    [stats] = [s for s in engine.finished_stats.values() if s.policy == "heads"]
    assert stats.compactions >= 2 and stats.blocks_freed > 0
    assert compacted == plain
    engine.cache.assert_invariants()
    assert engine.cache.pool.num_free == engine.cache.pool.num_blocks


def test_h2o_scores_accumulate_across_passes_instead_of_restarting(planted):
    cache = planted.runner.new_cache(32)
    cache.add("s")
    policy = H2O(sinks=4, recent=8, scale=planted.runner.scale, inv_freq=planted.runner.inv_freq)
    state = policy.new_state(2)
    ids = torch.tensor(_prompt(100, 50))
    queries: list = [None, None]
    planted.runner.prefill(cache, "s", ids[:64], 0, query_hook=queries.__setitem__)
    policy.observe(state, cache, "s", queries, torch.arange(64), prompt_read=False)
    planted.runner.prefill(cache, "s", ids[64:], 64, query_hook=queries.__setitem__)
    policy.observe(state, cache, "s", queries, torch.arange(64, 100), prompt_read=False)
    before = state.scores[0].clone()  # (Hkv, 100): mass from both chunks
    keep = policy.plan(state, cache, "s", 100, budget=40)
    cache.compact("s", keep)
    carried = [before[h, k] for h, k in enumerate(keep[0])]
    planted.runner.decode(cache, ["s"], torch.tensor([5]), torch.tensor([100]), query_hook=queries.__setitem__)
    policy.observe(state, cache, "s", [q[0:1] for q in queries], torch.tensor([100]), prompt_read=True)
    after = state.scores[0]  # (Hkv, 41)
    rep = planted.runner.num_heads // planted.runner.num_kv_heads
    for h in range(after.shape[0]):
        added = after[h, :40] - carried[h]
        assert bool((added >= -1e-6).all())
        # The new pass adds exactly one query's attention per query head to what earlier passes left.
        assert float(added.sum() + after[h, 40]) == pytest.approx(rep, rel=1e-4)
        assert float(carried[h].sum()) > 10 * rep
    assert float(before[0, 50]) == pytest.approx(float(before[0].max()))  # the planted token drew the most


def test_triattention_scores_are_a_running_sum_over_passes(planted):
    cache = planted.runner.new_cache(32)
    cache.add("s")
    policy = TriAttention(stats=planted.stats, sinks=4, recent=8)
    state = policy.new_state(2)
    planted.runner.prefill(cache, "s", torch.tensor(_prompt(100, 50)), 0)
    first = policy.layer_scores(state, cache, "s", 0, 100).clone()
    second = policy.layer_scores(state, cache, "s", 0, 100)
    torch.testing.assert_close(second, 2 * first)


def test_a_prompt_end_policy_peaks_at_the_prompt_and_steadies_at_the_budget_while_a_streaming_one_never_peaks(planted):
    engine = _engine(planted, num_blocks=256)
    prompt = _prompt(400, 200)
    params = SamplingParams(max_tokens=70, temperature=0, ignore_eos=True, kv_budget=96)
    engine.generate([prompt, prompt], [SamplingParams(**{**vars(params), "kv_policy": "snapkv"}), SamplingParams(**{**vars(params), "kv_policy": "h2o"})])
    snap, h2o = engine.finished_stats.values()
    assert snap.peak_blocks == math.ceil(400 / BLOCK_SIZE)
    assert snap.steady_blocks <= math.ceil((96 + 32 + 1) / BLOCK_SIZE)
    assert h2o.peak_blocks <= math.ceil((96 + 64) / BLOCK_SIZE) + 1
    assert h2o.steady_blocks <= math.ceil((96 + 32 + 1) / BLOCK_SIZE)


def test_a_prompt_end_policy_hands_back_its_prompt_peak_so_a_waiting_request_is_admitted(planted):
    prompt = _prompt(400, 200)
    need = math.ceil(400 / BLOCK_SIZE) + 2
    engine = _engine(planted, num_blocks=need + 12)  # one prompt peak, or one peak plus one steady request
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True, kv_budget=64, kv_policy="snapkv")
    first = engine.add_request(prompt, params)
    second = engine.add_request(prompt, params)
    _run_until(engine, first, 5)
    assert {r.id for r in engine.running} == {first, second}  # the first now holds its steady share only


def test_a_compacted_prompt_end_request_reserves_only_its_budget_and_one_interval_unless_a_question_follows(planted):
    prompt = _prompt(400, 200)
    peak, steady = math.ceil(400 / BLOCK_SIZE), math.ceil((64 + 32 + 1) / BLOCK_SIZE)  # interval 32; decode adds a token a step
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True, kv_budget=64, kv_policy="snapkv")
    engine = _engine(planted, num_blocks=peak + steady)  # one prompt peak beside one steady request, nothing to spare
    first = engine.add_request(prompt, params)
    second = engine.add_request(prompt, params)
    _run_until(engine, first, 5)
    assert {r.id for r in engine.running} == {first, second}

    # The same document with a question chunk read after the pass: it may land just before the next pass.
    engine = _engine(planted, num_blocks=peak + steady)
    with_question = _prompt(464, 200)
    after = SamplingParams(**{**vars(params), "kv_document_tokens": 400})
    first = engine.add_request(with_question, after)
    second = engine.add_request(with_question, after)
    _run_until(engine, first, 5)
    assert [r.id for r in engine.running] == [first]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(kv_budget=20, kv_policy="h2o"), "kv_budget"),
        (SamplingParams(kv_budget=64, kv_policy="lru"), "kv_policy"),
        (SamplingParams(kv_budget=64, kv_policy="snapkv:row"), "kv_policy"),
        (SamplingParams(kv_budget=40, kv_policy="heads"), "kv_budget"),
        (SamplingParams(kv_budget=64, kv_document_tokens=999), "kv_document_tokens"),
        (SamplingParams(kv_spill=True, kv_document_tokens=200), "kv_spill"),
        (SamplingParams(kv_budget=64, kv_policy="h2o", kv_spill=True, kv_document_tokens=200), "kv_spill"),
    ],
)
def test_an_unknown_policy_or_a_budget_that_cannot_hold_sinks_and_window_is_refused_naming_the_field(planted, params, field):
    engine = _engine(planted, head_ranking=[(0, 0), (1, 1)], whole_heads=2)
    with pytest.raises(RequestRejected) as info:
        engine.add_request(_prompt(300, 10), params)
    assert info.value.param == field


def _asked_prompt() -> list[int]:
    """A 300-token document with the planted token at 150, then a 40-token question about it."""
    question = torch.randint(QUESTION.start, QUESTION.stop, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    return _prompt(300, 150) + question


@pytest.mark.parametrize(("policy", "budget"), [("snapkv", 112), ("heads", 112 + 96)])  # heads: one whole KV head takes 96
def test_a_spilled_document_gives_back_the_token_a_later_question_asks_for(asked, policy, budget):
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, kv_budget=budget, kv_policy=policy, kv_document_tokens=300)
    plain = _engine(asked, head_ranking=[(1, 0)], whole_heads=1)
    rid = plain.add_request(_asked_prompt(), params)
    _run_until(plain, rid, 1)
    assert not _planted_survives(plain, rid)  # chosen where the document ended, before anyone asked

    spilled = _engine(asked, head_ranking=[(1, 0)], whole_heads=1)
    rid = spilled.add_request(_asked_prompt(), SamplingParams(**{**vars(params), "kv_spill": True}))
    _run_until(spilled, rid, 1)
    assert _planted_survives(spilled, rid)  # the question's attention chose it again from the host tier
    [r] = spilled.running
    assert spilled.cache.length(rid) <= 112 + 1 and r.stats.host_bytes > 0
    assert rid not in spilled.cache.host  # once the question has chosen, the host copy is let go: only the budget stays


def test_a_question_after_its_spilled_document_is_read_over_several_budgets_then_the_cache_holds_one(asked):
    engine = _engine(asked)  # the default spill_recall: 3 budgets for the question's reading
    rid = engine.add_request(_asked_prompt(), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, kv_budget=112, kv_policy="snapkv",
                                                             kv_document_tokens=300, kv_spill=True))
    [r] = engine.waiting
    wide = math.ceil(engine.spill_recall * 112 / BLOCK_SIZE)
    assert engine.spill_recall > 1 and r.need_blocks >= wide  # admitted for the wider reading, not only for the budget
    while engine.has_work:
        engine.step()
    stats = engine.finished_stats[rid]
    assert stats.peak_blocks == wide  # the question's reading over the wider recall is the peak
    assert stats.steady_blocks <= math.ceil((112 + 32 + 1) / BLOCK_SIZE)  # then the budget, an interval, the token decoded


def test_a_spill_recall_or_round_count_below_one_is_refused_at_start_up(asked):
    for option in ("spill_recall", "spill_rounds"):
        with pytest.raises(ValueError, match=option):
            _engine(asked, **{option: 0})


def test_auto_spills_with_snapkv_before_a_question_and_with_heads_where_the_question_is_in_the_prompt(asked):
    engine = _engine(asked, head_ranking=[(1, 0)], whole_heads=1)
    after = engine.add_request(_asked_prompt(), SamplingParams(max_tokens=2, kv_budget=208, kv_document_tokens=300, kv_spill=True))
    inside = engine.add_request(_asked_prompt(), SamplingParams(max_tokens=2, kv_budget=208, kv_spill=True))
    while engine.has_work:
        engine.step()
    assert engine.auto_policy == "heads"
    assert engine.finished_stats[after].policy == "snapkv" and engine.finished_stats[after].host_bytes > 0
    assert engine.finished_stats[inside].policy == "heads" and engine.finished_stats[inside].host_bytes > 0


@pytest.mark.parametrize("policy", ["snapkv", "heads"])
def test_a_spilling_request_reads_its_prompt_a_chunk_at_a_time_yet_chooses_from_all_of_it(planted, policy):
    budget = 96 + (96 if policy == "heads" else 0)  # heads: one whole KV head takes 96
    held: dict[bool, int] = {}
    for spill in (False, True):
        engine = _engine(planted, head_ranking=[(1, 0)], whole_heads=1)
        rid = engine.add_request(_prompt(300, 150), SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, kv_budget=budget,
                                                                   kv_policy=policy, kv_spill=spill))
        _run_until(engine, rid, 1)
        assert _planted_survives(engine, rid)  # chosen from every prompt token either way
        _run_until(engine, rid, 39)
        held[spill] = engine.finished_stats[rid].peak_blocks - engine.finished_stats[rid].whole_blocks
        engine.cache.assert_invariants()
        assert engine.cache.pool.num_free == engine.cache.pool.num_blocks
    assert held[False] == math.ceil(300 / BLOCK_SIZE)  # the prompt-end peak: the whole prompt
    assert held[True] <= math.ceil((96 + 32 + 1) / BLOCK_SIZE)  # one 64-token chunk, then the budget and an interval


def test_two_spilling_requests_run_together_in_a_pool_smaller_than_one_of_their_prompts(planted):
    steady = math.ceil((64 + 32 + 1) / BLOCK_SIZE)  # budget, one compaction interval, the token being decoded
    engine = _engine(planted, num_blocks=2 * steady)  # a 400-token prompt alone would need 25 blocks
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True, kv_budget=64, kv_policy="snapkv", kv_spill=True)
    first = engine.add_request(_prompt(400, 200), params)
    second = engine.add_request(_prompt(400, 100), params)
    _run_until(engine, first, 5)
    assert {r.id for r in engine.running} == {first, second}
    while engine.has_work:
        engine.step()
    assert all(engine.finished_stats[rid].peak_blocks <= steady for rid in (first, second))


@pytest.mark.parametrize("recall", [1, 3])
def test_the_re_selected_cache_holds_the_document_as_first_read_and_the_question_as_read_over_what_it_recalled(asked, recall):
    """The rows brought back are the document's K/V as it was read (to half precision), and the question's
    rows are what reading it over exactly the rows it recalled gives (``recall`` times the budget of
    them, before the cut to the budget): the cache is one the model itself could build."""
    prompt = _asked_prompt()
    engine = _engine(asked, spill_recall=recall)
    rid = engine.add_request(prompt, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, kv_budget=112, kv_policy="snapkv:layer",
                                                    kv_document_tokens=300, kv_spill=True))
    choices: list[list[list[int]]] = []  # every choice made from the host tier, per layer (snapkv:layer: one list a layer)
    brought_back: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per choice and layer, the host rows it names
    choose = engine._choose

    def spy(r, window, first, keep_n):
        rows, scores = choose(r, window, first, keep_n)
        choices.append(rows)
        brought_back.append([engine.cache.host[r.id].read(layer, torch.tensor(k)) for layer, k in enumerate(rows)])
        return rows, scores

    engine._choose = spy
    while not engine.running or engine.running[0].prefilled < len(prompt):
        engine.step()
    reread = 32  # the observation window: the question's last 32 tokens are read again
    read_over, kept = (choices[-2] if recall > 1 else choices[-1]), choices[-1]
    assert all(150 in rows and len(rows) == 112 - reread and max(rows) < len(prompt) - reread for rows in kept)
    assert all(150 in rows and len(rows) == recall * 112 - reread for rows in read_over)

    first_read = asked.runner.new_cache(64)
    first_read.add("doc")
    asked.runner.prefill(first_read, "doc", torch.tensor(prompt[:300]), 0)
    for layer, rows in enumerate(kept):
        got_k, got_v = engine.cache.gather(layer, rid)
        assert got_k.shape[0] == 112  # the budget: the kept rows, then the question's
        want_k, want_v = first_read.gather(layer, "doc")
        doc_rows = [i for i in rows if i < 300]
        at = [rows.index(i) for i in doc_rows]
        torch.testing.assert_close(got_k[at], want_k[doc_rows], atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(got_v[at], want_v[doc_rows], atol=2e-2, rtol=1e-2)

    rebuilt = asked.runner.new_cache(64)
    rebuilt.add("q")
    slots = rebuilt.append_slots("q", recall * 112 - reread)
    for layer, (k, v) in enumerate(brought_back[len(choices) - 2 if recall > 1 else -1]):
        rebuilt.write(layer, slots, k, v)
    asked.runner.prefill(rebuilt, "q", torch.tensor(prompt[-reread:]), len(prompt) - reread)
    for layer in range(len(rebuilt.k)):
        got_k, got_v = engine.cache.gather(layer, rid)
        want_k, want_v = rebuilt.gather(layer, "q")
        # a wider recall is cut by refilling from the host tier, so the question's rows went through half precision too
        tol = {"atol": 2e-2, "rtol": 1e-2} if recall > 1 else {}
        torch.testing.assert_close(got_k[-reread:], want_k[-reread:], **tol)
        torch.testing.assert_close(got_v[-reread:], want_v[-reread:], **tol)
    engine.cache.assert_invariants()


def test_a_ranking_file_is_read_best_first_and_a_greedy_one_in_the_order_chosen(tmp_path):
    import json

    from hydrabrain.inference.policies import load_head_ranking

    single = tmp_path / "single.json"
    single.write_text(json.dumps({"scores": [{"layer": 1, "group": 0, "restored": 0.1}, {"layer": 2, "group": 1, "restored": 0.6}]}))
    assert load_head_ranking(single) == [(2, 1), (1, 0)]
    greedy = tmp_path / "greedy.json"  # cumulative: the later heads score higher only because the earlier are in
    greedy.write_text(json.dumps({"search": "greedy", "scores": [{"layer": 1, "group": 0, "restored": 0.4},
                                                                  {"layer": 2, "group": 1, "restored": 0.9}]}))
    assert load_head_ranking(greedy) == [(1, 0), (2, 1)]


def _full_keys(runner: PagedLlama, prompt: list[int], layer: int = 0) -> torch.Tensor:
    """The keys (N, Hkv, D) of one layer after reading the whole prompt with no compaction."""
    with torch.inference_mode():
        full = runner.new_cache(64)
        full.add("ref")
        runner.prefill(full, "ref", torch.tensor(prompt), 0)
    return full.gather(layer, "ref")[0]


def _kept_positions(engine: Engine, rid: str, reference: torch.Tensor, layer: int = 0) -> list[set[int]]:
    """Per KV head, the prompt positions whose keys the compacted cache still holds (matched to `_full_keys`)."""
    keys, _ = engine.cache.gather(layer, rid)
    kept = []
    for h in range(keys.shape[1]):
        distance = torch.cdist(keys[:, h].float(), reference[:, h].float())  # (kept, N)
        nearest, index = distance.min(1)
        assert bool((nearest < 0.05).all())  # every kept key is one the prompt wrote (float16 on the host tier)
        kept.append({int(i) for i in index})
    return kept


def test_chunked_votes_rank_a_whole_aligned_chunk_by_its_mean_and_its_best_tokens_first():
    from hydrabrain.inference.policies import pool_votes
    from hydrabrain.inference.scoring import select_keep

    votes = torch.zeros(1, 100)
    votes[0, 37] = 1.0  # one strong vote, in the chunk 32..39
    votes[0, [10, 60, 90]] = 0.3  # isolated weaker votes elsewhere
    assert torch.equal(pool_votes(votes, 7, 0), torch.nn.functional.max_pool1d(votes[:, None], 7, stride=1, padding=3)[:, 0])
    chunked = pool_votes(votes, 7, 8)[0]
    assert select_keep(chunked, 4 + 8 + 4, sinks=4, recent=4) == [0, 1, 2, 3, *range(32, 40), 96, 97, 98, 99]
    assert int(chunked[32:40].argmax()) + 32 in range(34, 41)  # a chunk cut by the budget keeps the tokens near the vote


@pytest.mark.parametrize("spill", [False, True])
def test_a_chunked_snapkv_keeps_the_planted_tokens_whole_chunk_and_a_plain_one_only_its_neighbours(planted, spill):
    prompt = _prompt(300, 150)  # the planted token sits in the 16-token chunk 144..159
    reference = _full_keys(planted.runner, prompt)
    kept = {}
    for chunk in (0, 16):
        engine = _engine(planted, snapkv_chunk=chunk)
        rid = engine.add_request(prompt, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, kv_budget=96, kv_policy="snapkv", kv_spill=spill))
        _run_until(engine, rid, 1)
        assert _planted_survives(engine, rid)
        kept[chunk] = _kept_positions(engine, rid, reference)
    assert all(set(range(144, 160)) <= heads for heads in kept[16])
    assert not all(set(range(144, 160)) <= heads for heads in kept[0])


def test_a_negative_chunk_size_is_refused_when_the_engine_is_built(planted):
    with pytest.raises(ValueError, match="snapkv_chunk"):
        _engine(planted, snapkv_chunk=-1)


def test_backend_serve_refuses_a_negative_chunk_size_before_loading_a_model(settings, capsys):
    from hydrabrain.servers.cli import main

    assert main(["backend", "serve", "--kv-chunk", "-1"]) == 2
    assert "--kv-chunk" in capsys.readouterr().err


def test_backend_serve_refuses_a_spill_recall_below_one_before_loading_a_model(settings, capsys):
    from hydrabrain.servers.cli import main

    assert main(["backend", "serve", "--kv-spill-recall", "0"]) == 2
    assert "--kv-spill-recall" in capsys.readouterr().err


def test_auto_chooses_half_size_chunks_for_a_question_after_its_document_and_full_size_ones_in_the_prompt(asked):
    engine = _engine(asked, head_ranking=[(1, 0)], whole_heads=1, snapkv_chunk=16)
    after = engine.add_request(_asked_prompt(), SamplingParams(max_tokens=2, kv_budget=208, kv_document_tokens=300, kv_spill=True))
    inside = engine.add_request(_asked_prompt(), SamplingParams(max_tokens=2, kv_budget=208, kv_spill=True))
    chunks = {r.id: r.policy.chunk for r in engine.waiting}
    assert chunks == {after: 8, inside: 16}
    while engine.has_work:
        engine.step()
    assert engine.finished_stats[after].policy == "snapkv" and engine.finished_stats[inside].policy == "heads"

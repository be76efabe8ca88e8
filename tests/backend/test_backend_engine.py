"""The paged forward and the engine on a tiny random Llama, checked against transformers."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hydrabrain.inference.engine import Engine, RequestRejected, SamplingParams
from hydrabrain.inference.kv_cache import BLOCK_SIZE

GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def _engine(tiny, **kwargs) -> Engine:
    kwargs.setdefault("num_blocks", 256)
    kwargs.setdefault("prefill_chunk", 64)
    kwargs.setdefault("compaction_interval", 32)
    kwargs.setdefault("recent", 32)
    return Engine(tiny.runner, tiny.tokenizer, stats=tiny.stats, eos_token_ids=[], **kwargs)


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(5, 49000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_greedy(tiny, prompt: list[int], n: int) -> list[int]:
    out = tiny.hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_the_paged_forward_matches_transformers_logits_across_prefill_chunks_and_decode(tiny):
    ids = torch.tensor(_prompt(90, 1))
    cache = tiny.runner.new_cache(16)
    cache.add("s")
    first = tiny.runner.prefill(cache, "s", ids[:50], 0, all_logits=True)
    second = tiny.runner.prefill(cache, "s", ids[50:83], 50, all_logits=True)
    steps = [tiny.runner.decode(cache, ["s"], ids[i : i + 1], torch.tensor([i])) for i in range(83, 90)]
    with torch.inference_mode():
        expected = tiny.hf(ids[None]).logits[0]
    torch.testing.assert_close(torch.cat([first, second, *steps]), expected, atol=1e-4, rtol=1e-4)


def test_continuous_batching_gives_each_request_exactly_what_transformers_generates_alone(tiny):
    engine = _engine(tiny, max_batch=3)
    prompts = [_prompt(n, seed) for seed, n in enumerate((7, 130, 33, 64))]
    ids = [engine.add_request(p, GREEDY) for p in prompts[:2]]
    got: dict[str, list[int]] = {i: [] for i in ids}
    steps = 0
    while engine.has_work:
        if steps == 5:  # later requests join while the first ones are mid-decode
            for p in prompts[2:]:
                rid = engine.add_request(p, GREEDY)
                got[rid] = []
                ids.append(rid)
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
        steps += 1
    for rid, prompt in zip(ids, prompts, strict=True):
        assert got[rid] == _hf_greedy(tiny, prompt, GREEDY.max_tokens)
    engine.cache.assert_invariants()
    assert engine.cache.pool.num_free == engine.cache.pool.num_blocks


def test_a_budget_larger_than_the_sequence_decodes_exactly_like_no_budget(tiny):
    engine = _engine(tiny)
    prompts = [_prompt(100, 5), _prompt(20, 6)]
    plain = engine.generate(prompts, GREEDY)
    budgeted = engine.generate(prompts, dataclasses.replace(GREEDY, kv_budget=100 + GREEDY.max_tokens + 1))
    assert budgeted == plain
    assert engine.blocks_freed == 0
    assert all(s.compactions == 0 for s in engine.finished_stats.values())


def test_after_compaction_the_next_token_sees_exactly_the_kept_tokens_at_their_original_positions(tiny):
    ids = torch.tensor(_prompt(75, 9))
    keep = sorted(set(range(0, 74, 3)) | {74})
    cache = tiny.runner.new_cache(16)
    cache.add("s")
    tiny.runner.prefill(cache, "s", ids[:74], 0)
    tiny.runner.decode(cache, ["s"], ids[74:75], torch.tensor([74]))
    freed = cache.compact("s", [keep] * tiny.runner.num_layers)
    assert cache.length("s") == len(keep) and freed == math.ceil(75 / BLOCK_SIZE) - math.ceil(len(keep) / BLOCK_SIZE)
    nxt = torch.tensor([123])
    logits = tiny.runner.decode(cache, ["s"], nxt, torch.tensor([75]))[0]  # logical position 75, physical length 26
    # Reference: the whole sequence, with the last query allowed to see only the kept tokens.
    full = torch.cat([ids, nxt])[None]
    mask = torch.tril(torch.ones(76, 76, dtype=torch.bool))
    mask[-1, :75] = False
    mask[-1, keep] = True
    with torch.inference_mode():
        expected = tiny.hf(full, attention_mask=mask[None, None]).logits[0, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_a_budget_below_the_sequence_compacts_every_interval_and_gives_whole_blocks_back(tiny):
    engine = _engine(tiny)
    params = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True, kv_budget=64, kv_policy="triattention")
    [out] = engine.generate([_prompt(200, 11)], params)
    assert len(out) == 150
    [stats] = engine.finished_stats.values()
    # Prefill compacts after each chunk over budget, decode every 32 tokens.
    assert stats.compactions >= 150 // 32
    assert stats.blocks_freed >= math.ceil(350 / BLOCK_SIZE) - math.ceil((64 + 64) / BLOCK_SIZE)
    assert stats.peak_blocks <= math.ceil((64 + 64) / BLOCK_SIZE) + 1
    engine.cache.assert_invariants()
    assert engine.cache.pool.num_free == engine.cache.pool.num_blocks


def test_seeded_sampling_repeats_itself_and_a_tiny_top_p_is_greedy(tiny):
    engine = _engine(tiny)
    prompt = _prompt(12, 3)
    sampled = SamplingParams(max_tokens=20, temperature=1.5, seed=42, ignore_eos=True)
    a, b, c = engine.generate([prompt, prompt, prompt], [sampled, sampled, dataclasses.replace(sampled, seed=43)])
    assert a == b and a != c
    [nucleus] = engine.generate([prompt], dataclasses.replace(sampled, top_p=1e-6))
    assert nucleus == engine.generate([prompt], dataclasses.replace(GREEDY, max_tokens=20))[0]


def test_a_stop_string_ends_the_completion_just_before_it(tiny):
    engine = _engine(tiny)
    prompt = _prompt(10, 4)
    rid = engine.add_request(prompt, GREEDY)
    text = ""
    while engine.has_work:
        text += "".join(o.new_text for o in engine.step() if o.request_id == rid)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    rid = engine.add_request(prompt, dataclasses.replace(GREEDY, stop=[stop]))
    outs = []
    while engine.has_work:
        outs += [o for o in engine.step() if o.request_id == rid]
    assert "".join(o.new_text for o in outs) == text[:cut]
    assert outs[-1].finished and outs[-1].finish_reason == "stop"


def test_cancelling_a_running_request_gives_its_blocks_back_and_spares_the_others(tiny):
    engine = _engine(tiny)
    doomed = engine.add_request(_prompt(150, 2), dataclasses.replace(GREEDY, max_tokens=500))
    kept = engine.add_request(_prompt(30, 3), GREEDY)
    for _ in range(8):
        engine.step()
    assert engine.cache.pool.num_used > 0
    engine.cancel(doomed)
    finished = {o.request_id: o for o in engine.step() if o.finished}
    assert finished[doomed].finish_reason == "cancelled"
    assert doomed not in engine.cache.seqs
    while engine.has_work:
        engine.step()
    assert engine.finished_stats[kept] is not None
    assert engine.cache.pool.num_free == engine.cache.pool.num_blocks


def test_requests_wait_for_free_blocks_instead_of_failing(tiny):
    engine = _engine(tiny, num_blocks=12)  # room for one 150-token request at a time
    outs = engine.generate([_prompt(110, 1), _prompt(110, 2)], GREEDY)
    assert [len(o) for o in outs] == [40, 40]
    assert engine.cache.pool.num_free == 12


@pytest.mark.parametrize(
    ("prompt_len", "params", "message"),
    [
        (1000, GREEDY, "maximum context length is 1024"),
        (10, dataclasses.replace(GREEDY, kv_budget=10), "at least 36"),
        (0, GREEDY, "prompt is empty"),
        (10, dataclasses.replace(GREEDY, max_tokens=900), "pool has 32"),
        (10, dataclasses.replace(GREEDY, top_p=0), "top_p"),
    ],
)
def test_requests_that_can_never_run_are_rejected_with_the_reason(tiny, prompt_len, params, message):
    engine = _engine(tiny, num_blocks=32)
    with pytest.raises(RequestRejected, match=message):
        engine.add_request(_prompt(prompt_len, 0), params)
    assert not engine.has_work

"""The HydraHead model served from the paged cache: FA groups page their K/V, GDN heads keep state."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hydrabrain.inference.engine import Engine, RequestRejected, SamplingParams
from hydrabrain.inference.hydra import PagedHydraHead
from hydrabrain.inference.model import HydraHeadConfig, HydraHeadForCausalLM
from hydrabrain.inference.scoring import calibrate


@pytest.fixture(scope="module", params=[("normalised", 0), ("teacher", 0), ("teacher", 8)],
                ids=["trained_from_scratch", "converted", "converted_with_gdn_window"])
def hydra(request):
    fusion, window = request.param
    torch.manual_seed(0)
    # Layer 0 mixes one FA and one GDN group, layer 1 is all GDN (no K/V at all), layer 2 mixes the other way.
    config = HydraHeadConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, layer_heads=["FG", "GG", "GF"], max_position_embeddings=1024,
                             head_fusion=fusion, gdn_window=window, gdn_sinks=2)
    model = HydraHeadForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # move off the identity-like init so every path matters
            p.add_(torch.randn_like(p) * 0.05)
    runner = PagedHydraHead(model)
    stats = calibrate(runner, torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(1)), chunk=64)
    return model, runner, stats


def test_continuous_batching_of_a_hybrid_model_matches_its_own_greedy_generate(hydra):
    model, runner, stats = hydra
    engine = Engine(runner, None, num_blocks=64, stats=stats, eos_token_ids=[], prefill_chunk=32, recent=32, compaction_interval=32)
    prompts = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 70, 33)]
    ours = engine.generate(prompts, SamplingParams(max_tokens=20, temperature=0))
    for prompt, tokens in zip(prompts, ours, strict=True):
        assert tokens == model.generate(torch.tensor([prompt]), max_new_tokens=20)[0, len(prompt) :].tolist()
    assert engine.cache.kv_heads == [1, 0, 1]  # only FA groups take room in the pool


def test_a_hybrid_model_compacts_its_fa_cache_and_drops_gdn_state_with_the_sequence(hydra):
    _, runner, stats = hydra
    engine = Engine(runner, None, num_blocks=64, stats=stats, eos_token_ids=[], prefill_chunk=32, recent=32, compaction_interval=32)
    params = SamplingParams(max_tokens=100, temperature=0, kv_budget=48)
    outs = engine.generate([[7] * 90, [9] * 20], [params, dataclasses.replace(params, kv_budget=None)])
    assert [len(o) for o in outs] == [100, 100]
    assert engine.blocks_freed > 0
    engine.cache.assert_invariants()
    assert engine.cache.pool.num_free == 64 and not engine.cache.state


def test_a_hybrid_refuses_to_spill_because_its_gdn_state_cannot_be_rewound_to_read_the_question_again(hydra):
    _, runner, stats = hydra
    engine = Engine(runner, None, num_blocks=64, stats=stats, eos_token_ids=[], prefill_chunk=32, recent=32, compaction_interval=32)
    with pytest.raises(RequestRejected, match="rewound") as info:
        engine.add_request([7] * 90, SamplingParams(kv_budget=48, kv_policy="snapkv", kv_document_tokens=80, kv_spill=True))
    assert info.value.param == "kv_spill"


@pytest.mark.parametrize(("length", "first"), [(40, 17), (600, 300)], ids=["one_block", "read_whole_a_block_at_a_time"])
def test_a_gdn_window_reads_the_same_whether_the_sequence_comes_whole_or_token_by_token(length, first):
    torch.manual_seed(0)
    config = HydraHeadConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, layer_heads=["FG", "GG"], head_fusion="teacher", gdn_window=6, gdn_sinks=2)
    model = HydraHeadForCausalLM(config).eval()
    ids = torch.randint(0, 300, (2, length))
    with torch.no_grad():
        whole = model(ids).logits  # (2, length, vocab)
        out = model(ids[:, :first], use_cache=True)  # a chunk longer than the window, then one token at a time
        stepped = [out.logits]
        for t in range(first, length):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            stepped.append(out.logits)
    torch.testing.assert_close(torch.cat(stepped, dim=1), whole, rtol=1e-4, atol=1e-4)
    window_k, _, window_pos = out.cache.windows[1]
    assert window_k.shape[2] == 8  # sinks + window slots, however long the sequence
    assert window_pos[0].sort().values.tolist() == [0, 1, *range(length - 6, length)]


def test_a_gdn_window_is_a_fixed_state_and_needs_the_teacher_fusion():
    config = HydraHeadConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, layer_heads=["GG"], head_fusion="teacher", gdn_window=4, gdn_sinks=1)
    assert config.cache_bytes(1000) == config.cache_bytes(0)  # a fixed state: nothing grows with the sequence
    with pytest.raises(Exception, match="needs head_fusion"):
        HydraHeadConfig(layer_heads=None, head_fusion="normalised", gdn_window=4)


def test_recomputing_layers_in_the_backward_pass_gives_the_same_loss_and_gradients(hydra):
    model, _, _ = hydra
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(3))
    grads = []
    for recompute in (False, True):
        model.zero_grad(set_to_none=True)
        model.model.recompute_layers = recompute
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    model.model.recompute_layers = False
    model.zero_grad(set_to_none=True)
    (loss_kept, kept), (loss_recomputed, recomputed) = grads
    torch.testing.assert_close(loss_recomputed, loss_kept)
    assert kept.keys() == recomputed.keys() and kept
    for name in kept:
        torch.testing.assert_close(recomputed[name], kept[name], msg=name)

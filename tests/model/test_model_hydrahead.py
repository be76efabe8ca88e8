"""The HydraHead model: config checks, causality, cache equivalence, save/load, the ops seam, Llama conversion."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hydrabrain.inference import ops
from hydrabrain.inference.model import HybridCache, HydraHeadConfig, HydraHeadForCausalLM, from_llama

VOCAB = 61

LAYOUTS = {
    "all_fa": ["FF", "FF"],
    "all_gdn": ["GG", "GG"],
    "mixed": ["FG", "GF"],
}
FA_CONV = (False, True)


def tiny_config(layer_heads, **overrides) -> HydraHeadConfig:
    sizes = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=len(layer_heads),
        num_attention_heads=4, num_key_value_heads=2, layer_heads=layer_heads,
    )
    sizes.update(overrides)
    return HydraHeadConfig(**sizes)


def tiny_model(layer_heads, seed: int = 0, **overrides) -> HydraHeadForCausalLM:
    torch.manual_seed(seed)
    return HydraHeadForCausalLM(tiny_config(layer_heads, **overrides)).eval()


@pytest.mark.parametrize(
    "layer_heads, complaint",
    [
        (["FG"], "one string per layer"),
        (["FG", "F"], "one letter per KV group"),
        (["FG", "FX"], "one letter per KV group"),
        (["FG", "FGG"], "one letter per KV group"),
    ],
)
def test_a_head_assignment_that_does_not_cover_every_head_is_refused_at_construction(layer_heads, complaint):
    with pytest.raises(Exception, match=complaint):
        HydraHeadConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, layer_heads=layer_heads)


def test_query_heads_that_do_not_split_evenly_into_groups_are_refused():
    with pytest.raises(Exception, match="multiple of num_key_value_heads"):
        HydraHeadConfig(hidden_size=30, num_hidden_layers=1, num_attention_heads=5, num_key_value_heads=2, layer_heads=["FG"])


def test_fa_head_lists_naming_a_missing_group_are_refused():
    with pytest.raises(ValueError, match=r"KV groups \[3\] do not exist"):
        HydraHeadConfig.layer_heads_from([[0], [3]], num_kv_heads=2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_model_gives_one_logit_row_per_token(layout):
    model = tiny_model(LAYOUTS[layout])
    ids = torch.randint(0, VOCAB, (3, 17))
    assert model(ids).logits.shape == (3, 17, VOCAB)


@pytest.mark.parametrize("fa_conv", FA_CONV, ids=("plain_fa", "fa_conv"))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_head_type_lets_a_token_see_the_future(layout, fa_conv):
    model = tiny_model(LAYOUTS[layout], fa_conv=fa_conv)
    ids = torch.randint(0, VOCAB, (2, 90))  # past one 64-token chunk of the GDN prefill
    changed = ids.clone()
    changed[:, 70:] = (changed[:, 70:] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(before[:, :70], after[:, :70])
    assert not torch.allclose(before[:, 70:], after[:, 70:])


@pytest.mark.parametrize("fa_conv", FA_CONV, ids=("plain_fa", "fa_conv"))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decoding_token_by_token_gives_the_logits_of_one_full_forward(layout, fa_conv):
    model = tiny_model(LAYOUTS[layout], num_attention_heads=6, num_key_value_heads=2, hidden_size=48, fa_conv=fa_conv)
    ids = torch.randint(0, VOCAB, (2, 80))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :67], use_cache=True)  # prefill across a chunk boundary
        steps = [out.logits]
        for t in range(67, 80):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=2e-5)


def test_greedy_generation_extends_the_prompt_with_the_full_forward_argmax():
    model = tiny_model(LAYOUTS["mixed"])
    prompt = torch.randint(0, VOCAB, (1, 12))
    generated = model.generate(prompt, max_new_tokens=6)
    assert generated.shape == (1, 18) and torch.equal(generated[:, :12], prompt)
    with torch.no_grad():
        expected = model(generated[:, :-1]).logits[:, 11:].argmax(-1)
    assert torch.equal(generated[:, 12:], expected)


@pytest.mark.parametrize("fa_conv", FA_CONV, ids=("plain_fa", "fa_conv"))
def test_the_cache_holds_exactly_the_bytes_the_config_predicts(fa_conv):
    model = tiny_model(LAYOUTS["mixed"], fa_conv=fa_conv)
    with torch.no_grad():
        cache = model(torch.randint(0, VOCAB, (1, 40)), use_cache=True).cache
    assert isinstance(cache, HybridCache) and cache.seen_tokens == 40
    assert cache.nbytes() == model.config.cache_bytes(40)
    all_fa, mixed = tiny_config(LAYOUTS["all_fa"]), tiny_config(LAYOUTS["mixed"])
    # at long lengths KV dominates: half the FA groups, about half the bytes
    assert 0.45 < mixed.cache_bytes(100_000) / all_fa.cache_bytes(100_000) < 0.55


def test_prefill_and_decode_reach_gdn_through_the_ops_seam(monkeypatch):
    calls = []
    for name in ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    model = tiny_model(LAYOUTS["mixed"])
    with torch.no_grad():
        out = model(torch.randint(0, VOCAB, (1, 5)), use_cache=True)
        model(torch.randint(0, VOCAB, (1, 1)), cache=out.cache, use_cache=True)
    assert calls == ["chunk_gated_delta_rule"] * 2 + ["fused_recurrent_gated_delta_rule"] * 2


def test_a_saved_model_loads_back_through_the_auto_classes(tmp_path):
    model = tiny_model(LAYOUTS["mixed"])
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).layer_heads == ["FG", "GF"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, HydraHeadForCausalLM)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_a_few_training_steps_lower_the_loss_of_a_hybrid():
    model = tiny_model(LAYOUTS["mixed"]).train()
    ids = torch.randint(0, VOCAB, (4, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    return LlamaForCausalLM(config).eval()


def test_full_attention_heads_compute_what_llama_attention_computes():
    llama = tiny_llama()
    model = from_llama(llama, [[0, 1], [0, 1]]).eval()
    ids = torch.randint(0, VOCAB, (2, 15))
    seen = {}
    handle = llama.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda _m, a: seen.update(llama=a[0]))
    with torch.no_grad():
        llama(ids)
    handle.remove()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        q = attn.q_proj(x).view(2, 15, 6, 8)
        k, v = attn.k_proj(x).view(2, 15, 2, 8), attn.v_proj(x).view(2, 15, 2, 8)
        ours = attn._full_attention(q, k, v, torch.arange(15), None)  # (B, T, H, D) before scale normalisation
    torch.testing.assert_close(ours.reshape(2, 15, 48), seen["llama"], atol=1e-5, rtol=1e-5)


def test_conversion_from_llama_copies_every_shared_weight_and_assigns_the_chosen_heads():
    llama = tiny_llama()
    model = from_llama(llama, [[1], [0]])
    assert model.config.layer_heads == ["GF", "FG"]
    assert model.config.rope_theta == 500.0
    ours, theirs = model.state_dict(), llama.state_dict()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, msg=name)
    assert model(torch.randint(0, VOCAB, (1, 9))).logits.shape == (1, 9, VOCAB)


def test_conversion_refuses_a_head_list_for_the_wrong_number_of_layers():
    with pytest.raises(ValueError, match="fa_heads has 1 layers but the Llama model has 2"):
        from_llama(tiny_llama(), [[0]])

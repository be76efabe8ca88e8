"""Converting a Llama into a HydraHead hybrid: the identity start, both stages, resume, serving, and the errors."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import httpx
import pytest
import torch
from backend_http import served

from hydrabrain.inference import api
from hydrabrain.inference.convert import (
    ConvertConfig,
    TokenBatches,
    calibrate_gains,
    convert,
    distill_loss,
    far_copy_positions,
    plant_copies,
    read_texts,
    transfer_loss,
)
from hydrabrain.inference.model import HydraHeadForCausalLM, from_llama
from hydrabrain.servers.cli import main

ROOT = Path(__file__).resolve().parents[2]
MIXED = [[0], [1]]  # one FA and one GDN group in each of the tiny model's two layers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A JSONL corpus (xz) of real prose: the example documents, one marked held out."""
    docs = sorted((ROOT / "examples" / "corpus").glob("*.md"))
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl.xz"
    with lzma.open(path, "wt", encoding="utf-8") as fh:
        for i, doc in enumerate(docs):
            fh.write(json.dumps({"text": doc.read_text(encoding="utf-8"), "split": "heldout" if i == 0 else "train"}) + "\n")
    return path


def small(fa_heads, **overrides) -> ConvertConfig:
    settings = dict(stage1_tokens=2 * 2 * 32, stage2_tokens=2 * 2 * 32, seq_len=32, batch=2, lr=1e-2, lr_distill=1e-2, checkpoint_every=1)
    return ConvertConfig(fa_heads=fa_heads, **{**settings, **overrides})


def test_a_conversion_that_keeps_every_head_full_attention_gives_the_teachers_logits(tiny):
    student = from_llama(tiny.hf, [[0, 1], [0, 1]]).eval()
    ids = torch.tensor([tiny.tokenizer.encode("The quick brown fox jumps over the lazy dog, and then it rests.")])
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, tiny.hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_only_a_pair_that_comes_back_after_a_long_gap_marks_a_far_copy_position():
    filler = list(range(100, 120))  # twenty distinct tokens
    row = [7, 8, *filler, 7, 8, 9, 9, 9, 9]  # 7 -> 8 again, 22 tokens later; 9 -> 9 repeats at once
    marks = far_copy_positions(torch.tensor([row]), window=10)[0]
    assert marks.nonzero().flatten().tolist() == [22]  # the second 7, whose next token was last seen 22 back
    assert not far_copy_positions(torch.tensor([row]), window=30).any()  # within reach: nothing is far


def test_distillation_weights_of_one_give_the_plain_loss_and_far_weights_change_it(tiny, corpus):
    student = from_llama(tiny.hf, MIXED)
    ids = next(TokenBatches(read_texts(corpus), tiny.tokenizer, 2, 32, seed=1))
    with torch.no_grad():
        plain = distill_loss(tiny.hf, student, ids)
        torch.testing.assert_close(distill_loss(tiny.hf, student, ids, weights=torch.ones(ids.shape)), plain)
        weights = torch.ones(ids.shape)
        weights[:, :4] = 10.0
        assert not torch.isclose(distill_loss(tiny.hf, student, ids, weights=weights), plain)


def test_a_conversion_with_far_copy_weights_trains_and_records_them(tiny, corpus, tmp_path):
    _, report = convert(tiny.hf, tiny.tokenizer, corpus, tmp_path / "out", small(MIXED, distill_far_copy=4.0, gdn_window=8, gdn_sinks=2))
    assert report["recipe"]["distill_far_copy"] == 4.0 and report["tokens"] == {"stage1": 128, "stage2": 128}


def test_planted_copies_repeat_earlier_text_far_back_and_are_the_positions_marked():
    ids = torch.arange(1000, 1000 + 2 * 400).view(2, 400)  # every token distinct: only a planted copy repeats
    planted, mask = plant_copies(ids, count=3, min_gap=64, seed=5)
    changed = planted != ids
    assert changed.any(dim=1).all() and (changed.nonzero()[:, 1] >= 200).all()  # each row got copies, all in its second half
    for row in range(2):
        for t in changed[row].nonzero().flatten().tolist():
            source = (ids[row] == planted[row, t]).nonzero().item()  # where the copied token first stood
            assert t - source >= 64
    # a marked position predicts the copy's next token, which the copy took from earlier text
    assert (mask & ~changed).sum() == 0 and mask.sum() == changed.sum() - 2 * 3
    short = torch.arange(64).view(1, 64)
    assert torch.equal(plant_copies(short, 3, 64)[0], short)  # no room: the row is left as it is
    crowded, marked = plant_copies(ids, count=1000, min_gap=0)  # more than fit: as many as the second half holds
    assert marked.sum() > 0 and (marked.nonzero()[:, 1] >= 200).all()


def test_a_conversion_with_planted_copies_trains_and_records_them(tiny, corpus, tmp_path):
    cfg = small(MIXED, distill_plant_copies=2, distill_far_copy=4.0, distill_seq_len=128, distill_batch=1, gdn_window=8, gdn_sinks=2)
    _, report = convert(tiny.hf, tiny.tokenizer, corpus, tmp_path / "out", cfg)
    assert report["recipe"]["distill_plant_copies"] == 2 and report["tokens"] == {"stage1": 128, "stage2": 128}
    assert report["stages"]["stage2"]["loss_final"] > 0


def test_held_out_rows_are_never_trained_on(corpus):
    train, heldout = read_texts(corpus, "train"), read_texts(corpus, "heldout")
    assert len(heldout) == 1 and heldout[0] not in train and len(train) > 5


@pytest.mark.parametrize("window", [0, 8], ids=["gdn_only", "gdn_with_a_softmax_window"])
def test_two_steps_of_each_stage_lower_both_losses(tiny, corpus, tmp_path, window):
    # a window starts near the teacher, so the GDN-only case's large test step would overshoot it
    cfg = small(MIXED, gdn_window=window, gdn_sinks=2, **({"lr": 1e-3, "lr_distill": 1e-3} if window else {}))
    probe = next(TokenBatches(read_texts(corpus), tiny.tokenizer, 2, 32, seed=1))
    torch.manual_seed(cfg.seed)
    before = from_llama(tiny.hf, MIXED, gdn_window=window, gdn_sinks=2)
    calibrate_gains(tiny.hf, before, next(TokenBatches(read_texts(corpus), tiny.tokenizer, 2, 32, seed=cfg.seed)))
    after, report = convert(tiny.hf, tiny.tokenizer, corpus, tmp_path / "out", cfg)
    with torch.no_grad():
        assert float(transfer_loss(tiny.hf, after, probe)) < float(transfer_loss(tiny.hf, before, probe))
        assert float(distill_loss(tiny.hf, after, probe)) < float(distill_loss(tiny.hf, before, probe))
    assert report["tokens"] == {"stage1": 128, "stage2": 128}
    assert report["fa_heads"] == MIXED and report["layer_heads"] == ["FG", "GF"]


def test_training_changes_only_gdn_heads_and_their_fusion(tiny, corpus, tmp_path):
    student, _ = convert(tiny.hf, tiny.tokenizer, corpus, tmp_path / "out", small(MIXED))
    theirs, ours = tiny.hf.state_dict(), student.state_dict()
    torch.testing.assert_close(ours["model.layers.0.mlp.up_proj.weight"], theirs["model.layers.0.mlp.up_proj.weight"])
    D = 16
    # layer 0 keeps group 0 (query heads 0 and 1) as full attention: its rows stay the teacher's
    torch.testing.assert_close(ours["model.layers.0.self_attn.q_proj.weight"][: 2 * D], theirs["model.layers.0.self_attn.q_proj.weight"][: 2 * D])
    torch.testing.assert_close(ours["model.layers.0.self_attn.k_proj.weight"][:D], theirs["model.layers.0.self_attn.k_proj.weight"][:D])
    assert not torch.equal(ours["model.layers.0.self_attn.k_proj.weight"][D:], theirs["model.layers.0.self_attn.k_proj.weight"][D:])


def test_distilling_everything_also_moves_the_kept_heads_and_mlps_but_not_the_embeddings(tiny, corpus, tmp_path):
    student, report = convert(tiny.hf, tiny.tokenizer, corpus, tmp_path / "out", small(MIXED, distill_train="all"))
    theirs, ours = tiny.hf.state_dict(), student.state_dict()
    D = 16
    assert not torch.equal(ours["model.layers.0.mlp.up_proj.weight"], theirs["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(ours["model.layers.0.self_attn.k_proj.weight"][:D], theirs["model.layers.0.self_attn.k_proj.weight"][:D])
    torch.testing.assert_close(ours["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"])
    assert report["recipe"]["distill_train"] == "all" and report["tokens"]["stage2"] == 128


def test_an_unknown_distillation_scope_is_refused_before_any_work(tiny, corpus, tmp_path):
    with pytest.raises(ValueError, match="distill_train must be one of gdn, all"):
        convert(tiny.hf, tiny.tokenizer, corpus, tmp_path / "out", small(MIXED, distill_train="mlp"))
    assert not (tmp_path / "out").exists()


def test_an_interrupted_conversion_resumes_from_its_checkpoint(tiny, corpus, tmp_path):
    seen = []

    def stop_after_three(stage, done, total, rate, losses):
        seen.append((stage, done))
        if len(seen) == 3:
            raise KeyboardInterrupt

    cfg = small(MIXED, stage1_tokens=4 * 64)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny.hf, tiny.tokenizer, corpus, tmp_path / "out", cfg, progress=stop_after_three)
    assert (tmp_path / "out" / "checkpoint.pt").exists()
    resumed = []
    _, report = convert(tiny.hf, tiny.tokenizer, corpus, tmp_path / "out", cfg, resume=True, progress=lambda s, d, *_: resumed.append((s, d)))
    assert resumed[0] == ("stage1", 3 * 64)  # the two checkpointed steps are not trained again
    assert report["stages"]["stage1"]["steps"] == 4 and report["stages"]["stage2"]["steps"] == 2
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_distillation_can_read_longer_rows_and_resumes_mid_stage_on_the_same_text(tiny, corpus, tmp_path):
    cfg = small(MIXED, stage2_tokens=3 * 64, distill_seq_len=64, distill_batch=1)
    seen = []

    def stop_in_stage_two(stage, done, total, rate, losses):
        seen.append((stage, done, total))
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny.hf, tiny.tokenizer, corpus, tmp_path / "cut", cfg, progress=stop_in_stage_two)
    assert seen[2:] == [("stage2", 64, 192), ("stage2", 128, 192)]  # one 64-token row a step
    resumed = []
    student, report = convert(tiny.hf, tiny.tokenizer, corpus, tmp_path / "cut", cfg, resume=True, progress=lambda s, d, *_: resumed.append((s, d)))
    assert resumed[0] == ("stage2", 128) and report["stages"]["stage2"]["steps"] == 3
    whole, _ = convert(tiny.hf, tiny.tokenizer, corpus, tmp_path / "whole", cfg)
    for name, value in whole.state_dict().items():  # the resumed run read the rows the uninterrupted one read
        torch.testing.assert_close(student.state_dict()[name], value, msg=name)


def test_stage_one_heads_can_be_taken_from_an_all_gdn_bank(tiny, corpus, tmp_path):
    bank, _ = convert(tiny.hf, tiny.tokenizer, corpus, tmp_path / "bank", small([[], []], stage2_tokens=0))
    student, report = convert(tiny.hf, tiny.tokenizer, corpus, tmp_path / "out", small(MIXED, stage2_tokens=0, stage1_from=str(tmp_path / "bank")))
    # the same input gives every GDN head the same output in the bank and in the mixed model
    x = torch.randn(1, 20, 64)
    with torch.no_grad():
        for layer in range(2):
            ours, theirs = student.model.layers[layer].self_attn, bank.model.layers[layer].self_attn
            gdn = ours.gdn_queries
            torch.testing.assert_close(ours.head_outputs(x, torch.arange(20), None)[:, :, gdn], theirs.head_outputs(x, torch.arange(20), None)[:, :, gdn])
    assert report["tokens"]["stage1"] == 128 and report["stage1_from"] == str(tmp_path / "bank")
    with pytest.raises(ValueError, match="same window"):  # a bank trained without a window cannot seed heads that have one
        convert(tiny.hf, tiny.tokenizer, corpus, tmp_path / "windowed", small(MIXED, stage1_from=str(tmp_path / "bank"), gdn_window=8))


def test_a_converted_model_is_saved_loaded_and_served_over_the_http_api(tiny, corpus, tmp_path):
    convert(tiny.hf, tiny.tokenizer, corpus, tmp_path / "hybrid", small(MIXED))
    report = json.loads((tmp_path / "hybrid" / "conversion.json").read_text())
    assert {"teacher", "selection", "fa_heads", "tokens", "losses", "wall_s", "device"} <= set(report)
    engine, tokenizer = api.create_engine(str(tmp_path / "hybrid"), num_blocks=64)
    assert isinstance(engine.runner.model, HydraHeadForCausalLM)
    with served(api.build_app(engine, tokenizer, "hybrid")) as url, httpx.Client(base_url=url, timeout=120) as client:
        body = client.post("/v1/completions", json={"model": "hybrid", "prompt": "The service", "max_tokens": 5, "temperature": 0}).json()
    assert body["usage"]["completion_tokens"] == 5 and isinstance(body["choices"][0]["text"], str)


def test_the_command_line_converts_and_writes_its_evaluation(tiny, corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["model", "convert", str(tiny.folder), "--out", str(out), "--corpus", str(corpus), "--select", "layerwise",
                 "--ratio", "0.5", "--tokens", "128", "--seq-len", "32", "--batch", "2", "--eval-samples", "2", "--eval-lengths", "128"])
    assert code == 0
    report = json.loads((out / "conversion.json").read_text())
    assert report["selection"] == "layerwise" and report["fa_groups"] == 2
    assert set(report["evaluation"]["passkey"]) == {"128"} and report["evaluation"]["heldout_ppl"] > 1
    assert "serve it with" in capsys.readouterr().err


def test_the_command_line_chooses_heads_by_default_as_a_greedy_set_on_the_prose_probe(tiny, corpus, tmp_path, capsys):
    out = tmp_path / "hybrid"
    code = main(["model", "convert", str(tiny.folder), "--out", str(out), "--corpus", str(corpus), "--ratio", "0.5",
                 "--probe-length", "128", "--tokens", "128", "--seq-len", "32", "--batch", "2", "--no-eval"])
    assert code == 0
    err = capsys.readouterr().err
    assert "ranking heads by causal patching (greedy) on the passkey-prose probe" in err and "greedy search: 2/2 heads chosen" in err
    report = json.loads((out / "conversion.json").read_text())
    assert report["selection"] == "patching" and report["fa_groups"] == 2


@pytest.mark.parametrize(
    "flags, complaint",
    [
        (["--corpus", "no/such/corpus.jsonl"], "does not exist"),
        (["--ratio", "0.01"], "keeps no head"),
        (["--distill-far-copy", "-1"], "must be 0 or more"),
        (["--distill-plant-copies", "-2"], "must be 0 or more"),
    ],
)
def test_the_command_line_refuses_bad_input_with_a_clear_message(tiny, corpus, tmp_path, flags, complaint):
    args = ["model", "convert", str(tiny.folder), "--out", str(tmp_path / "o"), "--corpus", str(corpus), "--select", "random", *flags]
    with pytest.raises(SystemExit, match=complaint):
        main(args)
    assert not (tmp_path / "o").exists()


def test_a_teacher_that_is_not_llama_family_is_refused(tiny, corpus, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny.tokenizer), n_embd=32, n_layer=2, n_head=2)).save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    with pytest.raises(SystemExit, match="Llama-family"):
        main(["model", "convert", str(folder), "--out", str(tmp_path / "o"), "--corpus", str(corpus), "--select", "random"])

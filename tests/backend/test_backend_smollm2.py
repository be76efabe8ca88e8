"""The real SmolLM2-135M-Instruct through the engine and the API (one load for the module)."""

from __future__ import annotations

import httpx
import pytest
import torch
from backend_http import served

from hydrabrain.inference import models
from hydrabrain.inference.api import build_app
from hydrabrain.inference.engine import Engine, SamplingParams
from hydrabrain.inference.llama import PagedLlama
from hydrabrain.inference.scoring import CALIBRATION_TEXT, calibrate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def smollm2():
    hf, tokenizer = models.load("smollm2-135m")
    runner = PagedLlama(hf)
    stats = calibrate(runner, torch.tensor(tokenizer.encode(CALIBRATION_TEXT, add_special_tokens=False)))
    engine = Engine(runner, tokenizer, num_blocks=256, stats=stats)
    return hf, tokenizer, engine


def _chat(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def test_batched_greedy_decoding_matches_transformers_generate_token_for_token(smollm2):
    hf, tokenizer, engine = smollm2
    prompts = [_chat(tokenizer, "Name three colors."), _chat(tokenizer, "What is two plus two? Explain briefly.")]
    ours = engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0))
    for prompt, tokens in zip(prompts, ours, strict=True):
        with torch.inference_mode():
            theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt) :].tolist()
        if theirs[-1] == tokenizer.eos_token_id:
            theirs = theirs[:-1]  # transformers returns the end-of-turn token; the engine ends the stream on it
        assert tokens == theirs and len(tokens) > 8


def test_the_served_model_answers_a_chat_question_over_http(smollm2):
    _, tokenizer, engine = smollm2
    with served(build_app(engine, tokenizer, "smollm2-135m")) as url:
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "smollm2-135m", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 20},
            timeout=300,
        ).json()
    assert "Paris" in reply["choices"][0]["message"]["content"]
    assert reply["choices"][0]["finish_reason"] == "stop"  # <|im_end|> ends the turn and is not shown
    assert "<|im_end|>" not in reply["choices"][0]["message"]["content"]


def test_names_resolve_to_the_packaged_weights_and_unknown_ones_say_what_exists(tmp_path):
    source = models.resolve("smollm2-135m")
    assert source.gguf_file and source.gguf_file.endswith(".gguf") and (source.folder / source.gguf_file).is_file()
    with pytest.raises(models.ModelNotFound, match="neither a known name"):
        models.resolve("no-such-model")
    with pytest.raises(models.ModelNotFound, match="neither config.json nor a .gguf"):
        models.resolve(str(tmp_path))

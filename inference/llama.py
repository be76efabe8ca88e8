"""A Llama-family forward that reads and writes K/V through the paged cache.

Weights come from a transformers Llama model (SmolLM2 included); the forward is our own so that
attention really runs over the paged, compactable cache: decode through
``ops.paged_decode_attention``, prefill chunks as SDPA of the chunk's queries over the sequence's
whole cached history (earlier chunks, possibly compacted, plus the chunk itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hydrabrain.inference import ops
from hydrabrain.inference.kv_cache import PagedKVCache

# Called with (layer, pre-RoPE queries (N, Hq, D)) during a forward, for calibration.
QueryHook = Callable[[int, torch.Tensor], None]


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # (hidden,)
    wqkv: torch.Tensor  # (hidden, (Hq + 2 Hkv) D), q, k and v projections side by side
    wo: torch.Tensor  # (Hq D, hidden)
    mlp_norm: torch.Tensor  # (hidden,)
    w_gate_up: torch.Tensor  # (hidden, 2 I)
    w_down: torch.Tensor  # (I, hidden)


class PagedLlama:
    """Llama weights plus a batched forward over a PagedKVCache. Stateless between calls."""

    whole_heads_supported = True  # reads ``cache.whole`` (KV heads a compaction policy keeps whole)
    # A sequence's whole state is its K/V, so its newest tokens can be dropped and read again (kv_spill).
    reread_supported = True

    def __init__(self, hf_model: torch.nn.Module) -> None:
        cfg = hf_model.config
        self.config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.vocab_size = cfg.vocab_size
        self.max_position = cfg.max_position_embeddings
        rope = getattr(cfg, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"RoPE scaling {rope.get('rope_type')!r} is not supported by the paged forward")
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)).float()
        self.dtype = torch.float32
        base = hf_model.model
        self.embed = base.embed_tokens.weight.detach().float()
        self.final_norm = base.norm.weight.detach().float()
        self.lm_head = hf_model.lm_head.weight.detach().float().t().contiguous()  # (hidden, vocab)
        self.layers: list[LayerWeights] = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            if getattr(a.q_proj, "bias", None) is not None:
                raise ValueError("attention projections with bias are not supported by the paged forward")
            self.layers.append(
                LayerWeights(
                    attn_norm=layer.input_layernorm.weight.detach().float(),
                    wqkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach().float().t().contiguous(),
                    wo=a.o_proj.weight.detach().float().t().contiguous(),
                    mlp_norm=layer.post_attention_layernorm.weight.detach().float(),
                    w_gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach().float().t().contiguous(),
                    w_down=m.down_proj.weight.detach().float().t().contiguous(),
                )
            )
        self.scale = self.head_dim**-0.5

    def new_cache(self, num_blocks: int) -> PagedKVCache:
        return PagedKVCache([self.num_kv_heads] * self.num_layers, self.head_dim, num_blocks, self.dtype)

    # --- building blocks --------------------------------------------------------------------------

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (N, 1, D/2) of each row's logical position, computed once per forward."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (N, D/2)
        return angles.cos()[:, None, :], angles.sin()[:, None, :]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate (N, H, D) in the rotate-half layout: dimension f pairs with f + D/2."""
        half = self.head_dim // 2
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def _mlp(self, x: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        gate, up = (x @ w.w_gate_up).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w.w_down

    def _qkv(self, h: torch.Tensor, w: LayerWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, d = h.shape[0], self.head_dim
        qkv = h @ w.wqkv  # (N, (Hq + 2 Hkv) D)
        q = qkv[:, : self.num_heads * d].view(n, self.num_heads, d)  # (N, Hq, D)
        k = qkv[:, self.num_heads * d : (self.num_heads + self.num_kv_heads) * d].view(n, self.num_kv_heads, d)  # (N, Hkv, D)
        v = qkv[:, (self.num_heads + self.num_kv_heads) * d :].view(n, self.num_kv_heads, d)  # (N, Hkv, D)
        return q, k, v

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, self.final_norm) @ self.lm_head  # (N, vocab)

    # --- forwards ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, cache: PagedKVCache, seq_ids: Sequence[str], tokens: torch.Tensor, positions: torch.Tensor, query_hook: QueryHook | None = None) -> torch.Tensor:
        """One new token per sequence (B,), at logical ``positions`` (B,); returns logits (B, vocab).

        ``query_hook`` sees each layer's pre-RoPE queries (B, Hq, D), one row per sequence.
        """
        slots = torch.cat([cache.append_slots(s, 1) for s in seq_ids])  # (B,)
        tables, lens = cache.tables(seq_ids)
        cos, sin = self._angles(positions)
        x = self.embed[tokens]  # (B, hidden)
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(self._norm(x, w.attn_norm), w)
            if query_hook is not None:
                query_hook(i, q)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            cache.write(i, slots, k, v)
            o = ops.paged_decode_attention(q.contiguous(), cache.k[i], cache.v[i], tables, lens, self.scale)  # (B, Hq, D)
            if cache.whole:  # KV heads a compaction policy keeps whole read their whole history instead
                cache.attend_whole(i, seq_ids, q[:, None], k[:, None], v[:, None], o[:, None], self.scale)
            x = x + o.reshape(len(seq_ids), -1) @ w.wo
            x = x + self._mlp(self._norm(x, w.mlp_norm), w)
        return self.logits(x)

    @torch.inference_mode()
    def prefill(self, cache: PagedKVCache, seq_id: str, tokens: torch.Tensor, start_position: int, query_hook: QueryHook | None = None, all_logits: bool = False) -> torch.Tensor:
        """A chunk of one sequence's tokens (T,) from logical ``start_position``.

        Returns the last token's logits (vocab,), or every token's (T, vocab) with ``all_logits``.
        """
        t = tokens.shape[0]
        history = cache.length(seq_id)
        # A sequence read through the host tier (kv_spill) attends to every earlier token kept there,
        # in logical order; the pool holds only this chunk.
        from_host = seq_id in cache.host_reading and start_position > 0
        past = start_position if from_host else history
        slots = cache.append_slots(seq_id, t)
        cos, sin = self._angles(torch.arange(start_position, start_position + t))
        # Query i sits at index past + i of what it attends to and sees every index up to it.
        mask = torch.arange(past + t)[None, :] <= (past + torch.arange(t))[:, None]  # (T, L)
        x = self.embed[tokens]  # (T, hidden)
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(self._norm(x, w.attn_norm), w)
            if query_hook is not None:
                query_hook(i, q)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            cache.write(i, slots, k, v)
            if from_host:
                hk, hv = cache.host_history(i, seq_id, start_position, k.dtype, k.device)
                k_all, v_all = torch.cat([hk, k]), torch.cat([hv, v])
            else:
                k_all, v_all = cache.gather(i, seq_id) if history else (k, v)  # (L, Hkv, D)
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1), k_all.transpose(0, 1), v_all.transpose(0, 1), attn_mask=mask, scale=self.scale, enable_gqa=True
            ).transpose(0, 1)  # (T, Hq, D)
            if cache.whole:
                cache.attend_whole(i, [seq_id], q[None], k[None], v[None], o[None], self.scale)
            x = x + o.reshape(t, -1) @ w.wo
            x = x + self._mlp(self._norm(x, w.mlp_norm), w)
        return self.logits(x) if all_logits else self.logits(x[-1:])[0]

"""The HydraHead model on the paged cache: FA groups page their K/V, GDN heads keep a fixed state.

Same interface as ``PagedLlama`` (``new_cache``, ``prefill``, ``decode``), so the engine, the
compaction and the API serve either. The layer's own modules do the projections, the gated delta
rule and the fusion; only full attention is redone here, reading K/V through the block tables.
Each sequence's GDN state and short-convolution tail live in ``cache.state[seq_id]`` and go away
with its blocks. FA groups with a short convolution (``fa_conv``) are not supported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hydrabrain.inference import ops
from hydrabrain.inference.kv_cache import PagedKVCache
from hydrabrain.inference.llama import QueryHook
from hydrabrain.inference.model import HybridCache


class PagedHydraHead:
    """A HydraHeadForCausalLM driven over a PagedKVCache. Stateless between calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        if cfg.fa_conv:
            raise ValueError("HydraHead models with a convolution on FA heads (fa_conv) cannot be served from the paged cache yet")
        self.model = model.eval()
        self.config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.max_position = cfg.max_position_embeddings
        self.vocab_size = cfg.vocab_size
        self.inv_freq = (1.0 / cfg.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)).float()
        self.attn = [layer.self_attn for layer in model.model.layers]
        self.scale = self.head_dim**-0.5

    def new_cache(self, num_blocks: int) -> PagedKVCache:
        return PagedKVCache([len(a.fa_groups) for a in self.attn], self.head_dim, num_blocks, torch.float32)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate (N, H, D) by each row's position (N,), rotate-half layout."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # (N, D/2)
        cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
        half = self.head_dim // 2
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def _states(self, cache: PagedKVCache, seq_ids: Sequence[str]) -> HybridCache:
        """The sequences' GDN states stacked into one batch (None on a sequence's first chunk)."""
        batch = HybridCache(self.num_layers)
        stored = [cache.state.get(s) for s in seq_ids]
        if all(st is not None for st in stored):
            for layer in range(self.num_layers):
                if stored[0].states[layer] is not None:
                    batch.states[layer] = torch.cat([st.states[layer] for st in stored])
                    batch.convs[layer] = torch.cat([st.convs[layer] for st in stored])
                if stored[0].windows[layer] is not None:  # fixed slots, so every sequence's window stacks
                    batch.windows[layer] = tuple(torch.cat([st.windows[layer][j] for st in stored]) for j in range(3))
        return batch

    def _keep_states(self, cache: PagedKVCache, seq_ids: Sequence[str], batch: HybridCache) -> None:
        for row, s in enumerate(seq_ids):
            own = HybridCache(self.num_layers)
            for layer in range(self.num_layers):
                if batch.states[layer] is not None:
                    own.states[layer] = batch.states[layer][row : row + 1]
                    own.convs[layer] = batch.convs[layer][row : row + 1]
                if batch.windows[layer] is not None:
                    own.windows[layer] = tuple(t[row : row + 1] for t in batch.windows[layer])
            cache.state[s] = own

    def _layer(self, i: int, x: torch.Tensor, fa, hybrid: HybridCache, positions: torch.Tensor) -> torch.Tensor:
        """One decoder layer on x (B, T, d) at logical ``positions`` (B, T); ``fa(q, k, v)`` does full attention for this layer."""
        layer = self.model.model.layers[i]
        attn = self.attn[i]
        h = layer.input_layernorm(x)
        B, T, _ = h.shape
        H, D = self.num_heads, self.head_dim
        q = attn.q_proj(h).view(B, T, H, D)  # (B, T, H, D)
        k = attn.k_proj(h).view(B, T, -1, D)  # (B, T, G, D)
        v = attn.v_proj(h).view(B, T, -1, D)  # (B, T, G, D)
        parts = []
        if attn.fa_groups:
            parts.append(fa(q[:, :, attn.fa_queries], k[:, :, attn.fa_groups], v[:, :, attn.fa_groups]))  # (B, T, Hf, D)
        if attn.gdn_groups:
            parts.append(attn._gated_delta(h, q[:, :, attn.gdn_queries], k[:, :, attn.gdn_groups], v[:, :, attn.gdn_groups], hybrid, positions))
        heads = attn.fuse(h, torch.cat(parts, dim=2)[:, :, attn.unpermute])  # (B, T, H, D)
        x = x + attn.o_proj(heads.reshape(B, T, H * D))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    @torch.inference_mode()
    def prefill(self, cache: PagedKVCache, seq_id: str, tokens: torch.Tensor, start_position: int, query_hook: QueryHook | None = None, all_logits: bool = False) -> torch.Tensor:
        """A chunk (T,) of one sequence from logical ``start_position``; last (or every) token's logits."""
        t = tokens.shape[0]
        history = cache.length(seq_id)
        slots = cache.append_slots(seq_id, t)
        positions = torch.arange(start_position, start_position + t)
        mask = torch.arange(history + t)[None, :] <= (history + torch.arange(t))[:, None]  # (T, L)
        hybrid = self._states(cache, [seq_id])
        x = self.model.model.embed_tokens(tokens)[None]  # (1, T, d)
        for i in range(self.num_layers):

            def fa(q, k, v, i=i):  # q (1, T, Hf, D), k/v (1, T, Gf, D)
                if query_hook is not None:
                    query_hook(i, q[0])
                q, k = self._rope(q[0], positions), self._rope(k[0], positions)
                cache.write(i, slots, k, v[0])
                k_all, v_all = cache.gather(i, seq_id)  # (L, Gf, D)
                o = F.scaled_dot_product_attention(
                    q.transpose(0, 1), k_all.transpose(0, 1), v_all.transpose(0, 1), attn_mask=mask, scale=self.scale, enable_gqa=True
                )  # (Hf, T, D)
                return o.transpose(0, 1)[None]

            x = self._layer(i, x, fa, hybrid, positions[None])
        self._keep_states(cache, [seq_id], hybrid)
        logits = self.model.lm_head(self.model.model.norm(x[0]))  # (T, vocab)
        return logits if all_logits else logits[-1]

    @torch.inference_mode()
    def decode(self, cache: PagedKVCache, seq_ids: Sequence[str], tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per sequence (B,) at logical ``positions`` (B,); returns logits (B, vocab)."""
        slots = torch.cat([cache.append_slots(s, 1) for s in seq_ids])  # (B,)
        tables, lens = cache.tables(seq_ids)
        hybrid = self._states(cache, seq_ids)
        x = self.model.model.embed_tokens(tokens)[:, None]  # (B, 1, d)
        for i in range(self.num_layers):

            def fa(q, k, v, i=i):  # q (B, 1, Hf, D), k/v (B, 1, Gf, D)
                q, k = self._rope(q[:, 0], positions), self._rope(k[:, 0], positions)
                cache.write(i, slots, k, v[:, 0])
                o = ops.paged_decode_attention(q.contiguous(), cache.k[i], cache.v[i], tables, lens, self.scale)  # (B, Hf, D)
                return o[:, None]

            x = self._layer(i, x, fa, hybrid, positions[:, None])
        self._keep_states(cache, seq_ids, hybrid)
        return self.model.lm_head(self.model.model.norm(x[:, 0]))  # (B, vocab)

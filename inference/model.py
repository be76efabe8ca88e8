"""HydraHead: a decoder whose every layer mixes full-attention heads and Gated DeltaNet heads.

After HydraHead (arXiv 2606.20097) and Gated DeltaNet (arXiv 2412.06464). In each layer the KV
groups (heads, with GQA) are split: a few keep causal softmax attention with RoPE (FA), the rest
run the gated delta rule (GDN) over a fixed-size state. Both kinds read the same q/k/v
projections, so a Llama checkpoint converts head by head. Every head's output is brought to a
common scale (RMS-normalised, gated, times a learned per-head gain) before one output projection
fuses them. The GDN math runs through ``hydrabrain.inference.ops`` (chunked form for prefill,
recurrent form for decode), the same seam the engine and the Triton kernels use.

Read top to bottom: config, building blocks, the cache, attention, the layer, the models, then
conversion from Llama.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from hydrabrain.inference import ops

FULL, GDN = "F", "G"


# --- config -------------------------------------------------------------------------------------


@strict
class HydraHeadConfig(PreTrainedConfig):
    """Sizes of the model and, per layer, which KV groups are full attention and which are GDN."""

    model_type = "hydrahead"

    vocab_size: int = 49152  # tokens in the vocabulary
    hidden_size: int = 576  # d_model, the residual stream width
    intermediate_size: int = 1536  # width of the SwiGLU MLP
    num_hidden_layers: int = 30  # decoder layers
    num_attention_heads: int = 9  # query heads per layer
    num_key_value_heads: int = 3  # KV groups per layer (GQA); the unit a head is assigned at
    head_dim: int | None = None  # width of one head; hidden_size // num_attention_heads when None
    # One string per layer, one letter per KV group: "F" full attention, "G" Gated DeltaNet.
    # "GGFG" = group 2 of that layer keeps softmax attention. None means all full attention.
    layer_heads: list[str] | None = None
    conv_size: int = 4  # taps of the short causal convolution on GDN q/k/v
    # How head outputs meet before o_proj. "normalised": every head is RMS-normalised, scaled by a
    # learned gain and gated by silu(W x) (models trained from scratch). "teacher": FA heads pass
    # through untouched, exactly as in the Llama they came from, and only GDN heads are normalised,
    # scaled to the teacher head's output RMS and gated by 2 sigmoid(W x), which starts at 1; the
    # GDN short convolution then has no activation, so a converted head starts from its teacher's
    # q/k/v. A conversion that keeps every head FA is the teacher, exactly.
    head_fusion: str = "normalised"
    # Give FA heads the same short convolution on q/k/v (linear, identity at init). Off keeps them
    # exactly Llama attention; on, a key can carry its neighbour's token, which lets small models
    # learn associative recall in far fewer steps, and FA and GDN heads then differ only in the rule.
    fa_conv: bool = False
    # GDN heads may also keep a short softmax window, in the manner of LoLCATs' sliding-window hybrid: the
    # head attends, with its own RoPE'd q/k/v, to the first ``gdn_sinks`` tokens and the last ``gdn_window``
    # ones, and the GDN output is added to that. Local structure (most of what a head does) is then exact
    # and the delta rule only has to carry what lies beyond the window. The window is a fixed state per
    # sequence, not K/V that grows with it. 0 turns it off ("teacher" fusion only).
    gdn_window: int = 0
    gdn_sinks: int = 4
    rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm
    rope_theta: float = 10000.0  # RoPE base (FA heads and a GDN window; the delta rule needs no positions)
    max_position_embeddings: int = 8192  # longest sequence the RoPE table is meant for
    initializer_range: float = 0.02  # std of the normal init of linear and embedding weights
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_heads is None:
            self.layer_heads = [FULL * self.num_key_value_heads] * self.num_hidden_layers
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Every head gets exactly one kind, so a bad assignment fails here, not inside a forward."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if len(self.layer_heads) != self.num_hidden_layers:
            raise ValueError(
                f"layer_heads has {len(self.layer_heads)} entries but the model has {self.num_hidden_layers} layers: "
                "give one string per layer"
            )
        if self.head_fusion not in ("normalised", "teacher"):
            raise ValueError(f"head_fusion must be 'normalised' or 'teacher'; got {self.head_fusion!r}")
        if self.gdn_window < 0 or self.gdn_sinks < 0:
            raise ValueError(f"gdn_window ({self.gdn_window}) and gdn_sinks ({self.gdn_sinks}) must be >= 0")
        if self.gdn_window and self.head_fusion != "teacher":
            raise ValueError("gdn_window needs head_fusion='teacher' (the window's softmax output is added to the scaled GDN output)")
        for i, kinds in enumerate(self.layer_heads):
            if len(kinds) != self.num_key_value_heads or set(kinds) - {FULL, GDN}:
                raise ValueError(
                    f"layer_heads[{i}] = {kinds!r} must have exactly one letter per KV group "
                    f"({self.num_key_value_heads}), each 'F' (full attention) or 'G' (Gated DeltaNet)"
                )

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def fa_groups(self, layer: int) -> list[int]:
        return [g for g, kind in enumerate(self.layer_heads[layer]) if kind == FULL]

    def gdn_groups(self, layer: int) -> list[int]:
        return [g for g, kind in enumerate(self.layer_heads[layer]) if kind == GDN]

    def cache_bytes(self, seq_len: int, kv_bytes: int = 4) -> int:
        """Bytes one sequence of ``seq_len`` tokens holds: FA keys/values, GDN state (fp32) and conv state."""
        total = 0
        D = self.head_dim
        for layer in range(self.num_hidden_layers):
            fa, gdn = len(self.fa_groups(layer)), len(self.gdn_groups(layer))
            total += 2 * fa * D * seq_len * kv_bytes
            conv_channels = 0
            if gdn:
                total += gdn * self.queries_per_group * D * D * 4  # one (K, V) state per GDN query head
                if self.gdn_window:  # sinks + window: K/V of each GDN group and the slots' positions (int64)
                    total += (self.gdn_sinks + self.gdn_window) * (2 * gdn * D * kv_bytes + 8)
                conv_channels += gdn * (self.queries_per_group + 2) * D
            if fa and self.fa_conv:
                conv_channels += fa * (self.queries_per_group + 2) * D
            total += conv_channels * (self.conv_size - 1) * kv_bytes
        return total

    @staticmethod
    def layer_heads_from(fa_heads: list[list[int]], num_kv_heads: int) -> list[str]:
        """Per-layer FA group indices -> ``layer_heads`` strings (the rest are GDN)."""
        out = []
        for layer, groups in enumerate(fa_heads):
            bad = [g for g in groups if not 0 <= g < num_kv_heads]
            if bad:
                raise ValueError(f"layer {layer}: KV groups {bad} do not exist (the model has {num_kv_heads} per layer)")
            out.append("".join(FULL if g in groups else GDN for g in range(num_kv_heads)))
        return out


# --- building blocks ----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rms_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin of shape (..., D) for absolute ``positions`` (T,) or (B, T), the Llama (half-split) layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class MLP(nn.Module):
    def __init__(self, config: HydraHeadConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# --- the cache ----------------------------------------------------------------------------------


class HybridCache:
    """What generation carries between steps, per layer: K/V of the FA groups, state of the GDN heads.

    ``keys[l]`` / ``values[l]``: (B, G_fa, T, D), contiguous and grown by concatenation (the paged
    cache belongs to the engine). ``states[l]``: (B, H_gdn, D, D) fp32. ``convs[l]`` /
    ``fa_convs[l]``: (B, C, conv_size - 1), the last pre-convolution inputs of the GDN (FA) q/k/v.
    ``windows[l]``: the GDN heads' sinks and window (``gdn_window``), a fixed number of slots
    S = sinks + window: keys (RoPE'd) and values (B, Gg, S, D) and their positions (B, S), -1 where empty.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.states: list[torch.Tensor | None] = [None] * num_layers
        self.convs: list[torch.Tensor | None] = [None] * num_layers
        self.fa_convs: list[torch.Tensor | None] = [None] * num_layers
        self.windows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.seen_tokens = 0

    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, *self.states, *self.convs, *self.fa_convs, *(t for w in self.windows if w for t in w)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# --- attention: FA and GDN heads side by side -----------------------------------------------------


class HydraAttention(nn.Module):
    def __init__(self, config: HydraHeadConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        H, G, D, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.rep = config.queries_per_group
        self.fa_groups, self.gdn_groups = config.fa_groups(layer_idx), config.gdn_groups(layer_idx)
        self.fa_queries = [g * self.rep + r for g in self.fa_groups for r in range(self.rep)]
        self.gdn_queries = [g * self.rep + r for g in self.gdn_groups for r in range(self.rep)]
        # outputs are computed FA first, then GDN; this puts every head back in its own slot
        order = self.fa_queries + self.gdn_queries
        self.unpermute = sorted(range(len(order)), key=order.__getitem__)

        self.q_proj = nn.Linear(d, H * D, bias=False)
        self.k_proj = nn.Linear(d, G * D, bias=False)
        self.v_proj = nn.Linear(d, G * D, bias=False)
        self.o_proj = nn.Linear(H * D, d, bias=False)
        self.teacher_fusion = config.head_fusion == "teacher"
        if not self.teacher_fusion:
            # every head is gated and rescaled the same way, so FA and GDN outputs meet at one scale
            # and all variants of a model have the same parameter count up to the small GDN extras
            self.gate_proj = nn.Linear(d, H * D, bias=False)
        self.head_gain = nn.Parameter(torch.ones(H))
        if self.fa_groups and config.fa_conv:
            self.fa_conv_weight = nn.Parameter(torch.zeros((len(self.fa_queries) + 2 * len(self.fa_groups)) * D, config.conv_size))
        if self.gdn_groups:
            n_gdn = len(self.gdn_groups)
            channels = (len(self.gdn_queries) + 2 * n_gdn) * D  # q of its query heads, k and v of its groups
            self.conv_weight = nn.Parameter(torch.zeros(channels, config.conv_size))
            self.a_proj = nn.Linear(d, n_gdn, bias=False)  # per-token decay rate
            self.b_proj = nn.Linear(d, n_gdn, bias=False)  # per-token write strength beta
            self.A_log = nn.Parameter(torch.zeros(n_gdn))
            self.dt_bias = nn.Parameter(torch.zeros(n_gdn))
            self.gdn_norm = RMSNorm(D, config.rms_norm_eps)
            if self.teacher_fusion:
                self.gdn_gate_proj = nn.Linear(d, len(self.gdn_queries) * D, bias=False)  # zero at init: gate 1

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: HybridCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        heads = self.head_outputs(x, positions, cache)  # (B, T, H, D)
        return self.o_proj(heads.reshape(B, T, -1))  # (B, T, d)

    def head_outputs(self, x: torch.Tensor, positions: torch.Tensor, cache: HybridCache | None) -> torch.Tensor:
        """Every query head's fused output (B, T, H, D), in head order: what o_proj reads."""
        B, T, _ = x.shape
        H, D = self.config.num_attention_heads, self.config.head_dim
        q = self.q_proj(x).view(B, T, H, D)  # (B, T, H, D)
        k = self.k_proj(x).view(B, T, -1, D)  # (B, T, G, D)
        v = self.v_proj(x).view(B, T, -1, D)  # (B, T, G, D)
        parts = []
        if self.fa_groups:
            parts.append(self._full_attention(q[:, :, self.fa_queries], k[:, :, self.fa_groups], v[:, :, self.fa_groups], positions, cache))
        if self.gdn_groups:
            parts.append(self._gated_delta(x, q[:, :, self.gdn_queries], k[:, :, self.gdn_groups], v[:, :, self.gdn_groups], cache, positions))
        heads = torch.cat(parts, dim=2)[:, :, self.unpermute]  # (B, T, H, D), heads back in order
        return self.fuse(x, heads)

    def fuse(self, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Bring raw head outputs (B, T, H, D) to one scale before o_proj (see ``head_fusion``)."""
        if self.teacher_fusion:
            return heads  # FA heads untouched; GDN heads were scaled and gated in _gated_delta
        B, T, H, D = heads.shape
        gate = self.gate_proj(x).view(B, T, H, D)  # (B, T, H, D)
        return rms_normalise(heads, self.config.rms_norm_eps) * self.head_gain[:, None].to(heads.dtype) * F.silu(gate)

    def _full_attention(self, q, k, v, positions, cache):
        """Causal softmax attention with RoPE and GQA. q (B, T, Hf, D), k/v (B, T, Gf, D) -> (B, T, Hf, D)."""
        if self.config.fa_conv:
            q, k, v = self._short_conv(q, k, v, self.fa_conv_weight, None if cache is None else cache.fa_convs, activation=False)
        cos, sin = rope_tables(positions, q.shape[-1], self.config.rope_theta, q.dtype)
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, D)
        if cache is not None:
            i = self.layer_idx
            if cache.keys[i] is not None:
                k = torch.cat([cache.keys[i], k], dim=2)  # (B, Gf, past + T, D)
                v = torch.cat([cache.values[i], v], dim=2)
            cache.keys[i], cache.values[i] = k, v
        k = k.repeat_interleave(self.rep, dim=1)  # (B, Hf, S, D)
        v = v.repeat_interleave(self.rep, dim=1)
        T, S = q.shape[2], k.shape[2]
        # query i sits at absolute step S - T + i and may see keys 0..S - T + i
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, Hf, T, D)
        return out.transpose(1, 2)  # (B, T, Hf, D)

    def _short_conv(self, q, k, v, weight, store, activation: bool):
        """Depthwise causal convolution over time of q (B, T, Hq, D), k and v (B, T, G, D); same shapes out."""
        B, T, Hq, D = q.shape
        G = k.shape[2]
        mixed = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1).transpose(1, 2)  # (B, C, T)
        past = None if store is None else store[self.layer_idx]
        if past is None:
            past = mixed.new_zeros(B, mixed.shape[1], self.config.conv_size - 1)
        padded = torch.cat([past, mixed], dim=-1)  # (B, C, conv_size - 1 + T)
        if store is not None:
            store[self.layer_idx] = padded[:, :, -(self.config.conv_size - 1) :]
        mixed = F.conv1d(padded, weight[:, None, :].to(mixed.dtype), groups=mixed.shape[1])  # (B, C, T)
        if activation:
            mixed = F.silu(mixed)
        q, k, v = mixed.transpose(1, 2).split([Hq * D, G * D, G * D], dim=-1)  # (B, T, C_part)
        return q.reshape(B, T, Hq, D), k.reshape(B, T, G, D), v.reshape(B, T, G, D)

    def _gated_delta(self, x, q, k, v, cache, positions=None):
        """The gated delta rule over GDN heads. q (B, T, Hg, D), k/v (B, T, Gg, D) -> (B, T, Hg, D).

        With ``gdn_window`` the heads' softmax over sinks and window (at ``positions``, (T,) or (B, T)) is added.
        """
        raw = (q, k, v)
        q, k, v = self._short_conv(q, k, v, self.conv_weight, None if cache is None else cache.convs, activation=not self.teacher_fusion)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)  # (B, T, Hg, D), (B, T, Gg, D)
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias)  # (B, T, Gg), log decay <= 0
        beta = torch.sigmoid(self.b_proj(x).float())  # (B, T, Gg)
        # a group's k, v, decay and beta are shared by its query heads, as GQA shares K/V
        k, v = k.repeat_interleave(self.rep, dim=2), v.repeat_interleave(self.rep, dim=2)  # (B, T, Hg, D)
        g, beta = g.repeat_interleave(self.rep, dim=2), beta.repeat_interleave(self.rep, dim=2)  # (B, T, Hg)
        state = None if cache is None else cache.states[self.layer_idx]
        rule = ops.fused_recurrent_gated_delta_rule if (q.shape[1] == 1 and cache is not None) else ops.chunk_gated_delta_rule
        out, state = rule(q, k, v, g, beta, None, state, cache is not None)  # (B, T, Hg, D)
        if cache is not None:
            cache.states[self.layer_idx] = state
        out = self.gdn_norm(out)  # (B, T, Hg, D)
        if self.teacher_fusion:
            B, T, Hg, D = out.shape
            gain = self.head_gain[self.gdn_queries][:, None].to(out.dtype)  # (Hg, 1)
            gate = 2 * torch.sigmoid(self.gdn_gate_proj(x).view(B, T, Hg, D))  # (B, T, Hg, D), 1 at init
            out = out * gain * gate
        if self.config.gdn_window:
            if positions is None:
                raise ValueError("a model with gdn_window needs the tokens' positions")
            out = out + self._window_attention(*raw, positions, cache)
        return out

    def _window_attention(self, q, k, v, positions, cache):
        """Softmax over the sinks and the last ``gdn_window`` tokens. q (B, T, Hg, D), k/v (B, T, Gg, D) -> (B, T, Hg, D)."""
        B, T, _, D = q.shape
        cfg = self.config
        pos = positions.expand(B, T) if positions.dim() == 1 else positions  # (B, T)
        cos, sin = rope_tables(pos, D, cfg.rope_theta, q.dtype)  # (B, T, D)
        cos, sin = cos[:, :, None], sin[:, :, None]
        q = apply_rope(q, cos, sin).transpose(1, 2)  # (B, Hg, T, D)
        k = apply_rope(k, cos, sin).transpose(1, 2)  # (B, Gg, T, D)
        v, key_pos = v.transpose(1, 2), pos
        stored = None if cache is None else cache.windows[self.layer_idx]
        if cache is None and T > 2 * (cfg.gdn_sinks + cfg.gdn_window) and torch.equal(pos, torch.arange(T, device=pos.device).expand(B, T)):
            return self._window_attention_blocked(q, k, v, pos).transpose(1, 2)
        if stored is not None:
            k, v, key_pos = torch.cat([stored[0], k], dim=2), torch.cat([stored[1], v], dim=2), torch.cat([stored[2], pos], dim=1)
        if cache is not None:
            cache.windows[self.layer_idx] = self._keep_window(k, v, key_pos)
        qp, kp = pos[:, :, None], key_pos[:, None, :]  # (B, T, 1), (B, 1, S)
        allowed = (kp >= 0) & (kp <= qp) & ((kp < cfg.gdn_sinks) | (kp > qp - cfg.gdn_window))  # (B, T, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=True)  # (B, Hg, T, D)
        return out.transpose(1, 2)

    def _window_attention_blocked(self, q, k, v, pos):
        """The same softmax over sinks and window for a whole sequence at positions 0..T-1, a block of
        queries at a time against only the keys it can see: memory O(T (window + block)) instead of
        a (T, T) mask per head, which is what lets distillation read rows of several thousand tokens.
        q (B, Hg, T, D), k/v (B, Gg, T, D) -> (B, Hg, T, D)."""
        cfg = self.config
        T, S, W = q.shape[2], cfg.gdn_sinks, cfg.gdn_window
        block = max(W, 256)
        outs = []
        for start in range(0, T, block):
            end = min(T, start + block)
            lo = max(0, start - W + 1)  # the oldest key in the window of the block's first query
            sinks = min(S, lo)  # sinks not already inside [lo, end)
            keys = torch.cat([k[:, :, :sinks], k[:, :, lo:end]], dim=2)
            values = torch.cat([v[:, :, :sinks], v[:, :, lo:end]], dim=2)
            kp = torch.cat([pos[:, :sinks], pos[:, lo:end]], dim=1)[:, None, :]  # (B, 1, S')
            qp = pos[:, start:end, None]  # (B, Tb, 1)
            allowed = (kp <= qp) & ((kp < S) | (kp > qp - W))
            outs.append(F.scaled_dot_product_attention(q[:, :, start:end], keys, values, attn_mask=allowed[:, None], enable_gqa=True))
        return torch.cat(outs, dim=2)

    def _keep_window(self, k, v, key_pos):
        """The sinks and the most recent ``gdn_window`` of k/v (B, Gg, S, D) at key_pos (B, S), in a fixed
        number of slots (empty ones at position -1), so sequences of any length batch together."""
        cfg = self.config
        slots = cfg.gdn_sinks + cfg.gdn_window
        if k.shape[2] < slots:
            pad = slots - k.shape[2]
            k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
            key_pos = F.pad(key_pos, (0, pad), value=-1)
        # rank: sinks first, then the newest; empty slots last
        rank = torch.where(key_pos < 0, -1, torch.where(key_pos < cfg.gdn_sinks, torch.iinfo(torch.int64).max, key_pos))
        keep = rank.topk(slots, dim=1).indices  # (B, slots)
        index = keep[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        return k.gather(2, index), v.gather(2, index), key_pos.gather(1, keep)


class DecoderLayer(nn.Module):
    def __init__(self, config: HydraHeadConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = HydraAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, positions, cache):
        x = x + self.self_attn(self.input_layernorm(x), positions, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# --- the models ---------------------------------------------------------------------------------


class HydraHeadPreTrainedModel(PreTrainedModel):
    config_class = HydraHeadConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, HydraAttention):
            init.ones_(module.head_gain)
            if hasattr(module, "fa_conv_weight"):
                identity = torch.zeros_like(module.fa_conv_weight)
                identity[:, -1] = 1.0  # starts as plain attention and learns what to mix in
                init.copy_(module.fa_conv_weight, identity)
            if module.gdn_groups and module.teacher_fusion:
                init.zeros_(module.gdn_gate_proj.weight)
            if module.gdn_groups:
                init.normal_(module.conv_weight, mean=0.0, std=module.config.conv_size**-0.5)
                # Mamba-style: decay rates spread over [1, 16], step sizes over [1e-3, 1e-1]
                init.copy_(module.A_log, torch.empty_like(module.A_log).uniform_(1, 16).log())
                dt = torch.exp(torch.empty_like(module.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)))
                init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))


class HydraHeadModel(HydraHeadPreTrainedModel):
    def __init__(self, config: HydraHeadConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Training on long rows: keep only each layer's input and recompute its inside in the backward
        # pass (memory O(layers) activations instead of every intermediate, for a second forward's time).
        self.recompute_layers = False
        self.post_init()

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None, use_cache: bool = False, **_):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens); got shape {tuple(input_ids.shape)}")
        if cache is None and use_cache:
            cache = HybridCache(self.config.num_hidden_layers)
        start = 0 if cache is None else cache.seen_tokens
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.embed_tokens(input_ids)  # (B, T, d)
        recompute = self.recompute_layers and cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            x = torch.utils.checkpoint.checkpoint(layer, x, positions, None, use_reentrant=False) if recompute else layer(x, positions, cache)
        if cache is not None:
            cache.seen_tokens += input_ids.shape[1]
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=cache)


class HydraHeadForCausalLM(HydraHeadPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HydraHeadConfig):
        super().__init__(config)
        self.model = HydraHeadModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, cache=None, use_cache=False, labels=None, **_):
        out = self.model(input_ids, cache=cache, use_cache=use_cache)
        logits = self.lm_head(out.last_hidden_state)  # (B, T, vocab)
        loss = None
        if labels is not None:
            # labels are aligned with input_ids; -100 marks positions that carry no target
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding: one prefill, then one token per step through the cache. Returns prompt + new tokens."""
        out = self(input_ids, use_cache=True)
        cache, tokens = out.cache, [input_ids]
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1:].argmax(-1)  # (B, 1)
            tokens.append(nxt)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
            out = self(nxt, cache=cache, use_cache=True)
        return torch.cat(tokens, dim=1)


AutoConfig.register("hydrahead", HydraHeadConfig, exist_ok=True)
AutoModel.register(HydraHeadConfig, HydraHeadModel, exist_ok=True)
AutoModelForCausalLM.register(HydraHeadConfig, HydraHeadForCausalLM, exist_ok=True)


# --- conversion from Llama ----------------------------------------------------------------------


LLAMA_FAMILY = ("llama",)  # decoders whose attention from_llama copies head by head (SmolLM2 is one)


@torch.no_grad()
def from_llama(llama: nn.Module, fa_heads: list[list[int]], head_fusion: str = "teacher", gdn_window: int = 0, gdn_sinks: int = 4) -> HydraHeadForCausalLM:
    """A HydraHead model from a transformers Llama-family model; ``fa_heads[l]`` lists layer l's FA groups.

    Every weight the two share is copied: embeddings, norms, MLPs, and q/k/v/o of every head (FA
    heads keep their attention exactly; GDN heads start from the same projections). What Llama
    lacks starts fresh: GDN decay and beta, an identity convolution, and (with the default
    ``head_fusion="teacher"``) a GDN output gate that starts at 1 and unit gains, so FA heads are
    the teacher's and GDN heads are an initialisation to distil (``hydrabrain.inference.convert``).
    """
    lc = llama.config
    if getattr(lc, "model_type", None) not in LLAMA_FAMILY or not hasattr(getattr(llama, "model", None), "layers"):
        raise ValueError(
            f"the teacher is a {getattr(lc, 'model_type', type(llama).__name__)!r} model; conversion needs a Llama-family "
            f"decoder ({', '.join(LLAMA_FAMILY)}) whose attention has q/k/v/o projections and RoPE"
        )
    if any(getattr(getattr(layer.self_attn, "q_proj", None), "bias", None) is not None for layer in llama.model.layers):
        raise ValueError("the teacher's attention projections carry biases, which the HydraHead model does not have")
    if len(fa_heads) != lc.num_hidden_layers:
        raise ValueError(f"fa_heads has {len(fa_heads)} layers but the Llama model has {lc.num_hidden_layers}")
    rope = getattr(lc, "rope_parameters", None) or {}
    config = HydraHeadConfig(
        vocab_size=lc.vocab_size,
        hidden_size=lc.hidden_size,
        intermediate_size=lc.intermediate_size,
        num_hidden_layers=lc.num_hidden_layers,
        num_attention_heads=lc.num_attention_heads,
        num_key_value_heads=lc.num_key_value_heads,
        head_dim=getattr(lc, "head_dim", None) or lc.hidden_size // lc.num_attention_heads,
        layer_heads=HydraHeadConfig.layer_heads_from(fa_heads, lc.num_key_value_heads),
        rms_norm_eps=lc.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(lc, "rope_theta", 10000.0))),
        max_position_embeddings=lc.max_position_embeddings,
        tie_word_embeddings=bool(lc.tie_word_embeddings),
        bos_token_id=lc.bos_token_id,
        eos_token_id=lc.eos_token_id,
        pad_token_id=lc.pad_token_id,
        head_fusion=head_fusion,
        gdn_window=gdn_window,
        gdn_sinks=gdn_sinks,
    )
    model = HydraHeadForCausalLM(config).to(next(llama.parameters()).dtype)
    src, dst = llama.model, model.model
    dst.embed_tokens.weight.copy_(src.embed_tokens.weight)
    dst.norm.weight.copy_(src.norm.weight)
    if not config.tie_word_embeddings:
        model.lm_head.weight.copy_(llama.lm_head.weight)
    for s, t in zip(src.layers, dst.layers, strict=True):
        t.input_layernorm.weight.copy_(s.input_layernorm.weight)
        t.post_attention_layernorm.weight.copy_(s.post_attention_layernorm.weight)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(t.mlp, name).weight.copy_(getattr(s.mlp, name).weight)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(t.self_attn, name).weight.copy_(getattr(s.self_attn, name).weight)
        if t.self_attn.gdn_groups:
            t.self_attn.conv_weight.zero_()
            t.self_attn.conv_weight[:, -1] = 1.0  # identity: the newest token passes straight through
    return model

"""The paged KV cache: a pool of 16-token blocks, per-sequence block tables, and compaction.

Only full-attention heads keep K/V here; Gated DeltaNet heads carry a fixed-size state elsewhere.
Keys are stored after RoPE at their logical position, so a key keeps its meaning wherever it moves:
compaction can slide survivors forward while the next token still gets the next logical position.

Evicting a token frees memory only when every token of its block goes. Compaction therefore moves
the survivors of a sequence forward, in token order, into the sequence's own leading blocks, so
the tail blocks empty completely and return to the pool. What is reported is blocks freed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hydrabrain.inference import ops

BLOCK_SIZE = 16


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for."""


class BlockPool:
    """Fixed pool of block ids with reference counts and an O(1) free queue (vLLM's discipline).

    Invariants (checked by ``assert_invariants``):
    - a block is in the free queue exactly when its reference count is 0, and at most once;
    - free blocks + used blocks == total blocks;
    - reference counts are never negative.
    Blocks freed last are handed out last (FIFO), which spreads reuse over the pool.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks  # preallocated metadata, one entry per block
        self._free: deque[int] = deque(range(num_blocks))
        self._is_free = [True] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks (reference count 1 each) or raise OutOfBlocks taking none."""
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} KV blocks, {len(self._free)} of {self.num_blocks} are free")
        out = [self._free.popleft() for _ in range(n)]
        for block in out:
            self._is_free[block] = False
            self.ref_cnt[block] = 1
        return out

    def share(self, blocks: Sequence[int]) -> None:
        """Add a reference to blocks already in use (a forked sequence reading the same prefix)."""
        for block in blocks:
            if self._is_free[block]:
                raise ValueError(f"block {block} is free; only used blocks can be shared")
            self.ref_cnt[block] += 1

    def free(self, blocks: Sequence[int]) -> int:
        """Drop one reference from each block; returns how many went back to the pool."""
        returned = 0
        for block in blocks:
            if self._is_free[block]:
                raise ValueError(f"block {block} is already free")
            self.ref_cnt[block] -= 1
            if self.ref_cnt[block] == 0:
                self._is_free[block] = True
                self._free.append(block)
                returned += 1
        return returned

    def assert_invariants(self) -> None:
        free = list(self._free)
        assert len(set(free)) == len(free), "a block is queued twice"
        for block in range(self.num_blocks):
            assert self.ref_cnt[block] >= 0, f"block {block} has a negative reference count"
            assert (self.ref_cnt[block] == 0) == self._is_free[block], f"block {block}: ref_cnt and free flag disagree"
        assert sum(self._is_free) == len(free), "free flags and free queue disagree"
        assert self.num_free + self.num_used == self.num_blocks


@dataclass(frozen=True)
class Remap:
    """Where compaction moves a sequence's kept tokens, and which blocks it gives back."""

    src_slots: list[int]  # slots that move (kept tokens not already in place), ascending
    dst_slots: list[int]  # their new slots, ascending, each <= its source
    new_len: int  # physical length after compaction
    kept_blocks: list[int]  # the block table after compaction
    freed_blocks: list[int]  # blocks that hold no kept token any more

    def old_to_new(self) -> dict[int, int]:
        return dict(zip(self.src_slots, self.dst_slots, strict=True))


def compaction_remap(block_table: Sequence[int], seq_len: int, keep: Sequence[int], block_size: int = BLOCK_SIZE) -> Remap:
    """The old→new slot remap that keeps the tokens at physical indices ``keep`` (pure function).

    ``keep`` must be strictly ascending indices below ``seq_len``. The i-th kept token moves to
    physical index i of the same sequence, so order is kept and every block past the survivors empties.
    """
    keep = list(keep)
    if any(b <= a for a, b in zip(keep, keep[1:], strict=False)):
        raise ValueError("tokens to keep must be strictly ascending")
    if keep and (keep[0] < 0 or keep[-1] >= seq_len):
        raise ValueError(f"tokens to keep must lie in [0, {seq_len})")
    if len(block_table) < math.ceil(seq_len / block_size):
        raise ValueError(f"a block table of {len(block_table)} blocks cannot hold {seq_len} tokens")

    def slot(i: int) -> int:
        return block_table[i // block_size] * block_size + i % block_size

    src, dst = [], []
    for new, old in enumerate(keep):
        if new != old:
            src.append(slot(old))
            dst.append(slot(new))
    used = math.ceil(seq_len / block_size)
    kept = math.ceil(len(keep) / block_size)
    return Remap(src, dst, len(keep), list(block_table[:kept]), list(block_table[kept:used]))


def blocks_emptied_by_eviction(seq_len: int, keep: Sequence[int], block_size: int = BLOCK_SIZE) -> int:
    """Blocks that would come back if the evicted tokens were only marked dead, never moved."""
    occupied = {i // block_size for i in keep}
    return math.ceil(seq_len / block_size) - len(occupied)


@dataclass
class WholeKV:
    """The whole K/V of a few KV heads of one sequence, never compacted, kept beside its blocks.

    Its bytes are reserved as pool blocks (``reserved``) so that admission and accounting count them;
    the rows themselves live in their own tensors, indexed by logical position.
    """

    heads: list[list[int]]  # per layer, the cache's KV-head indices kept whole
    k: list[torch.Tensor | None]  # per layer (capacity, len(heads[layer]), D)
    v: list[torch.Tensor | None]
    lengths: list[int]  # per layer, tokens written
    reserved: list[int]  # pool blocks held for these bytes


class HostKV:
    """Every prompt token's K/V of one sequence, kept in host memory beside the pool (the spill tier).

    Compaction then drops tokens from the pool only: a later pass can bring any of them back by
    logical position, so no selection made before the question is final. Rows are indexed by logical
    position, in a narrower format than the pool (host memory is the cheaper tier, not a free one):
    ``float16``, or ``int8`` with one float16 scale per token and KV head (symmetric, round to nearest).
    """

    FORMATS = ("float16", "int8")

    def __init__(self, kv_heads: Sequence[int], head_dim: int, capacity: int, fmt: str = "float16") -> None:
        if fmt not in self.FORMATS:
            raise ValueError(f"unknown host KV format {fmt!r}; use one of {', '.join(self.FORMATS)}")
        self.format = fmt
        dtype = torch.int8 if fmt == "int8" else torch.float16
        self.k = [torch.zeros(capacity, h, head_dim, dtype=dtype) if h else None for h in kv_heads]
        self.v = [torch.zeros(capacity, h, head_dim, dtype=dtype) if h else None for h in kv_heads]
        scales = [torch.zeros(capacity, h, 1, dtype=torch.float16) if h and fmt == "int8" else None for h in kv_heads]
        self.k_scale, self.v_scale = scales, [None if t is None else t.clone() for t in scales]
        self.length = 0  # rows written (logical positions 0 .. length - 1)

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in (*self.k, *self.v, *self.k_scale, *self.v_scale) if t is not None)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows (N, Hkv, D) of one layer at logical positions ``start`` onward."""
        for store, scale, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            target = store[layer]
            assert target is not None
            x = x.to(device="cpu", dtype=torch.float32)
            if self.format == "int8":
                s = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8).to(torch.float16)
                target[start : start + x.shape[0]] = torch.round(x / s.float()).clamp(-127, 127).to(torch.int8)
                scale[layer][start : start + x.shape[0]] = s  # type: ignore[index]
            else:
                target[start : start + x.shape[0]] = x.to(target.dtype)
        self.length = max(self.length, start + k.shape[0])

    def read(self, layer: int, rows: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of one layer as float32, (N, Hkv, D) each: an index tensor or a slice of positions."""
        return self._load(self.k, self.k_scale, layer, rows), self._load(self.v, self.v_scale, layer, rows)

    def keys(self, layer: int, rows: torch.Tensor | slice) -> torch.Tensor:
        """The keys alone (what a vote over the host rows reads)."""
        return self._load(self.k, self.k_scale, layer, rows)

    def _load(self, store: list, scale: list, layer: int, rows: torch.Tensor | slice) -> torch.Tensor:
        target = store[layer]
        assert target is not None
        x = target[rows].float()
        return x * scale[layer][rows].float() if self.format == "int8" else x


@dataclass
class SequenceBlocks:
    """One sequence's view of the cache."""

    blocks: list[int]  # physical blocks in token order
    length: int = 0  # tokens cached (physical)


class PagedKVCache:
    """K/V tensors for every layer's full-attention KV heads over one shared block pool.

    ``k[layer]`` and ``v[layer]`` are ``(num_blocks, BLOCK_SIZE, kv_heads[layer], head_dim)``. One
    block table per sequence serves every layer: each layer may keep different tokens after
    compaction, but always the same number of them.
    """

    def __init__(self, kv_heads: Sequence[int], head_dim: int, num_blocks: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        self.pool = BlockPool(num_blocks)
        self.kv_heads = list(kv_heads)
        self.head_dim = head_dim
        shape = (num_blocks, BLOCK_SIZE)
        self.k = [torch.zeros(*shape, h, head_dim, dtype=dtype, device=device) for h in self.kv_heads]
        self.v = [torch.zeros(*shape, h, head_dim, dtype=dtype, device=device) for h in self.kv_heads]
        self.seqs: dict[str, SequenceBlocks] = {}
        # Per-sequence state that is not K/V (the fixed-size state of linear-attention heads);
        # it lives and dies with the sequence's blocks.
        self.state: dict[str, object] = {}
        self.whole: dict[str, WholeKV] = {}
        self.host: dict[str, HostKV] = {}
        # Sequences whose prefill reads its history from the host tier: the pool then holds only the
        # chunk being read, and the selection at the end of the prompt has every token to choose from.
        self.host_reading: set[str] = set()

    @property
    def bytes_per_block(self) -> int:
        """K and V bytes one block holds across all layers."""
        elem = self.k[0].element_size() if self.k else 0
        return 2 * BLOCK_SIZE * self.head_dim * elem * sum(self.kv_heads)

    def add(self, seq_id: str) -> None:
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id!r} is already in the cache")
        self.seqs[seq_id] = SequenceBlocks([])

    def whole_blocks_needed(self, heads: Sequence[Sequence[int]], capacity: int) -> int:
        """Pool blocks whose bytes equal the whole K/V of ``heads`` (per layer) for ``capacity`` tokens."""
        elem = self.k[0].element_size() if self.k else 0
        nbytes = 2 * capacity * self.head_dim * elem * sum(len(h) for h in heads)
        return math.ceil(nbytes / self.bytes_per_block) if nbytes else 0

    def add_whole(self, seq_id: str, heads: Sequence[Sequence[int]], capacity: int) -> int:
        """Keep the whole K/V of ``heads`` (per layer) for up to ``capacity`` tokens; returns blocks reserved."""
        reserved = self.pool.allocate(self.whole_blocks_needed(heads, capacity))
        ref = self.k[0] if self.k else torch.zeros(0)
        ks = [ref.new_zeros(capacity, len(h), self.head_dim) if h else None for h in heads]
        vs = [ref.new_zeros(capacity, len(h), self.head_dim) if h else None for h in heads]
        self.whole[seq_id] = WholeKV([list(h) for h in heads], ks, vs, [0] * len(heads), reserved)
        return len(reserved)

    def attend_whole(self, layer: int, seq_ids: Sequence[str], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, scale: float) -> None:
        """Redo attention for the KV heads kept whole, over their whole history, in place in ``o``.

        q, o: (B, T, Hq, D); k, v: (B, T, Hkv, D), post-RoPE, the T tokens each sequence just added
        (the rows are appended to the whole store first). Sequences without whole heads are untouched.
        """
        rep = q.shape[2] // max(1, k.shape[2])
        for row, seq_id in enumerate(seq_ids):
            whole = self.whole.get(seq_id)
            if whole is None or not whole.heads[layer]:
                continue
            heads = whole.heads[layer]
            start, t = whole.lengths[layer], k.shape[1]
            whole.k[layer][start : start + t] = k[row][:, heads].to(whole.k[layer].dtype)
            whole.v[layer][start : start + t] = v[row][:, heads].to(whole.v[layer].dtype)
            whole.lengths[layer] = n = start + t
            queries = [h * rep + j for h in heads for j in range(rep)]
            mask = torch.arange(n)[None, :] <= (start + torch.arange(t))[:, None]  # (T, n)
            out = torch.nn.functional.scaled_dot_product_attention(
                q[row][:, queries].transpose(0, 1), whole.k[layer][:n].transpose(0, 1), whole.v[layer][:n].transpose(0, 1),
                attn_mask=mask, scale=scale, enable_gqa=True,
            )  # (len(queries), T, D)
            o[row][:, queries] = out.transpose(0, 1).to(o.dtype)

    @staticmethod
    def _slots(seq: SequenceBlocks, idx: torch.Tensor) -> torch.Tensor:
        """Pool slots of the sequence's physical token indices ``idx``."""
        if not len(idx):
            return idx.long()
        return torch.tensor(seq.blocks, dtype=torch.long)[idx // BLOCK_SIZE] * BLOCK_SIZE + idx % BLOCK_SIZE

    def add_host(self, seq_id: str, capacity: int, fmt: str = "float16") -> int:
        """Keep the K/V of up to ``capacity`` tokens of the sequence in host memory; returns the bytes set aside."""
        self.host[seq_id] = host = HostKV(self.kv_heads, self.head_dim, capacity, fmt)
        return host.nbytes

    def host_history(self, layer: int, seq_id: str, upto: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The host tier's K/V of logical positions ``0 .. upto - 1`` of one layer, (upto, Hkv, D) each."""
        host = self.host[seq_id]
        if upto > host.length:
            raise ValueError(f"the host tier holds {host.length} tokens of {seq_id!r}, not {upto}")
        if not self.kv_heads[layer]:
            empty = torch.zeros(upto, 0, self.head_dim, dtype=dtype, device=device)
            return empty, empty
        k, v = host.read(layer, slice(0, upto))
        return k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)

    def spill_newest(self, seq_id: str, first_position: int, n: int) -> None:
        """Copy the K/V of the sequence's ``n`` newest tokens (its last physical slots, the same in every
        head) to the host tier at logical positions ``first_position`` onward (a re-read overwrites)."""
        host, seq = self.host[seq_id], self.seqs[seq_id]
        slots = self._slots(seq, torch.arange(seq.length - n, seq.length))
        for layer, heads in enumerate(self.kv_heads):
            if heads:
                host.write(layer, first_position, self.k[layer].view(-1, *self.k[layer].shape[2:])[slots],
                           self.v[layer].view(-1, *self.v[layer].shape[2:])[slots])

    def refill(self, seq_id: str, rows_per_layer: Sequence[Sequence[int] | Sequence[Sequence[int]]]) -> int:
        """Replace the sequence's pool contents by host rows (logical positions), in the order given.

        A layer's entry is one list (every KV head reads those rows) or one list per KV head, all of
        the same length m; the sequence then holds m tokens in its leading blocks. Returns the blocks
        given back to the pool (negative when it had to grow).
        """
        host, seq = self.host[seq_id], self.seqs[seq_id]
        per_layer = [[list(h) for h in rows] if rows and not isinstance(rows[0], int) else [list(rows)] for rows in rows_per_layer]
        sizes = {len(h) for heads in per_layer for h in heads}
        if len(per_layer) != len(self.k) or len(sizes) != 1:
            raise ValueError("a refill needs one row list per layer (or per KV head), all of the same length")
        m = sizes.pop()
        if any(r >= host.length for heads in per_layer for h in heads for r in h):
            raise ValueError(f"a refill asked for a row the host tier does not hold (it holds {host.length})")
        need = math.ceil(m / BLOCK_SIZE)
        freed = 0
        if len(seq.blocks) > need:
            freed = self.pool.free(seq.blocks[need:])
            seq.blocks = seq.blocks[:need]
        elif len(seq.blocks) < need:
            grow = need - len(seq.blocks)
            seq.blocks.extend(self.pool.allocate(grow))
            freed = -grow
        slots = self._slots(seq, torch.arange(m))
        for layer, heads in enumerate(per_layer):
            if not self.kv_heads[layer] or not m:
                continue
            flat_k = self.k[layer].view(-1, *self.k[layer].shape[2:])
            flat_v = self.v[layer].view(-1, *self.v[layer].shape[2:])
            if len(heads) == 1:
                k, v = host.read(layer, torch.tensor(heads[0], dtype=torch.long))
                flat_k[slots], flat_v[slots] = k.to(flat_k), v.to(flat_v)
                continue
            if len(heads) != self.kv_heads[layer]:
                raise ValueError(f"layer {layer} has {self.kv_heads[layer]} KV heads but {len(heads)} row lists")
            for head, rows_h in enumerate(heads):
                k, v = host.read(layer, torch.tensor(rows_h, dtype=torch.long))
                flat_k[slots, head], flat_v[slots, head] = k[:, head].to(flat_k), v[:, head].to(flat_v)
        seq.length = m
        return freed

    def rewind_whole(self, seq_id: str, length: int) -> None:
        """Forget the whole-K/V rows from logical position ``length`` on (they are about to be read again)."""
        whole = self.whole.get(seq_id)
        if whole is not None:
            whole.lengths = [min(n, length) for n in whole.lengths]

    def length(self, seq_id: str) -> int:
        return self.seqs[seq_id].length

    def blocks_held(self, seq_id: str) -> int:
        """Blocks the sequence holds, the ones reserved for its whole-K/V heads included."""
        whole = self.whole.get(seq_id)
        return len(self.seqs[seq_id].blocks) + (len(whole.reserved) if whole else 0)

    def append_slots(self, seq_id: str, n: int) -> torch.Tensor:
        """Grow the sequence by ``n`` tokens, allocating blocks as needed; returns their slots (n,)."""
        seq = self.seqs[seq_id]
        need = math.ceil((seq.length + n) / BLOCK_SIZE) - len(seq.blocks)
        if need > 0:
            seq.blocks.extend(self.pool.allocate(need))
        idx = torch.arange(seq.length, seq.length + n)
        table = torch.tensor(seq.blocks, dtype=torch.long)
        seq.length += n
        return table[idx // BLOCK_SIZE] * BLOCK_SIZE + idx % BLOCK_SIZE

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys/values (N, Hkv, D) of one layer at ``slots`` (N,)."""
        if not self.kv_heads[layer]:
            return
        self.k[layer].view(-1, *self.k[layer].shape[2:])[slots] = k.to(self.k[layer].dtype)
        self.v[layer].view(-1, *self.v[layer].shape[2:])[slots] = v.to(self.v[layer].dtype)

    def tables(self, seq_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables (B, max_blocks) int32 (padded with 0) and seq_lens (B,) int32."""
        width = max((len(self.seqs[s].blocks) for s in seq_ids), default=0) or 1
        table = torch.zeros(len(seq_ids), width, dtype=torch.int32)
        for row, s in enumerate(seq_ids):
            blocks = self.seqs[s].blocks
            if blocks:
                table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        lens = torch.tensor([self.seqs[s].length for s in seq_ids], dtype=torch.int32)
        return table, lens

    def gather(self, layer: int, seq_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's cached keys and values of one layer in token order, (L, Hkv, D) each."""
        seq = self.seqs[seq_id]
        if not self.kv_heads[layer]:
            empty = self.k[layer].new_zeros(seq.length, 0, self.head_dim)
            return empty, empty
        slots = self._slots(seq, torch.arange(seq.length))
        k = self.k[layer].view(-1, *self.k[layer].shape[2:])[slots]
        v = self.v[layer].view(-1, *self.v[layer].shape[2:])[slots]
        return k, v

    def compact(self, seq_id: str, keep_per_layer: Sequence[Sequence[int] | Sequence[Sequence[int]]]) -> int:
        """Keep, in every layer, the tokens at the given physical indices; returns blocks freed.

        A layer's entry is one strictly ascending list (every KV head keeps those tokens) or one
        such list per KV head (each head keeps its own tokens in the same slots). Every list has
        the same length, so one block table still serves every layer and head.
        """
        seq = self.seqs[seq_id]
        per_layer = [[list(h) for h in keep] if keep and not isinstance(keep[0], int) else [list(keep)] for keep in keep_per_layer]
        sizes = {len(h) for heads in per_layer for h in heads}
        if len(keep_per_layer) != len(self.k) or len(sizes) != 1:
            raise ValueError("compaction needs one keep list per layer (or per KV head), all of the same length")
        remap = None
        for layer, heads in enumerate(per_layer):
            if len(heads) > 1 and len(heads) != self.kv_heads[layer]:
                raise ValueError(f"layer {layer} has {self.kv_heads[layer]} KV heads but {len(heads)} keep lists")
            for head, keep in enumerate(heads):
                remap = compaction_remap(seq.blocks, seq.length, keep)
                if not remap.src_slots or not self.kv_heads[layer]:
                    continue
                src = torch.tensor(remap.src_slots, dtype=torch.long, device=self.k[layer].device)
                dst = torch.tensor(remap.dst_slots, dtype=torch.long, device=self.k[layer].device)
                if len(heads) == 1:
                    ops.kv_compact(self.k[layer], self.v[layer], src.int(), dst.int())
                    continue
                for cache in (self.k[layer], self.v[layer]):
                    flat = cache.view(-1, *cache.shape[2:])  # (slots, Hkv, D)
                    flat[dst, head] = flat[src, head].clone()
        assert remap is not None
        seq.blocks = remap.kept_blocks
        seq.length = remap.new_len
        return self.pool.free(remap.freed_blocks)

    def release(self, seq_id: str) -> int:
        """Drop the sequence; returns how many blocks went back to the pool."""
        seq = self.seqs.pop(seq_id, None)
        self.state.pop(seq_id, None)
        whole = self.whole.pop(seq_id, None)
        self.host.pop(seq_id, None)
        self.host_reading.discard(seq_id)
        return (self.pool.free(seq.blocks) if seq else 0) + (self.pool.free(whole.reserved) if whole else 0)

    def assert_invariants(self) -> None:
        self.pool.assert_invariants()
        held = [b for s in self.seqs.values() for b in s.blocks] + [b for w in self.whole.values() for b in w.reserved]
        for s_id, s in self.seqs.items():
            assert len(s.blocks) == math.ceil(s.length / BLOCK_SIZE), f"{s_id}: {len(s.blocks)} blocks for {s.length} tokens"
        counts: dict[int, int] = {}
        for b in held:
            counts[b] = counts.get(b, 0) + 1
        for b, n in counts.items():
            assert self.pool.ref_cnt[b] >= n, f"block {b} is held {n} times with ref_cnt {self.pool.ref_cnt[b]}"
        assert self.pool.num_used == len(counts), "a used block belongs to no sequence"

"""The Triton kernels on one CUDA GPU: bf16 parity at realistic shapes, then timings against the anchors.

    python benchmarks/kernels_gpu.py            # about 3 to 6 minutes on one H100
    python benchmarks/kernels_gpu.py --smoke    # the script's plumbing on CPU: tiny shapes, interpreter, writes nothing

Anchors, timed in the same run: flash-linear-attention's ``chunk_gated_delta_rule`` and
``fused_recurrent_gated_delta_rule`` (``pip install fla-core``; rows are marked missing without it),
and PyTorch SDPA (causal full attention on the same shapes; decode against a contiguous cache).
Reports TFLOPS or GB/s and the fraction of the H100 roofline (989 dense bf16 TFLOPS, 3.35 TB/s),
prints a table and writes ``benchmarks/results/kernels_h100.json``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "kernels_h100.json"
PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
PEAK_GBPS = 3350.0  # H100 SXM HBM3
TIME_BUDGET_S = 7 * 60  # stop starting new rows past this, so the run stays under 8 minutes


def _import_project() -> None:
    """Use the installed package, or map the checkout's kernels/ folder onto hydrabrain.kernels."""
    try:
        import hydrabrain.kernels  # noqa: F401

        return
    except ImportError:
        pass
    import types

    package = types.ModuleType("hydrabrain")
    package.__path__ = []
    sys.modules["hydrabrain"] = package
    spec = importlib.util.spec_from_file_location(
        "hydrabrain.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["hydrabrain.kernels"] = module
    spec.loader.exec_module(module)
    package.kernels = module


def main(argv: list[str]) -> int:
    smoke = "--smoke" in argv
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    if not smoke and not torch.cuda.is_available():
        print(
            "kernels_gpu.py needs a CUDA GPU (an H100 is the reference) and a CUDA build of torch; none was found. "
            "The CPU checks of these kernels are the tests: pytest tests/kernels",
            file=sys.stderr,
        )
        return 2
    _import_project()
    bench = Bench(torch, smoke=smoke)
    bench.run()
    return 0 if all(p["ok"] for p in bench.parity) else 1


class Bench:
    def __init__(self, torch, *, smoke: bool = False):
        import torch.nn.functional as F
        import triton
        import triton.testing

        from hydrabrain.kernels.gated_delta_rule.chunk import chunk_gated_delta_rule
        from hydrabrain.kernels.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule
        from hydrabrain.kernels.gated_delta_rule.naive import chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref
        from hydrabrain.kernels.kv_compact.naive import kv_compact_ref
        from hydrabrain.kernels.kv_compact.triton import kv_compact
        from hydrabrain.kernels.paged_attention.naive import paged_decode_attention_ref
        from hydrabrain.kernels.paged_attention.triton import paged_decode_attention
        from hydrabrain.kernels.triattention_score.naive import triattention_score_ref
        from hydrabrain.kernels.triattention_score.triton import triattention_score

        self.torch, self.F, self.triton = torch, F, triton
        self.ours = dict(
            chunk=chunk_gated_delta_rule, recurrent=fused_recurrent_gated_delta_rule, paged=paged_decode_attention,
            compact=kv_compact, score=triattention_score,
        )
        self.refs = dict(
            chunk=chunk_gated_delta_rule_ref, recurrent=recurrent_gated_delta_rule_ref, paged=paged_decode_attention_ref,
            compact=kv_compact_ref, score=triattention_score_ref,
        )
        self.smoke = smoke
        try:
            if smoke:
                raise ImportError("fla's kernels need a GPU; left out of the smoke run")
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
            from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent

            self.fla = dict(chunk=fla_chunk, recurrent=fla_recurrent)
        except ImportError as exc:
            print(f"fla-core not importable ({exc}); fla rows are marked missing. pip install fla-core", file=sys.stderr)
            self.fla = None
        self.dev = torch.device("cpu" if smoke else "cuda")
        # (chunk prefill lengths, tokens per row), decode batches, paged (B, L, Hq, Hkv, D), compaction tokens, score keys
        if smoke:
            self.H, self.D = 2, 32
            self.chunk_lengths, self.chunk_tokens = (64, 128), 128
            self.decode_batches = (1, 2)
            self.paged_shapes = ((2, 64, 4, 2, 32),)
            self.compact_tokens, self.score_keys = (256,), (256,)
        else:
            self.H, self.D = 16, 128
            self.chunk_lengths, self.chunk_tokens = (2048, 8192, 32768), 32768
            self.decode_batches = (1, 64, 256)
            self.paged_shapes = ((32, 4096, 32, 8, 128), (8, 32768, 32, 8, 128), (64, 2048, 9, 3, 64))
            self.compact_tokens, self.score_keys = (32768, 262144), (32768, 131072)
        self.started = time.perf_counter()
        self.parity: list[dict] = []
        self.timings: list[dict] = []

    # ---- helpers -------------------------------------------------------------------------------

    def ms(self, fn, *, rep=50, grad_to_none=None) -> float:
        if self.smoke:  # do_bench needs CUDA; one timed call shows the plumbing works
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        return float(self.triton.testing.do_bench(fn, warmup=max(3, rep // 5), rep=rep, grad_to_none=grad_to_none, return_mode="median"))

    def empty_cache(self) -> None:
        if not self.smoke:
            self.torch.cuda.empty_cache()

    def over_budget(self, name: str) -> bool:
        if time.perf_counter() - self.started > TIME_BUDGET_S:
            self.timings.append(dict(name=name, skipped="time budget of the run spent"))
            return True
        return False

    def rel_err(self, got, want) -> float:
        got, want = got.float(), want.float()
        return float((got - want).norm() / want.norm().clamp_min(1e-12))

    def gdn_inputs(self, B, T, H, K, V, *, requires_grad=False, with_state=True, seed=0):
        torch, F = self.torch, self.F
        gen = torch.Generator(device=self.dev).manual_seed(seed)
        bf16 = torch.bfloat16
        q = torch.randn(B, T, H, K, device=self.dev, generator=gen).to(bf16)
        k = F.normalize(torch.randn(B, T, H, K, device=self.dev, generator=gen), dim=-1).to(bf16)
        v = torch.randn(B, T, H, V, device=self.dev, generator=gen).to(bf16)
        g = F.logsigmoid(torch.randn(B, T, H, device=self.dev, generator=gen)) / 16  # fla's usual test gate range
        beta = torch.rand(B, T, H, device=self.dev, generator=gen).sigmoid()
        h0 = torch.randn(B, H, K, V, device=self.dev, generator=gen) if with_state else None
        xs = [q, k, v, g, beta]
        if requires_grad:
            xs = [x.requires_grad_(True) for x in xs]
        return (*xs, h0)

    def record(self, name, impl, ms, *, flops=None, bytes_=None, anchor_ms=None, anchor=None, **extra):
        row = dict(name=name, impl=impl, ms=round(ms, 4), **extra)
        if flops is not None:
            row["tflops"] = round(flops / ms / 1e9, 2)
            row["roofline_fraction"] = round(row["tflops"] / PEAK_TFLOPS, 4)
        if bytes_ is not None:
            row["gbps"] = round(bytes_ / ms / 1e6, 1)
            row["roofline_fraction"] = round(row["gbps"] / PEAK_GBPS, 4)
        if anchor_ms is not None:
            row["anchor"] = anchor
            row["speedup_vs_anchor"] = round(anchor_ms / ms, 3)
        self.timings.append(row)
        return row

    # ---- parity --------------------------------------------------------------------------------

    def check_parity(self) -> None:
        torch = self.torch
        # chunk forward at a realistic prefill shape, against the reference (fp32 math on the same bf16 inputs)
        H, D = self.H, self.D
        T = 130 if self.smoke else 4096
        q, k, v, g, beta, h0 = self.gdn_inputs(2, T, H, D, D, seed=1)
        o, ht = self.ours["chunk"](q, k, v, g, beta, None, h0, True)
        o_ref, ht_ref = self.refs["chunk"](q, k, v, g, beta, None, h0, True)
        self.add_parity(f"gdn chunk fwd, B2 T{T} H{H} K{D} V{D}", o, o_ref, ht, ht_ref, tol=2e-2)
        if self.fla:
            o_fla, ht_fla = self.fla["chunk"](q, k, v, g, beta, None, h0, True)
            self.add_parity("  fla chunk fwd, same inputs (for scale)", o_fla, o_ref, ht_fla, ht_ref, tol=2e-2)

        # chunk backward against autograd through the token-by-token reference (an independent path)
        T = 70 if self.smoke else 1024
        q, k, v, g, beta, h0 = self.gdn_inputs(1, T, H, D, D, requires_grad=True, seed=2)
        do = torch.randn_like(v)
        o, _ = self.ours["chunk"](q, k, v, g, beta, None, h0, False)
        grads = torch.autograd.grad(o, (q, k, v, g, beta), do)
        o_ref, _ = self.refs["recurrent"](q, k, v, g, beta, None, h0, False)
        grads_ref = torch.autograd.grad(o_ref, (q, k, v, g, beta), do)
        worst = max(self.rel_err(a, b) for a, b in zip(grads, grads_ref, strict=True))
        self.parity.append(dict(name=f"gdn chunk bwd (dq dk dv dg dbeta), B1 T{T} H{H}", grad_rel_err=worst, tol=2e-2, ok=worst < 2e-2))

        # decode: a batch of single tokens with a carried state
        B = 2 if self.smoke else 64
        q, k, v, g, beta, h0 = self.gdn_inputs(B, 1, H, D, D, seed=3)
        o, ht = self.ours["recurrent"](q, k, v, g, beta, None, h0, True)
        o_ref, ht_ref = self.refs["recurrent"](q, k, v, g, beta, None, h0, True)
        self.add_parity(f"gdn fused recurrent decode, B{B} T1 H{H}", o, o_ref, ht, ht_ref, tol=1e-2)

        B, L, Hq, Hkv, Dp = self.paged_shapes[0]
        cache = self.paged_setup(B, L, Hq, Hkv, Dp, seed=4)
        out = self.ours["paged"](*cache["args"])
        want = self.refs["paged"](*cache["args"])
        err = self.rel_err(out, want)
        self.parity.append(dict(name=f"paged decode, B{B} L{L} Hq{Hq} Hkv{Hkv} D{Dp}", out_rel_err=err, tol=1e-2, ok=err < 1e-2))

        n = 512 if self.smoke else 8192
        k_cache, v_cache, src, dst = self.compact_setup(n, 2, D, seed=5, sequences=n // 256)
        k2, v2 = k_cache.clone(), v_cache.clone()
        self.ours["compact"](k_cache, v_cache, src, dst)
        self.refs["compact"](k2, v2, src, dst)
        exact = bool(torch.equal(k_cache, k2) and torch.equal(v_cache, v2))
        self.parity.append(dict(name=f"kv compact, {n} tokens in {n // 256} sequences", exact=exact, ok=exact))

        N = self.score_keys[0]
        args = self.score_setup(N, Hq, Hkv, Dp, seed=6)
        err = self.rel_err(self.ours["score"](*args), self.refs["score"](*args))
        self.parity.append(dict(name=f"triattention score, N{N} Hq{Hq} Hkv{Hkv} D{Dp}", out_rel_err=err, tol=1e-2, ok=err < 1e-2))

    def add_parity(self, name, o, o_ref, ht, ht_ref, *, tol):
        eo, eh = self.rel_err(o, o_ref), self.rel_err(ht, ht_ref)
        self.parity.append(dict(name=name, out_rel_err=eo, state_rel_err=eh, tol=tol, ok=eo < tol and eh < tol))

    # ---- shapes for the cache kernels ------------------------------------------------------------

    def paged_setup(self, B, L, Hq, Hkv, D, *, seed, block_size=16):
        torch = self.torch
        gen = torch.Generator(device=self.dev).manual_seed(seed)
        blocks_per_seq = L // block_size
        num_blocks = B * blocks_per_seq + 8
        k_cache = torch.randn(num_blocks, block_size, Hkv, D, device=self.dev, generator=gen).bfloat16()
        v_cache = torch.randn(num_blocks, block_size, Hkv, D, device=self.dev, generator=gen).bfloat16()
        order = torch.randperm(num_blocks, device=self.dev, generator=gen)[: B * blocks_per_seq]
        tables = order.view(B, blocks_per_seq).to(torch.int32)
        lens = torch.full((B,), L, dtype=torch.int32, device=self.dev)
        q = torch.randn(B, Hq, D, device=self.dev, generator=gen).bfloat16()
        return dict(args=(q, k_cache, v_cache, tables, lens, D**-0.5), tables=tables)

    def compact_setup(self, n_tokens, Hkv, D, *, seed, sequences=32, block_size=16):
        """Sequences of 256 tokens in scattered blocks; every third token evicted, the rest slide forward."""
        torch = self.torch
        gen = torch.Generator(device=self.dev).manual_seed(seed)
        per_seq = n_tokens // sequences
        blocks_per_seq = per_seq // block_size
        num_blocks = sequences * blocks_per_seq
        k_cache = torch.randn(num_blocks, block_size, Hkv, D, device=self.dev, generator=gen).bfloat16()
        v_cache = torch.randn(num_blocks, block_size, Hkv, D, device=self.dev, generator=gen).bfloat16()
        tables = torch.randperm(num_blocks, device=self.dev, generator=gen).view(sequences, blocks_per_seq)
        keep = torch.arange(per_seq, device=self.dev)
        keep = keep[keep % 3 != 1]
        src, dst = [], []
        for s in range(sequences):
            slot = lambda t, s=s: tables[s, t // block_size] * block_size + t % block_size  # noqa: E731
            src.append(slot(keep))
            dst.append(slot(torch.arange(keep.numel(), device=self.dev)))
        return k_cache, v_cache, torch.cat(src), torch.cat(dst)

    def score_setup(self, N, Hq, Hkv, D, *, seed, block_size=16):
        torch = self.torch
        gen = torch.Generator(device=self.dev).manual_seed(seed)
        num_blocks = N // block_size + 4
        k_cache = torch.randn(num_blocks, block_size, Hkv, D, device=self.dev, generator=gen).bfloat16()
        table = torch.randperm(num_blocks, device=self.dev, generator=gen)[: N // block_size].to(torch.int32)
        q_mean = torch.randn(Hq, D, device=self.dev, generator=gen)
        q_abs_mean = torch.sqrt(q_mean[:, : D // 2] ** 2 + q_mean[:, D // 2 :] ** 2) + torch.rand(Hq, D // 2, device=self.dev, generator=gen)
        inv_freq = 10_000.0 ** (-torch.arange(D // 2, device=self.dev, dtype=torch.float32) * 2 / D)
        positions = torch.arange(N, N + 128, device=self.dev, dtype=torch.float32)
        return k_cache, table, N, q_mean, q_abs_mean, inv_freq, positions

    # ---- timings -------------------------------------------------------------------------------

    def gdn_flops(self, B, T, H, K, V, C=64) -> float:
        # the chunked algorithm's matmuls per chunk: KK^T, W, U, WS, K^T u, QS, QK^T, A u
        return B * H * math.ceil(T / C) * (6 * C * K * V + 6 * C * C * K + 4 * C * C * V)

    def time_gdn_chunk(self) -> None:
        torch, F = self.torch, self.F
        H, K, V = self.H, self.D, self.D
        for T in self.chunk_lengths:
            B = max(1, self.chunk_tokens // T)  # same number of tokens per row of the table
            name = f"gdn chunk, B{B} T{T} H{H} K{K} V{V}"
            if self.over_budget(name):
                continue
            q, k, v, g, beta, h0 = self.gdn_inputs(B, T, H, K, V, requires_grad=True, seed=T)
            do = torch.randn_like(v)
            flops = self.gdn_flops(B, T, H, K, V)
            sdpa_q, sdpa_k, sdpa_v = (x.detach().transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))
            sdpa_flops = 4 * B * H * T * T * K / 2  # causal: half the score matrix

            with torch.no_grad():
                sdpa_ms = self.ms(lambda: F.scaled_dot_product_attention(sdpa_q, sdpa_k, sdpa_v, is_causal=True))
                self.record(name + " fwd", "sdpa (causal softmax attention)", sdpa_ms, flops=sdpa_flops)
                fla_ms = None
                if self.fla:
                    fla_ms = self.ms(lambda: self.fla["chunk"](q, k, v, g, beta, None, h0, True))
                    self.record(name + " fwd", "fla chunk_gated_delta_rule", fla_ms, flops=flops)
                ours_ms = self.ms(lambda: self.ours["chunk"](q, k, v, g, beta, None, h0, True))
                self.record(name + " fwd", "ours", ours_ms, flops=flops, anchor_ms=fla_ms, anchor="fla" if fla_ms else None)

            def fwd_bwd(fn, grad_out, *xs):
                def step():
                    o = fn(*xs)
                    o = o[0] if isinstance(o, tuple) else o
                    o.backward(grad_out)
                return step

            grads = [q, k, v, g, beta, sdpa_q, sdpa_k, sdpa_v]
            bench = lambda fn: self.ms(fn, rep=20, grad_to_none=grads)  # noqa: E731
            do_sdpa = do.transpose(1, 2).contiguous()
            sdpa_ms = bench(fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), do_sdpa, sdpa_q, sdpa_k, sdpa_v))
            self.record(name + " fwd+bwd", "sdpa (causal softmax attention)", sdpa_ms, flops=3.5 * sdpa_flops)
            fla_ms = None
            if self.fla:
                fla_ms = bench(fwd_bwd(lambda *xs: self.fla["chunk"](*xs, None, h0, False), do, q, k, v, g, beta))
                self.record(name + " fwd+bwd", "fla chunk_gated_delta_rule", fla_ms, flops=3 * flops)
            if self.over_budget(name + " fwd+bwd (ours)"):
                continue
            ours_ms = bench(fwd_bwd(lambda *xs: self.ours["chunk"](*xs, None, h0, False), do, q, k, v, g, beta))
            self.record(name + " fwd+bwd", "ours", ours_ms, flops=3 * flops,
                        anchor_ms=fla_ms, anchor="fla" if fla_ms else None)
            del q, k, v, g, beta, h0, do, sdpa_q, sdpa_k, sdpa_v
            self.empty_cache()

    def time_decode(self) -> None:
        torch = self.torch
        H, K, V = self.H, self.D, self.D
        for B in self.decode_batches:
            name = f"gdn fused recurrent decode, B{B} T1 H{H} K{K} V{V}"
            if self.over_budget(name):
                continue
            q, k, v, g, beta, h0 = self.gdn_inputs(B, 1, H, K, V, seed=B)
            # the fp32 state is read and written once; q, k, v, o are noise beside it
            bytes_ = 2 * B * H * K * V * 4 + B * H * (2 * K + 2 * V) * 2
            fla_ms = None
            with torch.no_grad():
                if self.fla:
                    fla_ms = self.ms(lambda: self.fla["recurrent"](q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True))
                    self.record(name, "fla fused_recurrent_gated_delta_rule", fla_ms, bytes_=bytes_)
                ours_ms = self.ms(lambda: self.ours["recurrent"](q, k, v, g, beta, None, h0, True))
            self.record(name, "ours", ours_ms, bytes_=bytes_, anchor_ms=fla_ms, anchor="fla" if fla_ms else None)

        for B, L, Hq, Hkv, D in self.paged_shapes:
            name = f"paged decode, B{B} L{L} Hq{Hq} Hkv{Hkv} D{D}"
            if self.over_budget(name):
                continue
            setup = self.paged_setup(B, L, Hq, Hkv, D, seed=L)
            q, k_cache, v_cache = setup["args"][:3]
            bytes_ = 2 * B * L * Hkv * D * 2 + 2 * B * Hq * D * 2
            # the anchor: SDPA over the same tokens laid out contiguously (no block table to follow)
            slots = (setup["tables"].long()[:, :, None] * 16 + torch.arange(16, device=self.dev)).view(B, L)
            k_flat = k_cache.view(-1, Hkv, D)[slots].transpose(1, 2).contiguous()  # (B, Hkv, L, D)
            v_flat = v_cache.view(-1, Hkv, D)[slots].transpose(1, 2).contiguous()
            q4 = q[:, :, None, :]  # (B, Hq, 1, D)
            with torch.no_grad():
                sdpa_ms = self.ms(lambda: self.F.scaled_dot_product_attention(q4, k_flat, v_flat, enable_gqa=True))
                self.record(name, "sdpa on a contiguous cache", sdpa_ms, bytes_=bytes_)
                ours_ms = self.ms(lambda: self.ours["paged"](*setup["args"]))
            self.record(name, "ours (paged, block table)", ours_ms, bytes_=bytes_, anchor_ms=sdpa_ms, anchor="sdpa")
            del setup, k_flat, v_flat
            self.empty_cache()

    def time_cache_maintenance(self) -> None:
        torch = self.torch
        Hkv, D = (2, self.D) if self.smoke else (8, 128)
        for n_tokens in self.compact_tokens:
            name = f"kv compact, {n_tokens} tokens, Hkv{Hkv} D{D}"
            if self.over_budget(name):
                continue
            k_cache, v_cache, src, dst = self.compact_setup(n_tokens, Hkv, D, seed=n_tokens, sequences=n_tokens // 256)
            moved = int((src != dst).sum())
            bytes_ = 2 * 2 * moved * Hkv * D * 2  # K and V, read and write, bf16
            ref_ms = self.ms(lambda: self.refs["compact"](k_cache, v_cache, src, dst))
            self.record(name, "reference (torch gather + scatter)", ref_ms, bytes_=bytes_, moved_tokens=moved)
            ours_ms = self.ms(lambda: self.ours["compact"](k_cache, v_cache, src, dst))
            self.record(name, "ours (in place)", ours_ms, bytes_=bytes_, moved_tokens=moved, anchor_ms=ref_ms, anchor="reference")

        Hq = 4 if self.smoke else 32
        for N in self.score_keys:
            name = f"triattention score, N{N} Hq{Hq} Hkv{Hkv} D{D}"
            if self.over_budget(name):
                continue
            args = self.score_setup(N, Hq, Hkv, D, seed=N)
            bytes_ = N * Hkv * D * 2 + Hq * N * 4
            ref_ms = self.ms(lambda: self.refs["score"](*args))
            self.record(name, "reference (torch)", ref_ms, bytes_=bytes_)
            ours_ms = self.ms(lambda: self.ours["score"](*args))
            row = self.record(name, "ours", ours_ms, bytes_=bytes_, anchor_ms=ref_ms, anchor="reference")
            row["keys_per_s"] = round(N / ours_ms * 1e3)

    # ---- run -----------------------------------------------------------------------------------

    def run(self) -> None:
        torch, triton = self.torch, self.triton
        device = "cpu (smoke run, Triton interpreter)" if self.smoke else torch.cuda.get_device_name()
        print(f"device: {device}; torch {torch.__version__}; triton {triton.__version__}", flush=True)
        self.check_parity()
        for p in self.parity:
            errs = ", ".join(f"{k}={v:.2e}" for k, v in p.items() if k.endswith("err"))
            print(f"parity {'ok  ' if p['ok'] else 'FAIL'} {p['name']}: {errs or p.get('exact')}", flush=True)
        for part in (self.time_gdn_chunk, self.time_decode, self.time_cache_maintenance):
            part()
            self.empty_cache()
        elapsed = time.perf_counter() - self.started
        self.print_table()
        if self.smoke:
            print(f"smoke run finished in {elapsed:.0f} s; nothing written", flush=True)
            return
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(dict(
            device=device, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
            fla=self.fla_version(), peak_tflops_bf16=PEAK_TFLOPS, peak_gbps=PEAK_GBPS, elapsed_s=round(elapsed, 1),
            command="python benchmarks/kernels_gpu.py", parity=self.parity, timings=self.timings,
        ), indent=2) + "\n")
        print(f"wrote {RESULTS.relative_to(ROOT)} in {elapsed:.0f} s", flush=True)

    def fla_version(self):
        try:
            import fla

            return getattr(fla, "__version__", "unknown")
        except ImportError:
            return None

    def print_table(self) -> None:
        head = f"{'case':<52} {'implementation':<42} {'ms':>9} {'TFLOPS':>8} {'GB/s':>8} {'roof':>6} {'x anchor':>9}"
        print(head)
        print("-" * len(head))
        for r in self.timings:
            if "skipped" in r:
                print(f"{r['name']:<52} skipped: {r['skipped']}")
                continue
            tf = f"{r['tflops']:.1f}" if "tflops" in r else ""
            gb = f"{r['gbps']:.0f}" if "gbps" in r else ""
            roof = f"{100 * r['roofline_fraction']:.0f}%" if "roofline_fraction" in r else ""
            sp = f"{r['speedup_vs_anchor']:.2f}" if "speedup_vs_anchor" in r else ""
            print(f"{r['name']:<52} {r['impl']:<42} {r['ms']:>9.3f} {tf:>8} {gb:>8} {roof:>6} {sp:>9}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

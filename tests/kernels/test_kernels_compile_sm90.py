"""Every Triton kernel compiles for an H100 (sm_90) ahead of time, here, with no GPU.

The interpreter runs the kernels' arithmetic but never the compiler, so a kernel could pass every
parity test and still fail to compile on the GPU. Triton's wheel ships ptxas, so the whole path
(Triton IR, PTX, cubin) runs on a CPU machine. It runs in a child process because the kernel
modules in this one were imported in interpreter mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

KERNELS = [
    "_fused_recurrent_gdr_kernel",
    "_prepare_kernel",
    "_state_kernel",
    "_output_kernel",
    "_bwd_state_kernel",
    "_bwd_dqk_kernel",
    "_bwd_wy_kernel",
    "_paged_decode_split_kernel",
    "_paged_decode_merge_kernel",
    "_kv_compact_kernel",
    "_triattention_score_kernel",
]


def test_every_kernel_compiles_to_an_sm90_cubin_at_realistic_bf16_shapes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(compiled) == sorted(KERNELS)
    assert all(size > 0 for size in compiled.values())


def _compile_all() -> dict[str, int]:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import hydrabrain.kernels.gated_delta_rule.chunk as chunk
    import hydrabrain.kernels.gated_delta_rule.fused_recurrent as recurrent
    import hydrabrain.kernels.kv_compact.triton as compact
    import hydrabrain.kernels.paged_attention.triton as paged
    import hydrabrain.kernels.triattention_score.triton as score

    target = GPUTarget("cuda", 90, 32)
    sizes: dict[str, int] = {}

    def build(kernel, types, constants, *, num_warps=4, num_stages=1):
        while not isinstance(kernel, triton.runtime.jit.JITFunction):
            kernel = kernel.fn  # under an autotuner
        signature = {name: "constexpr" if name in constants else types[name] for name in kernel.arg_names}
        compiled = triton.compile(
            ASTSource(kernel, signature, constexprs=constants), target=target, options=dict(num_warps=num_warps, num_stages=num_stages)
        )
        sizes[kernel.__name__] = len(compiled.asm["cubin"])

    bf, f32, i32 = "*bf16", "*fp32", "i32"
    H, K, V = 16, 128, 128
    gdn = dict(H=H, K=K, V=V, BT=64, PRECISION="tf32", DT=tl.bfloat16)
    build(
        recurrent._fused_recurrent_gdr_kernel,
        dict(q=bf, k=bf, v=bf, g=f32, beta=f32, o=bf, h0=f32, ht=f32, scale="fp32", T=i32),
        dict(H=H, K=K, V=V, BK=128, BV=32, HAS_INITIAL=True, STORE_FINAL=True),
        num_warps=2,
    )
    build(
        chunk._prepare_kernel,
        dict(k=bf, v=bf, g=f32, beta=f32, gamma=f32, w=bf, u=bf, a_inv=f32, T=i32),
        dict(gdn, BK=64, BV=64, STORE_INV=True, LOG_BT=6),
        num_warps=8,
    )
    build(
        chunk._state_kernel,
        dict(k=bf, w=bf, u=bf, gamma=f32, h0=f32, hs=bf, v_new=bf, ht=f32, T=i32, NT=i32),
        dict(gdn, BK=128, BV=64, HAS_INITIAL=True, STORE_FINAL=True),
        num_warps=8,
        num_stages=2,
    )
    build(
        chunk._output_kernel,
        dict(q=bf, k=bf, v_new=bf, gamma=f32, hs=bf, o=bf, scale="fp32", T=i32, NT=i32),
        dict(gdn, BK=64, BV=64),
        num_warps=8,
        num_stages=2,
    )
    build(
        chunk._bwd_state_kernel,
        dict(q=bf, k=bf, w=bf, gamma=f32, do=bf, dht=f32, dh0=f32, dhs=f32, dvn=f32, scale="fp32", T=i32, NT=i32),
        dict(gdn, BK=128, BV=32, HAS_DHT=True, STORE_DH0=True),
    )
    build(
        chunk._bwd_dqk_kernel,
        dict(
            q=bf, k=bf, gamma=f32, hs=bf, dhs=f32, v_new=bf, dvn=f32, do=bf, dq=bf, dk_part=f32, dw=f32, dgamma_part=f32,
            scale="fp32", T=i32, NT=i32,
        ),
        dict(gdn, BK=128, BV=32),
        num_warps=8,
    )
    build(
        chunk._bwd_wy_kernel,
        dict(k=bf, v=bf, beta=f32, gamma=f32, a_inv=f32, dvn=f32, dw=f32, dk_part=f32, dgamma_part=f32, dk=bf, dv=bf, dbeta=f32, dg=f32, T=i32),
        dict(gdn, BK=128, BV=32),
        num_warps=8,
    )
    build(
        paged._paged_decode_split_kernel,
        dict(
            q=bf, k_cache=bf, v_cache=bf, block_tables="*i32", seq_lens="*i32", m_part=f32, l_part=f32, acc_part=f32,
            scale="fp32", max_blocks=i32, tokens_per_split=i32, num_splits=i32,
        ),
        dict(HQ=32, HKV=8, D=128, BLOCK_SIZE=16, GROUP=4, BG=16, BD=128, BN=64, DT=tl.bfloat16),
        num_warps=8,
        num_stages=2,
    )
    build(paged._paged_decode_merge_kernel, dict(m_part=f32, l_part=f32, acc_part=f32, out=bf, num_splits=i32), dict(D=128, BS=16, BD=128))
    build(
        compact._kv_compact_kernel,
        dict(k_cache=bf, v_cache=bf, src_slots="*i64", dst_slots="*i64", n=i32),
        dict(ROW=1024, BN=32, BC=128),
        num_warps=8,
    )
    build(
        score._triattention_score_kernel,
        dict(k_cache=bf, block_table="*i32", a_re=f32, a_im=f32, spread=f32, out=f32, seq_len=i32),
        dict(HQ=32, HKV=8, D=128, HALF=64, BLOCK_SIZE=16, GROUP=4, BG=16, BH=64, BN=64),
        num_warps=8,
    )
    return sizes


if __name__ == "__main__":
    print(json.dumps(_compile_all()))

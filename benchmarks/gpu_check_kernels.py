"""GPU correctness check of both CUDA paths against the dense reference (part 1 of gpu_check.sh).

Random paged batches on the GPU (random block tables, chunks straddling the prompt
end, a later chunk of a long prompt, single and multi-token decode rows) in
bfloat16/float16 with head sizes 64/128/256; the Triton kernel, the flash-attn
path (vLLM's ``vllm_flash_attn``) and a CUDA-graph replay of the Triton kernel on
a uniform decode batch are each compared with :mod:`swaa_kernels.reference`
(float64). Prints one line per check and exits non-zero on any mismatch.
"""

from __future__ import annotations

import sys
import time

import torch

from swaa_kernels.cpu import LayerMaskSpec
from swaa_kernels.flash_attn_path import flash_attn_swaa_attention
from swaa_kernels.reference import reference_attention, swaa_mask
from swaa_kernels.triton_swaa import triton_paged_swaa_attention


def _flash_attn_importable() -> bool:
    """vLLM's bundled flash-attn is only there when the CUDA build of vLLM is installed."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func  # noqa: F401
    except (ImportError, OSError) as exc:
        print(f"SKIPPED flash-attn path: vllm.vllm_flash_attn does not import here ({exc}); "
              "install the CUDA build of vLLM 0.33 to check it", flush=True)
        return False
    return True


FLASH_ATTN = _flash_attn_importable()

DEV = "cuda"
TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make_batch(reqs, num_heads, num_kv_heads, head_size, dtype, block_size=16, seed=0):
    """Random paged batch; returns kernel args (device) and dense per-request K/V.

    Block 0 is vLLM's null block (zeros, in no request's table).
    """
    gen = torch.Generator(device=DEV).manual_seed(seed)
    nblk = [-(-s // block_size) for s, _, _ in reqs]
    num_blocks = sum(nblk) + 8
    kv = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_size, device=DEV, generator=gen).to(dtype)
    kv[0] = 0
    key_cache = kv.permute(0, 2, 1, 3)[..., :head_size]  # head-major memory, as vLLM's LBHNC
    value_cache = kv.permute(0, 2, 1, 3)[..., head_size:]
    perm = torch.randperm(num_blocks - 1, device=DEV, generator=gen).int() + 1
    table = torch.zeros(len(reqs), max(nblk), dtype=torch.int32, device=DEV)
    used, dense = 0, []
    for r, (seq_len, _, _) in enumerate(reqs):
        table[r, : nblk[r]] = perm[used : used + nblk[r]]
        used += nblk[r]
        pos = torch.arange(seq_len, device=DEV)
        blocks, offs = table[r, pos // block_size].long(), pos % block_size
        dense.append((key_cache[blocks, offs], value_cache[blocks, offs]))
    q_lens = [q for _, q, _ in reqs]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    query = torch.randn(sum(q_lens), num_heads, head_size, device=DEV, generator=gen).to(dtype)
    seq_lens = torch.tensor([s for s, _, _ in reqs], dtype=torch.int32)
    prompt_lens = torch.tensor([p for _, _, p in reqs], dtype=torch.int32)
    return query, key_cache, value_cache, table, qsl, seq_lens, prompt_lens, dense


def reference(query, qsl, reqs, dense, spec, scale):
    out = torch.zeros(query.shape, dtype=torch.float64, device=DEV)
    for r, (seq_len, q_len, prompt_len) in enumerate(reqs):
        q_pos = torch.arange(seq_len - q_len, seq_len, device=DEV)
        mask = swaa_mask(q_pos, torch.arange(seq_len, device=DEV), prompt_len, spec.window, spec.keep_first,
                         spec.fa_decode)
        out[qsl[r] : qsl[r + 1]] = reference_attention(query[qsl[r] : qsl[r + 1]], *dense[r], mask, scale)
    return out


REQS = [(3000, 3000, 2500), (5000, 1000, 6000), (4100, 1, 4000), (2100, 4, 2000), (700, 300, 650)]
SPECS = [LayerMaskSpec(512, 100, True), LayerMaskSpec(1, 0, False), LayerMaskSpec(300, 1000, True),
         LayerMaskSpec(None)]
SHAPES = [(32, 8, 128, torch.bfloat16), (16, 16, 64, torch.float16), (8, 2, 256, torch.bfloat16)]


def main() -> int:
    failures = 0
    for heads, kv_heads, head_size, dtype in SHAPES:
        query, kc, vc, table, qsl, seq_lens, prompt_lens, dense = make_batch(REQS, heads, kv_heads, head_size, dtype)
        scale = head_size**-0.5
        for spec in SPECS:
            ref = reference(query, qsl.tolist(), REQS, dense, spec, scale)
            results = {
                "triton": triton_paged_swaa_attention(
                    query, kc, vc, table, qsl.to(DEV), seq_lens.to(DEV), prompt_lens.to(DEV), spec, scale,
                    max_query_len=3000),
            }
            if FLASH_ATTN:
                results["flash_attn"] = flash_attn_swaa_attention(query, kc, vc, table, qsl, seq_lens, prompt_lens,
                                                                  spec, scale)
            for name, result in results.items():
                err = (result.double() - ref).abs().max().item()
                ok = err <= TOL[dtype]
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {name:10s} H={heads} Hkv={kv_heads} D={head_size} {dtype} "
                      f"{spec}: max abs err {err:.2e}", flush=True)
    failures += check_freed_blocks()
    failures += check_cuda_graph_decode()
    failures += time_prefill_kernels()
    return 1 if failures else 0


def check_freed_blocks() -> int:
    """Sliding-decode layers: blocks the sink-window KV manager frees hold NaN; neither path may load one.

    The freed blocks of a request: fully inside ``[k, first_query - W + 1)``
    (``swaa_vllm/sink_window_cache.gap_blocks``); the worker's block table still names them.
    """
    failures = 0
    spec, block_size = LayerMaskSpec(512, 100, False), 16
    query, kc, vc, table, qsl, seq_lens, prompt_lens, dense = make_batch(REQS, 32, 8, 128, torch.bfloat16)
    poisoned = 0
    for r, (seq_len, q_len, _) in enumerate(REQS):
        first = -(-spec.keep_first // block_size)
        end = max(0, seq_len - q_len - spec.window + 1) // block_size
        for b in range(first, end):
            kc[table[r, b].long()] = float("nan")
            vc[table[r, b].long()] = float("nan")
            poisoned += 1
    ref = reference(query, qsl.tolist(), REQS, dense, spec, 128**-0.5)
    results = {"triton": triton_paged_swaa_attention(query, kc, vc, table, qsl.to(DEV), seq_lens.to(DEV),
                                                     prompt_lens.to(DEV), spec, 128**-0.5, max_query_len=3000)}
    if FLASH_ATTN:
        results["flash_attn"] = flash_attn_swaa_attention(query, kc, vc, table, qsl, seq_lens, prompt_lens, spec,
                                                          128**-0.5)
    for name, result in results.items():
        err = (result.double() - ref).abs().max().item()
        ok = err <= TOL[torch.bfloat16]  # NaN compares False
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name:10s} {poisoned} freed (NaN) blocks, {spec}: max abs err {err:.2e}",
              flush=True)
    return failures


def check_cuda_graph_decode() -> int:
    """Capture the Triton kernel on a uniform decode batch, change lengths in place, replay."""
    reqs = [(2000, 1, 1500), (3000, 1, 3000), (1000, 1, 10), (2500, 1, 2500)]
    spec, dtype = LayerMaskSpec(256, 64, True), torch.bfloat16
    query, kc, vc, table, qsl, seq_lens, prompt_lens, dense = make_batch(reqs, 32, 8, 128, dtype, seed=1)
    qsl_d, seq_d, prompt_d = qsl.to(DEV), seq_lens.to(DEV), prompt_lens.to(DEV)
    out = torch.empty_like(query)

    def run():
        triton_paged_swaa_attention(query, kc, vc, table, qsl_d, seq_d, prompt_d, spec, 0.088, out=out,
                                    max_query_len=1)

    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    failures = 0
    for step, (new_seq, new_prompt) in enumerate([([2000, 3000, 1000, 2500], [1500, 3000, 10, 2500]),
                                                  ([1999, 2800, 900, 2500], [1999, 100, 900, 2400])]):
        seq_d.copy_(torch.tensor(new_seq, dtype=torch.int32))
        prompt_d.copy_(torch.tensor(new_prompt, dtype=torch.int32))
        graph.replay()
        cur = [(s, 1, p) for s, p in zip(new_seq, new_prompt, strict=True)]
        cur_dense = [(k[:s], v[:s]) for (k, v), s in zip(dense, new_seq, strict=True)]
        err = (out.double() - reference(query, qsl.tolist(), cur, cur_dense, spec, 0.088)).abs().max().item()
        ok = err <= TOL[dtype]
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} cuda-graph decode replay {step}: max abs err {err:.2e}", flush=True)
    return failures


def time_prefill_kernels() -> int:
    """Attention-only timing of one 32k prefill, W=2048 k=100: both SWAA paths vs full causal."""
    n = 32768
    query, kc, vc, table, qsl, seq_lens, prompt_lens, _ = make_batch([(n, n, n)], 32, 8, 128, torch.bfloat16,
                                                                      seed=2)
    args_dev = (query, kc, vc, table, qsl.to(DEV), seq_lens.to(DEV), prompt_lens.to(DEV))
    args_cpu = (query, kc, vc, table, qsl, seq_lens, prompt_lens)
    cases = {
        "triton swaa": lambda: triton_paged_swaa_attention(*args_dev, LayerMaskSpec(2048, 100, True), 0.088,
                                                           max_query_len=n),
        "flash_attn swaa": lambda: flash_attn_swaa_attention(*args_cpu, LayerMaskSpec(2048, 100, True), 0.088),
        "triton full": lambda: triton_paged_swaa_attention(*args_dev, LayerMaskSpec(None), 0.088, max_query_len=n),
        "flash_attn full": lambda: flash_attn_swaa_attention(*args_cpu, LayerMaskSpec(None), 0.088),
    }
    if not FLASH_ATTN:
        cases = {name: fn for name, fn in cases.items() if not name.startswith("flash_attn")}
    for name, fn in cases.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        print(f"time {name:16s} 32k-token prefill, one layer: {(time.perf_counter() - t0) / 3 * 1e3:.2f} ms",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Micro-benchmark: the SWAA CPU attention op alone against torch's fused causal attention.

Same shapes as the bundled model's layers (9 query heads, 3 KV heads, head size 64,
bf16, block size 128). For each prompt length n it times one layer's

* prefill of n tokens: torch's ``scaled_dot_product_attention(is_causal=True)`` on
  contiguous tensors (the reference point the issue names), vLLM's CPU attention op
  (``CPU_ATTN``'s kernel) over the paged cache, and ``swaa_kernels.cpu.paged_swaa_attention``
  as the backend runs it for a full layer and for a sliding layer (W, k);
  the sliding layer twice: sink-window rows on the native C++ kernel and on the torch path
  (``sink_window_kernel``; the native column is empty where the kernel does not build);
* decode of one token at context n: the same.

Each repeat times every variant once, in turn, and the table gives medians over the repeats
(a 2-core VM drifts by more than the differences measured; interleaving keeps the ratios
within one row honest). It prints the times with the ratios ``sdpa / swaa`` (prefill: the
FLOP ratio of a sliding layer against a full one is ``n / 2 / (W + k)`` roughly), and for
prefill the FLOP rates: ``4 * heads * head_size`` per query-key pair the mask lets a row see
(:func:`swaa_vllm.evaluation.costs.visible_pairs`) per second, for vLLM's op (causal) and for
the swaa sliding layer (its sink-window rows, plus the early rows that go to the op), and their
ratio ``sliding rate / op rate`` (issue 16's target: >= 0.9). dtype: bfloat16 on CPUs with
native bf16, float32 elsewhere (``--dtype``).

Those columns use the cache layout every reader knows (ISA ``vec``), and the native kernel runs
without AMX tiles there (``amx_tiles=False``: its VDPBF16PS path for bfloat16), so on an AMX CPU
they stand for a CPU with AVX512_BF16 but no AMX on both sides. Where ``CPU_ATTN`` picks
another ISA for this dtype (``amx``: bfloat16 on CPUs with AMX tiles), the last columns repeat
the op and the native sliding layer on a cache in that layout, as the backend runs them there
(``swaa_vllm.platforms.cpu_attention_op.layer_cache_isa``; the kernel on AMX tiles). Run:
``.venv/bin/python benchmarks/attention_micro.py [--lengths 2048 8192] [--window 1024 --keep-first 64]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from swaa_kernels import sink_window_native
from swaa_kernels.cpu import (
    LayerMaskSpec,
    paged_swaa_attention,
    plan_rows,
    torch_paged_attention,
    write_kv_cache,
    write_kv_cache_amx,
)
from swaa_vllm.evaluation.costs import visible_pairs
from swaa_vllm.platforms.cpu_attention_op import VllmCpuPagedAttention, cpu_attention_isa, layer_cache_isa
from swaa_vllm.platforms.cpu_features import benchmark_dtype, cpu_model, describe

HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 9, 3, 64, 128


def _time_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function; each repeat calls every function once, in turn.

    The order rotates by one per repeat, so no function always runs after the same neighbour (a
    sub-millisecond decode call is slower right after a long prefill call on these VMs).
    """
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            fn = fns[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--keep-first", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per variant (median)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bfloat16 with native bf16 (AVX-512 BF16 / AMX), else float32")
    args = parser.parse_args()
    if args.dtype == "auto":
        args.dtype = benchmark_dtype()
    dtype = getattr(torch, args.dtype)
    scale = HEAD_SIZE**-0.5
    vllm_op = VllmCpuPagedAttention(cpu_attention_isa(BLOCK, HEAD_SIZE))
    # The ISA CPU_ATTN runs for this dtype; the swaa backend takes it too where the native kernel serves its rows.
    native_isa = layer_cache_isa(dtype, BLOCK, HEAD_SIZE, amx_readable=True)
    isa_op = VllmCpuPagedAttention(native_isa)
    sliding = LayerMaskSpec(args.window, args.keep_first, True)
    full = LayerMaskSpec(None)
    try:
        sink_window_native.load()
        native = True
    except sink_window_native.NativeKernelError as exc:
        print(f"native sink-window kernel unavailable: {exc}")
        native = False
    print(f"{cpu_model()}, {describe()}; threads={torch.get_num_threads()} dtype={args.dtype} W={args.window} "
          f"k={args.keep_first} repeats={args.repeats} (medians); CPU_ATTN's ISA for {args.dtype}: {native_isa}")
    print("| phase | tokens | sdpa causal (ms) | vLLM op (ms) | swaa full layer (ms) | swaa sliding, native (ms) "
          "| swaa sliding, torch sink-window (ms) | torch-only swaa sliding (ms) | sdpa/swaa full "
          "| sdpa/swaa sliding native | op GFLOP/s | sliding native GFLOP/s | sliding torch GFLOP/s "
          "| sliding rate / op rate: native | torch "
          f"| op, isa {native_isa} (ms) | sliding native, isa {native_isa} (ms) "
          f"| sliding rate / op rate, isa {native_isa} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.lengths:
        q = torch.randn(n, HEADS, HEAD_SIZE, dtype=dtype)
        k = torch.randn(n, KV_HEADS, HEAD_SIZE, dtype=dtype)
        v = torch.randn(n, KV_HEADS, HEAD_SIZE, dtype=dtype)
        blocks = -(-n // BLOCK)
        kv_cache = torch.zeros(blocks, KV_HEADS, BLOCK, 2 * HEAD_SIZE, dtype=dtype)
        write_kv_cache(k, v, kv_cache, torch.arange(n))
        isa_cache = kv_cache
        if native_isa == "amx":
            isa_cache = torch.zeros_like(kv_cache)
            write_kv_cache_amx(k, v, isa_cache, torch.arange(n))
        table = torch.arange(blocks, dtype=torch.int32)[None]
        seq = torch.tensor([n], dtype=torch.int32)
        for phase, q_len in (("prefill", n), ("decode", 1)):
            query = q[-q_len:]
            qsl = torch.tensor([0, q_len], dtype=torch.int32)
            prompt = seq if phase == "prefill" else seq - 1
            reps = args.repeats if phase == "prefill" else 20 * args.repeats

            # Each closure is timed within its iteration; the defaults bind this iteration's tensors.
            def swaa(spec, prim=vllm_op, kernel="torch", query=query, qsl=qsl, prompt=prompt, kv_cache=kv_cache,
                     table=table, seq=seq, layout="vec"):
                # AMX tiles only beside the op's amx ISA: the vec columns are a CPU without AMX on both sides.
                return lambda: paged_swaa_attention(query, kv_cache, table, qsl, seq, prompt, spec, scale,
                                                    paged_attention=prim, sink_window_kernel=kernel,
                                                    cache_layout=layout, amx_tiles=layout == "amx")

            def sdpa(query=query, q_len=q_len, k=k, v=v):
                # Prefill: causal over n; decode: one query over all n keys (no mask needed).
                F.scaled_dot_product_attention(query.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                               v.transpose(0, 1)[None], is_causal=q_len > 1, scale=scale,
                                               enable_gqa=True)

            def op(query=query, qsl=qsl, kv_cache=kv_cache, table=table, seq=seq, prim=vllm_op):
                batch = plan_rows(qsl, seq, seq, table, full).causal
                prim(query, kv_cache, batch, scale, torch.empty_like(query))

            fns = {"sdpa": sdpa, "op": op, "full": swaa(full), "slide_torch": swaa(sliding),
                   "torch_only": swaa(sliding, torch_paged_attention)}
            if native:
                fns["slide_native"] = swaa(sliding, kernel="native")
            if native_isa != "vec":
                fns["op_isa"] = lambda op=op, isa_cache=isa_cache: op(kv_cache=isa_cache, prim=isa_op)
                if native:
                    fns["slide_native_isa"] = swaa(sliding, isa_op, "native", kv_cache=isa_cache,
                                                   layout=isa_op.cache_layout)
            t = _time_interleaved(fns, reps)
            t.setdefault("op_isa", t["op"])
            t.setdefault("slide_native_isa", t.get("slide_native", float("nan")))
            t_native = t.get("slide_native", float("nan"))
            rates = "| | | | |"
            isa_rate = ""
            if phase == "prefill":
                per_pair = 4.0 * HEADS * HEAD_SIZE
                op_rate = per_pair * visible_pairs(n, None) / t["op"] / 1e9
                pairs = per_pair * visible_pairs(n, (args.window, args.keep_first))
                native_rate, torch_rate = pairs / t_native / 1e9, pairs / t["slide_torch"] / 1e9
                rates = (f"{op_rate:.1f} | {native_rate:.1f} | {torch_rate:.1f} | {native_rate / op_rate:.2f} "
                         f"| {torch_rate / op_rate:.2f} |")
                isa_op_rate = per_pair * visible_pairs(n, None) / t["op_isa"] / 1e9
                isa_rate = f"{pairs / t['slide_native_isa'] / 1e9 / isa_op_rate:.2f}"
            print(f"| {phase} | {n} | {t['sdpa'] * 1e3:.2f} | {t['op'] * 1e3:.2f} | {t['full'] * 1e3:.2f} "
                  f"| {t_native * 1e3:.2f} | {t['slide_torch'] * 1e3:.2f} | {t['torch_only'] * 1e3:.2f} "
                  f"| {t['sdpa'] / t['full']:.2f} | {t['sdpa'] / t_native:.2f} | {rates} {t['op_isa'] * 1e3:.2f} "
                  f"| {t['slide_native_isa'] * 1e3:.2f} | {isa_rate} |", flush=True)


if __name__ == "__main__":
    main()

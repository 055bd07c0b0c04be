"""Micro-benchmark: the SWAA CPU attention op against torch's fused causal attention.

Same shapes as the bundled model's layers (9 query heads, 3 KV heads, head size 64).
Prints, per prompt length, the time of one prefill of a sliding layer (W, k) and of a
full layer through ``swaa_kernels.cpu.paged_swaa_attention``, against
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` on the same
tensors, and the ratios. Run: ``.venv/bin/python benchmarks/attention_micro.py``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from swaa_kernels.cpu import LayerMaskSpec, paged_swaa_attention

HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 9, 3, 64, 128


def _time(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--keep-first", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"threads={torch.get_num_threads()} dtype={args.dtype} W={args.window} k={args.keep_first}")
    print("| tokens | sdpa causal (s) | swaa full layer (s) | swaa sliding layer (s) | sdpa/full | sdpa/sliding |")
    print("|---|---|---|---|---|---|")
    for n in args.lengths:
        q = torch.randn(n, HEADS, HEAD_SIZE, dtype=dtype)
        k = torch.randn(n, KV_HEADS, HEAD_SIZE, dtype=dtype)
        v = torch.randn(n, KV_HEADS, HEAD_SIZE, dtype=dtype)
        blocks = -(-n // BLOCK)
        kc = k.new_zeros(blocks * BLOCK, KV_HEADS, HEAD_SIZE)
        vc = v.new_zeros(blocks * BLOCK, KV_HEADS, HEAD_SIZE)
        kc[:n], vc[:n] = k, v
        kc, vc = kc.view(blocks, BLOCK, KV_HEADS, HEAD_SIZE), vc.view(blocks, BLOCK, KV_HEADS, HEAD_SIZE)
        table = torch.arange(blocks, dtype=torch.int32)[None]
        qsl, seq = torch.tensor([0, n]), torch.tensor([n])
        scale = HEAD_SIZE**-0.5

        def run(spec):
            return lambda: paged_swaa_attention(q, kc, vc, table, qsl, seq, seq, spec, scale)

        def sdpa():
            F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           is_causal=True, scale=scale, enable_gqa=True)

        t_sdpa = _time(sdpa, args.repeats)
        t_full = _time(run(LayerMaskSpec(window=None)), args.repeats)
        t_slide = _time(run(LayerMaskSpec(args.window, args.keep_first, True)), args.repeats)
        print(f"| {n} | {t_sdpa:.3f} | {t_full:.3f} | {t_slide:.3f} | {t_sdpa / t_full:.2f} | {t_sdpa / t_slide:.2f} |")


if __name__ == "__main__":
    main()

"""Micro-benchmark: what the swaa backend costs per decode step on CPU beyond vLLM's ``CPU_ATTN``.

Issue 16 asks for decode at >= 1.0x ``CPU_ATTN`` and for the per-step overhead to be found and
removed. Without a ``swaa_config`` (and for every layer under full-attention decode) a decode row
of the swaa backend runs vLLM's own C++ op, so any difference is the Python around it. This
script times that directly, with both backends' real attention classes
(``vllm/v1/attention/backends/cpu_attn.py``'s ``CPUAttentionBackendImpl`` and
``swaa_vllm.backend.SwaaAttentionImpl``) on the bundled model's layer shape (9 query heads,
3 KV heads, head size 64, block size 128), one decode token of one request:

* one step = the step's attention metadata (``CPU_ATTN``: its builder's scheduler-metadata call;
  swaa: :class:`~swaa_vllm.backend.SwaaMetadata`, whose row plan and scheduler metadata the first
  layer computes), then ``--layers`` x (``do_kv_cache_update`` + ``forward``);
* the two backends alternate step by step (``--steps`` each), medians per step.

At a short context (default 256 keys) the op itself is cheap and the difference is the Python
per step; at the decode context of ``make bench`` (8192) it is set against the whole attention
time. ``--rows N`` times the last N prompt rows of a prefill chunk instead (the same op for both
backends without ``swaa_config``). vLLM's model-runner work outside attention (the same for both
backends) is not included.
Run: ``.venv/bin/python benchmarks/decode_overhead.py [--contexts 256 8192] [--steps 200]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadata

from swaa_vllm.backend import SwaaAttentionImpl, SwaaMetadata
from swaa_vllm.platforms.cpu_attention_op import vllm_attention_isa
from swaa_vllm.platforms.cpu_features import benchmark_dtype, cpu_model, describe

HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 9, 3, 64, 128


def _layer(index: int, isa: str):
    """The attributes of vLLM's ``Attention`` layer that the two forwards read."""
    return types.SimpleNamespace(layer_name=f"model.layers.{index}.self_attn.attn", isa=isa,
                                 _k_scale_float=1.0, _v_scale_float=1.0)


def step_times(context: int, layers: int, steps: int, dtype: torch.dtype, rows: int = 1) -> dict[str, float]:
    """Median seconds per step of each backend: ``rows`` query rows (1: a decode row; more: the last rows of a
    prefill chunk, all prompt tokens) of one request at ``context`` keys (steps interleaved).

    Raises:
        RuntimeError: if the two backends' outputs of the last layer differ (they run the same op).
    """
    isa = vllm_attention_isa(dtype, BLOCK, HEAD_SIZE)  # CPU_ATTN's; the swaa impl takes it too (full layers)
    if isa == "amx":
        torch.cpu._init_amx()  # vLLM's op does not ask Linux for AMX tiles (SIGILL without)
    scale = HEAD_SIZE**-0.5
    gen = torch.Generator().manual_seed(0)
    num_blocks = context // BLOCK + 1
    caches = [torch.randn(num_blocks, KV_HEADS, BLOCK, 2 * HEAD_SIZE, generator=gen).to(dtype) for _ in range(layers)]
    query = torch.randn(rows, HEADS, HEAD_SIZE, generator=gen).to(dtype)
    key = torch.randn(rows, KV_HEADS, HEAD_SIZE, generator=gen).to(dtype)
    value = torch.randn(rows, KV_HEADS, HEAD_SIZE, generator=gen).to(dtype)
    out = torch.empty_like(query)
    block_table = torch.arange(num_blocks, dtype=torch.int32)[None]
    query_start_loc = torch.tensor([0, rows], dtype=torch.int32)
    seq_lens = torch.tensor([context], dtype=torch.int32)
    prompt_lens = torch.tensor([context - 1 if rows == 1 else context], dtype=torch.int32)
    slot_mapping = torch.arange(context - rows, context, dtype=torch.int64)
    layer_objs = [_layer(i, isa) for i in range(layers)]
    # One impl per layer, as vLLM builds them (each Attention layer owns its impl; the swaa impl keeps its
    # layer's cache views and op, so one impl shared by every layer would redo them at each layer).
    cpu_attns = [CPUAttentionBackendImpl(HEADS, HEAD_SIZE, scale, KV_HEADS, None, None, "auto") for _ in layer_objs]
    swaas = [SwaaAttentionImpl(HEADS, HEAD_SIZE, scale, KV_HEADS) for _ in layer_objs]

    def cpu_attn_step() -> None:
        metadata = CPUAttentionMetadata(
            num_actual_tokens=rows, max_query_len=rows, query_start_loc=query_start_loc, max_seq_len=context,
            seq_lens=seq_lens, block_table=block_table, slot_mapping=slot_mapping,
            scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
                num_reqs=1, num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_SIZE, seq_lens=seq_lens,
                dtype=dtype, query_start_loc=query_start_loc, causal=True, sliding_window_size=-1, isa=isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype="auto"),
        )
        for cpu_attn, layer, kv_cache in zip(cpu_attns, layer_objs, caches, strict=True):
            cpu_attn.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
            cpu_attn.forward(layer, query, key, value, kv_cache, metadata, out)

    def swaa_step() -> None:
        metadata = SwaaMetadata(num_actual_tokens=rows, query_start_loc=query_start_loc, seq_lens=seq_lens,
                                prompt_lens=prompt_lens, block_table=block_table)
        for swaa, layer, kv_cache in zip(swaas, layer_objs, caches, strict=True):
            swaa.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
            swaa.forward(layer, query, key, value, kv_cache, metadata, out)

    fns = {"CPU_ATTN": cpu_attn_step, "swaa": swaa_step}
    outputs = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()  # warm-up
        outputs[name] = out.clone()
    if not torch.equal(outputs["CPU_ATTN"], outputs["swaa"]):  # both must run the same op on the same rows
        raise RuntimeError("the two backends' decode outputs differ; the timing would compare different work")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(steps):
        for name in (("CPU_ATTN", "swaa") if i % 2 == 0 else ("swaa", "CPU_ATTN")):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 8192], help="keys per decode row")
    parser.add_argument("--layers", type=int, default=30, help="attention layers per step (bundled model: 30)")
    parser.add_argument("--steps", type=int, default=200, help="steps per backend (interleaved, median)")
    parser.add_argument("--rows", type=int, default=1,
                        help="query rows per step: 1 = a decode row (default); N > 1 = the last N prompt rows of a "
                             "prefill chunk (each context must be >= N)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bfloat16 with native bf16 (AVX-512 BF16 / AMX), else float32")
    parser.add_argument("--model", default=None,
                        help="model directory for vLLM's config (default: the bundled model, prepared if needed)")
    args = parser.parse_args(argv)
    if min(args.contexts) < 2 or args.layers < 1 or args.steps < 1 or args.rows < 1:
        parser.error("--contexts must be >= 2, --layers, --steps and --rows >= 1")
    if args.rows > min(args.contexts):
        parser.error(f"--rows {args.rows} exceeds the shortest --contexts {min(args.contexts)}")
    dtype_name = benchmark_dtype() if args.dtype == "auto" else args.dtype
    dtype = getattr(torch, dtype_name)
    if args.model is None:
        from swaa_vllm.models.bundled import prepare_model

        args.model = str(prepare_model())
    config = VllmConfig(model_config=ModelConfig(model=args.model, dtype=dtype_name))
    what = "one decode row" if args.rows == 1 else f"{args.rows} prefill rows"
    print(f"{cpu_model()}, {describe()}, {torch.get_num_threads()} threads, {dtype_name}; {args.layers} layers, "
          f"{what}, {args.steps} interleaved steps per backend (medians)")
    print("| context (keys) | CPU_ATTN step (us) | swaa step (us) | swaa - CPU_ATTN per step (us) | per layer (us) "
          "| swaa / CPU_ATTN |")
    print("|---|---|---|---|---|---|")
    rows = []
    with set_current_vllm_config(config):
        for context in args.contexts:
            t = step_times(context, args.layers, args.steps, dtype, args.rows)
            extra = (t["swaa"] - t["CPU_ATTN"]) * 1e6
            rows.append({"context": context, **t, "extra_us": extra})
            print(f"| {context} | {t['CPU_ATTN'] * 1e6:.0f} | {t['swaa'] * 1e6:.0f} | {extra:+.0f} | "
                  f"{extra / args.layers:+.1f} | {t['swaa'] / t['CPU_ATTN']:.3f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()

"""What a SWAA plan costs, by formula: prefill and decode FLOPs, KV cache bytes and blocks per request.

One definition shared by the CPU speed benchmarks (``benchmarks/cpu_e2e.py``,
``benchmarks/serve_bench.py``), the KV memory benchmark (``benchmarks/kv_memory.py``) and the accuracy harness's table
(:mod:`swaa_vllm.evaluation.report`), so a plan's accuracy, speed and memory are quoted from
the same model.

* **Prefill FLOPs** (:func:`prefill_flops`): the linear layers (q/k/v/o projections and the
  MLP, ``2 x parameters`` per token), one logits row, and attention at
  ``4 x heads x head_dim`` per query-key pair a layer's mask lets a prompt token see
  (``shared/SWAA.md``: rows ``i >= W + k`` see ``k + W`` keys, earlier rows ``i + 1``).
* **KV blocks per request** (:func:`kv_blocks_per_request`): ``ceil(n / B)`` per layer that
  keeps every block (full layers, FA-decode layers), and vLLM's sink-window bound
  (:func:`swaa_vllm.sink_window_cache.max_sink_window_blocks`) per layer that slides while
  decoding, at chunked-prefill budget ``c``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from swaa_vllm.config import build_plan

__all__ = ["ModelShape", "decode_flops", "kv_blocks_per_request", "prefill_flops", "prefill_speedup_bound",
           "prompt_masks", "visible_pairs"]


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-architecture config the cost model needs."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, cfg: dict) -> ModelShape:
        """From a Hugging Face ``config.json`` dict."""
        heads = cfg["num_attention_heads"]
        return cls(cfg["hidden_size"], cfg["num_hidden_layers"], heads, cfg.get("num_key_value_heads", heads),
                   cfg.get("head_dim") or cfg["hidden_size"] // heads, cfg["intermediate_size"], cfg["vocab_size"])

    def kv_bytes_per_token(self, dtype: str) -> int:
        """KV cache bytes one token takes over all layers: ``layers x kv_heads x head_dim x 2`` (K and V)
        elements of 4 bytes for ``"float32"``, 2 for the 16-bit dtypes."""
        return self.layers * self.kv_heads * self.head_dim * 2 * (4 if dtype == "float32" else 2)

    def linear_flops_per_token(self) -> float:
        """2 * parameters touched per token in one forward (projections and MLP, all layers)."""
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 3 * self.hidden * self.intermediate
        return 2.0 * self.layers * (q_o + k_v + mlp)


def visible_pairs(n: int, layer: tuple[int, int] | None) -> float:
    """Query-key pairs a prompt of n tokens attends in one layer: ``layer`` = (W, k), None for full."""
    full = n * (n + 1) / 2
    if layer is None:
        return full
    w, k = layer
    span = w + k  # rows i >= W + k see k sinks + W window keys; earlier rows see i + 1 keys
    if n <= span:
        return full
    return span * (span + 1) / 2 + (n - span) * span


def prefill_flops(shape: ModelShape, layers: Sequence[tuple[int, int] | None], n: int) -> float:
    """FLOPs of prefilling n tokens; ``layers``: per layer (W, k) if its prompt rows slide, else None."""
    attention = sum(4.0 * shape.heads * shape.head_dim * visible_pairs(n, layer) for layer in layers)
    return n * shape.linear_flops_per_token() + attention + 2.0 * shape.vocab * shape.hidden


def decode_flops(shape: ModelShape, context: int) -> float:
    """FLOPs of one decode step with full attention over ``context`` keys in every layer (FA decode)."""
    return shape.linear_flops_per_token() + 4.0 * shape.heads * shape.head_dim * context * shape.layers


def prompt_masks(swaa_config: dict | None, num_layers: int) -> list[tuple[int, int] | None]:
    """Per layer, (W, k) if its prompt rows slide under ``swaa_config``, else None (the input of :func:`prefill_flops`).

    Raises:
        SwaaConfigError: an invalid ``swaa_config``.
    """
    plan = build_plan(swaa_config, num_layers)
    return [None if spec.is_full else (spec.window, spec.keep_first) for spec in plan.layers]


def prefill_speedup_bound(shape: ModelShape, swaa_config: dict | None, n: int) -> float:
    """Full attention's prefill FLOPs over the plan's, for an n-token prompt (>= 1)."""
    return prefill_flops(shape, [None] * shape.layers, n) / prefill_flops(
        shape, prompt_masks(swaa_config, shape.layers), n)


def kv_blocks_per_request(swaa_config: dict | None, num_layers: int, n: int, block_size: int,
                          chunk: int) -> int:
    """KV cache blocks (one layer's page each) an n-token request holds at most, over all layers.

    Raises:
        SwaaConfigError: an invalid ``swaa_config``.
    """
    from swaa_vllm.sink_window_cache import max_sink_window_blocks

    plan = build_plan(swaa_config, num_layers)
    every_block = -(-n // block_size)
    total = 0
    for spec in plan.layers:
        if spec.is_full or spec.fa_decode:
            total += every_block
        else:
            total += max_sink_window_blocks(spec.window, spec.keep_first, block_size, chunk, n)  # <= every_block
    return total

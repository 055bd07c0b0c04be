"""Features that cannot honour the SWAA mask are refused with a message, never bypassed."""

from __future__ import annotations

import types

import pytest
import torch

from swaa_vllm.backend import SwaaAttentionBackend, SwaaAttentionImpl, SwaaMetadataBuilder


@pytest.mark.parametrize(
    ("kwargs", "what"),
    [
        ({"alibi_slopes": [1.0, 0.5]}, "ALiBi"),
        ({"sliding_window": 4096}, "their own sliding window"),
        ({"logits_soft_cap": 30.0}, "soft-capping"),
        ({"sinks": torch.zeros(2)}, "attention-sink logits"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype='fp8'"),
        ({"attn_type": "encoder_only"}, "attention type"),
        ({"kv_sharing_target_layer_name": "model.layers.0.self_attn.attn"}, "KV sharing"),
    ],
)
def test_impl_refuses_features_the_mask_cannot_honour(kwargs, what):
    with pytest.raises(NotImplementedError, match=what):
        SwaaAttentionImpl(num_heads=2, head_size=64, scale=0.125, num_kv_heads=1, **kwargs)


def test_cascade_attention_is_refused():
    builder = SwaaMetadataBuilder(types.SimpleNamespace(), ["model.layers.0.self_attn.attn"], None, torch.device("cpu"))
    builder.prompt_lengths = types.SimpleNamespace(for_batch=lambda cm: torch.tensor([4], dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="cascade"):
        builder.build(common_prefix_len=16, common_attn_metadata=types.SimpleNamespace())


def test_builder_without_prompt_lengths_says_how_to_fix():
    builder = SwaaMetadataBuilder(types.SimpleNamespace(), [], None, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="worker-cls"):
        builder.build(common_prefix_len=0, common_attn_metadata=types.SimpleNamespace())


def test_kv_connectors_are_refused():
    reasons = SwaaAttentionBackend.validate_configuration(
        head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16, use_mla=False, has_sink=False,
        use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False, device_capability=None,
        attn_type="decoder", use_kv_connector=True,
    )
    assert "KV connector not supported" in reasons


def _impl_for(monkeypatch, swaa_config):
    import swaa_vllm.backend as backend

    hf_config = types.SimpleNamespace(num_hidden_layers=4, model_type="llama", swaa_config=swaa_config)
    monkeypatch.setattr(
        backend, "get_current_vllm_config", lambda: types.SimpleNamespace(model_config=types.SimpleNamespace(
            hf_config=hf_config))
    )
    backend.cpu_sink_window_kernel.cache_clear()
    try:
        return SwaaAttentionImpl(num_heads=2, head_size=64, scale=0.125, num_kv_heads=1)
    finally:
        backend.cpu_sink_window_kernel.cache_clear()


def test_bad_sink_window_kernel_choice_stops_model_construction(monkeypatch):
    """SWAA_CPU_SINK_WINDOW_KERNEL is read when the layers are built (start-up), not at the first request."""
    monkeypatch.setenv("SWAA_CPU_SINK_WINDOW_KERNEL", "fastest")
    with pytest.raises(ValueError, match="SWAA_CPU_SINK_WINDOW_KERNEL must be auto, native or torch"):
        _impl_for(monkeypatch, {"sliding_window_size": 16, "keep_first": 4})
    monkeypatch.setenv("SWAA_CPU_SINK_WINDOW_KERNEL", "torch")
    assert _impl_for(monkeypatch, {"sliding_window_size": 16, "keep_first": 4})._sink_window_kernel == "torch"
    monkeypatch.setenv("SWAA_CPU_SINK_WINDOW_KERNEL", "native")
    assert _impl_for(monkeypatch, {"sliding_window_size": 16, "keep_first": 4})._sink_window_kernel == "native"


def test_models_without_sink_window_layers_never_build_the_kernel(monkeypatch):
    import swaa_vllm.backend as backend

    monkeypatch.setattr(backend, "kernel_choice", lambda: pytest.fail("kernel chosen without sink-window layers"))
    for swaa_config in (None, {"sliding_window_size": 16, "keep_first": 0}):
        assert _impl_for(monkeypatch, swaa_config)._sink_window_kernel == "torch"
        monkeypatch.setenv("SWAA_CPU_SINK_WINDOW_KERNEL", "bogus")  # still refused, though never used
        with pytest.raises(ValueError, match="SWAA_CPU_SINK_WINDOW_KERNEL must be auto, native or torch"):
            _impl_for(monkeypatch, swaa_config)
        monkeypatch.delenv("SWAA_CPU_SINK_WINDOW_KERNEL")

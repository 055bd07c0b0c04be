"""The Triton SWAA kernel (``kernels/triton_swaa.py``) without a GPU.

1. ``test_interpreted_cases``: runs ``tests/triton_interp_cases.py`` (kernel vs the
   dense reference on random paged batches, W/k edge cases, chunks straddling the
   prompt end, the tile-visit count) in a child pytest with ``TRITON_INTERPRET=1``.
   A child process because Triton decides interpreted-or-compiled once, for the
   whole process, when it is imported (and ``@triton.jit`` when it decorates): a
   private interpreted copy of the module fails as soon as the kernel calls
   Triton's own compiled-mode helpers, and setting the variable here would leak
   into vLLM, which imports Triton too. The child's output is shown on failure.
2. ``test_compiles_for_sm90``: compiles the kernel (no GPU needed: Triton's
   bundled NVIDIA backend and ptxas) for sm_90 at the launch configurations the
   backend uses, in bfloat16/float16 and head sizes 64/128/256, which catches what
   the interpreter does not check (types across branches, constexpr use, dot
   shapes, shared memory).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_interpreted_cases():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/triton_interp_cases.py"],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreted Triton kernel tests failed:\n{tail}"
    assert " passed" in tail and "skipped" not in tail.split("\n")[-2], tail


def _nvidia_backend_or_skip():
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - depends on the Triton wheel
        pytest.skip(f"Triton's NVIDIA backend is not importable: {exc}")
    return triton, GPUTarget, ASTSource


@pytest.mark.parametrize(
    "dtype,head_size,group,max_query_len,is_full,fa_decode,count",
    [
        ("bf16", 128, 4, None, False, True, False),  # prefill, Qwen3-4B-shaped
        ("fp16", 256, 4, None, False, False, False),
        ("bf16", 64, 8, 1, True, False, False),  # decode config, full layer
        ("bf16", 128, 3, 1, False, True, True),  # odd group, tile counting on
    ],
)
def test_compiles_for_sm90(dtype, head_size, group, max_query_len, is_full, fa_decode, count, tmp_path, monkeypatch):
    triton, GPUTarget, ASTSource = _nvidia_backend_or_skip()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    from swaa_kernels import triton_swaa

    kernel = triton_swaa._swaa_paged_kernel
    cfg = triton_swaa.kernel_config(group, head_size, max_query_len)
    constexprs = {
        "IS_FULL": is_full, "FA_DECODE": fa_decode, "GROUP": group,
        "BLOCK_Q": cfg["BLOCK_Q"], "BLOCK_M": cfg["BLOCK_M"],
        "TILE_N": cfg["TILE_N"], "HEAD_SIZE": head_size, "HEAD_PAD": triton.next_power_of_2(head_size),
        "KV_BLOCK_SIZE": 16, "COUNT_TILES": count,
    }
    pointers = {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "o_ptr": dtype}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        elif name.endswith("_ptr"):
            signature[name] = "*i32"
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg["num_warps"]})
    assert "cubin" in compiled.asm
    assert compiled.metadata.shared <= 227 * 1024  # H100/H200 shared memory per block

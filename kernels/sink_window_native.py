"""The native (C++) sink-window attention kernel for CPU: build, load and call.

``kernels/sink_window_cpu.cpp`` is a flash-attention forward specialised to SWAA's sink-window
rows (each row sees the sinks ``[0, k)`` and its window ``(i - W, i]``), vectorised with AVX-512
(bfloat16 products with VDPBF16PS, or on AMX tiles where the CPU has them). On AVX-512 machines it
runs at about the FLOP rate of vLLM's own C++ CPU attention op at the ISA ``CPU_ATTN`` picks
(``vec``; ``amx`` for bfloat16 on AMX CPUs), where torch's fused CPU attention reaches a third to
two thirds of it (``benchmarks/results/attention_micro.md``). It reads both cache layouts.

**Build.** Compiled on first use, once per machine, with ``torch.utils.cpp_extension.load``
(g++ and ninja; ``-O3 -march=native -fopenmp``, threads from ``at::parallel_for``, i.e. the
torch/vLLM thread pool). The build folder is keyed by the source, the torch version and the
CPU's instruction-set flags, so a checkout moved to a machine of another ISA never loads code
built for the wrong one: ``$XDG_CACHE_HOME/swaa-vllm/kernels/<key>`` (``~/.cache`` by default).
About 10-15 s.

**Choice** (:func:`kernel_choice`), environment variable ``SWAA_CPU_SINK_WINDOW_KERNEL``:

* ``auto`` (default): the native kernel where the CPU has AVX-512F and the build succeeds;
  otherwise the torch path (logged with the reason). On AVX2-only machines the torch path is
  already at or above the op's rate (attention_micro.md), and the kernel's portable fallback
  is not tuned.
* ``native``: the native kernel on any x86 CPU (AVX-512 code where available, else a portable
  build); a failed build raises.
* ``torch``: always the torch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

from swaa_kernels.cpu_info import cpu_flags

__all__ = [
    "ENV_VAR",
    "NativeKernelError",
    "cpu_has_avx512",
    "requested_choice",
    "kernel_choice",
    "load",
    "native_sink_window_attention",
    "supports",
]

logger = logging.getLogger("vllm.swaa")

ENV_VAR = "SWAA_CPU_SINK_WINDOW_KERNEL"
_SOURCE = Path(__file__).with_name("sink_window_cpu.cpp")


class NativeKernelError(RuntimeError):
    """The native kernel was asked for (``SWAA_CPU_SINK_WINDOW_KERNEL=native``) but cannot be built."""


def cpu_has_avx512() -> bool:
    """True if this CPU reports AVX-512F (``/proc/cpuinfo``)."""
    return "avx512f" in cpu_flags()


def requested_choice() -> str:
    """``SWAA_CPU_SINK_WINDOW_KERNEL`` as given: ``"auto"`` (also when unset), ``"native"`` or ``"torch"``.

    Raises:
        ValueError: any other value (checked at engine start-up even for models that never use the kernel).
    """
    choice = os.environ.get(ENV_VAR, "auto").strip().lower()
    if choice not in ("auto", "native", "torch"):
        raise ValueError(f"{ENV_VAR} must be auto, native or torch, got {choice!r}")
    return choice


def kernel_choice() -> str:
    """``SWAA_CPU_SINK_WINDOW_KERNEL`` resolved to ``"native"`` or ``"torch"`` (see the module docstring).

    Raises:
        ValueError: if the variable is not ``auto``, ``native`` or ``torch``.
        NativeKernelError: ``native`` was asked for and the build failed.
    """
    choice = requested_choice()
    if choice == "torch":
        return "torch"
    if choice == "auto" and not cpu_has_avx512():
        logger.info("swaa: sink-window rows on the torch path (no AVX-512 on this CPU; %s=native to force)", ENV_VAR)
        return "torch"
    try:
        load()
    except NativeKernelError as exc:
        if choice == "native":
            raise
        logger.warning("swaa: sink-window rows on the torch path, the native kernel did not build: %s", exc)
        return "torch"
    return "native"


def _build_directory(march: str) -> Path:
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(march.encode())
    key.update(torch.__version__.encode())
    key.update(" ".join(sorted(cpu_flags())).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "swaa-vllm" / "kernels" / f"sink_window_cpu-{key.hexdigest()[:16]}"


def load() -> None:
    """Build (first time on this machine) and load the kernel as ``torch.ops.swaa_cpu``; idempotent.

    Raises:
        NativeKernelError: the compiler or ninja is missing, or the build failed (the message
            carries the compiler's last lines and the fix).
    """
    _load("native")


def build_flags(march: str) -> dict[str, list[str]]:
    """``torch.utils.cpp_extension.load``'s compiler and linker flags for this kernel built with ``-march=<march>``
    (the product build, and ``benchmarks/kernel_ab.py``'s build of an older source beside it)."""
    return {"extra_cflags": ["-O3", f"-march={march}", "-fopenmp"], "extra_ldflags": ["-fopenmp"]}


@functools.cache
def _load(march: str) -> None:
    """Build with ``-march=<march>`` and load (one build per process: the op namespace is global).

    ``native`` is the product; the tests build ``x86-64-v3`` (AVX2, no AVX-512) in a subprocess to
    check the portable code path on AVX-512 machines too.
    """
    from torch.utils import cpp_extension

    build_dir = _build_directory(march)
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name="swaa_sink_window_cpu",
            sources=[str(_SOURCE)],
            **build_flags(march),
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as exc:
        # The compiler's own lines, without ninja's echo of the (long) compile commands.
        lines = [line for line in str(exc).strip().splitlines() if line.strip() and "-MMD" not in line]
        tail = "\n".join(lines[-4:])
        raise NativeKernelError(
            f"building {_SOURCE.name} in {build_dir} failed ({tail}); install g++ and ninja "
            f"(pip install ninja), or set {ENV_VAR}=torch"
        ) from exc


def supports(num_heads: int, num_kv_heads: int, head_size: int) -> bool:
    """True if the kernel serves this head layout (head size a multiple of 16, GQA group <= 16)."""
    return head_size % 16 == 0 and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= 16


def native_sink_window_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_row: torch.Tensor,
    out: torch.Tensor,
    sinks: int,
    window: int,
    first_position: int,
    scale: float,
    amx_layout: bool = False,
    amx_tiles: bool = True,
) -> None:
    """Sink-window attention of one run of rows of one request with the native kernel (built on first use).

    Row ``r`` sits at position ``first_position + r`` and sees the keys ``[0, sinks)`` and
    ``(first_position + r - window, first_position + r]`` of its paged cache.

    Args:
        query: ``[N, H, D]`` float32/bfloat16/float16 (copied if not contiguous).
        kv_cache: ``[num_blocks, Hkv, block_size, 2 * D]`` same dtype, contiguous, in vLLM's CPU layout of ISA
            ``vec``/``vec16`` (``swaa_kernels.cpu``'s) or, with ``amx_layout``, of ISA ``amx``
            (:func:`swaa_kernels.cpu.amx_key_value_blocks`; bfloat16, block and head size multiples of 32).
        block_row: int32 ``[max_blocks]``, the request's block-table row.
        out: ``[N, H, D]`` same dtype, written (copied back if not contiguous).
        sinks: k >= 1. window: W >= 1. first_position: >= W + k. scale: softmax scale, > 0.
        amx_layout: the cache holds vLLM's AMX layout.
        amx_tiles: bfloat16 may run on AMX tiles where this build and CPU have them (default); False runs the
            VDPBF16PS path of CPUs with AVX512_BF16 but no AMX (to test and measure that path on AMX machines).

    Raises:
        RuntimeError: from the op, for arguments outside the above (the message names them).
    """
    load()
    target = out if out.is_contiguous() else torch.empty_like(query, memory_format=torch.contiguous_format)
    torch.ops.swaa_cpu.sink_window_attention(
        query.contiguous(), kv_cache, block_row.contiguous(), target, sinks, window, first_position, scale, amx_layout,
        amx_tiles,
    )
    if target is not out:
        out.copy_(target)

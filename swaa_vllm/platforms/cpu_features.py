"""What this CPU can do, and the dtype the speed benchmarks pick for it.

Machines of one kind differ from day to day: some have AVX-512 with native bf16 arithmetic
(``avx512_bf16``, or AMX's ``amx_bf16``), some only AVX2, where torch and vLLM's CPU kernels
emulate bf16 and run several times slower than float32. A speed figure in bf16 from an AVX2
machine measures the emulation, not the attention, so the benchmarks
(``benchmarks/cpu_e2e.py``, ``benchmarks/serve_bench.py``, ``benchmarks/attention_micro.py``)
default to :func:`benchmark_dtype`: bfloat16 where the CPU computes it natively, float32
elsewhere, and record :func:`describe` with their results.

``python -m swaa_vllm.platforms.cpu_features`` prints the dtype and the reason.
"""

from __future__ import annotations

import sys

from swaa_kernels.cpu_info import cpu_flags, cpuinfo_text

__all__ = ["benchmark_dtype", "cpu_flags", "cpu_model", "describe", "has_native_bf16"]

#: /proc/cpuinfo flags that mean the CPU computes bf16 dot products natively.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_model(cpuinfo: str | None = None) -> str:
    """The ``model name`` of the first processor (``"unknown CPU"`` if there is none)."""
    text = cpuinfo_text() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """True if the CPU has one of :data:`NATIVE_BF16_FLAGS`."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def benchmark_dtype(flags: frozenset[str] | None = None) -> str:
    """``"bfloat16"`` on a CPU with native bf16, else ``"float32"`` (bf16 is emulated there)."""
    return "bfloat16" if has_native_bf16(flags) else "float32"


def describe(flags: frozenset[str] | None = None) -> str:
    """The vector instruction sets that matter here, e.g. ``"AVX-512 (avx512f, avx512_bf16), AMX"`` or
    ``"AVX2 only (bf16 emulated)"``."""
    flags = cpu_flags() if flags is None else flags
    avx512 = sorted(f for f in flags if f.startswith("avx512"))
    amx = sorted(f for f in flags if f.startswith("amx"))
    if avx512:
        shown = [f for f in avx512 if f in ("avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni")]
        text = f"AVX-512 ({', '.join(shown or avx512[:3])})"
        if amx:
            text += f", AMX ({', '.join(amx)})"
        return text + ("" if has_native_bf16(flags) else ", bf16 emulated")
    if "avx2" in flags:
        return "AVX2 only (bf16 emulated)"
    return "no AVX2 or AVX-512 (bf16 emulated)"


def main() -> int:
    """Print the benchmark dtype and why."""
    dtype = benchmark_dtype()
    why = "native bf16" if dtype == "bfloat16" else "no native bf16: bf16 would be emulated, several times slower"
    print(f"{dtype}\t{cpu_model()}: {describe()}; {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``swaa_vllm.platforms.cpu_features``: the benchmarks' dtype follows the CPU's native bf16 support."""

from __future__ import annotations

from swaa_vllm.platforms import cpu_features as cf

AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX512_BF16 = "model name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512bw avx512_vnni avx512_bf16\n"
AMX = "flags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8\n"
AVX512_NO_BF16 = "flags\t\t: avx2 avx512f avx512bw avx512vl\n"


def test_dtype_per_instruction_set():
    assert cf.benchmark_dtype(cf.cpu_flags(AVX2)) == "float32"
    assert cf.benchmark_dtype(cf.cpu_flags(AVX512_BF16)) == "bfloat16"
    assert cf.benchmark_dtype(cf.cpu_flags(AMX)) == "bfloat16"
    assert cf.benchmark_dtype(cf.cpu_flags(AVX512_NO_BF16)) == "float32"
    assert cf.benchmark_dtype(cf.cpu_flags("")) == "float32"


def test_description_names_the_isa():
    assert cf.describe(cf.cpu_flags(AVX2)) == "AVX2 only (bf16 emulated)"
    assert cf.describe(cf.cpu_flags(AVX512_BF16)) == "AVX-512 (avx512_bf16, avx512_vnni, avx512f)"
    assert cf.describe(cf.cpu_flags(AMX)).endswith("AMX (amx_bf16, amx_int8, amx_tile)")
    assert cf.describe(cf.cpu_flags(AVX512_NO_BF16)).endswith("bf16 emulated")
    assert cf.cpu_model(AVX2) == "AMD EPYC" and cf.cpu_model(AMX) == "unknown CPU"


def test_this_machine_agrees_with_proc_cpuinfo():
    text = open("/proc/cpuinfo").read()
    native = "avx512_bf16" in text or "amx_bf16" in text
    assert cf.has_native_bf16() is native
    assert cf.benchmark_dtype() == ("bfloat16" if native else "float32")

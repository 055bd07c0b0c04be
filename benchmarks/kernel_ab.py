"""A/B of the native sink-window kernel (``kernels/sink_window_cpu.cpp``) against its source at a git revision.

A 2-core VM drifts by more than a kernel change moves (10-20% between consecutive processes), so two builds
timed in two processes cannot be compared. This script builds the kernel of ``--base`` (``git show
REV:kernels/sink_window_cpu.cpp``, its op renamed to ``torch.ops.swaa_cpu_base``) beside the working tree's
(``swaa_kernels.sink_window_native.load``) and times both in one process, alternating call by call (each round
runs both, the order flipping every round), on one sliding layer's sink-window rows of the bundled model's shape
(9 query heads, 3 KV heads, head size 64, block size 128; W=1024, k=64 unless told). Prints per case the medians
and minimums of both, their ratios (base / working tree: > 1 means the working tree is faster) and the largest
output difference between the two builds. Only the native kernel runs here: the vLLM op and the rows below W + k
are ``attention_micro.py``'s. Needs a CPU with AVX-512 (the kernel's product path) and git.

Run: ``.venv/bin/python benchmarks/kernel_ab.py --base HEAD~1 [--dtypes bfloat16 float32] [--lengths 2048 8192]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swaa_kernels import sink_window_native  # noqa: E402
from swaa_vllm.platforms.cpu_features import cpu_model, describe  # noqa: E402
from tests.test_sink_window_native import paged_case  # noqa: E402  (the tests' paged-cache builder)

HEADS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 9, 3, 64, 128


def build_base(rev: str, build_dir: Path):
    """Build the kernel source of git revision ``rev`` as op ``torch.ops.swaa_cpu_base.sink_window_attention``.

    Raises:
        subprocess.CalledProcessError: ``rev`` names no commit holding ``kernels/sink_window_cpu.cpp``.
        RuntimeError: the build failed (torch.utils.cpp_extension's message).
    """
    from torch.utils import cpp_extension

    source = subprocess.run(["git", "show", f"{rev}:kernels/sink_window_cpu.cpp"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    for macro in ("TORCH_LIBRARY(", "TORCH_LIBRARY_IMPL("):
        if source.count(f"{macro}swaa_cpu,") != 1:
            raise RuntimeError(f"{rev}: expected one {macro}swaa_cpu, ...) in the kernel source")
        source = source.replace(f"{macro}swaa_cpu,", f"{macro}swaa_cpu_base,")
    path = build_dir / "sink_window_cpu_base.cpp"
    path.write_text(source)
    cpp_extension.load(name="swaa_sink_window_cpu_base", sources=[str(path)], build_directory=str(build_dir),
                       is_python_module=False, **sink_window_native.build_flags("native"))
    return torch.ops.swaa_cpu_base.sink_window_attention


def time_case(ops: dict, dtype: torch.dtype, length: int, window: int, sinks: int, rounds: int) -> dict:
    """Times every op of ``ops`` on the sink-window rows [W + k, length) of one layer; seconds per call."""
    q, _, _, kv_cache, block_row = paged_case(length, HEADS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE, dtype, seed=0)
    first = window + sinks
    query = q[first:].contiguous()
    scale = HEAD_SIZE**-0.5
    outs = {name: torch.empty_like(query) for name in ops}
    times = {name: [] for name in ops}

    def call(name: str) -> None:  # the vec cache layout (amx_layout=False), AMX tiles where the CPU has them
        ops[name](query, kv_cache, block_row, outs[name], sinks, window, first, scale, False, True)

    order = list(ops)
    for name in order:  # warm-up
        call(name)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            call(name)
            times[name].append(time.perf_counter() - start)
    return {"times": times, "max_diff": (outs[order[0]].float() - outs[order[1]].float()).abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision of the kernel to compare with (default HEAD)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192, 16384])
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--keep-first", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=0, help="rounds per case (default: about 5 s per variant)")
    args = parser.parse_args()
    if not sink_window_native.cpu_has_avx512():
        sys.exit("kernel_ab.py: needs AVX-512 (the native kernel's product path); this CPU has none")

    sink_window_native.load()
    with tempfile.TemporaryDirectory(prefix="swaa-kernel-ab-") as build_dir:
        ops = {"base": build_base(args.base, Path(build_dir)), "tree": torch.ops.swaa_cpu.sink_window_attention}
        print(f"{cpu_model()}, {describe()}; threads={torch.get_num_threads()}; base={args.base} "
              f"W={args.window} k={args.keep_first}; alternating calls in one process")
        print("| dtype | tokens | rounds | base median (ms) | tree median (ms) | base/tree median | base min (ms) "
              "| tree min (ms) | base/tree min | max abs output difference |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for length in args.lengths:
                rounds = args.rounds or max(8, int(5 * 16384 / length * (2 if dtype == torch.bfloat16 else 1)))
                result = time_case(ops, dtype, length, args.window, args.keep_first, rounds)
                med = {n: statistics.median(t) * 1e3 for n, t in result["times"].items()}
                low = {n: min(t) * 1e3 for n, t in result["times"].items()}
                print(f"| {dtype_name} | {length} | {rounds} | {med['base']:.2f} | {med['tree']:.2f} | "
                      f"{med['base'] / med['tree']:.3f} | {low['base']:.2f} | {low['tree']:.2f} | "
                      f"{low['base'] / low['tree']:.3f} | {result['max_diff']:.2e} |", flush=True)


if __name__ == "__main__":
    main()

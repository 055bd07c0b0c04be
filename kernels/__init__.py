"""swaa_kernels: SWAA attention kernels usable without vLLM.

The source folder is ``kernels/``; it installs as the import package
``swaa_kernels`` (a top-level ``kernels`` would collide with the PyPI package of
that name).

* :mod:`swaa_kernels.reference`: dense plain-torch reference of the SWAA mask
  (``shared/SWAA.md``), the oracle for every other path.
* :mod:`swaa_kernels.cpu`: paged-KV-cache attention for CPU: rows sorted into
  causal / windowed / sink-window classes; the first two through a pluggable paged
  attention primitive (plain torch here, vLLM's C++ CPU op in the backend), the
  sink-window rows, which read only their sinks and window, in torch query tiles or
  with the native kernel.
* :mod:`swaa_kernels.cpu_info`: the CPU's ``/proc/cpuinfo`` flags (which kernel build,
  which benchmark dtype).
* :mod:`swaa_kernels.sink_window_native`: builds (once per machine), loads and calls
  the C++ sink-window kernel ``sink_window_cpu.cpp`` (flash-attention over the sinks
  and the window, AVX-512), and picks it or the torch tiles
  (``SWAA_CPU_SINK_WINDOW_KERNEL``).
* :mod:`swaa_kernels.triton_swaa`: the Triton kernel over a paged cache (GPU; tested
  on CPU in Triton's interpreter).
* :mod:`swaa_kernels.flash_attn_path`: the flash-attn alternative (window via
  flash-attn, sinks merged by LSE).
"""

from swaa_kernels.reference import reference_attention, swaa_mask

__all__ = ["reference_attention", "swaa_mask"]

"""swaa_kernels: SWAA attention kernels usable without vLLM.

The source folder is ``kernels/``; it installs as the import package
``swaa_kernels`` (a top-level ``kernels`` would collide with the PyPI package of
that name).

* :mod:`swaa_kernels.reference`: dense plain-torch reference of the SWAA mask
  (``shared/SWAA.md``), the oracle for every other path.
* :mod:`swaa_kernels.cpu`: paged-KV-cache attention for CPU in plain torch.
"""

from swaa_kernels.reference import reference_attention, swaa_mask

__all__ = ["reference_attention", "swaa_mask"]

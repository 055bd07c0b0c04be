"""Test-only harness: run vLLM's Model Runner V2 on this CPU (Triton interpreter + a stand-in ``cpu`` backend).

vLLM's V2 model runner (``vllm/v1/worker/gpu/``, subclassed by the CPU build's
``vllm/v1/worker/cpu/model_runner.py``) prepares each step's inputs with Triton
kernels. The PyPI Triton has no CPU backend, and the CPU build of vLLM enables
Triton only when ``triton.backends.backends`` has a ``"cpu"`` entry
(``vllm/triton_utils/importing.py``). Triton's interpreter (``TRITON_INTERPRET=1``)
runs those kernels on CPU tensors in Python; it only needs that some driver is
listed and active.

This file is a ``sitecustomize`` module: put this folder first on ``PYTHONPATH``
and set ``SWAA_TRITON_CPU_STANDIN=1`` (:func:`tests.v2_runner.v2_runner_env`
does both), and every Python process started with that environment, including
vLLM's spawned engine-core and worker processes, registers the stand-in before
anything imports vLLM. Without the flag it does nothing. It is never installed
with the package and never used outside the tests.

Engines under the stand-in must run eager (``enforce_eager=True``, ``--enforce-eager``):
torch.compile's inductor then sees a Triton ``cpu`` backend and tries to compile
through it. With that, ``vllm serve`` also runs on V2 here (checked by hand: healthy
after ~75 s, "The capital of France is Paris.").

One interpreter fault is mended too: Triton 3.9's interpreter represents ``a & b``
of a block mask and a scalar comparison as int32 data (a ``tl.int1`` value), and its
masked load/store then fail with "mask has unsupported dtype" (it happens in vLLM's
V2 ngram speculator, ``_ngram_finalize_kernel``). Masked loads and stores cast such
masks to bool, which is what compiled Triton does; nothing else changes.
"""

import os

if os.environ.get("SWAA_TRITON_CPU_STANDIN") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import torch
        from triton.backends import Backend, backends
        from triton.backends.compiler import BaseBackend, GPUTarget
        from triton.backends.driver import DriverBase
    except ImportError:  # a process of the test run that has no Triton/torch (e.g. hadolint)
        pass
    else:

        class _InterpreterCompiler(BaseBackend):
            """Never compiles: under TRITON_INTERPRET=1 kernels run in Triton's interpreter."""

            @staticmethod
            def supports_target(target):
                return target.backend == "cpu"

            def hash(self):
                return "swaa-test-triton-cpu-standin"

            def parse_options(self, options):
                raise RuntimeError("the Triton CPU stand-in only runs kernels with TRITON_INTERPRET=1")

            def add_stages(self, stages, options, language):
                raise RuntimeError("the Triton CPU stand-in only runs kernels with TRITON_INTERPRET=1")

            def load_dialects(self, context):
                pass

            def get_module_map(self):
                return {}

        class _InterpreterDriver(DriverBase):
            """Always active, so that vLLM's check sees one CPU driver (``vllm/triton_utils/importing.py``)."""

            @classmethod
            def is_active(cls):
                return True

            def get_current_target(self):
                return GPUTarget("cpu", 0, 0)

            def get_active_torch_device(self):
                return torch.device("cpu")

            def get_benchmarker(self):
                from triton.testing import do_bench

                return do_bench

            def get_device_interface(self):
                return torch.cpu

            def get_current_device(self):
                return 0

            def get_current_stream(self, device=None):
                return 0

        backends["cpu"] = Backend(compiler=_InterpreterCompiler, driver=_InterpreterDriver)

        import numpy as np
        from triton.runtime import interpreter as _interp

        def _bool_mask(mask):
            if mask.data.dtype != np.bool_:
                return _interp.TensorHandle(mask.data.astype(np.bool_), mask.dtype)
            return mask

        _masked_load = _interp.InterpreterBuilder.create_masked_load
        _masked_store = _interp.InterpreterBuilder.create_masked_store

        def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
            return _masked_load(self, ptrs, _bool_mask(mask), other, cache_policy, is_volatile)

        def create_masked_store(self, ptrs, value, mask, cache_policy):
            return _masked_store(self, ptrs, value, _bool_mask(mask), cache_policy)

        _interp.InterpreterBuilder.create_masked_load = create_masked_load
        _interp.InterpreterBuilder.create_masked_store = create_masked_store

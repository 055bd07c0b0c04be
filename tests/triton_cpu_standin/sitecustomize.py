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

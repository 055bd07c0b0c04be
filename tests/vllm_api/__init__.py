"""The vLLM interfaces swaa-vllm relies on, checked against vLLM's sources without importing vLLM.

:mod:`tests.vllm_api.expectations` lists them, :mod:`tests.vllm_api.check` resolves
them by parsing vLLM's python files (``make check-vllm-gpu-api`` runs it on the
official CUDA wheel, ``tests/test_vllm_api.py`` on the installed CPU build).
"""

"""Offline batch generation with the ``swaa`` backend.

* :mod:`swaa_vllm.batch.ray_data`: the Ray Data pipeline (``python -m swaa_vllm.batch.ray_data``).
"""

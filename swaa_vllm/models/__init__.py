"""Model preparation.

* :mod:`swaa_vllm.models.bundled`: the bundled SmolLM2-135M-Instruct GGUF converted to a Hugging Face
  directory (``swaa-vllm-prepare-model``).
"""

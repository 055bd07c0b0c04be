"""Platform-specific glue of the ``swaa`` backend (imported by the plugin core, never the reverse order).

* :mod:`swaa_vllm.platforms.cpu_attention_op`: vLLM's C++ CPU attention op as the paged primitive of the CPU path.
* :mod:`swaa_vllm.platforms.cuda_path`: the CUDA side: per-step metadata, kernel selection (flash-attn or Triton).
* :mod:`swaa_vllm.platforms.ray_executor`: vLLM's Ray executor made to run on the CPU build (shim 6).
"""

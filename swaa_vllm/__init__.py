"""swaa-vllm: Sliding Window Attention Adaptation as a vLLM attention backend.

Installing the package registers the vLLM general plugin ``swaa``
(entry point ``vllm.general_plugins``), which makes
``--attention-backend swaa`` available; see the README.

The plugin core is this folder's modules; the platform glue and the tools around the
plugin live in subpackages:

* :mod:`swaa_vllm.vllm_shims`: every change made to vLLM at plugin load, each explained (``register`` runs it).
* :mod:`swaa_vllm.config`: ``swaa_config`` validation and the per-layer plan.
* :mod:`swaa_vllm.backend`: the attention backend, metadata builder and impl.
* :mod:`swaa_vllm.prompt_lengths`: prompt lengths from vLLM's V1/V2 model runners for the builder.
* :mod:`swaa_vllm.worker`: the SWAA CPU/GPU workers that bind those prompt lengths.
* :mod:`swaa_vllm.platforms`: the CPU attention op, the CUDA path, the Ray executor on CPU.
* :mod:`swaa_vllm.evaluation`: the accuracy harness's tasks, scoring, recipes and report.
* :mod:`swaa_vllm.finetuning`: SWA-aware LoRA fine-tuning (data, trainer, training-time attention).
* :mod:`swaa_vllm.batch`: offline batch generation on Ray Data.
* :mod:`swaa_vllm.models`: the bundled model's GGUF -> Hugging Face conversion.
"""

__all__ = ["register"]


def register() -> None:
    """vLLM general-plugin entry point: register the SWAA backend (all processes)."""
    from swaa_vllm.vllm_shims import install

    install()

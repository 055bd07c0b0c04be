"""swaa-vllm: Sliding Window Attention Adaptation as a vLLM attention backend.

Installing the package registers the vLLM general plugin ``swaa``
(entry point ``vllm.general_plugins``), which makes
``--attention-backend swaa`` available; see the README.

Modules:

* :mod:`swaa_vllm.config`: ``swaa_config`` validation and the per-layer plan.
* :mod:`swaa_vllm.backend`: the attention backend, metadata builder and impl.
* :mod:`swaa_vllm.worker`: worker/model runner passing prompt lengths to the builder.
* :mod:`swaa_vllm.vllm_shims`: the only changes made to vLLM, each explained.
* :mod:`swaa_vllm.model_prep`: converts the bundled SmolLM2 GGUF into a HF directory.
"""

__all__ = ["register"]


def register() -> None:
    """vLLM general-plugin entry point: register the SWAA backend (all processes)."""
    from swaa_vllm.vllm_shims import install

    install()

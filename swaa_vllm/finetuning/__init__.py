"""SWA-aware LoRA fine-tuning: train an adapter under the masks the ``swaa`` backend serves it with.

* :mod:`swaa_vllm.finetuning.distill`: the data, prompts answered by the full-attention model
  (``python -m swaa_vllm.finetuning.distill``).
* :mod:`swaa_vllm.finetuning.train`: the peft LoRA trainer (``python -m swaa_vllm.finetuning.train``,
  ``swaa-vllm-finetune``); its presets are :mod:`swaa_vllm.evaluation.recipes`.
* :mod:`swaa_vllm.finetuning.training_attention`: the SWAA masks as a transformers attention function.
"""

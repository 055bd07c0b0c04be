"""The offline accuracy harness's library (its runner is ``benchmarks/accuracy_grid.py``).

* :mod:`swaa_vllm.evaluation.tasks`: synthetic long-context retrieval prompts (passkey, RULER NIAH, and
  the fine-tuning families).
* :mod:`swaa_vllm.evaluation.scoring`: exact-match scoring of a model's output.
* :mod:`swaa_vllm.evaluation.recipes`: the named ``swaa_config`` plans of the ablation (shared with fine-tuning).
* :mod:`swaa_vllm.evaluation.report`: Wilson intervals, tables, JSON and the plot.

Nothing here imports vLLM.
"""

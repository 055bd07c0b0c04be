"""The named ``swaa_config`` plans of the paper's ablation, shared by the accuracy harness and fine-tuning.

A plan is built from four knobs on top of sliding-window attention (SWAA.md, Yu et al., arXiv 2512.10411):
the window ``W``, ``keep_first`` sink tokens, full-attention decode, and a pattern of layers that keep full
attention. :func:`swaa_config` turns the knobs into the ``swaa_config`` dict the backend reads;
``benchmarks/accuracy_grid.py`` builds its rows with it, and :data:`PRESETS` names the two plans that
SWA-aware fine-tuning trains under (``python -m swaa_vllm.finetuning.train --preset``), so that an adapter
of ``adapters/<preset>_w<W>`` is trained under exactly the plan of the harness row it is evaluated in.
"""

from __future__ import annotations

__all__ = ["KEEP_FIRST", "PRESETS", "full_layer_indices", "preset_config", "swaa_config"]

# Sink tokens of the recipe on the bundled model (the harness's default and the fine-tuning presets').
KEEP_FIRST = 16

# Preset name -> knobs (keep sinks, FA decode, full-layer pattern). ``recipe``: W, k sinks, FA decode, odd
# layers full (the harness's recipe row); ``swa_only``: W alone.
PRESETS: dict[str, tuple[bool, bool, str]] = {
    "recipe": (True, True, "odd"),
    "swa_only": (False, False, ""),
}


def full_layer_indices(kind: str, num_layers: int) -> list[int]:
    """Layer indices that keep full attention: ``odd`` (1, 3, ...), ``even`` (0, 2, ...), ``1/4`` (3, 7, ...:
    the last layer of every group of four), ``""`` (none).

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "":
        return []
    if kind == "odd":
        return list(range(1, num_layers, 2))
    if kind == "even":
        return list(range(0, num_layers, 2))
    if kind == "1/4":
        return list(range(3, num_layers, 4))
    raise ValueError(f"unknown full-layer pattern {kind!r}")


def swaa_config(window: int, num_layers: int, keep_first: int = 0, fa_decode: bool = False,
                full_layers: str = "") -> dict:
    """The ``swaa_config`` of window ``window`` with ``keep_first`` sinks (0: none), full-attention decode on
    every sliding layer if ``fa_decode``, and the layers of :func:`full_layer_indices` ``full_layers`` full.

    Raises:
        ValueError: unknown ``full_layers`` pattern.
    """
    cfg: dict = {"sliding_window_size": window}
    if keep_first:
        cfg["keep_first"] = keep_first
    if fa_decode:
        cfg["force_fa_decode"] = True
    if full_layers:
        cfg["non_sliding_layers"] = full_layer_indices(full_layers, num_layers)
    return cfg


def preset_config(preset: str, window: int, num_layers: int, keep_first: int = KEEP_FIRST) -> dict:
    """The ``swaa_config`` of a :data:`PRESETS` name at window ``window``.

    Raises:
        ValueError: unknown preset.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {tuple(PRESETS)} or pass --swaa-config")
    keep, fa_decode, full_layers = PRESETS[preset]
    return swaa_config(window, num_layers, keep_first if keep else 0, fa_decode, full_layers)

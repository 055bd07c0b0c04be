"""From a per-layer ranking to candidate plans at fixed costs, and the rule that picks one.

A candidate keeps the ``n`` highest-ranked layers full (``n`` = a fraction of the layers, rounded down: a
quarter of 30 layers is 7, the count of the one-in-four pattern), slides the others with the user's W and k,
and decodes with full attention everywhere (the SWAA recipe, ``shared/SWAA.md``). Its cost is quoted from
:mod:`swaa_vllm.evaluation.costs`: the FLOP-model prefill speed-up bound against full attention (the formula
``benchmarks/cpu_e2e.py`` measures against) and the KV cache a request holds against full attention (1.0
with FA decode, which keeps every block). The paper's fixed patterns with the same number of full layers
(:func:`swaa_vllm.evaluation.recipes.full_layer_indices`) are built the same way, so costs are equal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from swaa_vllm.config import build_plan
from swaa_vllm.evaluation.costs import ModelShape, kv_blocks_per_request, prefill_speedup_bound
from swaa_vllm.evaluation.recipes import full_layer_indices

__all__ = ["FRACTIONS", "PAPER_PATTERNS", "Candidate", "candidates", "choose", "full_layer_count",
           "plan_config", "rank_layers", "sign_test"]

FRACTIONS = (0.25, 0.5, 0.75)
PAPER_PATTERNS = ("1/4", "odd", "even")
_FRACTION_NAMES = {0.25: "quarter", 0.5: "half", 0.75: "three_quarters"}


def rank_layers(scores: Sequence[float]) -> list[int]:
    """Layer indices from the most to the least dependent on keys outside sinks + window.

    Sorted by descending score; equal scores (and NaN, last) by ascending index, so the ranking is a pure
    function of the scores.
    """
    def key(i: int) -> tuple[int, float, int]:
        s = scores[i]
        return (1, 0.0, i) if math.isnan(s) else (0, -s, i)

    return sorted(range(len(scores)), key=key)


def full_layer_count(fraction: float, num_layers: int) -> int:
    """Full layers kept at ``fraction`` of ``num_layers``: ``floor(fraction * num_layers)`` in ``[1, L - 1]``.

    Raises:
        ValueError: ``fraction`` outside (0, 1) or a model of fewer than 2 layers.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"a fraction of layers kept full must be in (0, 1), got {fraction}")
    if num_layers < 2:
        raise ValueError(f"a plan needs at least 2 layers (one full, one sliding), got {num_layers}")
    return min(num_layers - 1, max(1, math.floor(fraction * num_layers + 1e-9)))


def plan_config(full_layers: Sequence[int], window: int, keep_first: int) -> dict:
    """The ``swaa_config`` with ``full_layers`` full, W, k, and FA decode on every sliding layer."""
    cfg: dict = {"sliding_window_size": window}
    if keep_first:
        cfg["keep_first"] = keep_first
    cfg["force_fa_decode"] = True
    cfg["non_sliding_layers"] = sorted(full_layers)
    return cfg


@dataclass(frozen=True)
class Candidate:
    """One plan to validate.

    Attributes:
        name: short id (``calibrated_half_w128``, ``odd_w128``, ``full``).
        label: the row name of the report.
        source: ``"calibrated"``, ``"paper"`` (a fixed pattern) or ``"full"`` (full attention).
        fraction: the fraction of layers it keeps full (None for full attention).
        window, keep_first: W and k (None, 0 for full attention).
        full_layers: the layers that keep full attention.
        swaa_config: the ``swaa_config`` (None for full attention), validated by :func:`build_plan`.
        prefill_speedup: FLOP-model prefill speed-up bound against full attention at ``cost_tokens``.
        kv_ratio: KV cache a request holds against full attention at ``cost_tokens``.
    """

    name: str
    label: str
    source: str
    fraction: float | None
    window: int | None
    keep_first: int
    full_layers: tuple[int, ...]
    swaa_config: dict | None
    prefill_speedup: float
    kv_ratio: float

    def to_dict(self) -> dict:
        """JSON-ready form."""
        d = asdict(self)
        d["full_layers"] = list(self.full_layers)
        return d


def _costed(name: str, label: str, source: str, fraction: float | None, window: int | None, keep_first: int,
            full: Sequence[int], shape: ModelShape, cost_tokens: int, block_size: int, chunk: int) -> Candidate:
    cfg = None if window is None else plan_config(full, window, keep_first)
    build_plan(cfg, shape.layers)  # raises SwaaConfigError for a plan the backend would refuse
    kv = (kv_blocks_per_request(cfg, shape.layers, cost_tokens, block_size, chunk)
          / kv_blocks_per_request(None, shape.layers, cost_tokens, block_size, chunk))
    return Candidate(name, label, source, fraction, window, keep_first, tuple(sorted(full)), cfg,
                     round(prefill_speedup_bound(shape, cfg, cost_tokens), 4), round(kv, 4))


def candidates(ranking: Sequence[int], shape: ModelShape, window: int, keep_first: int,
               fractions: Sequence[float] = FRACTIONS, cost_tokens: int = 8192, baselines: bool = True,
               block_size: int = 16, chunk: int = 2048, source: str = "calibrated", prefix: str = "calibrated",
               label: str = "calibrated") -> list[Candidate]:
    """The calibrated plan at each fraction, each followed by the paper patterns with as many full layers.

    Args:
        ranking: :func:`rank_layers` of the calibration signal (all ``shape.layers`` layers).
        shape: the model's cost shape.
        window, keep_first: W and k of every sliding layer.
        fractions: fractions of layers kept full.
        cost_tokens: prompt length the costs are quoted at.
        baselines: add the paper's fixed patterns (:data:`PAPER_PATTERNS`) of equal size.
        block_size, chunk: KV block size and chunked-prefill budget of the KV model.
        source, prefix, label: the calibrated rows' ``source`` and the start of their name and label (another
            ranking, e.g. by the secondary signal, gets its own).

    Raises:
        ValueError: a ranking that is not a permutation of the layers, or a bad fraction.
    """
    if sorted(ranking) != list(range(shape.layers)):
        raise ValueError(f"ranking must be a permutation of the {shape.layers} layers, got {list(ranking)}")
    out = []
    for fraction in fractions:
        n = full_layer_count(fraction, shape.layers)
        tag = _FRACTION_NAMES.get(fraction, f"{fraction:g}")
        out.append(_costed(f"{prefix}_{tag}_w{window}", f"{label}, {n} layers full", source, fraction,
                           window, keep_first, ranking[:n], shape, cost_tokens, block_size, chunk))
        if baselines:
            for pattern in PAPER_PATTERNS:
                layers = full_layer_indices(pattern, shape.layers)
                if len(layers) == n:
                    name = {"1/4": "quarter"}.get(pattern, pattern)
                    out.append(_costed(f"{name}_w{window}", f"{pattern} layers full ({n})", "paper", fraction,
                                       window, keep_first, layers, shape, cost_tokens, block_size, chunk))
    return out


def full_attention(shape: ModelShape, cost_tokens: int = 8192) -> Candidate:
    """Full attention everywhere, the reference row (speed-up and KV ratio 1)."""
    return _costed("full", "full attention", "full", None, None, 0, range(shape.layers), shape, cost_tokens, 16,
                   2048)


def sign_test(only_a: int, only_b: int) -> float:
    """Exact two-sided sign test (McNemar's exact test) on the discordant pairs of a paired comparison.

    ``p = min(1, 2 * P[X <= min(b, c)])`` for ``X ~ Binomial(b + c, 1/2)`` (McNemar, Psychometrika 12, 1947;
    exact form as in Fagerland et al., BMC Med. Res. Methodol. 13:91, 2013). 1.0 when there is no discordant
    pair.

    Raises:
        ValueError: a negative count.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError("counts must be >= 0")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def choose(accuracies: dict[str, float], speedups: dict[str, float], reference: float, tolerance: float) -> str:
    """The fastest plan whose accuracy is at least ``reference - tolerance``; else the most accurate one.

    Args:
        accuracies: plan name -> held-out accuracy in [0, 1] (SWAA plans only, not full attention).
        speedups: plan name -> prefill speed-up bound.
        reference: full attention's accuracy.
        tolerance: accuracy (fraction, e.g. 0.05) the user accepts to lose.

    Ties: higher accuracy, then name order.

    Raises:
        ValueError: no plans.
    """
    if not accuracies:
        raise ValueError("no plans to choose from")
    keep = [n for n, a in accuracies.items() if a >= reference - tolerance - 1e-12]
    if keep:
        return sorted(keep, key=lambda n: (-speedups[n], -accuracies[n], n))[0]
    return sorted(accuracies, key=lambda n: (-accuracies[n], -speedups[n], n))[0]

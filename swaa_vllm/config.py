"""``swaa_config``: validation and the per-layer plan it resolves to.

The model config carries ``swaa_config`` (checkpoint ``config.json`` or
``--hf-overrides '{"swaa_config": {...}}'``). Field names and defaults follow
``shared/SWAA.md`` (and the paper's released code):

==========================  =========================  =======  ==========================================
field                       type                       default  meaning
==========================  =========================  =======  ==========================================
``sliding_window_size``     int >= 1 or null           null     W; null means full attention everywhere
``keep_first``              int >= 0                   0        k, the number of sink tokens
``force_fa_decode``         bool or list of layers     false    FA decode for all SWA layers, or the listed
``non_sliding_layers``      list of layers             []       layers that keep full attention everywhere
==========================  =========================  =======  ==========================================

Validation is strict: an unknown field, a wrong type (``"2048"``, ``true`` for an
int), W < 1, k < 0, a layer outside the model, a duplicate, or a setting that
would have no effect all raise :class:`SwaaConfigError` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from swaa_kernels.cpu import FULL_ATTENTION, LayerMaskSpec

__all__ = ["SwaaConfig", "SwaaConfigError", "SwaaPlan", "plan_from_hf_config"]

_DOCS = "see the README section 'Configuration'"


class SwaaConfigError(ValueError):
    """A ``swaa_config`` that cannot be honoured; the message names the field and the fix.

    Every message starts with ``invalid swaa_config:`` so it is easy to find in a server log.
    """

    PREFIX = "invalid swaa_config: "

    def __init__(self, message: str) -> None:
        super().__init__(message if message.startswith(self.PREFIX) else self.PREFIX + message)


class SwaaConfig(BaseModel):
    """The ``swaa_config`` JSON object, validated strictly (pydantic v2)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    sliding_window_size: int | None = Field(default=None, ge=1)
    keep_first: int = Field(default=0, ge=0)
    force_fa_decode: bool | list[int] = False
    non_sliding_layers: list[int] = Field(default_factory=list)


@dataclass(frozen=True)
class SwaaPlan:
    """The effective per-layer attention of a model.

    Attributes:
        layers: one :class:`LayerMaskSpec` per decoder layer, indexed like the
            model's own config (layer 0 first).
        configured: False when the model has no ``swaa_config`` (plain causal).
    """

    layers: tuple[LayerMaskSpec, ...]
    configured: bool

    def for_layer(self, index: int) -> LayerMaskSpec:
        """The mask of decoder layer ``index``; IndexError if outside the model."""
        if not 0 <= index < len(self.layers):
            raise IndexError(f"layer {index} is outside the model's {len(self.layers)} layers")
        return self.layers[index]

    def describe(self) -> str:
        """One human-readable paragraph: which layers slide, W, k, FA decode."""
        n = len(self.layers)
        if not self.configured:
            return f"no swaa_config: all {n} layers use full causal attention (plain causal backend)"
        if all(spec.is_full for spec in self.layers):
            return f"swaa_config has no sliding_window_size: all {n} layers use full causal attention"
        groups: dict[str, list[int]] = {}
        for i, spec in enumerate(self.layers):
            if spec.is_full:
                key = "full attention"
            else:
                # Sliding-decode layers get the sink-window KV cache spec (swaa_vllm/sink_window_cache.py)
                # unless the hybrid KV cache manager is off: the worker logs which layers free memory.
                decode = "full-attention decode" if spec.fa_decode else "sliding decode"
                key = f"sliding W={spec.window} k={spec.keep_first}, {decode}"
            groups.setdefault(key, []).append(i)
        parts = [f"{key}: layers {_ranges(idx)} ({len(idx)})" for key, idx in groups.items()]
        return f"SWAA plan for {n} layers: " + "; ".join(parts)


def _ranges(indices: list[int]) -> str:
    """Compact ``[0-3, 5, 7-9]`` rendering of sorted layer indices."""
    out: list[str] = []
    start = prev = indices[0]
    for i in indices[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return "[" + ", ".join(out) + "]"


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = "swaa_config" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])
        got = "" if e["type"] == "missing" else f" (got {e['input']!r})"
        if e["type"] == "extra_forbidden":
            msg = "unknown field; valid fields are " + ", ".join(sorted(SwaaConfig.model_fields))
        else:
            msg = e["msg"]
        lines.append(f"{field}: {msg}{got}")
    return "; ".join(lines)


def _check_layers(field: str, layers: list[int], num_layers: int) -> None:
    seen: set[int] = set()
    for layer in layers:
        if not 0 <= layer < num_layers:
            raise SwaaConfigError(
                f"swaa_config.{field}: layer {layer} is outside the model, which has "
                f"{num_layers} layers (valid indices 0..{num_layers - 1}); {_DOCS}"
            )
        if layer in seen:
            raise SwaaConfigError(f"swaa_config.{field}: layer {layer} is listed twice; list each layer once")
        seen.add(layer)


def build_plan(raw: Any, num_layers: int) -> SwaaPlan:
    """Validate a raw ``swaa_config`` and resolve it for a model of ``num_layers``.

    Args:
        raw: None (no config: plain causal attention), a mapping, a JSON-decoded
            object, or a :class:`SwaaConfig`.
        num_layers: number of decoder layers of the model (``num_hidden_layers``).

    Raises:
        SwaaConfigError: naming the offending field and the fix.
    """
    if raw is None:
        return SwaaPlan(layers=(FULL_ATTENTION,) * num_layers, configured=False)
    if isinstance(raw, SwaaConfig):
        cfg = raw
    else:
        if not isinstance(raw, Mapping):
            raise SwaaConfigError(
                f"swaa_config must be a JSON object such as "
                f'{{"sliding_window_size": 2048, "keep_first": 100}}, got {type(raw).__name__} {raw!r}'
            )
        try:
            cfg = SwaaConfig.model_validate(dict(raw))
        except ValidationError as err:
            raise SwaaConfigError(f"{_format_validation_error(err)}; {_DOCS}") from None
    _check_layers("non_sliding_layers", cfg.non_sliding_layers, num_layers)
    fa_list = cfg.force_fa_decode if isinstance(cfg.force_fa_decode, list) else []
    _check_layers("force_fa_decode", fa_list, num_layers)
    if cfg.sliding_window_size is None:
        ignored = [
            name
            for name, default in (("keep_first", 0), ("force_fa_decode", False), ("non_sliding_layers", []))
            if getattr(cfg, name) != default
        ]
        if ignored:
            raise SwaaConfigError(
                f"swaa_config.{ignored[0]} has no effect while swaa_config.sliding_window_size is null "
                f"(full attention everywhere); set sliding_window_size or remove {', '.join(ignored)}"
            )
        return SwaaPlan(layers=(FULL_ATTENTION,) * num_layers, configured=True)
    both = sorted(set(fa_list) & set(cfg.non_sliding_layers))
    if both:
        raise SwaaConfigError(
            f"swaa_config.force_fa_decode lists layer {both[0]}, which is also in non_sliding_layers "
            f"(already full attention everywhere); remove it from one of the two lists"
        )
    full = set(cfg.non_sliding_layers)
    if len(full) == num_layers:
        raise SwaaConfigError(
            f"swaa_config.non_sliding_layers lists all {num_layers} layers, so sliding_window_size has no effect; "
            "remove some layers from non_sliding_layers, or set sliding_window_size to null"
        )
    layers = []
    for i in range(num_layers):
        if i in full:
            layers.append(FULL_ATTENTION)
            continue
        fa_decode = cfg.force_fa_decode if isinstance(cfg.force_fa_decode, bool) else i in fa_list
        layers.append(LayerMaskSpec(window=cfg.sliding_window_size, keep_first=cfg.keep_first, fa_decode=fa_decode))
    return SwaaPlan(layers=tuple(layers), configured=True)


def plan_from_hf_config(hf_config: Any) -> SwaaPlan:
    """The plan of a Hugging Face model config (reads ``swaa_config`` and ``num_hidden_layers``).

    A ``swaa_config`` given as a JSON string is decoded first.

    Raises:
        SwaaConfigError: invalid ``swaa_config``, or a model without ``num_hidden_layers``.
    """
    raw = getattr(hf_config, "swaa_config", None)
    if isinstance(raw, str):
        import json

        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise SwaaConfigError(f"swaa_config is not valid JSON: {err}") from None
    text_config = getattr(hf_config, "get_text_config", lambda: hf_config)()
    num_layers = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise SwaaConfigError(
            f"model type {getattr(hf_config, 'model_type', '?')!r} has no num_hidden_layers in its config; "
            "swaa supports decoder-only transformer models (Llama, Qwen2, Qwen3, ...)"
        )
    return build_plan(raw, num_layers)

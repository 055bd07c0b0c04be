"""SWA-aware fine-tuning: training masks = inference masks, and the adapter serves through vLLM.

* The masks the training attention applies (``swaa_vllm.finetuning.training_attention``) are compared, layer by
  layer and position by position, with the key sets the ``swaa`` backend's row plan gives the same
  positions in three scheduler situations (one recompute chunk, prefill + decode steps, chunked
  prefill): same plan, same prompt/generated roles.
* The tiled training attention equals the dense float64 reference (``tests/hf_reference.py``) on a
  tiny model, and its key tiles stay within sinks + window.
* A few training steps on a tiny random-weight Llama produce a peft adapter that vLLM (``swaa``
  backend, ``enable_lora``) loads, that changes greedy output, and whose served tokens and
  log-probabilities equal the training model's own teacher-forced forward.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from swaa_kernels.cpu import plan_rows
from swaa_vllm.config import build_plan, plan_from_hf_config
from swaa_vllm.evaluation.recipes import preset_config
from swaa_vllm.evaluation.scoring import score
from swaa_vllm.evaluation.tasks import (
    FILLER_SENTENCES,
    TASKS,
    TRAINING_FILLER_SENTENCES,
    TRAINING_TASKS,
    TaskSpec,
    make_sample,
)
from swaa_vllm.finetuning import training_attention
from swaa_vllm.finetuning.distill import build_samples, read_jsonl
from swaa_vllm.finetuning.train import LoraHyperparameters, train
from tests import hf_reference, tiny_models

REPO = Path(__file__).resolve().parent.parent
NUM_LAYERS = 4
# Layer 0: sliding with FA decode; layer 1: full; layers 2-3: sliding, generated tokens also windowed.
SWAA_CONFIG = {"sliding_window_size": 16, "keep_first": 4, "force_fa_decode": [0], "non_sliding_layers": [1]}
PROMPT_LEN, ANSWER_LEN = 70, 12


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_models.make_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama", num_layers=NUM_LAYERS,
                                       num_heads=4, num_kv_heads=2, head_dim=32, seed=3)


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                attn_implementation=training_attention.register()).eval()


def _training_masks(model, plan, ids: list[int], prompt_len: int, monkeypatch) -> list[torch.Tensor]:
    """The mask each layer's training attention applied in one forward, in layer order."""
    seen: list[torch.Tensor] = []
    real = training_attention.tiled_masked_attention

    def record(query, key, value, mask, *args, **kwargs):
        seen.append(mask.clone())
        return real(query, key, value, mask, *args, **kwargs)

    monkeypatch.setattr(training_attention, "tiled_masked_attention", record)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), use_cache=False, swaa_plan=plan, swaa_prompt_len=prompt_len)
    monkeypatch.setattr(training_attention, "tiled_masked_attention", real)
    return seen


def _inference_visible(spec, prompt_len: int, steps: list[tuple[int, int]]) -> dict[int, set[int]]:
    """Key sets the backend's row plan gives each position, over scheduler steps ``(context, q_len)``.

    Row classes as ``kernels/cpu.py`` serves them: causal rows read ``[0, i]``, windowed rows
    ``(i - W, i]``, sink-window rows ``[0, k)`` and ``(i - W, i]``.
    """
    visible: dict[int, set[int]] = {}
    for context, q_len in steps:
        plan = plan_rows(torch.tensor([0, q_len]), torch.tensor([context + q_len]), torch.tensor([prompt_len]),
                         torch.zeros(1, 1, dtype=torch.int32), spec)

        def rows(batch):
            if batch is None:
                return []
            return list(range(batch.num_rows)) if batch.rows is None else batch.rows.tolist()

        for row in rows(plan.causal):
            visible[context + row] = set(range(context + row + 1))
        for row in rows(plan.windowed):
            i = context + row
            visible[i] = set(range(max(0, i - spec.window + 1), i + 1))
        for _, first, end, _ in plan.sink_window:
            for row in range(first, end):
                i = context + row
                visible[i] = set(range(spec.keep_first)) | set(range(i - spec.window + 1, i + 1))
    return visible


SITUATIONS = {
    # prompt and answer in one chunk: a recompute after preemption, and exactly a training sequence
    "one_chunk": [(0, PROMPT_LEN + ANSWER_LEN)],
    "prefill_then_decode": [(0, PROMPT_LEN)] + [(PROMPT_LEN + t, 1) for t in range(ANSWER_LEN)],
    "chunked_prefill_7": [(c, min(7, PROMPT_LEN + ANSWER_LEN - c)) for c in range(0, PROMPT_LEN + ANSWER_LEN, 7)],
}


@pytest.mark.parametrize("situation", sorted(SITUATIONS))
def test_training_masks_equal_inference_masks(tiny_llama, situation, monkeypatch):
    from transformers import AutoConfig

    model = _load(tiny_llama)
    hf_config = AutoConfig.from_pretrained(tiny_llama)
    hf_config.swaa_config = SWAA_CONFIG
    inference_plan = plan_from_hf_config(hf_config)  # what the backend resolves at start-up
    training_plan = build_plan(SWAA_CONFIG, model.config.num_hidden_layers)
    assert training_plan == inference_plan
    ids = torch.randint(2, tiny_models.VOCAB, (PROMPT_LEN + ANSWER_LEN,), generator=torch.Generator().manual_seed(0))
    masks = _training_masks(model, training_plan, ids.tolist(), PROMPT_LEN, monkeypatch)
    assert len(masks) == NUM_LAYERS
    kinds = set()
    for layer, mask in enumerate(masks):
        spec = inference_plan.for_layer(layer)
        visible = _inference_visible(spec, PROMPT_LEN, SITUATIONS[situation])
        assert sorted(visible) == list(range(PROMPT_LEN + ANSWER_LEN))
        for i in range(PROMPT_LEN + ANSWER_LEN):
            trained = set(torch.nonzero(mask[i]).flatten().tolist())
            assert trained == visible[i], (layer, i, sorted(trained ^ visible[i]))
            kinds.add((layer, len(trained) == i + 1))
    # the case must exercise both roles: layer 0 answers see everything, layer 2 answers stay windowed
    assert masks[0][PROMPT_LEN + 5].sum() == PROMPT_LEN + 6
    assert masks[2][PROMPT_LEN + 5].sum() == 4 + 16
    assert masks[1][PROMPT_LEN - 1].sum() == PROMPT_LEN


def test_training_attention_equals_dense_reference(tiny_llama):
    """Tiled training attention = the float64 dense oracle over prompt + answer (teacher forcing)."""
    model = _load(tiny_llama)
    plan = build_plan(SWAA_CONFIG, NUM_LAYERS)
    ids = torch.randint(2, tiny_models.VOCAB, (1, 150), generator=torch.Generator().manual_seed(1))
    prompt_len = 137  # prompt rows of the last tile and generated rows in one tile
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False, swaa_plan=plan, swaa_prompt_len=prompt_len).logits[0]
    reference = hf_reference.load_model(tiny_llama)
    hf_reference._State.rules = hf_reference.layer_rules(SWAA_CONFIG, NUM_LAYERS)
    hf_reference._State.prompt_len = prompt_len
    with torch.no_grad():
        want = reference(input_ids=ids, use_cache=False).logits[0]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    # the same forward with all layers full differs: the masks matter at this length
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False, swaa_plan=build_plan(None, NUM_LAYERS),
                     swaa_prompt_len=prompt_len).logits[0]
    assert (full - want).abs().max() > 1e-2


@pytest.mark.parametrize("tile", [1, 5, 64, 512])
def test_tiled_attention_matches_dense_softmax_and_reads_only_visible_keys(tile, monkeypatch):
    from swaa_kernels.reference import reference_attention

    n, w, k = 200, 24, 3
    spec = build_plan({"sliding_window_size": w, "keep_first": k, "force_fa_decode": True}, 1).for_layer(0)
    mask = training_attention.layer_mask(spec, n, prompt_len=180)
    g = torch.Generator().manual_seed(2)
    q, key, v = (torch.randn(1, h, n, 16, generator=g) for h in (4, 2, 2))
    widths = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, keys, *args, **kwargs):
        widths.append((query.shape[2], keys.shape[2]))
        return real(query, keys, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    out = training_attention.tiled_masked_attention(q, key, v, mask, 0.25, tile=tile)
    want = reference_attention(q[0].transpose(0, 1), key[0].transpose(0, 1), v[0].transpose(0, 1), mask, 0.25)
    torch.testing.assert_close(out[0].double(), want, atol=1e-5, rtol=1e-5)
    for t, (rows, cols) in enumerate(widths):
        last_row = t * tile + rows - 1
        if last_row < 180:  # prompt tiles: sinks + window span only
            assert cols <= k + w - 1 + rows, (t, rows, cols)


def test_training_attention_refuses_missing_plan_and_batches(tiny_llama):
    model = _load(tiny_llama)
    with pytest.raises(ValueError, match="swaa_plan"):
        model(input_ids=torch.tensor([[3, 4, 5]]), use_cache=False)
    with pytest.raises(ValueError, match="one sequence"):
        model(input_ids=torch.tensor([[3, 4, 5], [6, 7, 8]]), use_cache=False,
              swaa_plan=build_plan(SWAA_CONFIG, NUM_LAYERS), swaa_prompt_len=2)


def _rows(num: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(2, tiny_models.VOCAB, (PROMPT_LEN,), generator=g).tolist(),
             "answer_ids": torch.randint(2, tiny_models.VOCAB, (ANSWER_LEN,), generator=g).tolist()}
            for _ in range(num)]


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama, tmp_path_factory) -> tuple[Path, list[dict], dict]:
    rows = _rows(2, seed=4)
    out = tmp_path_factory.mktemp("adapter")
    hp = LoraHyperparameters(learning_rate=5e-3, dropout=0.0, epochs=12, warmup_fraction=0.0)
    summary = train(tiny_llama, SWAA_CONFIG, rows, out, hp, bf16=False, progress=False)
    return out, rows, summary


def test_training_writes_a_peft_adapter_and_learns(tiny_adapter):
    out, rows, summary = tiny_adapter
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32 and config["use_rslora"] is True
    assert sorted(config["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    log = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(24)) and summary["steps"] == 24
    assert summary["swaa_config"] == SWAA_CONFIG
    # memorising two sequences: the loss of the last epoch is far below the first
    assert summary["loss_last_quarter"] < 0.2 * summary["loss_first_quarter"]


def _served(model_dir: Path, prompts: list[list[int]], adapter: Path | None, max_tokens: int):
    from vllm import SamplingParams, TokensPrompt
    from vllm.lora.request import LoRARequest

    from tests.engine import llm_engine

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1, ignore_eos=True, detokenize=False)
    with llm_engine(model_dir, attention_backend="swaa", hf_overrides={"swaa_config": SWAA_CONFIG},
                    skip_tokenizer_init=True, enable_lora=True, max_lora_rank=16, max_loras=1,
                    max_model_len=512) as llm:
        results = []
        for lora in (None, LoRARequest("swaa-lora", 1, str(adapter)) if adapter else None):
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                                lora_request=lora)
            results.append([(list(o.outputs[0].token_ids),
                             [s[t].logprob for t, s in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)])
                            for o in outs])
    return results


@pytest.mark.e2e
def test_adapter_serves_through_vllm_swaa_backend_and_matches_training_forward(tiny_llama, tiny_adapter):
    from peft import PeftModel

    adapter, rows, _ = tiny_adapter
    prompts = [rows[0]["prompt_ids"], rows[1]["prompt_ids"], _rows(1, seed=9)[0]["prompt_ids"]]
    base, tuned = _served(tiny_llama, prompts, adapter, ANSWER_LEN)
    assert any(b[0] != t[0] for b, t in zip(base, tuned, strict=True)), "the adapter did not change vLLM's output"
    # the trained prompts now continue with (the start of) their memorised answers
    assert tuned[0][0][:4] == rows[0]["answer_ids"][:4]
    model = PeftModel.from_pretrained(_load(tiny_llama), adapter).eval()
    plan = build_plan(SWAA_CONFIG, NUM_LAYERS)
    for prompt, (tokens, logprobs) in zip(prompts, tuned, strict=True):
        ids = torch.tensor([prompt + tokens[:-1]])
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False, swaa_plan=plan, swaa_prompt_len=len(prompt),
                           logits_to_keep=len(tokens)).logits[0]
        lp = torch.log_softmax(logits.float(), dim=-1)
        assert lp.argmax(dim=-1).tolist() == tokens
        torch.testing.assert_close(torch.tensor(logprobs), lp[torch.arange(len(tokens)), tokens],
                                   atol=2e-3, rtol=0)


def test_presets_and_cli_errors(tmp_path):
    assert preset_config("swa_only", 64, 4) == {"sliding_window_size": 64}
    assert preset_config("recipe", 128, 6) == {"sliding_window_size": 128, "keep_first": 16,
                                               "force_fa_decode": True, "non_sliding_layers": [1, 3, 5]}
    with pytest.raises(ValueError, match="preset"):
        preset_config("recipe_plus", 128, 6)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt_ids": [1, 2], "answer_ids": [3]}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "swaa_vllm.finetuning.train", *args],
                              capture_output=True, text=True,
                              env=env, timeout=120)

    bad = run("--data", str(data), "--output", str(tmp_path / "a"), "--swaa-config", '{"sliding_window_size": 0}')
    assert bad.returncode != 0 and "swaa_config.sliding_window_size" in bad.stderr
    missing = run("--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "a"))
    assert missing.returncode != 0 and "python -m swaa_vllm.finetuning.distill" in missing.stderr
    # both wrong: the config is reported first (it does not depend on the data)
    both = run("--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "a"), "--swaa-config",
               '{"sliding_window_size": 0}')
    assert both.returncode != 0 and "swaa_config.sliding_window_size" in both.stderr
    zero = run("--data", str(data), "--output", str(tmp_path / "a"), "--rank", "0")
    assert zero.returncode != 0 and "--rank must be >= 1" in zero.stderr
    assert not (tmp_path / "a").exists()


def test_distillation_file_errors_name_line_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt_ids": [1, 2], "answer_ids": [3]}) + "\n" + json.dumps({"prompt_ids": [1]}))
    with pytest.raises(ValueError, match=r"d.jsonl:2: field 'answer_ids'"):
        read_jsonl(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        read_jsonl(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="d.jsonl:1: not JSON"):
        read_jsonl(path)


def test_training_families_are_disjoint_from_the_harness(model_dir):
    from transformers import AutoTokenizer

    assert not set(TRAINING_TASKS) & set(TASKS)
    assert not set(TRAINING_FILLER_SENTENCES) & set(FILLER_SENTENCES)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="not training families"):
        build_samples(tokenizer, 1, tasks=["passkey"])
    samples = build_samples(tokenizer, 4)
    assert [s.task for s in samples] == [t for t in TRAINING_TASKS for _ in range(4)]
    for s in samples:
        assert s.answers[0] in s.text and not any(f in s.text for f in FILLER_SENTENCES)
        assert s.num_tokens <= 832
    again = make_sample(tokenizer, TaskSpec("code_lookup", 448, num_keys=2), samples[4].seed, samples[4].depth)
    assert again == samples[4]


@pytest.mark.parametrize("task, output, answer, right", [
    ("word_lookup", "The secret color of the amber-falcon is Teal.", "teal", True),
    ("word_lookup", "It is red, or maybe teal.", "teal", False),
    ("word_lookup", "I do not know.", "teal", False),
    ("code_lookup", "The access code is QX-4817.", "QX-4817", True),
    ("code_lookup", "The access code is QX-4816.", "QX-4817", False),
    ("code_lookup", "QX-48170", "QX-4817", False),
    ("person_city", "Maria moved to Lisbon last year.", "Lisbon", True),
    ("person_city", "Maria moved to Oslo, not Lisbon.", "Lisbon", False),
])
def test_training_family_scoring(task, output, answer, right):
    assert score(task, output, [answer]) is right

"""The Ray Data batch pipeline ``python -m swaa_vllm.batch.ray_data`` (issue 7, part 2).

* 2 replicas over a small JSONL file on a local Ray instance (2 CPUs): every id comes back once,
  with the same greedy text as one ``LLM.generate`` call on the same prompts (same engine
  settings and sampling), both replicas built a swaa engine with the requested plan, and both
  generated rows (their per-batch log lines, by actor pid, add up to the input);
* invalid inputs and settings stop before Ray starts, with exit status 2 and a message that names
  the line, the field and the fix.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from swaa_vllm.batch import ray_data

FILLER = "The museum opens at nine and closes at five. Visitors may bring a camera but no tripod. "
SWAA_CONFIG = {"sliding_window_size": 32, "keep_first": 4, "force_fa_decode": True}
MAX_TOKENS = 12
ENGINE = dict(dtype="float32", max_model_len=1024, kv_cache_memory_bytes=64 << 20, enforce_eager=True)


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def prompts():
    """Five prompts of 35-75 tokens: longer than the 32-token window, so the plan matters."""
    return {f"q{i}": f"Note {i}: " + FILLER * (1 + i % 3) + f"Question {i}: when does the museum open?"
            for i in range(5)}


@pytest.mark.e2e
def test_two_replicas_match_one_llm_generate(tmp_path, model_dir, prompts):
    source = _write_jsonl(tmp_path / "prompts.jsonl", [{"id": k, "prompt": v, "extra": 1} for k, v in prompts.items()])
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "swaa_vllm.batch.ray_data", "--input", str(source), "--output", str(out),
        "--model", str(model_dir), "--replicas", "2", "--swaa-config", json.dumps(SWAA_CONFIG),
        "--max-tokens", str(MAX_TOKENS), "--dtype", "float32", "--max-model-len", "1024",
        "--kv-cache-gib", str((64 << 20) / (1 << 30)), "--enforce-eager", "--num-cpus", "2", "--batch-size", "2",
    ]
    # Ray merges similar log lines of different workers (numbers ignored) unless told not to.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "wrote 5 rows" in proc.stdout

    rows = [json.loads(line) for f in sorted(out.glob("*.json")) for line in f.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(prompts)
    assert all(set(r) == set(ray_data.OUTPUT_FIELDS) for r in rows)

    # Both replicas built an engine with the requested plan (their log lines carry the actor pid).
    log = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # Ray forwards actor logs to stdout
    plan_pids = set(re.findall(r"\(MapWorker\(MapBatches\(SwaaGenerator\)\) pid=(\d+)\).*SWAA plan for 30 layers: "
                               r"sliding W=32 k=4, full-attention decode", log))
    assert len(plan_pids) == 2, "expected two replicas logging the SWAA plan"
    # ... and both generated rows: each batch's log line names its replica and rows.
    ids_by_pid: dict[str, list[str]] = {}
    for pid, ids in re.findall(r"SwaaGenerator pid (\d+): generated \d+ rows, ids (\[.*?\])", log):
        ids_by_pid.setdefault(pid, []).extend(json.loads(ids.replace("'", '"')))
    assert set(ids_by_pid) == plan_pids, ids_by_pid
    assert sorted(i for ids in ids_by_pid.values() for i in ids) == sorted(prompts)

    # The reference: one LLM.generate over the same prompts, same settings.
    from vllm import SamplingParams

    from tests.engine import llm_engine

    ids = list(prompts)
    with llm_engine(model_dir, attention_backend="swaa", hf_overrides={"swaa_config": SWAA_CONFIG}, **ENGINE) as llm:
        outs = llm.generate([prompts[i] for i in ids], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                            use_tqdm=False)
    expected = {i: o.outputs[0].text for i, o in zip(ids, outs, strict=True)}
    got = {r["id"]: r["generated_text"] for r in rows}
    assert got == expected
    assert all(r["num_generated_tokens"] == MAX_TOKENS for r in rows)


@pytest.mark.parametrize(
    ("rows", "batch_size", "replicas", "blocks"),
    [(5, 2, 2, 3), (3, 16, 2, 2), (1, 16, 2, 1), (100, 16, 2, 7), (10**6, 16, 2, 128), (5, 2, 1, 3)],
)
def test_input_blocks_give_every_replica_work(rows, batch_size, replicas, blocks):
    # A replica takes whole blocks: fewer blocks than replicas leaves one idle (CI once saw all rows of a
    # small file in one block, on one replica).
    assert ray_data.input_block_count(rows, batch_size, replicas) == blocks


def test_pipeline_waits_for_every_replica_before_the_first_batch(tmp_path, model_dir):
    # Ray Data hands out batches only after all replicas are up if the dataset's own DataContext says so:
    # a dataset copies the process-wide context when it is read, so setting that afterwards is ignored
    # (it was, and CI twice saw the first replica up take every row).
    import ray

    source = _write_jsonl(tmp_path / "in.jsonl", [{"id": f"q{i}", "prompt": "hi"} for i in range(5)])
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        ray.data.DataContext.get_current().wait_for_min_actors_s = -1  # Ray's default: no wait
        ds = ray_data.build_dataset(source, str(model_dir), replicas=2, batch_size=2)
        assert ds.context.wait_for_min_actors_s == ray_data.REPLICA_START_TIMEOUT_S
    finally:
        ray.shutdown()


def _run_main(args, capsys):
    status = ray_data.main(args)
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": "a", "prompt": "hi"}, {"id": "b", "text": "hello"}],
         "line 2: no 'prompt' field (fields: id, text)"),
        ([{"prompt": "hi"}], "line 1: no 'id' field"),
        ([{"id": "a", "prompt": ""}], "line 1: field 'prompt': String should have at least 1 character"),
        ([{"id": "a", "prompt": 3}], "line 1: field 'prompt': Input should be a valid string"),
        ([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], "line 2: id 'a' appears twice"),
        (['{"id": "a", "prompt": "x"', ], "line 1: not valid JSON"),
        (['["a", "x"]'], "line 1: a JSON list, not an object"),
        ([], "the file has no rows"),
    ],
    ids=["missing-prompt", "missing-id", "empty-prompt", "prompt-not-text", "duplicate-id", "bad-json", "not-object",
         "empty-file"],
)
def test_bad_input_is_refused_with_the_field_and_fix(tmp_path, model_dir, capsys, rows, message):
    source = _write_jsonl(tmp_path / "in.jsonl", rows)
    status, err = _run_main(["--input", str(source), "--output", str(tmp_path / "out"), "--model", str(model_dir)],
                            capsys)
    assert status == 2
    assert message in err
    assert 'each row needs an "id"' in err or "give every row its own id" in err
    assert not (tmp_path / "out").exists()


def test_parquet_without_prompt_column_and_missing_file(tmp_path, model_dir, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "text": ["hi"]}), tmp_path / "in.parquet")
    status, err = _run_main(["--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "o"),
                             "--model", str(model_dir)], capsys)
    assert status == 2 and "no 'prompt' column (columns: id, text)" in err
    status, err = _run_main(["--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o"),
                             "--model", str(model_dir)], capsys)
    assert status == 2 and "no such file" in err


def test_parquet_rows_are_checked_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2], "prompt": ["a", "b"], "x": [0, 0]}), tmp_path / "ok.parquet")
    assert ray_data.check_input(tmp_path / "ok.parquet") == 2


@pytest.mark.parametrize(
    ("swaa_config", "message"),
    [
        ('{"sliding_window_size": 32, "keep_firs": 4}', "invalid swaa_config: swaa_config.keep_firs: unknown field"),
        ('{"sliding_window_size": 32, "non_sliding_layers": [30]}',
         "swaa_config.non_sliding_layers: layer 30 is outside the model, which has 30 layers"),
        ('{"sliding_window_size": "32"}', "swaa_config.sliding_window_size: Input should be a valid integer"),
        ('{sliding_window_size: 32}', "--swaa-config is not valid JSON"),
        ("/nonexistent/swaa.json", "is neither a JSON object nor an existing file"),
    ],
    ids=["unknown-field", "layer-outside-model", "wrong-type", "not-json", "missing-file"],
)
def test_bad_swaa_config_is_refused_before_ray_starts(tmp_path, model_dir, capsys, swaa_config, message):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}])
    status, err = _run_main(["--input", str(source), "--output", str(tmp_path / "out"), "--model", str(model_dir),
                             "--swaa-config", swaa_config], capsys)
    assert status == 2
    assert message in err


def test_unloadable_model_is_refused_before_ray_starts(tmp_path, capsys):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}])
    status, err = _run_main(["--input", str(source), "--output", str(tmp_path / "out"), "--model",
                             str(tmp_path / "no-model")], capsys)
    assert status == 2
    assert f"--model {tmp_path / 'no-model'}: cannot load its config" in err and "config.json" in err

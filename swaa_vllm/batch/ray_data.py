"""Offline batch generation with the ``swaa`` backend on Ray Data.

    python -m swaa_vllm.batch.ray_data --input prompts.jsonl --output out/ --model DIR --replicas 2 \\
        --swaa-config '{"sliding_window_size": 512, "keep_first": 64, "force_fa_decode": true}'

Reads prompts from JSONL (one JSON object per line) or Parquet, each row with an ``id`` and a
``prompt`` (text; other fields are ignored), runs vLLM with ``attention_backend="swaa"`` in N
replicas and writes one output row per input row (``id``, ``generated_text``, ``finish_reason``,
``num_prompt_tokens``, ``num_generated_tokens``) as JSONL or Parquet files into the output
directory. Ray Data shows the progress (its progress bars, or progress log lines when the output
is not a terminal). The same greedy request gives the same text as one ``LLM.generate`` call on
the same prompts (``tests/test_ray_batch.py``).

Pipeline: ``ray.data.read_json`` / ``read_parquet`` -> ``Dataset.map_batches`` with the callable
class :class:`SwaaGenerator` (one ``vllm.LLM`` per actor) on a fixed pool of N actors -> ``write_json`` /
``write_parquet``. Reading and writing request no CPU, so the N replicas can use all of them
(an operator that asks for a CPU while the replicas hold them all waits forever: Ray Data's
progress then shows it ``backpressured:tasks(ResourceBudget)``).

Why not Ray's own LLM batch API (``ray.data.llm``, Ray 2.60)? It was tried first, with vLLM's
CPU build, and runs there only with workarounds: ``log_engine_metrics=False`` (its metrics logger
imports ``ray.serve``, which ``ray[data]`` does not install), a CPU ``placement_group_config``
(its default asks for one GPU per replica) and fractional CPUs for its pre/post-processing
stages. So set up, one replica served 6 prompts in 36 s on 2 cores, but two replicas on 2 cores
stalled after engine start-up (runs of 5 and 7 minutes). The same stall then appeared in this
module's first version, where Ray Data's progress named the cause: an operator between read and
inference asked for a CPU that the replicas held (``backpressured:tasks(ResourceBudget)``);
``ray.data.llm`` adds such stages of its own. Its replicas also run vLLM's ``AsyncLLM``, three
processes each on CPU (actor, engine core, worker). ``map_batches`` with a callable class is Ray
Data's standard pattern for stateful inference; the synchronous ``vllm.LLM`` here is the API the
single-process reference uses, and it runs in-process (one process per replica,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, vLLM's uni executor), on the OpenMP threads Ray gives the
actor (``OMP_NUM_THREADS`` = its CPUs).

Validation happens before Ray starts, and every error names the field and the fix
(:class:`BatchInputError`): a missing or empty input, a line that is not a JSON object, a row
without ``prompt`` or ``id`` (or with an empty prompt), duplicate ids, an invalid
``--swaa-config`` (checked against the model's layer count by :func:`swaa_vllm.config.build_plan`,
message ``invalid swaa_config: ...``), more replica CPUs than the Ray cluster has.

Multi-node: start Ray on each node (``ray start --head`` / ``ray start --address=HEAD:6379``), with
swaa-vllm installed everywhere, and pass ``--ray-address auto`` (or set ``RAY_ADDRESS``); replicas
spread over the cluster. On GPUs pass ``--num-gpus-per-replica 1`` (and ``--num-cpus-per-replica``
as needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from swaa_vllm.config import SwaaConfigError, build_plan

__all__ = [
    "BatchInputError", "PromptRow", "SwaaGenerator", "build_dataset", "check_input", "input_block_count",
    "load_swaa_config", "main", "model_config", "run_batch",
]

# Seconds Ray Data waits for all replicas to build their engines before the first batch (then it fails).
REPLICA_START_TIMEOUT_S = 1800
# Upper bound on input blocks per replica (a block is the unit a replica takes; see run_batch).
BLOCKS_PER_REPLICA = 64
OUTPUT_FIELDS = ("id", "generated_text", "finish_reason", "num_prompt_tokens", "num_generated_tokens")
_ROW_FORMAT = 'each row needs an "id" (string or integer) and a non-empty "prompt" string, e.g. ' \
              '{"id": "q1", "prompt": "Summarise ..."}'


class BatchInputError(ValueError):
    """Input or settings the batch job cannot run with; the message names the field and the fix."""


class PromptRow(BaseModel):
    """One input row: ``id`` (string or integer, unique) and ``prompt`` (non-empty text)."""

    model_config = ConfigDict(extra="ignore")

    id: StrictStr | StrictInt
    prompt: StrictStr = Field(min_length=1)


def _input_format(path: Path) -> str:
    suffix = "".join(path.suffixes[-2:]) if path.suffix in (".gz", ".zst") else path.suffix
    if suffix in (".jsonl", ".json", ".jsonl.gz", ".json.gz"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise BatchInputError(
        f"--input {path}: unknown format {suffix or '(no extension)'!r}; use a .jsonl file (one JSON object per "
        "line) or a .parquet file"
    )


def _iter_rows(path: Path, fmt: str) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for each row of the input, ``where`` being "line N" or "row N" (1-based)."""
    if fmt == "jsonl":
        import gzip

        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"line {number}", json.loads(line)
                except json.JSONDecodeError as err:
                    raise BatchInputError(
                        f"--input {path}, line {number}: not valid JSON ({err.msg}); {_ROW_FORMAT}"
                    ) from None
    else:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        missing = [name for name in ("id", "prompt") if name not in names]
        if missing:
            raise BatchInputError(
                f"--input {path}: no {missing[0]!r} column (columns: {', '.join(names)}); {_ROW_FORMAT}"
            )
        number = 0
        for batch in parquet.iter_batches(columns=["id", "prompt"]):
            for row in batch.to_pylist():
                number += 1
                yield f"row {number}", row


def check_input(path: str | os.PathLike) -> int:
    """Validate a JSONL or Parquet prompt file; the number of rows.

    Streams the file once (it is not held in memory); each row is checked with :class:`PromptRow`.

    Raises:
        BatchInputError: missing/empty file, unknown format, a row that is not a JSON object, a
            missing or wrong ``id``/``prompt``, or a duplicate id; the message names the line or
            row, the field and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise BatchInputError(f"--input {path}: no such file; pass a .jsonl or .parquet file of prompts")
    fmt = _input_format(path)
    seen: set[Any] = set()
    count = 0
    for where, raw in _iter_rows(path, fmt):
        if not isinstance(raw, dict):
            raise BatchInputError(f"--input {path}, {where}: a JSON {type(raw).__name__}, not an object; {_ROW_FORMAT}")
        try:
            row = PromptRow.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "row"
            if first["type"] == "missing":
                problem = f"no {field!r} field (fields: {', '.join(raw) or 'none'})"
            else:
                problem = f"field {field!r}: {first['msg']} (got {first['input']!r})"
            raise BatchInputError(f"--input {path}, {where}: {problem}; {_ROW_FORMAT}") from None
        key = (type(row.id).__name__, row.id)
        if key in seen:
            raise BatchInputError(f"--input {path}, {where}: id {row.id!r} appears twice; give every row its own id")
        seen.add(key)
        count += 1
    if count == 0:
        raise BatchInputError(f"--input {path}: the file has no rows; {_ROW_FORMAT}")
    return count


def load_swaa_config(value: str | None, num_layers: int) -> dict | None:
    """Parse and validate ``--swaa-config`` (a JSON object, or the path of a JSON file) for a model of
    ``num_layers`` decoder layers (from :func:`model_config`).

    None keeps the model's own ``swaa_config`` (its ``config.json``), if any.

    Raises:
        SwaaConfigError: not JSON, or invalid for the model (message starts ``invalid swaa_config:``
            and names the field and the fix, as at server start-up).
    """
    if value is None:
        return None
    text = value
    if not value.lstrip().startswith("{"):
        if not Path(value).is_file():
            raise SwaaConfigError(
                f"--swaa-config {value!r} is neither a JSON object nor an existing file; pass a JSON object such as "
                '\'{"sliding_window_size": 512, "keep_first": 64}\' or the path of a JSON file'
            )
        text = Path(value).read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise SwaaConfigError(
            f"--swaa-config is not valid JSON ({err.msg} at character {err.pos}); pass a JSON object such as "
            '\'{"sliding_window_size": 512, "keep_first": 64}\' or the path of a JSON file'
        ) from None
    build_plan(raw, num_layers)  # raises SwaaConfigError naming the field
    return raw


def model_config(model: str):
    """The Hugging Face config of ``model`` (a directory, or a name already in the local HF cache).

    Raises:
        BatchInputError: the config cannot be loaded (the message names ``--model`` and the fix).
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BatchInputError(
            f"--model {model}: cannot load its config ({first}); pass a model directory with a config.json "
            "(or a model name available offline)"
        ) from None


class SwaaGenerator:
    """Ray Data callable class: one ``vllm.LLM`` with the swaa backend per actor.

    Args:
        model: model directory or name, as for ``vllm.LLM``.
        engine_kwargs: further ``vllm.LLM`` arguments (``attention_backend="swaa"`` and
            ``hf_overrides`` are set by :func:`run_batch`).
        sampling: ``vllm.SamplingParams`` arguments, the same for every row.
    """

    def __init__(self, model: str, engine_kwargs: dict[str, Any], sampling: dict[str, Any]) -> None:
        from vllm import LLM, SamplingParams

        self.llm = LLM(model, **engine_kwargs)
        self.sampling = SamplingParams(**sampling)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        """Generate for one batch ``{"id": [n], "prompt": [n], ...}``; returns the output columns, n rows each."""
        outputs = self.llm.generate([str(p) for p in batch["prompt"]], self.sampling, use_tqdm=False)
        # One line per batch in the driver's log: which replica generated which rows (the pid in the text also
        # keeps Ray's log deduplication from merging the replicas' lines).
        print(f"SwaaGenerator pid {os.getpid()}: generated {len(outputs)} rows, ids {list(batch['id'])}",
              file=sys.stderr, flush=True)
        return {
            "id": list(batch["id"]),
            "generated_text": [o.outputs[0].text for o in outputs],
            "finish_reason": [o.outputs[0].finish_reason for o in outputs],
            "num_prompt_tokens": [len(o.prompt_token_ids) for o in outputs],
            "num_generated_tokens": [len(o.outputs[0].token_ids) for o in outputs],
        }


def input_block_count(num_rows: int, batch_size: int, replicas: int) -> int:
    """Blocks the read makes of ``num_rows`` input rows: one per batch of ``batch_size`` rows, at least
    ``replicas`` (so each replica gets a block; never more than ``num_rows``), at most
    ``BLOCKS_PER_REPLICA * replicas`` (blocks of several batches for large inputs)."""
    per_batch = min(math.ceil(num_rows / batch_size), BLOCKS_PER_REPLICA * replicas)
    return max(1, min(num_rows, max(replicas, per_batch)))


def run_batch(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    model: str,
    *,
    replicas: int = 1,
    swaa_config: dict | None = None,
    sampling: dict[str, Any] | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    output_format: str = "jsonl",
    batch_size: int = 16,
    num_cpus_per_replica: float = 1.0,
    num_gpus_per_replica: float = 0.0,
    overwrite: bool = False,
    num_rows: int | None = None,
) -> None:
    """Run the pipeline on the connected Ray cluster (call ``ray.init`` first).

    Args:
        input_path: JSONL or Parquet file of ``{"id", "prompt"}`` rows (validate with :func:`check_input`).
        output_dir: directory for the output files (created; must be empty unless ``overwrite``).
        model: model directory or name.
        replicas: number of engines (Ray actors), each serving batches of ``batch_size`` rows.
        swaa_config: the plan, passed as ``hf_overrides={"swaa_config": ...}``; None keeps the model's own.
        sampling: ``vllm.SamplingParams`` arguments (default: greedy, 256 tokens).
        engine_kwargs: further ``vllm.LLM`` arguments (e.g. ``kv_cache_memory_bytes``, ``max_model_len``).
        output_format: ``"jsonl"`` or ``"parquet"``.
        num_cpus_per_replica, num_gpus_per_replica: Ray resources of each replica.
        overwrite: replace existing files in ``output_dir``.
        num_rows: rows of the input (from :func:`check_input`; counted again when None): the read makes
            ``ceil(num_rows / batch_size)`` blocks, at least one per replica (up to ``num_rows``) and at most
            ``BLOCKS_PER_REPLICA`` per replica.

    Raises:
        BatchInputError: the cluster has fewer CPUs/GPUs than the replicas ask for (Ray would
            otherwise wait for them forever), ``output_dir`` is not empty, or ``output_format`` is neither
            ``"jsonl"`` nor ``"parquet"``.
    """
    import ray

    if output_format not in ("jsonl", "parquet"):
        raise BatchInputError(f"--output-format {output_format!r}: use jsonl or parquet")
    total = ray.cluster_resources()
    for name, per_replica, flag in (("CPU", num_cpus_per_replica, "--num-cpus-per-replica"),
                                    ("GPU", num_gpus_per_replica, "--num-gpus-per-replica")):
        have = total.get(name, 0)
        if replicas * per_replica > have:
            raise BatchInputError(
                f"--replicas {replicas} x {flag} {per_replica:g} needs {replicas * per_replica:g} {name}s but the "
                f"Ray cluster has {have:g}; lower --replicas or {flag}, or add nodes"
            )
    out = Path(output_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BatchInputError(f"--output {out} is not empty; choose a new directory or pass --overwrite")
    results = build_dataset(input_path, model, replicas=replicas, swaa_config=swaa_config, sampling=sampling,
                            engine_kwargs=engine_kwargs, batch_size=batch_size,
                            num_cpus_per_replica=num_cpus_per_replica, num_gpus_per_replica=num_gpus_per_replica,
                            num_rows=num_rows)
    _write(results, out, output_format, overwrite)


def build_dataset(
    input_path: str | os.PathLike,
    model: str,
    *,
    replicas: int = 1,
    swaa_config: dict | None = None,
    sampling: dict[str, Any] | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    batch_size: int = 16,
    num_cpus_per_replica: float = 1.0,
    num_gpus_per_replica: float = 0.0,
    num_rows: int | None = None,
):
    """The lazy Ray Data pipeline of :func:`run_batch` (arguments as there): read, then ``replicas``
    :class:`SwaaGenerator` actors; nothing runs until the returned ``ray.data.Dataset`` is consumed."""
    import ray

    engine = dict(engine_kwargs or {})
    engine["attention_backend"] = "swaa"
    if swaa_config is not None:
        engine["hf_overrides"] = {**engine.get("hf_overrides", {}), "swaa_config": swaa_config}
    params = {"temperature": 0.0, "max_tokens": 256, **(sampling or {})}

    path = str(Path(input_path).resolve())
    # Every replica takes part only if there are at least as many blocks as replicas: a replica's task gets
    # whole blocks (map_batches cuts them into batches inside the task), and Ray's default block count depends
    # on the cluster's state at planning time (one block of a small file was seen, all rows on one replica).
    # So the read asks for one block per batch, at least one per replica (while rows last) and at most
    # BLOCKS_PER_REPLICA per replica (large inputs: blocks of several batches, the load still balanced to
    # 1/BLOCKS_PER_REPLICA of a replica's share).
    rows = check_input(input_path) if num_rows is None else num_rows
    num_blocks = input_block_count(rows, batch_size, replicas)
    if _input_format(Path(input_path)) == "jsonl":
        ds = ray.data.read_json(path, lines=True, num_cpus=0, file_extensions=None, override_num_blocks=num_blocks)
    else:
        ds = ray.data.read_parquet(path, columns=["id", "prompt"], num_cpus=0, override_num_blocks=num_blocks)
    # No operator between read and map_batches: Ray Data gives each one a CPU by default, which the
    # replicas hold, and the job would wait forever.
    # Every replica takes part: Ray Data starts handing out batches only once all replicas have built their
    # engines (otherwise the first one up takes the first batches), and gives a replica one batch at a time
    # (its engine runs one batch at a time anyway; more would queue behind it while another replica idles).
    # A dataset keeps a copy of the DataContext taken when it was read (and each derived dataset a copy of
    # its parent's), so the wait is set on this dataset's own context: set on the process-wide context after
    # the read, it was silently ignored and the first replica up took all rows (CI, twice).
    ds.context.wait_for_min_actors_s = REPLICA_START_TIMEOUT_S
    return ds.map_batches(
        SwaaGenerator,
        fn_constructor_kwargs={"model": model, "engine_kwargs": engine, "sampling": params},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=1),
        num_cpus=num_cpus_per_replica,
        num_gpus=num_gpus_per_replica,
        # One process per replica: the engine runs inside the actor (no engine-core/worker processes).
        runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}},
    )


def _write(results, output_dir: Path, output_format: str, overwrite: bool) -> None:
    """Run the lazy ``results`` dataset and write it to ``output_dir`` as JSONL or Parquet."""
    from ray.data import SaveMode

    mode = SaveMode.OVERWRITE if overwrite else SaveMode.APPEND
    if output_format == "jsonl":
        results.write_json(str(output_dir.resolve()), ray_remote_args={"num_cpus": 0}, mode=mode)
    else:
        results.write_parquet(str(output_dir.resolve()), ray_remote_args={"num_cpus": 0}, mode=mode)


def _json_object(flag: str):
    def parse(value: str) -> dict:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"{flag} is not valid JSON ({err.msg})") from None
        if not isinstance(parsed, dict):
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object, got {type(parsed).__name__}")
        return parsed

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m swaa_vllm.batch.ray_data",
        description="Offline batch generation with the swaa attention backend on Ray Data.",
    )
    p.add_argument("--input", required=True, help=".jsonl or .parquet file; rows {\"id\": ..., \"prompt\": \"...\"}")
    p.add_argument("--output", required=True, help="output directory (one file per block)")
    p.add_argument("--model", required=True, help="model directory (or name) for vLLM")
    p.add_argument("--replicas", type=int, default=1, help="number of engine replicas (default 1)")
    p.add_argument("--swaa-config", default=None,
                   help="swaa_config JSON object or path of a JSON file (default: the model's own config.json)")
    p.add_argument("--output-format", choices=("jsonl", "parquet"), default="jsonl")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--batch-size", type=int, default=16, help="rows per engine call (default 16)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-gib", type=float, default=1.0,
                   help="KV cache per replica in GiB (default 1; vLLM's CPU default would take most of the RAM)")
    p.add_argument("--enforce-eager", action="store_true", help="no torch.compile (faster start-up)")
    p.add_argument("--engine-kwargs", type=_json_object("--engine-kwargs"), default={},
                   help="further vllm.LLM arguments as a JSON object, e.g. '{\"tensor_parallel_size\": 2}'")
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    p.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join ('auto' or HOST:PORT; default: RAY_ADDRESS, else a local instance)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of a local Ray instance (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace files already in --output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 for invalid input or settings, with the reason on stderr)."""
    args = _parser().parse_args(argv)
    try:
        if args.replicas < 1:
            raise BatchInputError(f"--replicas must be at least 1, got {args.replicas}")
        rows = check_input(args.input)
        num_layers = model_config(args.model).get_text_config().num_hidden_layers
        swaa_config = load_swaa_config(args.swaa_config, num_layers)
    except (BatchInputError, SwaaConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import ray

    engine = {"dtype": args.dtype, "kv_cache_memory_bytes": int(args.kv_cache_gib * (1 << 30)),
              "enforce_eager": args.enforce_eager, **args.engine_kwargs}
    if args.max_model_len is not None:
        engine["max_model_len"] = args.max_model_len
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.seed is not None:
        sampling["seed"] = args.seed
    joins_cluster = args.ray_address is not None or "RAY_ADDRESS" in os.environ
    ray.init(address=args.ray_address, include_dashboard=False,
             **({} if joins_cluster or args.num_cpus is None else {"num_cpus": args.num_cpus}))
    started = time.perf_counter()
    try:
        run_batch(args.input, args.output, args.model, replicas=args.replicas, swaa_config=swaa_config,
                  sampling=sampling, engine_kwargs=engine, output_format=args.output_format,
                  batch_size=args.batch_size, num_cpus_per_replica=args.num_cpus_per_replica,
                  num_gpus_per_replica=args.num_gpus_per_replica, overwrite=args.overwrite, num_rows=rows)
    except BatchInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        ray.shutdown()
    print(f"wrote {rows} rows to {args.output} ({args.output_format}) in {time.perf_counter() - started:.1f} s "
          f"with {args.replicas} replica(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

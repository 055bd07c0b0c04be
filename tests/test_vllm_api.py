"""The vLLM-interface manifest (tests/vllm_api/) and its AST checker, on the installed vLLM (no import, no GPU).

* the manifest resolves in the installed vLLM 0.32 CPU build's sources (``make
  check-vllm-gpu-api`` runs the same check on the CUDA wheel of 0.33);
* the checker reports a broken record (unknown parameter, attribute, module,
  snippet, decorator, enum member, wrong kind) as MISSING by name and exits 1;
* the resolver's rules (re-exports, star imports, conditional aliases, lazy module
  attributes, inherited ``self.x``, ``**kwargs``) on a small synthetic tree;
* completeness: every ``import vllm...`` / ``from vllm... import`` in ``swaa_vllm/``
  and ``kernels/`` is in the manifest, except the CPU-only ones of :data:`CPU_ONLY`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.vllm_api import check
from tests.vllm_api.expectations import EXPECTATIONS, Expect, Kind

REPO = Path(__file__).resolve().parent.parent
SCANNED = ("swaa_vllm", "kernels")

# vLLM imports that need not exist in the CUDA release, by file. Decided by reading each file:
# * swaa_vllm/platforms/ray_executor.py runs only on CPU: shim 6 selects its executor from the CPU platform's
#   config hook (on CUDA vLLM's own Ray executor is used unchanged). Its `vllm.envs` and
#   `vllm.platforms.cpu` imports are in the manifest anyway (other files need them).
# * swaa_vllm/platforms/cpu_attention_op.py's `_get_attn_isa` (vLLM CPU_ATTN's ISA choice): imported inside
#   vllm_attention_isa, which only the CPU path calls; tests/test_cpu_kernel.py pins its rule and signature on the
#   installed CPU build (test_layer_cache_isa_takes_vllms_choice_where_the_layer_can_read_it).
# Not here, because the GPU path needs them too: swaa_vllm/platforms/cpu_attention_op.py's `vllm._custom_ops` and
# `vllm.envs` (swaa_vllm/backend.py imports that module at import time on every platform; its vllm._C
# ops themselves run only on CPU and are not imports), and the public `vllm.LLM`, `SamplingParams`,
# `TokensPrompt` of swaa_vllm/batch/ray_data.py (GPU replicas) and finetuning/distill.py. The rest of
# evaluation/, finetuning/ and models/ imports nothing from vLLM.
CPU_ONLY: dict[str, set[tuple[str, str | None]]] = {
    "swaa_vllm/platforms/ray_executor.py": {
        ("vllm.v1.executor", "ray_executor_v2"),
        ("vllm.v1.executor.ray_executor_v2", "RayExecutorV2"),
        ("vllm.v1.executor.ray_executor_v2", "RayWorkerProc"),
    },
    "swaa_vllm/platforms/cpu_attention_op.py": {
        ("vllm.v1.attention.backends.cpu_attn", "_get_attn_isa"),
    },
}


def _installed_vllm_root() -> Path:
    """The directory holding the installed ``vllm/`` (find_spec of a top-level package does not import it)."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.origin, "vLLM is not installed in this environment"
    return Path(spec.origin).resolve().parent.parent


@pytest.fixture(scope="module")
def resolver() -> check.Resolver:
    return check.Resolver(_installed_vllm_root())


def _record(module: str, obj: str) -> Expect:
    matches = [r for r in EXPECTATIONS if r.module == module and r.obj == obj]
    assert matches, f"no record {module} {obj} in the manifest"
    return matches[0]


# -- (a) the manifest holds on the installed vLLM ------------------------------------------------------------


def test_manifest_resolves_in_installed_vllm(resolver):
    results = check.check(EXPECTATIONS, resolver)
    missing = [check.format_result(r) for r in results if not r.ok]
    assert not missing, "\n".join(missing)
    assert len(results) == len(EXPECTATIONS) > 100


def test_cli_exits_0_on_installed_vllm():
    root = _installed_vllm_root()
    proc = subprocess.run([sys.executable, "-m", "tests.vllm_api.check", "--vllm-src", str(root)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == len(EXPECTATIONS) + 1 and all(line.startswith("OK      ") for line in lines[:-1])
    assert lines[-1].endswith(f"{len(EXPECTATIONS)} records, {len(EXPECTATIONS)} OK, 0 MISSING")


def test_records_are_well_formed():
    assert len(set(EXPECTATIONS)) == len(EXPECTATIONS), "duplicate records"
    for rec in EXPECTATIONS:
        assert rec.module == "vllm" or rec.module.startswith("vllm."), rec
        assert rec.used_by and any(s in rec.used_by for s in ("swaa_vllm/", "kernels/", "pyproject.toml")), rec
        assert (rec.kind is Kind.SOURCE) == bool(rec.snippet), rec
        assert (rec.kind is Kind.MODULE) == (rec.obj == "") or rec.kind is Kind.SOURCE, rec
        assert not rec.params or rec.kind in (Kind.FUNCTION, Kind.METHOD, Kind.ABSTRACTS), rec


# vLLM base class -> (our file, our subclass) (the ABSTRACTS records list its methods).
_OUR_SUBCLASSES = {
    "AttentionBackend": ("swaa_vllm/backend.py", "SwaaAttentionBackend"),
    "AttentionMetadataBuilder": ("swaa_vllm/backend.py", "SwaaMetadataBuilder"),
    "AttentionImpl": ("swaa_vllm/backend.py", "SwaaAttentionImpl"),
    "SingleTypeKVCacheManager": ("swaa_vllm/sink_window_cache.py", "SinkWindowManager"),
}


def test_abstracts_records_list_our_methods():
    records = {r.obj: r for r in EXPECTATIONS if r.kind is Kind.ABSTRACTS}
    assert set(records) == set(_OUR_SUBCLASSES)
    for base, (path, ours_name) in _OUR_SUBCLASSES.items():
        tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
        ours = {
            node.name: {f.name for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
            for node in tree.body if isinstance(node, ast.ClassDef)
        }
        assert set(records[base].params) == ours[ours_name], f"{base} record vs {ours_name} in {path}"


# -- (b) broken records are reported ----------------------------------------------------------------------


BROKEN = [
    # (broken record, fragment of the reason)
    (dataclasses.replace(_record("vllm.v1.core.kv_cache_utils", "generate_block_hash_extra_keys"),
                         params=("request", "start_token_idx", "end_token_idx", "start_block_idx")),
     "no parameter start_block_idx"),
    (dataclasses.replace(_record("vllm.v1.worker.gpu.states", "RequestState.prompt_len"),
                         obj="RequestState.prompt_length"),
     "no class attribute, field, method, property or assignment self.prompt_length in class RequestState"),
    (dataclasses.replace(_record("vllm.v1.worker.gpu.states", "RequestState.prompt_len"),
                         module="vllm.v1.worker.gpu.request_states"),
     "module vllm.v1.worker.gpu.request_states not found"),
    (dataclasses.replace(_record("vllm.v1.worker.gpu_worker", ""), kind=Kind.MODULE,
                         module="vllm.v1.worker.gpu_worker_v2"),
     "module vllm.v1.worker.gpu_worker_v2 not found"),
    (dataclasses.replace(
        next(r for r in EXPECTATIONS if r.kind is Kind.SOURCE and r.obj == "Worker.initialize_from_config"),
        snippet="self.model_runner.initialize_kv_cache_v2("),
     "does not contain 'self.model_runner.initialize_kv_cache_v2('"),
    (dataclasses.replace(_record("vllm.platforms.cuda", "CudaPlatform.check_and_update_config"),
                         decorators=("staticmethod",)),
     "not @staticmethod"),
    (dataclasses.replace(_record("vllm.v1.kv_cache_layout", "KVCacheLayout.LBNHC"), obj="KVCacheLayout.LNBHC"),
     "no LNBHC in class KVCacheLayout"),
    (Expect("vllm.v1.attention.backend", "CommonAttentionMetadata.replace", Kind.METHOD, "test", params=("num_reqs",)),
     "**kwargs does not count"),
    (dataclasses.replace(_record("vllm.v1.core.kv_cache_utils", "generate_block_hash_extra_keys"), kind=Kind.CLASS,
                         params=()),
     "is a function at vllm/v1/core/kv_cache_utils.py"),
    (Expect("vllm.v1.attention.backend", "AttentionImpl.do_kv_cache_update", Kind.METHOD, "test"),
     "no do_kv_cache_update in class AttentionImpl or its vLLM bases"),
    (dataclasses.replace(_record("vllm.v1.attention.backend", "AttentionMetadataBuilder"), kind=Kind.ABSTRACTS,
                         params=("__init__",)),
     "abstract in vLLM, not implemented by our subclass: build (vllm/v1/attention/backend.py:"),
    (Expect("vllm.v1.attention.backend", "AttentionType.DECODER.value", Kind.ATTRIBUTE, "test"),
     "not a vLLM module or class"),
]


@pytest.mark.parametrize("broken,reason", BROKEN, ids=[check.label(b) for b, _ in BROKEN])
def test_broken_record_is_missing(resolver, broken, reason):
    result = check.check_record(resolver, broken)
    line = check.format_result(result)
    assert not result.ok, line
    assert line.startswith(f"MISSING {check.label(broken)}: "), line
    assert reason in line, line


def test_cli_exits_1_naming_the_broken_records(capsys):
    records = [*EXPECTATIONS[:5], *(b for b, _ in BROKEN)]
    assert check.main(["--vllm-src", str(_installed_vllm_root())], records=records) == 1
    out = capsys.readouterr().out.splitlines()
    for broken, _ in BROKEN:
        assert any(line.startswith(f"MISSING {check.label(broken)}: ") for line in out), check.label(broken)
    assert sum(line.startswith("OK      ") for line in out) == 5
    assert f"{len(records)} records, 5 OK, {len(BROKEN)} MISSING" in out[-2]


def test_cli_exits_2_without_vllm_sources(tmp_path, capsys):
    assert check.main(["--vllm-src", str(tmp_path)]) == 2
    assert "holds no vllm/__init__.py" in capsys.readouterr().err


# -- the resolver's rules on a synthetic tree ----------------------------------------------------------------

_TREE = {
    "vllm/__init__.py": (
        "import typing\n"
        "TABLE = {'Engine': '.engine:Engine'}\n"
        "if typing.TYPE_CHECKING:\n    from vllm.engine import Ghost\n"
        "else:\n    def __getattr__(name):\n        return name\n"
    ),
    "vllm/engine.py": (
        "import enum\n"
        "from .base import *\n"
        "from . import base as b\n"
        "class Engine(Base):\n"
        "    def step(self, batch, *args, sampled=None, **kwargs):\n"
        "        self.steps, self.last = 1, batch  # counted\n"
        "    @classmethod\n    def make(cls, config): ...\n"
        "class Color(enum.Enum):\n    RED = 1\n"
        "Alias = Engine if b.FAST else Base\n"
    ),
    "vllm/base.py": (
        "__all__ = ['Base']\n"
        "import abc\n"
        "class Base:\n    size: int\n    def __init__(self):\n        self.inner: int = 0\n"
        "    @abc.abstractmethod\n    def run(self): ...\n    @abc.abstractmethod\n    def stop(self): ...\n"
        "class Runner(Base):\n    def run(self): ...\n"
        "class Hidden: ...\n"
    ),
    "vllm/platforms/__init__.py": "def __getattr__(name):\n    if name == 'current':\n        return 1\n",
}


@pytest.fixture
def tree(tmp_path) -> check.Resolver:
    for rel, text in _TREE.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return check.Resolver(tmp_path)


@pytest.mark.parametrize("rec,ok", [
    (Expect("vllm", "Engine", Kind.CLASS, "t"), True),  # lazy table beside __getattr__, followed
    (Expect("vllm", "Ghost", Kind.CLASS, "t"), False),  # only under TYPE_CHECKING
    (Expect("vllm.platforms", "current", Kind.ATTRIBUTE, "t"), True),  # named in __getattr__
    (Expect("vllm.engine", "Base", Kind.CLASS, "t"), True),  # star import honouring __all__
    (Expect("vllm.engine", "Hidden", Kind.CLASS, "t"), False),  # not in __all__
    (Expect("vllm.engine", "Engine.step", Kind.METHOD, "t", params=("batch", "sampled")), True),
    (Expect("vllm.engine", "Engine.step", Kind.METHOD, "t", params=("args",)), False),  # *args has no name
    (Expect("vllm.engine", "Engine.step", Kind.METHOD, "t", params=("extra",)), False),  # **kwargs does not count
    (Expect("vllm.engine", "Engine.make", Kind.METHOD, "t", decorators=("classmethod",)), True),
    (Expect("vllm.engine", "Engine.last", Kind.ATTRIBUTE, "t"), True),  # tuple target self.steps, self.last
    (Expect("vllm.engine", "Engine.inner", Kind.ATTRIBUTE, "t"), True),  # annotated self.x in a base
    (Expect("vllm.engine", "Engine.size", Kind.ATTRIBUTE, "t"), True),  # annotated field of a base
    (Expect("vllm.engine", "Engine.missing", Kind.ATTRIBUTE, "t"), False),
    (Expect("vllm.engine", "Color.RED", Kind.ENUM_MEMBER, "t"), True),
    (Expect("vllm.engine", "Engine.make", Kind.ENUM_MEMBER, "t"), False),  # not an Enum
    (Expect("vllm.engine", "Alias.step", Kind.METHOD, "t"), False),  # the Base branch has no step
    (Expect("vllm.engine", "Alias.size", Kind.ATTRIBUTE, "t"), True),  # both branches have it
    (Expect("vllm.engine", "Engine.step", Kind.SOURCE, "t", snippet="self.steps,self.last=1, batch"), True),
    (Expect("vllm.engine", "Engine.step", Kind.SOURCE, "t", snippet="1, batch # counted"), False),  # comments ignored
    (Expect("vllm.engine", "Engine", Kind.ABSTRACTS, "t", params=("run", "stop")), True),
    (Expect("vllm.engine", "Engine", Kind.ABSTRACTS, "t", params=("run",)), False),  # stop left open
    (Expect("vllm.base", "Runner", Kind.ABSTRACTS, "t", params=("stop",)), True),  # run implemented by Runner
    (Expect("vllm.engine", "Engine", Kind.FUNCTION, "t"), False),
    (Expect("vllm.engine", "Engine.make", Kind.FUNCTION, "t"), False),  # a method, not a module function
])
def test_resolver_rules(tree, rec, ok):
    result = check.check_record(tree, rec)
    assert result.ok is ok, check.format_result(result)


def test_unpack_wheel_extracts_only_python(tmp_path):
    wheel = tmp_path / "vllm-9.9.9-cp38-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("vllm/__init__.py", "")
        zf.writestr("vllm/v1/x.py", "X = 1\n")
        zf.writestr("vllm/_C.abi3.so", b"\0")
        zf.writestr("vllm-9.9.9.dist-info/METADATA", "")
    src = check.unpack_wheel(wheel, tmp_path / "src")
    assert src == tmp_path / "src" / "vllm-9.9.9-cp38-abi3-linux_x86_64"
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    assert files == [".unpacked", "vllm/__init__.py", "vllm/v1/x.py"]
    assert check.unpack_wheel(wheel, tmp_path / "src") == src  # reused
    assert check.check_record(check.Resolver(src), Expect("vllm.v1.x", "X", Kind.ATTRIBUTE, "t")).ok


# -- (c) completeness: every vLLM import of the plugin is in the manifest ------------------------------------


def _vllm_imports() -> dict[str, set[tuple[str, str | None]]]:
    """``{file: {(module, name)}}`` of every vLLM import in swaa_vllm/ and kernels/ (name None for ``import M``)."""
    found: dict[str, set[tuple[str, str | None]]] = {}
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=rel)):
                if isinstance(node, ast.Import):
                    pairs = {(a.name, None) for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    pairs = {(node.module, a.name) for a in node.names}
                else:
                    continue
                pairs = {(m, n) for m, n in pairs if m == "vllm" or m.startswith("vllm.")}
                if pairs:
                    found.setdefault(rel, set()).update(pairs)
    return found


def _in_manifest(module: str, name: str | None) -> bool:
    modules = {r.module for r in EXPECTATIONS if r.kind is Kind.MODULE}
    if name is None:
        return module in modules
    return f"{module}.{name}" in modules or any(
        r.module == module and (r.obj == name or r.obj.startswith(name + ".")) for r in EXPECTATIONS
    )


def test_every_vllm_import_is_in_the_manifest():
    imports = _vllm_imports()
    assert "swaa_vllm/backend.py" in imports and "kernels/flash_attn_path.py" in imports  # the scan works
    uncovered = [
        f"{rel}: {'import ' + m if n is None else f'from {m} import {n}'}"
        for rel, pairs in sorted(imports.items())
        for m, n in sorted(pairs, key=str)
        if not _in_manifest(m, n) and (m, n) not in CPU_ONLY.get(rel, set())
    ]
    assert not uncovered, "add these to tests/vllm_api/expectations.py (or, if CPU-only, to CPU_ONLY):\n" + "\n".join(
        uncovered
    )


def test_cpu_only_entries_are_still_imported():
    imports = _vllm_imports()
    stale = [
        f"{rel}: {pair}" for rel, pairs in CPU_ONLY.items() for pair in pairs if pair not in imports.get(rel, set())
    ]
    assert not stale, "remove from CPU_ONLY (no longer imported there): " + ", ".join(stale)


def test_completeness_check_can_fail(monkeypatch):
    """A manifest without the V2 runner's module leaves prompt_lengths.py's import uncovered."""
    trimmed = tuple(r for r in EXPECTATIONS if r.module != "vllm.v1.worker.gpu.model_runner")
    monkeypatch.setattr(sys.modules[__name__], "EXPECTATIONS", trimmed)
    assert not _in_manifest("vllm.v1.worker.gpu.model_runner", "GPUModelRunner")
    with pytest.raises(AssertionError, match="swaa_vllm/prompt_lengths.py: from vllm.v1.worker.gpu.model_runner"):
        test_every_vllm_import_is_in_the_manifest()

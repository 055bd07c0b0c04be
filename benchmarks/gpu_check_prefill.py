"""End-to-end prefill timing on a random-weight Qwen3-4B-shaped model (part 2 of gpu_check.sh).

``python benchmarks/gpu_check_prefill.py`` runs one child process per engine
(vLLM's FLASH_ATTN and TRITON_ATTN, SWAA with every layer sliding, SWAA with every
other layer full; W=2048, k=100, FA decode), each timing one prompt of 32k and one
of 128k tokens with ``max_tokens=1`` (prefill plus one sampled token) after a
short warm-up, then prints a table of SWAA's speedups against both baselines.
Weights are random (``load_format="dummy"``) from a written ``config.json``; no
tokenizer (token-id prompts), nothing is downloaded. Engines run eager
(``enforce_eager``) to keep start-up short; prefill is not CUDA-graphed anyway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

LENGTHS = (32768, 131072)
W, K, LAYERS = 2048, 100, 36
CONFIGS = {
    "FLASH_ATTN": ("FLASH_ATTN", None),
    "TRITON_ATTN": ("TRITON_ATTN", None),
    "SWAA all sliding": ("swaa", {"sliding_window_size": W, "keep_first": K, "force_fa_decode": True}),
    "SWAA half sliding": ("swaa", {"sliding_window_size": W, "keep_first": K, "force_fa_decode": True,
                                   "non_sliding_layers": list(range(1, LAYERS, 2))}),
}

QWEN3_4B = {  # Qwen/Qwen3-4B's config.json shape (random weights)
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2560,
    "intermediate_size": 9728, "num_hidden_layers": LAYERS, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 135168,
    "rope_theta": 1000000, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "use_sliding_window": False, "sliding_window": None,
}


def child(model_dir: str, backend: str, swaa_config: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = {"hf_overrides": {"swaa_config": json.loads(swaa_config)}} if swaa_config != "null" else {}
    llm = LLM(model_dir, load_format="dummy", skip_tokenizer_init=True, attention_backend=backend,
              max_model_len=max(LENGTHS) + 64, enforce_eager=True, gpu_memory_utilization=0.85,
              enable_prefix_caching=False, seed=0, **kwargs)
    params = SamplingParams(max_tokens=1, temperature=0, detokenize=False)
    ids = [(i * 7919) % 150000 + 100 for i in range(max(LENGTHS))]
    llm.generate([TokensPrompt(prompt_token_ids=ids[:2048])], params, use_tqdm=False)  # warm-up
    times = {}
    for n in LENGTHS:
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=ids[:n])], params, use_tqdm=False)
        times[n] = time.perf_counter() - t0
    print("RESULT " + json.dumps(times), flush=True)


def main() -> int:
    model_dir = tempfile.mkdtemp(prefix="swaa-qwen3-4b-shape-")
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(QWEN3_4B, f)
    results = {}
    for name, (backend, swaa) in CONFIGS.items():
        proc = subprocess.run([sys.executable, __file__, "--child", model_dir, backend, json.dumps(swaa)],
                              capture_output=True, text=True, timeout=150, check=False)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: FAILED (rc {proc.returncode})\n{(proc.stdout + proc.stderr)[-3000:]}", flush=True)
            continue
        results[name] = {int(k): v for k, v in json.loads(line[7:]).items()}
        print(f"{name}: " + ", ".join(f"{n // 1024}k {t:.2f} s" for n, t in results[name].items()), flush=True)
    print("\nprefill (+1 token) wall time and SWAA speedup, random-weight Qwen3-4B shape, W=2048 k=100, eager")
    print(f"{'config':20s} {'len':>5s} {'seconds':>8s} {'vs FLASH_ATTN':>14s} {'vs TRITON_ATTN':>15s}")
    for name, times in results.items():
        for n, t in times.items():
            ratios = [f"{results[b][n] / t:.2f}x" if b in results else "n/a" for b in ("FLASH_ATTN", "TRITON_ATTN")]
            print(f"{name:20s} {n // 1024:>4d}k {t:8.2f} {ratios[0]:>14s} {ratios[1]:>15s}")
    return 0 if len(results) == len(CONFIGS) else 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        sys.exit(main())

"""The OpenAI-compatible server: ``vllm serve --attention-backend swaa`` as a subprocess.

Started on a free loopback port with the bundled model; checks ``/v1/models``,
completions, chat, streaming, the per-layer plan in the log, and that a malformed
``swaa_config`` stops startup with a message naming the field. The server also serves a
LoRA adapter (``--enable-lora --lora-modules``, as for an adapter of ``swaa_vllm.finetuning.train``):
a random-weight peft adapter of the bundled model, which must change the output.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server import free_port, openai_client, stop, vllm_serve, wait_for_exit, wait_until_healthy

pytestmark = pytest.mark.e2e

SERVED_NAME = "smollm2-swaa"
LORA_NAME = "swaa-lora"
SWAA_CONFIG = {"sliding_window_size": 64, "keep_first": 8, "force_fa_decode": True, "non_sliding_layers": [0, 15]}


def _random_adapter(model_dir: Path, out: Path) -> Path:
    """A rank-16 q/k/v peft adapter of the bundled model with random (non-zero) weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"],
                      init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "vllm.log"
    adapter = _random_adapter(model_dir, tmp_path_factory.mktemp("adapter"))
    proc = vllm_serve(model_dir, port, SWAA_CONFIG, log_path, SERVED_NAME,
                      ("--enable-lora", "--max-lora-rank", "16", "--lora-modules", f"{LORA_NAME}={adapter}"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, base, log_path)
        yield base, log_path
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server[0])


def test_models_lists_served_model_and_adapter(client):
    assert [m.id for m in client.models.list().data] == [SERVED_NAME, LORA_NAME]


def test_lora_adapter_changes_the_output(client):
    import openai

    prompt = "The capital of France is"
    base = client.completions.create(model=SERVED_NAME, prompt=prompt, temperature=0, max_tokens=8).choices[0].text
    tuned = client.completions.create(model=LORA_NAME, prompt=prompt, temperature=0, max_tokens=8).choices[0].text
    assert "Paris" in base and tuned != base
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt=prompt, max_tokens=2)
    again = client.completions.create(model=SERVED_NAME, prompt=prompt, temperature=0, max_tokens=8).choices[0].text
    assert again == base


def test_log_shows_per_layer_plan(server):
    log = server[1].read_text()
    assert "SWAA plan for 30 layers: " in log
    assert "sliding W=64 k=8, full-attention decode: layers [1-14, 16-29] (28)" in log
    assert "full attention: layers [0, 15] (2)" in log
    assert "Using the SWAA attention backend" in log


def test_chat_completion_answers(client):
    r = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=16,
    )
    assert "Paris" in r.choices[0].message.content


def test_completion(client):
    r = client.completions.create(model=SERVED_NAME, prompt="One, two, three, four,", temperature=0, max_tokens=8)
    assert r.choices[0].text.strip()
    assert r.usage.completion_tokens == 8


def test_streaming_chat_equals_non_streaming(client):
    messages = [{"role": "user", "content": "Name a fruit that is yellow."}]
    full = client.chat.completions.create(model=SERVED_NAME, messages=messages, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(
        model=SERVED_NAME, messages=messages, temperature=0, max_tokens=12, stream=True,
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2
    assert text == full.choices[0].message.content


def test_oversized_request_rejected_server_stays_up(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as err:
        client.completions.create(model=SERVED_NAME, prompt="hello " * 3000, max_tokens=4)
    assert "2048" in str(err.value)  # names the max_model_len limit
    assert client.models.list().data  # still serving


@pytest.mark.parametrize(
    ("bad_config", "field"),
    [
        ({"sliding_window_size": 0}, "swaa_config.sliding_window_size"),
        ({"sliding_window_size": 64, "keep_firts": 4}, "swaa_config.keep_firts"),
        ({"sliding_window_size": 64, "non_sliding_layers": [30]}, "swaa_config.non_sliding_layers"),
    ],
)
def test_malformed_swaa_config_fails_at_startup(model_dir, tmp_path, bad_config, field):
    log_path = tmp_path / "vllm.log"
    rc = wait_for_exit(vllm_serve(model_dir, free_port(), bad_config, log_path, SERVED_NAME))
    log = log_path.read_text()
    assert rc != 0
    assert "invalid swaa_config: " in log and field in log, log[-3000:]

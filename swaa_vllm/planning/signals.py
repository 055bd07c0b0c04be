"""Per-layer calibration signals: how much a model depends, layer by layer, on keys outside sinks + window.

Two signals are measured on the same calibration prompts, both with the project's own masks
(:func:`swaa_kernels.reference.swaa_mask` through :func:`swaa_vllm.finetuning.training_attention.layer_mask`,
the masks SWA-aware fine-tuning trains under; no second mask is written here):

* **mass** (cheap, one forward per prompt): the softmax probability mass that prompt rows put on keys the
  SWAA mask hides (outside the first ``k`` keys and the last ``W``), from one full-attention forward:
  ``outside = 1 - exp(LSE(scores over SWAA-visible keys) - LSE(scores over causal keys))`` per head and
  row, averaged over heads and over the prompt rows whose mask differs from causal (``W + k <= i < P``).
  This is what LightTransfer's "lazy layers" criterion looks at (Zhang et al., arXiv 2410.13846: layers whose
  attention already concentrates on the initial and recent tokens are made streaming). The SWAA paper
  (Yu et al., arXiv 2512.10411, discussion of which layers to keep full) reports that such a choice was
  unstable, and that fixed interleaved patterns (odd, even, one in four) differ noticeably, so the mass is
  measured here as a secondary signal and not trusted blindly.
* **kl** (the default, 1 + L partial forwards per prompt): the change in the model's output when only layer
  ``L`` slides (prefill rows under sinks + window, FA decode, every other layer full), measured as the mean
  KL divergence ``KL(p_full || p_L)`` of the next-token distributions over the answer positions (the last
  prompt position and the positions of ``answer_tokens`` greedy full-attention answer tokens appended to the
  prompt, i.e. teacher-forced decode steps). It targets the objective directly: the outputs of the served
  model, under exactly the plan the backend will run (FA decode included: mass on prompt rows says nothing
  about how the generated tokens read the context). The layers before ``L`` are unchanged by the plan, so
  each sliding forward restarts from the full forward's hidden state at the input of layer ``L`` (on
  average half a forward per layer).

Measured on the bundled model (SmolLM2-135M-Instruct, W=128, k=16, 6 prompts of ~640 tokens from the three
bundled training families; ``benchmarks/results/plan_search.md``): the two rankings agree only loosely
(Spearman 0.59 over the 30 layers). ``mass`` puts the early layers 3-10 on top (0.37-0.62 of their prompt
rows' mass lies outside sinks + window there, 0.06-0.26 in layers 11-29); ``kl`` ranks layers 15, 8, 14, 7,
6, 18 first and keeps mid layers (14-20) that ``mass`` ranks low: a layer can spread its attention widely
yet change the output little, and the reverse. On 64 held-out prompts the ``kl`` plans were at least as
accurate as the ``mass`` plans at every size (55 vs 52, 59 vs 49, 56 vs 56 right at 7, 15, 22 full layers;
paired p = 0.006 at 15), so ``kl`` is the default; ``--signal mass`` is the cheap alternative (one forward
per prompt instead of about 1 + L/2).

Both run on Hugging Face transformers with float32 weights (the attention itself is
:func:`~swaa_vllm.finetuning.training_attention.tiled_masked_attention`); decoder layers are driven one by one
(``model.model.layers``), which fits the Llama / Qwen2 / Qwen3 / Mistral families the backend serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from swaa_kernels.reference import swaa_mask
from swaa_vllm.config import SwaaPlan, build_plan
from swaa_vllm.finetuning.training_attention import layer_mask, tiled_masked_attention

__all__ = ["ATTN_NAME", "Calibration", "calibrate", "greedy_answer", "outside_mass", "prompt_signals",
           "register", "single_layer_plan", "spearman"]

ATTN_NAME = "swaa_calibration"
ROW_TILE = 256


def outside_mass(query: torch.Tensor, key: torch.Tensor, scale: float, prompt_len: int, window: int,
                 keep_first: int) -> torch.Tensor:
    """Softmax mass that prompt rows put on keys outside the sinks and the window, under full causal attention.

    Args:
        query: ``[1, num_heads, n, head_size]`` (after RoPE), any float dtype.
        key: ``[1, num_kv_heads, n, head_size]``; ``num_heads % num_kv_heads == 0`` (GQA, query head h reads
            KV head ``h // (num_heads // num_kv_heads)``).
        scale: softmax scale.
        prompt_len: P; rows ``>= P`` are not prompt rows and are skipped.
        window: W >= 1, keys a prompt row sees counting itself.
        keep_first: k >= 0 sinks.

    Returns:
        float64 ``[num_heads, R]``, R = ``max(0, P - (W + k))``: for rows ``i = W + k .. P - 1`` (the prompt
        rows whose SWAA mask hides some key), ``1 - sum of p_ij over SWAA-visible j`` with ``p`` the causal
        softmax. In [0, 1].
    """
    num_heads, n = query.shape[1], query.shape[2]
    group = num_heads // key.shape[1]
    first = window + keep_first
    last = min(prompt_len, n)
    if last <= first:
        return torch.zeros(num_heads, 0, dtype=torch.float64)
    k = key[0].double().repeat_interleave(group, dim=0)  # [H, n, D]
    keys = torch.arange(n)
    outs = []
    for start in range(first, last, ROW_TILE):
        rows = torch.arange(start, min(start + ROW_TILE, last))
        scores = (query[0, :, rows].double() @ k.transpose(1, 2)) * scale  # [H, r, n]
        causal = swaa_mask(rows, keys, prompt_len, None, 0, False)
        sliding = swaa_mask(rows, keys, prompt_len, window, keep_first, True)
        lse_all = scores.masked_fill(~causal, float("-inf")).logsumexp(-1)
        lse_in = scores.masked_fill(~sliding, float("-inf")).logsumexp(-1)
        outs.append((1.0 - torch.exp(lse_in - lse_all)).clamp_(0.0, 1.0))
    return torch.cat(outs, dim=1)


def calibration_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                          swaa_plan: SwaaPlan | None = None, swaa_prompt_len: int | None = None,
                          swaa_mass: dict | None = None, swaa_mass_window: tuple[int, int] | None = None, **kwargs):
    """transformers attention function: the layer's SWAA mask (``swaa_plan``), optionally recording the mass.

    Like :func:`swaa_vllm.finetuning.training_attention.swaa_training_attention` (same masks, same tiled
    attention for sliding layers; full layers use torch's causal SDPA, the same causal mask), plus: when
    ``swaa_mass`` (a dict) and ``swaa_mass_window = (W, k)`` are given, stores
    :func:`outside_mass` of this layer's query/key under ``swaa_mass[layer_idx]``.

    Raises:
        ValueError: missing plan or prompt length, or a KV cache (queries shorter than keys).
    """
    if swaa_plan is None or swaa_prompt_len is None:
        raise ValueError(f"attn_implementation={ATTN_NAME!r} needs swaa_plan= and swaa_prompt_len=")
    if query.shape[2] != key.shape[2]:
        raise ValueError("calibration attention runs one pass over the whole sequence; use_cache must be False")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if swaa_mass is not None and swaa_mass_window is not None:
        swaa_mass[module.layer_idx] = outside_mass(query, key, scale, swaa_prompt_len, *swaa_mass_window)
    spec = swaa_plan.for_layer(module.layer_idx)
    if spec.is_full:  # the causal mask: torch's causal kernel is ~3x faster on CPU than the masked tiles
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                                               enable_gqa=True)
        return out.transpose(1, 2), None
    mask = layer_mask(spec, query.shape[2], swaa_prompt_len).to(query.device)
    return tiled_masked_attention(query, key, value, mask, scale), None


def register() -> str:
    """Register :func:`calibration_attention` with transformers under :data:`ATTN_NAME`; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, calibration_attention)
    return ATTN_NAME


def single_layer_plan(layer: int, num_layers: int, window: int, keep_first: int) -> SwaaPlan:
    """The plan in which only ``layer`` slides (W, k, FA decode) and every other layer keeps full attention."""
    return build_plan({"sliding_window_size": window, "keep_first": keep_first, "force_fa_decode": True,
                       "non_sliding_layers": [i for i in range(num_layers) if i != layer]}, num_layers)


@torch.no_grad()
def greedy_answer(model, prompt_ids: Sequence[int], max_tokens: int, eos_token_ids: Sequence[int] = ()) -> list[int]:
    """Up to ``max_tokens`` greedy full-attention tokens after ``prompt_ids`` (stops after an EOS token).

    Runs transformers' ``generate`` with its ``sdpa`` attention (plain causal, KV cache), then puts the
    model's attention implementation back.
    """
    if max_tokens <= 0:
        return []
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        ids = torch.tensor([list(prompt_ids)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=list(eos_token_ids) or None, pad_token_id=(list(eos_token_ids) or [0])[0])
    finally:
        model.set_attn_implementation(previous)
    return out[0, len(prompt_ids):].tolist()


def _decoder_layers(model):
    return model.model.layers[: model.config.num_hidden_layers]


def _forward_from(model, hidden: torch.Tensor, start: int, rotary, position_ids, plan: SwaaPlan, prompt_len: int,
                  score_positions: torch.Tensor, record: list | None = None, mass: dict | None = None,
                  mass_window: tuple[int, int] | None = None) -> torch.Tensor:
    """Decoder layers ``start..`` from ``hidden``, then the final norm and the LM head at ``score_positions``.

    Returns float64 log-probabilities ``[len(score_positions), vocab]``. ``record``, if given, receives the
    input hidden state of every layer run.
    """
    for layer in _decoder_layers(model)[start:]:
        if record is not None:
            record.append(hidden)
        hidden = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=rotary,
                       swaa_plan=plan, swaa_prompt_len=prompt_len, swaa_mass=mass, swaa_mass_window=mass_window)
    hidden = model.model.norm(hidden[:, score_positions])
    return model.lm_head(hidden)[0].double().log_softmax(-1)


@torch.no_grad()
def prompt_signals(model, prompt_ids: Sequence[int], answer_ids: Sequence[int], window: int, keep_first: int,
                   kl: bool = True, layer_callback: Callable[[], None] | None = None
                   ) -> tuple[list[float], list[float]]:
    """Both signals of one calibration prompt.

    Args:
        model: a transformers causal LM loaded with ``attn_implementation=ATTN_NAME`` (after :func:`register`).
        prompt_ids: the prompt, P tokens (P > W + k, else no prompt row is affected).
        answer_ids: tokens appended as teacher-forced decode steps (may be empty).
        window, keep_first: W and k of the plan.
        kl: also compute the per-layer KL (1 + L partial forwards); False gives NaNs for it.
        layer_callback: called after each layer's sliding forward (progress bars).

    Returns:
        ``(mass, kl)``: two lists of one float per decoder layer. ``mass[L]``: mean outside mass of layer L
        (:func:`outside_mass`, over heads and rows); ``kl[L]``: mean over the ``1 + len(answer_ids) - 1``
        scored positions (``P - 1 .. n - 2``, n = P + len(answer)) of ``KL(p_full || p_L)`` in nats.
    """
    num_layers = model.config.num_hidden_layers
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)])
    prompt_len, n = len(prompt_ids), ids.shape[1]
    score_positions = torch.arange(prompt_len - 1, max(prompt_len, n - 1))
    position_ids = torch.arange(n)[None]
    hidden = model.model.embed_tokens(ids)
    rotary = model.model.rotary_emb(hidden, position_ids=position_ids)
    record: list[torch.Tensor] = []
    mass: dict[int, torch.Tensor] = {}
    full_plan = build_plan(None, num_layers)
    ref = _forward_from(model, hidden, 0, rotary, position_ids, full_plan, prompt_len, score_positions, record, mass,
                        (window, keep_first))
    mass_signal = [float(mass[i].mean()) if mass[i].numel() else 0.0 for i in range(num_layers)]
    kl_signal = [float("nan")] * num_layers
    if kl:
        p_ref = ref.exp()
        for layer in range(num_layers):
            plan = single_layer_plan(layer, num_layers, window, keep_first)
            out = _forward_from(model, record[layer], layer, rotary, position_ids, plan, prompt_len, score_positions)
            kl_signal[layer] = float((p_ref * (ref - out)).sum(-1).mean())
            if layer_callback is not None:
                layer_callback()
    return mass_signal, kl_signal


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties; Pearson correlation of the ranks).

    Raises:
        ValueError: sequences of different lengths or shorter than 2.
    """
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of the same length >= 2")
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else float("nan")


@dataclass
class Calibration:
    """The signals of a model at one (W, k), averaged over the calibration prompts.

    Attributes:
        window, keep_first: W and k.
        num_layers: decoder layers.
        mass, kl: per layer, the mean over prompts of :func:`prompt_signals`' two signals (kl all NaN if it
            was not computed).
        mass_per_prompt, kl_per_prompt: the same per prompt (``[prompts][layers]``).
        prompt_tokens, answer_tokens: per prompt, its length and the number of greedy answer tokens appended.
        wall_s: seconds spent (answers + signals).
    """

    window: int
    keep_first: int
    num_layers: int
    mass: list[float]
    kl: list[float]
    mass_per_prompt: list[list[float]] = field(repr=False)
    kl_per_prompt: list[list[float]] = field(repr=False)
    prompt_tokens: list[int]
    answer_tokens: list[int]
    wall_s: float

    def signal(self, name: str) -> list[float]:
        """The per-layer values of ``name`` in {"kl", "mass"}."""
        if name not in ("kl", "mass"):
            raise ValueError(f"unknown signal {name!r}; expected 'kl' or 'mass'")
        return self.kl if name == "kl" else self.mass

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {k: getattr(self, k) for k in ("window", "keep_first", "num_layers", "mass", "kl", "mass_per_prompt",
                                              "kl_per_prompt", "prompt_tokens", "answer_tokens", "wall_s")}


def calibrate(model, prompts: Sequence[Sequence[int]], window: int, keep_first: int, answer_tokens: int = 16,
              eos_token_ids: Sequence[int] = (), kl: bool = True, progress: bool = True,
              answers: Sequence[Sequence[int]] | None = None) -> Calibration:
    """:func:`prompt_signals` over ``prompts``, averaged per layer.

    Args:
        model: see :func:`prompt_signals`.
        prompts: token-id prompts, each longer than ``window + keep_first``.
        answer_tokens: greedy full-attention tokens appended to each prompt (:func:`greedy_answer`).
        eos_token_ids: where a greedy answer stops.
        kl: compute the KL signal too.
        progress: a tqdm bar over prompts x layers.
        answers: precomputed answers (one per prompt), instead of generating them.

    Raises:
        ValueError: no prompts, or a prompt of at most ``window + keep_first`` tokens.
    """
    if not prompts:
        raise ValueError("calibrate needs at least one prompt")
    short = [len(p) for p in prompts if len(p) <= window + keep_first]
    if short:
        raise ValueError(f"a calibration prompt of {min(short)} tokens is not longer than W + k = "
                         f"{window + keep_first}")
    from tqdm import tqdm

    num_layers = model.config.num_hidden_layers
    start = time.perf_counter()
    per_prompt = 1 + (num_layers if kl else 0)
    bar = tqdm(total=len(prompts) * per_prompt, desc=f"calibration W={window} k={keep_first}", unit="fwd",
               disable=not progress)
    masses, kls, lengths = [], [], []
    for i, prompt in enumerate(prompts):
        answer = list(answers[i]) if answers is not None else greedy_answer(model, prompt, answer_tokens,
                                                                               eos_token_ids)
        m, k = prompt_signals(model, prompt, answer, window, keep_first, kl=kl, layer_callback=lambda: bar.update(1))
        bar.update(1)
        masses.append(m)
        kls.append(k)
        lengths.append(len(answer))
    bar.close()

    def mean(rows: list[list[float]]) -> list[float]:
        return [sum(r[i] for r in rows) / len(rows) for i in range(num_layers)]

    return Calibration(window, keep_first, num_layers, mean(masses), mean(kls), masses, kls,
                       [len(p) for p in prompts], lengths, round(time.perf_counter() - start, 1))

"""Synthetic long-context retrieval tasks (offline, deterministic by seed).

The tasks follow passkey retrieval and RULER's needle-in-a-haystack family (Hsieh et al., "RULER: What's
the real context size of your long-context language models?", arXiv 2404.06654):

* ``passkey``: one pass key hidden in filler text; "What is the pass key?"
* ``niah_single``: one "special magic number for <key>" in the haystack.
* ``niah_multikey``: several needles with different keys; one key is queried.
* ``niah_multivalue``: several numbers for the same key; all of them are asked for.

A prompt is the model's chat template around one user turn (instruction, haystack, question), ending
with the assistant header, so the model words its own answer; optionally (``answer_prefix``) the
assistant turn starts with the answer's beginning ("The pass key is"), as RULER does. The haystack is
made of short bland sentences drawn with the sample's own seed, padded until the templated prompt reaches
``context_tokens``; the needle goes at a chosen relative depth. :mod:`swaa_vllm.evaluation.scoring` scores
the model's answers.

Separate families, :data:`TRAINING_TASKS`, feed SWA-aware fine-tuning (``swaa_vllm.finetuning.distill``) and are never
scored by the accuracy harness, so that the harness measures generalisation: they hide words, codes and
places instead of numbers, in a different filler text:

* ``word_lookup``: "The secret color of <key> is <color>." among other keys' colors.
* ``code_lookup``: "The access code of the <key> vault is <XY-1234>." among other vaults.
* ``person_city``: "<Name> moved to <City> last year." among other people.

Nothing here imports vLLM; a tokenizer with ``encode`` and ``apply_chat_template`` (transformers) is all
that generation needs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue")
TRAINING_TASKS = ("word_lookup", "code_lookup", "person_city")

# Bland, mutually unrelated sentences (the "noise" haystack of passkey/RULER, a little varied so that
# the filler is not one sentence period).
FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
    "The river runs to the sea.",
    "A bird sings in the morning.",
    "The road goes on and on.",
    "Clouds drift over the hills.",
    "The wind is cold today.",
    "Leaves fall in the autumn.",
    "The stars come out at night.",
)

# The training families' haystack (no sentence shared with FILLER_SENTENCES).
TRAINING_FILLER_SENTENCES = (
    "The market opens at dawn.",
    "A cat sleeps by the window.",
    "The bell rings twice at noon.",
    "Snow covers the old bridge.",
    "The train leaves on time.",
    "Bread is baked every morning.",
    "The lamp stands on the table.",
    "Waves break on the rocks.",
    "The door creaks when it opens.",
    "Rain taps on the roof.",
    "The library closes early on Sundays.",
    "A boat rests in the harbor.",
)
# The training families' values (also the vocabulary of their scoring, swaa_vllm/evaluation/scoring.py).
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "violet", "brown", "black", "white", "gray",
           "pink", "gold", "teal", "crimson", "indigo")
_PEOPLE = ("Alice", "Bruno", "Clara", "Daniel", "Elena", "Felix", "Grace", "Hugo", "Irene", "Jonas", "Karla", "Liam",
           "Maria", "Nora", "Oscar", "Paula", "Quentin", "Rosa", "Simon", "Tara", "Victor", "Wanda", "Yusuf", "Zoe")
CITIES = ("Lisbon", "Oslo", "Vienna", "Dublin", "Prague", "Madrid", "Berlin", "Warsaw", "Athens", "Helsinki", "Lyon",
           "Porto", "Zurich", "Geneva", "Munich", "Naples", "Seville", "Krakow", "Bergen", "Tallinn")

_ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
    "mellow", "noble", "odd", "proud", "quiet", "rapid", "silver", "tender", "upbeat", "vivid", "witty", "young",
)
_NOUNS = (
    "anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket",
    "kettle", "ladder", "meadow", "needle", "orchard", "pepper", "quartz", "rocket", "saddle", "tunnel",
    "violin", "walnut", "yogurt", "zipper",
)


@dataclass(frozen=True)
class TaskSpec:
    """What to generate.

    Attributes:
        task: one of :data:`TASKS` (scored by the harness) or :data:`TRAINING_TASKS` (fine-tuning data).
        context_tokens: target length of the whole templated prompt in tokens (the result is within a
            sentence, about 8 tokens, below it).
        value_digits: digits of each hidden number (the first digit is never 0).
        num_keys: needles with distinct keys in ``niah_multikey`` (one is queried).
        num_values: numbers hidden for the queried key in ``niah_multivalue``.
        answer_prefix: end the prompt with the start of the answer in the assistant turn ("The pass key
            is"), as RULER does, so that the first generated token is the value. Without it the model
            words its own answer, and those first tokens are generated (decode) tokens, which matters
            for SWAA: the last prompt position is computed under the window, generated ones may not be.
    """

    task: str
    context_tokens: int
    value_digits: int = 6
    num_keys: int = 4
    num_values: int = 2
    answer_prefix: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS + TRAINING_TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS + TRAINING_TASKS}")
        if self.context_tokens < 64:
            raise ValueError(f"context_tokens must be >= 64, got {self.context_tokens}")
        if not 1 <= self.value_digits <= 12:
            raise ValueError(f"value_digits must be in [1, 12], got {self.value_digits}")
        if self.num_keys < 2 or self.num_keys > len(_ADJECTIVES):
            raise ValueError(f"num_keys must be in [2, {len(_ADJECTIVES)}], got {self.num_keys}")
        if self.num_values < 2:
            raise ValueError(f"num_values must be >= 2, got {self.num_values}")


@dataclass(frozen=True)
class Sample:
    """One generated prompt and its expected answer.

    Attributes:
        task: the task name.
        seed: the seed that produced it (the same seed, spec and tokenizer give the same sample).
        depth: requested relative depth of the queried needle in the haystack, in [0, 1].
        prompt_ids: the templated prompt, token ids (length ``num_tokens``).
        answers: the expected numbers as strings; all must be retrieved.
        needle_token_pos: token index in ``prompt_ids`` where the queried needle sentence starts
            (for ``niah_multivalue``, the first of its needles), to within a token or two of BPE merging.
        text: the user message (for inspection; ``prompt_ids`` is what the model sees).
    """

    task: str
    seed: int
    depth: float
    prompt_ids: tuple[int, ...]
    answers: tuple[str, ...]
    needle_token_pos: int
    text: str

    @property
    def num_tokens(self) -> int:
        """Prompt length in tokens."""
        return len(self.prompt_ids)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _chat_prefix_ids(tokenizer, user_text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], add_generation_prompt=True,
                                        tokenize=True)
    if not isinstance(ids, list):  # transformers >= 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _user_start(tokenizer) -> int:
    """Index of the first token of the user message in a templated prompt."""
    a, b = _chat_prefix_ids(tokenizer, "a"), _chat_prefix_ids(tokenizer, "b")
    # strict=False: the two prompts may differ in length; they first differ inside the user text.
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _distinct_keys(rng: random.Random, n: int) -> list[str]:
    adjectives = rng.sample(_ADJECTIVES, n)
    return [f"{a}-{rng.choice(_NOUNS)}" for a in adjectives]


def _code(rng: random.Random, digits: int) -> str:
    letters = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(2))
    return f"{letters}-{_number(rng, min(digits, 4))}"


def _training_parts(spec: TaskSpec, rng: random.Random) -> tuple[str, list[str], str, str, tuple[str, ...]]:
    """:func:`_parts` for :data:`TRAINING_TASKS`: one queried needle among ``num_keys`` (queried first)."""
    intro = ("Some facts are hidden within the following text. Make sure to memorize them. "
             "I will ask you about one of them afterwards.")
    n = spec.num_keys
    if spec.task == "word_lookup":
        keys, values = _distinct_keys(rng, n), rng.sample(COLORS, n)
        needles = [f"The secret color of the {k} is {v}." for k, v in zip(keys, values, strict=True)]
        return (intro, needles, f"What is the secret color of the {keys[0]}?",
                f"The secret color of the {keys[0]} is", (values[0],))
    if spec.task == "code_lookup":
        keys = _distinct_keys(rng, n)
        values = [_code(rng, spec.value_digits) for _ in keys]
        needles = [f"The access code of the {k} vault is {v}." for k, v in zip(keys, values, strict=True)]
        return (intro, needles, f"What is the access code of the {keys[0]} vault?",
                f"The access code of the {keys[0]} vault is", (values[0],))
    people, cities = rng.sample(_PEOPLE, n), rng.sample(CITIES, n)
    needles = [f"{p} moved to {c} last year." for p, c in zip(people, cities, strict=True)]
    return (intro, needles, f"Which city did {people[0]} move to last year?", f"{people[0]} moved to", (cities[0],))


def _parts(spec: TaskSpec, rng: random.Random) -> tuple[str, list[str], str, str, tuple[str, ...]]:
    """(instruction, needle sentences with the queried one(s) first, question, answer prefix, answers)."""
    if spec.task in TRAINING_TASKS:
        return _training_parts(spec, rng)
    d = spec.value_digits
    if spec.task == "passkey":
        value = _number(rng, d)
        return (
            ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
             "I will quiz you about the pass key."),
            [f"The pass key is {value}. Remember it. {value} is the pass key."],
            "What is the pass key?",
            "The pass key is",
            (value,),
        )
    intro = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
             "I will quiz you about the numbers afterwards.")
    if spec.task == "niah_single":
        key, value = _distinct_keys(rng, 1)[0], _number(rng, d)
        return (intro, [f"One of the special magic numbers for {key} is: {value}."],
                f"What is the special magic number for {key} mentioned in the provided text?",
                f"The special magic number for {key} mentioned in the provided text is", (value,))
    if spec.task == "niah_multikey":
        keys = _distinct_keys(rng, spec.num_keys)
        values = [_number(rng, d) for _ in keys]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values, strict=True)]
        return (intro, needles, f"What is the special magic number for {keys[0]} mentioned in the provided text?",
                f"The special magic number for {keys[0]} mentioned in the provided text is", (values[0],))
    key = _distinct_keys(rng, 1)[0]
    values: list[str] = []
    while len(values) < spec.num_values:
        v = _number(rng, d)
        if v not in values:
            values.append(v)
    needles = [f"One of the special magic numbers for {key} is: {v}." for v in values]
    return (intro, needles, f"What are all the special magic numbers for {key} mentioned in the provided text?",
            f"The special magic numbers for {key} mentioned in the provided text are", tuple(values))


def make_sample(tokenizer, spec: TaskSpec, seed: int, depth: float) -> Sample:
    """Generate one sample.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        spec: the task and the target prompt length.
        seed: drives the values, keys, filler order and positions of the other needles.
        depth: relative position of the queried needle in the haystack, 0 = first sentence, 1 = last.

    Returns:
        A :class:`Sample`; ``num_tokens <= spec.context_tokens`` and within about one filler sentence of it.

    Raises:
        ValueError: ``depth`` outside [0, 1], or ``context_tokens`` too short for the instruction,
            needles and question.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{spec.task}/{seed}")
    instruction, needles, question, answer_prefix, answers = _parts(spec, rng)

    def render(filler: list[str], positions: list[int]) -> tuple[str, int]:
        """User text with needle i before filler sentence positions[i]; char offset of needle 0."""
        inserts: dict[int, list[str]] = {}
        for needle, pos in zip(needles, positions, strict=True):
            inserts.setdefault(pos, []).append(needle)
        sentences, first = [], -1
        for i in range(len(filler) + 1):
            for needle in inserts.get(i, []):
                if needle == needles[0] and first < 0:
                    first = len(sentences)
                sentences.append(needle)
            if i < len(filler):
                sentences.append(filler[i])
        head = instruction + "\n\n"
        text = head + " ".join(sentences) + "\n\n" + question
        offset = len(head) + sum(len(s) + 1 for s in sentences[:first])
        return text, offset

    answer_ids = _encode(tokenizer, answer_prefix) if spec.answer_prefix else []
    fixed = len(_chat_prefix_ids(tokenizer, render([], [0] * len(needles))[0])) + len(answer_ids)
    budget = spec.context_tokens - fixed
    if budget < 0:
        raise ValueError(f"context_tokens={spec.context_tokens} is below the {fixed} tokens of the fixed text")
    filler: list[str] = []
    used = 0
    sentences = TRAINING_FILLER_SENTENCES if spec.task in TRAINING_TASKS else FILLER_SENTENCES
    while True:
        sentence = rng.choice(sentences)
        cost = len(_encode(tokenizer, " " + sentence))
        if used + cost > budget:
            break
        filler.append(sentence)
        used += cost
    n = len(filler)
    first_pos = round(depth * n)
    other_positions = [rng.randint(0, n) for _ in needles[1:]]
    positions = [first_pos, *other_positions]
    if spec.task == "niah_multivalue":  # the queried needle is the earliest of the key's needles
        positions = [first_pos, *(max(p, first_pos) for p in other_positions)]
    text, offset = render(filler, positions)
    ids = _chat_prefix_ids(tokenizer, text) + answer_ids
    # Shrink if BPE merges across sentence boundaries came out longer than the per-sentence estimate.
    while len(ids) > spec.context_tokens and filler:
        filler.pop()
        positions = [min(p, len(filler)) for p in positions]
        text, offset = render(filler, positions)
        ids = _chat_prefix_ids(tokenizer, text) + answer_ids
    needle_pos = _user_start(tokenizer) + len(_encode(tokenizer, text[:offset].rstrip()))
    return Sample(task=spec.task, seed=seed, depth=depth, prompt_ids=tuple(ids), answers=answers,
                  needle_token_pos=needle_pos, text=text)


def depths(n: int, low: float = 0.1, high: float = 0.9) -> list[float]:
    """``n`` evenly spaced needle depths from ``low`` to ``high`` inclusive (one depth, the midpoint, if n == 1).

    Raises:
        ValueError: ``n < 1`` or not ``0 <= low <= high <= 1``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got {low}, {high}")
    if n == 1:
        return [(low + high) / 2]
    return [low + (high - low) * i / (n - 1) for i in range(n)]


def make_samples(tokenizer, specs: Sequence[TaskSpec], per_task: int, seed: int = 0,
                 depth_range: tuple[float, float] = (0.1, 0.9)) -> list[Sample]:
    """``per_task`` samples of each spec, needles at evenly spaced depths, seeds ``seed*1000 + i``.

    Returns:
        ``len(specs) * per_task`` samples, grouped by spec in the given order.
    """
    out = []
    for spec in specs:
        for i, depth in enumerate(depths(per_task, *depth_range)):
            out.append(make_sample(tokenizer, spec, seed * 1000 + i, depth))
    return out

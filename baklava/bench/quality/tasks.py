"""The long-context tasks of the quality benchmark, generated from a seed (RULER-like).

Every sample is a token sequence cut in two: ``context_ids`` (instruction + haystack, what gets
compressed) and ``query_ids`` (question + the start of the answer). The same tokens serve both
settings: *query-aware* prefills them in one pass (the question is seen before compression),
*query-agnostic* prefills the context, compresses it, and only then reads the question.

Haystack prose is cut from ``pydoc_data.topics`` between the calibration windows (the profiler
reads the start of that text and the allocation search its end). Needles are RULER's "special
magic numbers"; variable tracking follows chains of ``VAR X = VAR Y``; frequent words counts coded
words drawn from a Zipf law. ``ppl`` is the perplexity of held-out prose after the compressed
context.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

from baklava.profiles.calibration import default_text
from baklava.runtime.chat_split import ChatSplit

GENERATION_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "fwe")
TASKS = (*GENERATION_TASKS, "ppl")
PPL_CONTINUATION = 128  # tokens scored after the compressed context

_ADJECTIVES = (
    "amber ancient bitter brave bright calm clever cold crimson curious damp dusty eager early "
    "fancy fierce gentle golden grumpy hollow humble icy jolly lazy lively lucky mellow misty "
    "noisy odd pale patient plain proud quiet rapid rough rusty salty shiny silent silver sleepy "
    "slow smooth soft sour spicy steady sticky stormy sunny tall tender thirsty tiny wary wild"
).split()
_NOUNS = (
    "anchor apple badger banner basket beacon bottle bridge candle canyon castle cellar comet "
    "cottage crater desert dragon engine falcon feather forest fountain garden glacier harbor "
    "helmet island jacket kettle ladder lantern meadow mirror needle orchard pebble pepper piano "
    "pillow planet pocket puzzle quarry river saddle shadow spider station teapot thunder tower "
    "tunnel valley violin wagon walrus window"
).split()


@dataclass
class Sample:
    """One prompt of one task; ``answers`` are the strings the output must contain."""

    task: str
    length: int  # target tokens of context + query
    index: int
    context_ids: list[int]
    query_ids: list[int]
    answers: list[str] = field(default_factory=list)
    max_new_tokens: int = 0  # 0 for ppl: the query tokens are scored, not generated

    @property
    def num_tokens(self) -> int:
        return len(self.context_ids) + len(self.query_ids)

    def score(self, output: str) -> float:
        """Fraction of the expected answers found in ``output`` (RULER's string match)."""
        return sum(a.lower() in output.lower() for a in self.answers) / len(self.answers)


@dataclass(frozen=True)
class _Prompt:
    instruction: str
    pieces: list[str]  # inserted into the haystack, in order, at random depths
    question: str
    answer_prefix: str
    answers: list[str]
    max_new_tokens: int
    haystack: bool = True  # False: the pieces are the whole context (frequent words)


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _keys(rng: random.Random, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        k = _key(rng)
        if k not in keys:
            keys.append(k)
    return keys


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


_NIAH_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards."
)


def _niah(task: str, rng: random.Random) -> _Prompt:
    if task == "niah_single":
        key, value = _key(rng), _number(rng)
        pieces, keys, answers = [_needle(key, value)], [key], [value]
    elif task == "niah_multikey":  # one needle asked, three distractors with other keys
        keys_all = _keys(rng, 4)
        values = [_number(rng) for _ in keys_all]
        pieces = [_needle(k, v) for k, v in zip(keys_all, values, strict=True)]
        rng.shuffle(pieces)
        keys, answers = keys_all[:1], values[:1]
    elif task == "niah_multivalue":  # four values of the same key, all asked
        key = _key(rng)
        answers = [_number(rng) for _ in range(4)]
        pieces, keys = [_needle(key, v) for v in answers], [key]
    else:  # niah_multiquery: four keys, two asked
        keys_all = _keys(rng, 4)
        values = [_number(rng) for _ in keys_all]
        pieces = [_needle(k, v) for k, v in zip(keys_all, values, strict=True)]
        rng.shuffle(pieces)
        keys, answers = keys_all[:2], values[:2]
    many = len(answers) > 1
    what = " and ".join(keys)
    noun = "numbers" if many else "number"
    verb = "are" if many else "is"
    return _Prompt(
        _NIAH_INSTRUCTION,
        pieces,
        f"What {verb} the special magic {noun} for {what} mentioned in the provided text?",
        f"The special magic {noun} for {what} mentioned in the provided text {verb}",
        answers,
        max_new_tokens=12 * len(answers),
    )


def _variable_tracking(rng: random.Random) -> _Prompt:
    """One chain of 4 hops to find, one distractor chain with another value."""
    names = set()
    while len(names) < 10:
        names.add("".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)))
    names = sorted(names)
    rng.shuffle(names)
    value, other = _number(rng)[:5], _number(rng)[:5]
    chains = []
    for chain_names, v in ((names[:5], value), (names[5:], other)):
        lines = [f"VAR {chain_names[0]} = {v}."]
        lines += [f"VAR {b} = VAR {a}." for a, b in zip(chain_names, chain_names[1:], strict=False)]
        chains.append(lines)
    pieces = [line for pair in zip(*chains, strict=True) for line in pair]  # interleaved, in chain order
    return _Prompt(
        "Memorize and track the chain(s) of variable assignment hidden in the following text.",
        pieces,
        f"Find all variables that are assigned the value {value} in the text above.",
        f"Answer: According to the chain(s) of variables assignment in the text above, 5 variables "
        f"are assigned the value {value}, they are:",
        names[:5],
        max_new_tokens=30,
    )


def _coded_word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 7)))


def _frequent_words(rng: random.Random) -> _Prompt:
    """Coded words drawn from a Zipf law (alpha 2); the three most frequent are asked."""
    vocab = list(dict.fromkeys(_coded_word(rng) for _ in range(300)))
    weights = [1.0 / (rank + 1) ** 2 for rank in range(len(vocab))]
    return _Prompt(
        "Read the following coded text and track the frequency of each coded word. Find the three "
        "most frequently appeared coded words.",
        [" ".join(rng.choices(vocab, weights, k=64)) for _ in range(4096)],  # cut to length later
        "What are the three most frequently appeared words in the above coded text?",
        "Answer: According to the coded text above, the three most frequently appeared words are:",
        vocab[:3],
        max_new_tokens=20,
        haystack=False,
    )


@lru_cache(maxsize=4)
def _prose_ids(tokenizer) -> tuple[int, ...]:
    """Token ids of the prose between the calibration windows (skip its first and last 12k tokens)."""
    ids = tokenizer(default_text(), add_special_tokens=False)["input_ids"]
    return tuple(ids[12_000:-12_000])


class PromptFormatter(ChatSplit):
    """Render ``instruction + context + question`` with the model's chat template, cut in two
    (:class:`~baklava.runtime.chat_split.ChatSplit`, the engine's cut for a request's context)."""

    def context(self, instruction: str, body: str) -> list[int]:
        return self.context_ids(f"{instruction}\n\n{body}")

    def query(self, question: str, answer_prefix: str) -> list[int]:
        return self.question_ids(question, answer_prefix)


def _insert(body_sentences: list[str], pieces: list[str], rng: random.Random) -> str:
    """Insert ``pieces`` in order at random sentence boundaries of the haystack."""
    depths = sorted(rng.randrange(len(body_sentences) + 1) for _ in pieces)
    out, last = [], 0
    for depth, piece in zip(depths, pieces, strict=True):
        out += body_sentences[last:depth] + [piece]
        last = depth
    return " ".join(out + body_sentences[last:])


def _sentences(text: str) -> list[str]:
    parts = [s.strip() for s in text.replace("\n", " ").split(". ")]
    return [p if p.endswith(".") else p + "." for p in parts if p]


def make_sample(task: str, length: int, index: int, fmt: PromptFormatter, seed: int = 0) -> Sample:
    """Sample ``index`` of ``task`` at about ``length`` tokens (context + query), deterministic in ``seed``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    rng = random.Random(f"{seed}/{task}/{length}/{index}")
    prose = _prose_ids(fmt.tokenizer)
    if task == "ppl":
        cont_start = length - PPL_CONTINUATION
        start = rng.randrange(len(prose) - length)
        window = list(prose[start : start + length])
        return Sample(task, length, index, window[:cont_start], window[cont_start:])
    spec = (
        _niah(task, rng)
        if task.startswith("niah")
        else _variable_tracking(rng)
        if task == "vt"
        else _frequent_words(rng)
    )
    query = fmt.query(spec.question, spec.answer_prefix)
    room = length - len(fmt.context(spec.instruction, "")) - len(query)
    if spec.haystack:
        room -= sum(len(fmt.encode(" " + p)) for p in spec.pieces)
    if room < 64:
        raise ValueError(f"length {length} is too short for {task}")
    layout = rng.random()  # fixes haystack start and needle depths, whatever the room
    best = None
    for _ in range(6):  # joining prose and needles re-tokenises differently: adjust the room to fit
        body, answers = _body(spec, prose, room, random.Random(layout), fmt)
        context = fmt.context(spec.instruction, body)
        excess = len(context) + len(query) - length
        if excess <= 0:
            best = Sample(task, length, index, context, query, answers, spec.max_new_tokens)
            if excess >= -16:
                break
        room -= excess + (2 if excess > 0 else -2)
    if best is None:
        raise ValueError(f"could not fit {task} into {length} tokens")
    return best


def _body(spec: _Prompt, prose, room: int, rng: random.Random, fmt: PromptFormatter) -> tuple[str, list[str]]:
    """The context text of ``room`` tokens and the expected answers."""
    if spec.haystack:
        start = rng.randrange(len(prose) - room)
        return _insert(
            _sentences(fmt.tokenizer.decode(prose[start : start + room])), spec.pieces, rng
        ), spec.answers
    body = fmt.tokenizer.decode(fmt.encode(" ".join(spec.pieces))[:room])
    body = body[: body.rfind(" ")]  # no half word at the end
    counts: dict[str, int] = {}
    for w in body.split():
        counts[w] = counts.get(w, 0) + 1
    return body, sorted(counts, key=lambda w: (-counts[w], w))[:3]


def build_suite(
    tokenizer, tasks: list[str], lengths: list[int], samples: int, *, seed: int = 0, chat: bool = True
) -> list[Sample]:
    """``samples`` prompts for every task and length, in a fixed order."""
    fmt = PromptFormatter(tokenizer, chat)
    return [make_sample(t, n, i, fmt, seed) for n in lengths for t in tasks for i in range(samples)]

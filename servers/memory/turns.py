"""Conversation turns as clients write them: who spoke, what was said, and when.

A turn is stored as an episode of kind ``turn`` with its speaker and its position in the session,
so recall can use what a conversation carries and a note does not:

- dates said relatively ("yesterday", "last Friday", "two weeks ago") are resolved against the
  turn's own time and indexed beside the words, so "When did ...?" questions meet them;
- names (capitalised words that do not open a sentence) link turns across sessions in the graph;
- the chit-chat that fills conversations ("wow, that's great!") is kept out of the lexical query,
  so BM25 weighs the words that carry content.

Ranking turns (`rank_turns`) fuses the dense and BM25 channels by their standardised scores rather
than by rank: over hundreds of short turns, how far a turn stands above the rest tells more than
its place in each list (on the development conversations, rank fusion gave 0.48 evidence recall@5
where score fusion gave 0.57 on the same vectors). Then a conversation's own structure: a turn's
vector is embedded with the turn before it (a reply such as "yes, last Friday" means little alone),
a turn whose predecessor matches the words of the question inherits part of that match, each turn
lends part of its score to its neighbours, and the turns of the speaker the question names come
first (97 % of the evidence turns in the development set were said by the person the question
names).

A third channel reads word pieces rather than one pooled vector: late interaction (MaxSim, in the
manner of ColBERT) compares each piece of the question with every piece of a turn, read in context
by the same MiniLM pass that gives the turn's vector, and weighs the question's pieces by their
idf over the user's turns. A pooled vector blurs which words matched; MaxSim keeps them apart, so
a paraphrase ("her pet" for "my dog") still lines up. Alone it finds more evidence than either
other channel on the development conversations (0.68 recall@5 against 0.54 for BM25), and beside
them it adds about three points.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from hydrabrain.shared.embeddings import TokenVectors
from hydrabrain.shared.lexical import STOPWORDS, index_terms

MAX_TURNS_PER_CALL = 2_000
MAX_SPEAKER_CHARS = 128

# Words that carry no topic in conversation: greetings, reactions, fillers, pronouns, light verbs.
CHITCHAT = STOPWORDS | frozenset(
    "hey hi hello bye yeah yes yep ok okay oh wow cool awesome amazing great good nice glad thanks thank "
    "really so very just too much lot lots pretty totally definitely absolutely sure well um hmm haha lol "
    "me my mine myself you're i'm it's that's what's i've i'd i'll you've we're they're there's let's "
    "am been being has had having get got getting go going gone went make made do doing done did "
    "think thought know knew feel felt see saw say said tell told thing things stuff something anything "
    "hope love like also still even kind sort bit way time day one ones any some all every "
    "us him them those more most other such only own same than s t can't don't didn't won't isn't ago last next".split()
)

_NUMBERS = {
    "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "a couple of": 2, "couple of": 2, "a few": 3, "few": 3, "several": 3,
}
_WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_UNIT = r"(day|week|month|year|weekend)s?"
_COUNT = r"(\d+|a couple of|couple of|a few|few|several|an?|one|two|three|four|five|six|seven|eight|nine|ten)"
_RELATIVE = re.compile(
    rf"\b(?:(yesterday|today|tonight|tomorrow|this morning|this afternoon|this evening|last night)"
    rf"|(last|this past|past|next|this) ({'|'.join(_WEEKDAYS)}|week|weekend|month|year|summer|winter|spring|fall|autumn)"
    rf"|{_COUNT} {_UNIT} ago)\b",
    re.IGNORECASE,
)
_NAME = re.compile(r"(?<![.!?]\s)(?<!^)\b([A-Z][a-z]{2,}(?:\s[A-Z][a-z]{2,})*)")
_NOT_NAMES = frozenset(
    "I The This That These Those There Then What When Where Which Who Why How And But Yes Yeah Wow Hey Thanks Thank "
    "Oh Well Sure Great Good Nice Awesome Cool Amazing Hope Glad Sounds Love Really Just Also Have Did Was "
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July August "
    "September October November December Mom Dad".split()
)


@dataclass(frozen=True)
class TurnInput:
    speaker: str
    text: str
    at: float | None = None


@dataclass
class ResolvedDate:
    phrase: str  # as said, e.g. "last Friday"
    label: str  # what it resolves to, e.g. "5 May 2023" or "May 2023"
    start: float  # epoch seconds of the day/period it names
    terms: list[str] = field(default_factory=list)


def _day_label(d: datetime) -> str:
    return f"{d.day} {d.strftime('%B')} {d.year}"


def _shift_months(d: datetime, months: int) -> datetime:
    month = d.month - 1 + months
    year = d.year + month // 12
    return d.replace(year=year, month=month % 12 + 1, day=1)


def resolve_dates(text: str, at: float) -> list[ResolvedDate]:
    """Relative dates in `text`, resolved against the moment `at` the turn was said."""
    base = datetime.fromtimestamp(at, tz=UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    found: list[ResolvedDate] = []
    for m in _RELATIVE.finditer(text):
        phrase = m.group(0)
        low = phrase.lower()
        day: datetime | None = None
        label: str | None = None
        if m.group(1):
            offset = {"yesterday": -1, "tomorrow": 1, "last night": -1}.get(low, 0)
            day = base + timedelta(days=offset)
        elif m.group(2):
            which, unit = m.group(2).lower(), m.group(3).lower()
            step = 1 if which == "next" else (0 if which == "this" else -1)
            if unit in _WEEKDAYS:
                target = _WEEKDAYS.index(unit)
                delta = (base.weekday() - target) % 7 or 7
                day = base - timedelta(days=delta) if step <= 0 else base + timedelta(days=(target - base.weekday()) % 7 or 7)
            elif unit == "weekend":
                day = base - timedelta(days=(base.weekday() - 5) % 7 or 7) if step <= 0 else base + timedelta(days=(5 - base.weekday()) % 7 or 7)
                label = f"the weekend of {_day_label(day)}"
            elif unit == "week":
                day = base + timedelta(weeks=step)
                label = f"the week of {_day_label(day - timedelta(days=day.weekday()))}"
            elif unit == "month":
                day = _shift_months(base, step)
                label = f"{day.strftime('%B')} {day.year}"
            elif unit == "year":
                day = base.replace(year=base.year + step, month=1, day=1)
                label = str(day.year)
            else:  # a season: the year is what it tells
                day = base.replace(year=base.year + (step if step else 0), month=1, day=1)
                label = f"{unit} {day.year}"
        else:
            raw = m.group(4).lower()
            count = int(raw) if raw.isdigit() else _NUMBERS.get(raw, 1)
            unit = m.group(5).lower()
            if unit == "day":
                day = base - timedelta(days=count)
            elif unit in ("week", "weekend"):
                day = base - timedelta(weeks=count)
                label = f"the week of {_day_label(day - timedelta(days=day.weekday()))}"
            elif unit == "month":
                day = _shift_months(base, -count)
                label = f"{day.strftime('%B')} {day.year}"
            else:
                day = base.replace(year=base.year - count, month=1, day=1)
                label = str(day.year)
        if day is None:
            continue
        label = label or _day_label(day)
        found.append(ResolvedDate(phrase, label, day.timestamp(), index_terms(label)))
    return found


def names_in(text: str, speakers: frozenset[str] = frozenset()) -> list[str]:
    """Proper names a turn mentions (capitalised words not opening a sentence), speakers left out."""
    names = []
    for m in _NAME.finditer(text):
        name = m.group(1)
        if name.split()[0] in _NOT_NAMES:
            name = " ".join(name.split()[1:])
        if name and name not in _NOT_NAMES and name.casefold() not in speakers:
            names.append(name)
    return list(dict.fromkeys(names))


def content_terms(text: str) -> list[str]:
    """The words of a query or turn that say what it is about (stemmed, chit-chat dropped)."""
    return index_terms(text, CHITCHAT)


def indexed_text(speaker: str, text: str, dates: list[ResolvedDate]) -> str:
    """What the lexical and dense channels see: the speaker, the words, and any resolved dates."""
    suffix = "".join(f" ({d.phrase}: {d.label})" for d in dates)
    return f"{speaker}: {text}{suffix}"


def embedding_text(previous: tuple[str, str] | None, indexed: str) -> str:
    """What a turn's vector is computed from (``memory.turn_encoding = "paired"``): the turn before it in
    its session (speaker, text), then the turn."""
    return f"{previous[0]}: {previous[1]}\n{indexed}" if previous else indexed


def turn_vectors(turns: Sequence[TokenVectors], before: TokenVectors | None = None) -> np.ndarray:
    """(n, dim) unit vectors of a session's consecutive turns, each read together with the turn before it
    (``before`` precedes the first), from one encoder pass per turn (``memory.turn_encoding = "single"``).

    The encoder mean-pools its token vectors, so the vector of two turns read as one text is close to
    the normalised sum of each turn's token vectors read alone (cosine 0.96 on long conversations).
    Every turn goes through the encoder once instead of twice (2.0x the ingest rate in the conversation
    benchmark); what is lost is the context of each turn's own pieces, which late interaction reads
    (recall@5 0.743 against the paired pass's 0.755, benchmarks/memory_conversations.md).
    """
    totals = [t.total for t in turns]  # Embedder.embed_with_tokens fills them
    previous = [before.total if before is not None else None, *totals[:-1]]
    summed = np.stack([own if prev is None else own + prev for own, prev in zip(totals, previous, strict=True)]).astype(np.float32)
    return summed / np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-9)


def named_speakers(query: str, speakers: Sequence[str]) -> set[str]:
    """The known speakers a query names (whole words, "Ana's" counts), as stored."""
    return {s for s in speakers if re.search(rf"(?<!\w){re.escape(s)}(?!\w)", query, re.IGNORECASE)}


def without_speakers(query: str, speakers: Sequence[str]) -> str:
    """The query with speaker names taken out: the speaker filter handles them, and as words they only
    match every turn that addresses that person by name."""
    for s in sorted(speakers, key=len, reverse=True):
        query = re.sub(rf"(?<!\w){re.escape(s)}(?:'s)?(?!\w)", " ", query, flags=re.IGNORECASE)
    return query


@dataclass(frozen=True)
class TurnScoring:
    """How `rank_turns` combines its signals; the defaults were chosen on the development conversations
    (`benchmarks/memory_conversations.md`), in z-score units of the fused channels."""

    dense: float = 1.0
    lexical: float = 1.0
    lexical_context: float = 0.3  # share of the previous turn's BM25 a turn inherits
    next_turn: float = 0.5  # share of a turn's (positive) score lent to the turn after it (often its answer)
    previous_turn: float = 0.5  # and to the turn before it (often the question it answers)
    graph: float = 0.3  # share lent to turns that name the same people or places as the best turns
    speaker: float = 5.0  # the question names who said it: about a hard filter, yet a strong neighbour can still come in
    late: float = 2.0  # late interaction (idf-weighted MaxSim over word pieces): finds paraphrases one pooled vector blurs
    late_candidates: int = 80  # MaxSim scores only the best turns so far (as good on the development set, ~4x cheaper)
    # When the question names a speaker, the speaker bonus fills those 80 with that speaker's turns; the
    # best turns of everyone else get MaxSim too, so abstention can compare the two (`late_share`).
    share_candidates: int = 20
    bm25_b: float = 0.3  # length normalisation: long turns are not diluted chit-chat
    candidates: int = 100  # per channel


@dataclass
class TurnSignals:
    """One candidate turn: where it sits, who said it, and what each channel found (None: not in its top list)."""

    id: str
    session_id: str
    turn: int
    speaker: str
    cosine: float | None = None
    bm25: float | None = None
    late: float | None = None
    graph: bool = False


_FILLER_PIECES: dict[int, np.ndarray] = {}


def content_pieces(pieces: TokenVectors, tokenizer: Any) -> TokenVectors:
    """A turn's pieces without stopwords and punctuation: half the pieces to store and score, and on the
    development conversations the same recall (a question's content pieces seldom find their best
    match in a "the" or a comma). A turn made only of such pieces keeps them all."""
    drop = _FILLER_PIECES.get(id(tokenizer))
    if drop is None:
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        drop = _FILLER_PIECES[id(tokenizer)] = np.array([v in STOPWORDS or all(c in string.punctuation for c in v) for v in vocab])
    keep = ~drop[pieces.ids]
    return TokenVectors(pieces.ids[keep], pieces.vecs[keep]) if keep.any() else pieces


def late_interaction(query: TokenVectors, turns: Mapping[str, TokenVectors], frequencies: Mapping[int, int], total: int) -> dict[str, float]:
    """Each turn's MaxSim: for every query piece, its best cosine with any of the turn's pieces, averaged
    with idf weights (log((N + 1) / (df + 0.5)) over the user's turns), so "what", "did" and "?" count
    for little and the words that carry the question count most. Turns without stored pieces are absent.
    """
    have = [(i, t) for i, t in turns.items() if len(t.ids)]
    if not have or not len(query.ids):
        return {}
    weights = np.array([math.log((total + 1) / (frequencies.get(int(p), 0) + 0.5)) for p in query.ids])
    weights /= max(float(weights.sum()), 1e-9)
    import torch  # loaded already by the embedder; numpy converts float16 without SIMD, ten times slower here

    pieces = torch.from_numpy(np.concatenate([t.vecs for _, t in have])).float()
    sims = (torch.from_numpy(query.vecs).float() @ pieces.T).numpy()
    starts = np.cumsum([0] + [len(t.ids) for _, t in have[:-1]])
    best = np.maximum.reduceat(sims, starts, axis=1)  # (query pieces, turns)
    return {i: float(v) for (i, _), v in zip(have, weights @ best, strict=True)}


def late_share(turns: Sequence[TurnSignals], named: set[str]) -> float:
    """For a question that names a speaker: the named speaker's best MaxSim over the best of anyone's.

    Most questions about something never said swap the speaker ("What did Ana learn at the race?" when
    Ben ran it): the words match a turn well, but not one of hers. 1.0 when no speaker is named or
    nothing was scored. MaxSim separates such questions better than the BM25 share on the development
    conversations (`benchmarks/memory_conversations.md`), because it also matches paraphrases.
    """
    scored = [t for t in turns if t.late is not None]
    if not named or not scored:
        return 1.0
    best = max(t.late for t in scored)
    theirs = max((t.late for t in scored if t.speaker in named), default=0.0)
    return max(theirs, 0.0) / best if best > 0 else 1.0


def _standardise(values: np.ndarray) -> np.ndarray:
    spread = float(values.std())
    return (values - values.mean()) / spread if spread > 1e-9 else np.zeros_like(values)


def rank_turns(turns: Sequence[TurnSignals], named: set[str], w: TurnScoring,
               late: Callable[[list[str]], Mapping[str, float]] | None = None) -> dict[str, dict[str, float]]:
    """Scores for candidate turns (higher is better), with the part each signal contributed; `named`
    holds speakers as stored (`named_speakers`).

    A turn the dense search did not return gets the lowest cosine it did return (it is at most that
    close); one the lexical search did not return has no matching word (BM25 0). `late` gives the
    late-interaction score of the turns it is asked about: only the best `w.late_candidates` so far
    are asked (MaxSim costs a matrix product per turn's pieces), the rest score as the worst of those;
    when `named` is set, so are the best `w.share_candidates` turns of other speakers (see `late_share`).
    """
    if not turns:
        return {}
    place = {(t.session_id, t.turn): n for n, t in enumerate(turns)}
    cosines = [t.cosine for t in turns if t.cosine is not None]
    floor = min(cosines) if cosines else 0.0
    dense = np.array([t.cosine if t.cosine is not None else floor for t in turns])
    own = np.array([t.bm25 or 0.0 for t in turns])
    before = np.array([own[place[(t.session_id, t.turn - 1)]] if (t.session_id, t.turn - 1) in place else 0.0 for t in turns])
    lexical = own + w.lexical_context * before
    fused = w.dense * _standardise(dense) + w.lexical * _standardise(lexical)
    ahead = np.maximum(fused, 0.0)
    lent = np.zeros_like(fused)
    for n, t in enumerate(turns):
        prev, nxt = place.get((t.session_id, t.turn - 1)), place.get((t.session_id, t.turn + 1))
        lent[n] = max(w.next_turn * ahead[prev] if prev is not None else 0.0, w.previous_turn * ahead[nxt] if nxt is not None else 0.0)
    if w.graph:
        best = float(ahead.max()) if len(ahead) else 0.0
        lent = np.maximum(lent, np.array([w.graph * best if t.graph else 0.0 for t in turns]))
    said = np.array([w.speaker if t.speaker in named else 0.0 for t in turns])
    score = fused + lent + said
    interaction = np.zeros_like(score)
    if late is not None and w.late:
        top = list(np.argsort(-score, kind="stable")[: w.late_candidates])
        if named and w.share_candidates:
            asked = set(top)
            others = [n for n in np.argsort(-(fused + lent), kind="stable") if turns[n].speaker not in named]
            top += [n for n in others[: w.share_candidates] if n not in asked]
        found = late([turns[n].id for n in top])
        for n in top:
            turns[n].late = found.get(turns[n].id)
        values = [t.late for t in turns if t.late is not None]
        if values:  # a turn not asked about, or stored without pieces, scores as the worst that was
            interaction = w.late * _standardise(np.array([t.late if t.late is not None else min(values) for t in turns]))
    return {
        t.id: {"score": float(score[n] + interaction[n]), "fused": float(fused[n]), "context": float(lent[n]), "speaker": float(said[n]),
               "late": float(interaction[n])}
        for n, t in enumerate(turns)
    }

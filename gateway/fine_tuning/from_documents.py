"""A training set from a tenant's own documents (``from_documents`` jobs): chat examples that teach what the
documents say, offline and deterministically (no model is called; the same documents and seed give the same
examples).

1. **Facts.** Each document is cut into sentences (paragraphs, lines, sentence ends). A sentence is a fact when it
   reads ``<subject> <verb> <value>`` with a relational verb (``is``/``are``/``was``, ``has``, ``costs``,
   ``leaves``, ``opens``, ``meets``, ``takes``, ``was built``, ...: :data:`_VERBS`), a short subject that is not
   a clause (``If ...``, ``In 2022 ...``) and a value. A leading possessive or ``It`` refers to what the document
   is about (its first fact's subject, else its title): ``Its mayor is X`` becomes ``Quillmere's mayor is X``.
2. **The newest version of each fact.** A fact's key is its subject's content words (articles, possessives and
   adverbs such as ``now`` dropped: ``the mayor of Quillmere`` = ``Quillmere's mayor``) and its relation (the verb's
   lemma and the preposition or participle after it: ``leaves at`` differs from ``leaves from``). Two facts are
   about the same thing when their relations match and one subject's words hold the other's (a bare ``the ferry``
   only within documents whose titles share a word). Facts are taken oldest document first and each one replaces
   every earlier fact about the same thing, so the newest timestamp wins, as retrieval's ranking does.
3. **Questions, plain.** For each fact kept, several wordings of a question a user would ask (``When does the
   ferry leave?``, ``What time does the ferry leave?``, ``The ferry leaves at what time?``, ``How many rooms does
   the inn have?``, ...; the question word follows the value: a time, a date, an amount, a person, a place), each
   answered with the fact's sentence and no context: this puts the fact in the weights.
4. **Questions with retrieval's context.** The same questions with a system message built exactly as the gateway
   builds ``rag`` context (:func:`retrieval.context.build_context`, the chat surface's system message) holding the
   fact's passage among others, answered with the sentence and its ``[n]``: next to the older passage it replaced
   (the newer one wins), next to unrelated passages, and next to a dated *later* passage that changes the value
   (the later value wins: what happens when a fact changes after training). So the adapter learns to read the
   context and to prefer its newer source over what it memorised, and weights and retrieval work together.

The output is bounded (:data:`MAX_EXAMPLES`): facts are served in turns (every fact's first examples before any
fact's later ones) until the bound.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from retrieval.context import TokenCounter, build_context
from retrieval.documents import Passage, SourceDocument

MAX_EXAMPLES = 1000
"""The most examples one training set gets."""
MAX_FACTS = 400
"""The most facts read (the newest kept first): beyond, the examples would be cut anyway."""
PLAIN_WORDINGS = 4
"""Question wordings per fact without context."""
CONTEXT_BUDGET_TOKENS = 1024
"""The context's budget in base-model tokens (the gateway's default ``rag`` budget)."""
PASSAGE_WORDS = 60
"""A passage (what a retrieved chunk would hold) is the fact's sentence and its neighbours up to this many words:
short, because a grounded example's length sets its whole batch's (padded) cost in training time and memory."""

Example = list[dict[str, str]]

_PARAGRAPH_RE = re.compile(r"\n\s*\n|\n(?=\s*(?:[-*•]|\d+[.)])\s)|\n")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")
_ABBREVIATION_RE = re.compile(r"(?:^|\s)(?:Dr|Mr|Mrs|Ms|Prof|St|Mt|No|Jr|Sr|vs|etc|e\.g|i\.e|[A-Z])\.$")
_BULLET_RE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
_WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’:.,-]*[A-Za-z0-9]|[A-Za-z0-9]")
_TIME_RE = re.compile(r"\b\d{1,2}[:.]\d{2}\b|\b\d{1,2}\s?(?:am|pm|a\.m\.|p\.m\.)(?!\w)|\bnoon\b|\bmidnight\b", re.I)
_DATE_RE = re.compile(r"\b(?:1[5-9]\d\d|20\d\d)\b|\b(?:january|february|march|april|may|june|july|august|september|"
                      r"october|november|december|spring|summer|autumn|winter)\b", re.I)
_DAY_RE = re.compile(r"\b(?:mon|tues|wednes|thurs|fri|satur|sun)days?\b|\bweekends?\b|\bevery day\b|\bdaily\b", re.I)
_DURATION_RE = re.compile(r"\b\d[\d,.]*\s*(?:seconds?|minutes?|hours?|days?|weeks?|months?|years?)\b", re.I)
_DATE_HEADS = frozenset({"in", "on", "since", "from", "until", "by", "every"})
_VERB_S_RE = re.compile(r"^[a-z]{2,}[^su']s$")
_NUMBER_RE = re.compile(r"\d[\d,]*(?:\.\d+)?")
_MONEY_VERBS = frozenset({"cost", "charge", "pay", "earn"})
_CONTENT_SKIP = frozenset({
    "a", "an", "the", "its", "their", "his", "her", "our", "your", "my", "this", "that", "these", "those", "of",
    "now", "currently", "still", "also", "usually", "today", "already", "always", "only", "just", "s",
})
_ADVERBS = frozenset({"now", "currently", "still", "also", "usually", "today", "already", "always", "only",
                      "just", "again", "recently", "officially", "newly", "normally", "no", "longer"})
_CLAUSE_STARTS = frozenset({
    "if", "when", "while", "although", "though", "because", "since", "after", "before", "during", "in", "on",
    "at", "for", "from", "to", "with", "without", "by", "as", "once", "until", "unless", "please", "there",
    "here", "we", "you", "i", "they", "he", "she", "this", "that", "these", "those", "what", "which", "who",
    "how", "why", "where", "and", "but", "or", "so", "then", "each", "every", "all", "some", "any", "no",
    "none", "most", "many", "few", "both", "either", "neither", "yes", "note", "however", "also",
})
_POSSESSIVES = frozenset({"its", "their"})
_LEADS = frozenset({"from", "since", "in", "on", "at", "as", "after", "starting", "until", "this", "next", "last",
                    "today", "now", "currently", "recently", "also", "however", "meanwhile", "lately"})
_PREPOSITIONS = frozenset({
    "at", "in", "on", "from", "to", "by", "for", "with", "into", "onto", "near", "behind", "under", "over",
    "between", "about", "after", "before", "until", "through", "during", "within", "outside", "inside",
    "around", "across", "along", "past", "towards", "every", "each", "once", "twice",
})
_STATES = frozenset({"open", "closed", "available", "free", "located", "based", "called", "named", "known",
                     "home", "part", "run", "held", "made", "led", "kept", "built", "sold", "paid", "done", "due"})
_NAMING = frozenset({"called", "named", "known"})
_MEASURE_RE = re.compile(r"^\d[\d,.]*\s+[a-z]+\s+(long|tall|high|wide|deep|old|heavy|big|large)\b")
# Relational verbs: form -> (lemma, tense); "be" and "have" are the auxiliaries questions invert.
_VERBS: dict[str, tuple[str, str]] = {
    "is": ("be", "present"), "are": ("be", "present"), "was": ("be", "past"), "were": ("be", "past"),
    "has": ("have", "present"), "have": ("have", "present"), "had": ("have", "past"),
}
for _lemma, _past in (
    ("cost", "cost"), ("leave", "left"), ("depart", "departed"), ("arrive", "arrived"), ("open", "opened"),
    ("close", "closed"), ("meet", "met"), ("take", "took"), ("run", "ran"), ("start", "started"),
    ("begin", "began"), ("end", "ended"), ("last", "lasted"), ("weigh", "weighed"), ("hold", "held"),
    ("sell", "sold"), ("use", "used"), ("make", "made"), ("build", "built"), ("grow", "grew"), ("live", "lived"),
    ("work", "worked"), ("belong", "belonged"), ("own", "owned"), ("lead", "led"), ("serve", "served"),
    ("offer", "offered"), ("pay", "paid"), ("earn", "earned"), ("charge", "charged"), ("cover", "covered"),
    ("contain", "contained"), ("include", "included"), ("measure", "measured"), ("sit", "sat"),
    ("stand", "stood"), ("lie", "lay"), ("keep", "kept"), ("need", "needed"), ("require", "required"),
    ("win", "won"), ("play", "played"), ("teach", "taught"), ("manage", "managed"), ("employ", "employed"),
    ("host", "hosted"), ("produce", "produced"), ("reach", "reached"), ("connect", "connected"),
    ("stop", "stopped"), ("return", "returned"), ("visit", "visited"), ("found", "founded"),
    ("speak", "spoke"), ("drive", "drove"), ("ride", "rode"), ("fly", "flew"), ("carry", "carried"),
    ("handle", "handled"), ("report", "reported"), ("support", "supported"), ("accept", "accepted"),
    ("allow", "allowed"), ("follow", "followed"), ("prefer", "preferred"), ("like", "liked"), ("love", "loved"),
):
    _third = _lemma + ("es" if _lemma.endswith(("s", "sh", "ch", "x", "o")) else "s")
    if _lemma.endswith("y") and _lemma[-2] not in "aeiou":
        _third = _lemma[:-1] + "ies"
    _VERBS[_third] = (_lemma, "present")
    if _past != _lemma:  # "cost": read as the present
        _VERBS[_past] = (_lemma, "past")
for _modal in ("will", "can", "must", "should", "may"):
    _VERBS[_modal] = (_modal, "modal")


@dataclass(frozen=True)
class Fact:
    """A sentence read as ``subject verb value``, with where it came from."""

    sentence: str
    """The sentence as taught (a leading possessive resolved)."""
    subject: str
    verb: str
    """The verb as written (``leaves``, ``is``, ``will``)."""
    value: str
    """What follows the verb (adverbs such as ``now`` left out)."""
    lemma: str
    tense: str
    subject_words: frozenset[str]
    relation: tuple[str, str]
    proper: bool
    """The subject names something (a capitalised word past its first): it needs no document to be specific."""
    topic: frozenset[str]
    """The content words of the document's title: bare subjects only meet within one topic."""
    passage: str
    """The sentence and its neighbours: the text retrieval would show for it."""
    document: SourceDocument
    order: int
    """Position in the corpus (oldest document first): the tie-break between equal timestamps."""

    def same_thing(self, other: Fact) -> bool:
        """Whether the two sentences state the same property of the same thing (so the newer one replaces)."""
        if self.relation != other.relation:
            return False
        small, large = sorted((self, other), key=lambda f: len(f.subject_words))
        if not small.subject_words or not small.subject_words <= large.subject_words:
            return False
        return small.proper or bool(self.topic & other.topic) or self.document.id == other.document.id


def examples_from_documents(documents: Sequence[SourceDocument], *, tokens: TokenCounter,
                            seed: int) -> list[list[dict[str, str]]]:
    """Chat examples (OpenAI ``messages`` lists) that teach what ``documents`` say, the newest version of each fact
    only (see the module's docstring). Deterministic for the same documents and ``seed``; at most
    :data:`MAX_EXAMPLES`. Raises :class:`ValueError` with a message for the user when the documents hold no fact."""
    facts = newest_facts(documents)
    if not facts:
        raise ValueError("The documents hold no statements to learn from (sentences such as \"The ferry leaves "
                         "at 7:15.\"): add documents with facts, or give a training file.")
    rng = random.Random(seed)
    superseded = _superseded(documents, facts)
    per_fact: list[list[Example]] = []
    for fact in facts:
        questions = questions_for(fact, rng=rng)
        plain: list[Example] = [[{"role": "user", "content": q}, {"role": "assistant", "content": fact.sentence}]
                                for q in questions[:PLAIN_WORDINGS]]
        grounded = _grounded(fact, questions, facts=facts, older=superseded.get(fact, []), rng=rng,
                             tokens=tokens)
        # Interleave so that a bound cuts the least useful last: a plain wording, then a grounded one, ...
        mixed: list[Example] = []
        for i in range(max(len(plain), len(grounded))):
            mixed.extend(([plain[i]] if i < len(plain) else []) + ([grounded[i]] if i < len(grounded) else []))
        per_fact.append(mixed)
    examples: list[Example] = []
    for turn in range(max(len(p) for p in per_fact)):
        examples.extend(p[turn] for p in per_fact if turn < len(p))
    examples = examples[:MAX_EXAMPLES]
    rng.shuffle(examples)
    return examples


def newest_facts(documents: Sequence[SourceDocument]) -> list[Fact]:
    """The facts of ``documents``, each only in its newest version, in corpus order (oldest document first)."""
    kept: list[Fact] = []
    for fact in _all_facts(documents):
        kept = [f for f in kept if not fact.same_thing(f)]
        kept.append(fact)
    return kept[-MAX_FACTS:]


def _all_facts(documents: Sequence[SourceDocument]) -> list[Fact]:
    facts: list[Fact] = []
    order = 0
    for document in sorted(documents, key=lambda d: d.timestamp):  # stable: export order breaks ties
        topic = _content_words(document.title or "")
        sentences = _sentences(document.text)
        about = ""  # the last subject that names something: what "Its ..." and "It ..." refer to
        seen: set[str] = set()
        for index, sentence in enumerate(sentences):
            fact = _read_fact(sentence, about=about)
            if fact is None or fact[0] in seen:
                continue
            seen.add(fact[0])
            text, subject, verb, value = fact
            if _is_proper(subject):
                about = subject
            lemma, tense = _VERBS.get(verb.split()[0].lower()) or (_lemma_of(verb), "present")
            facts.append(Fact(sentence=text, subject=subject, verb=verb, value=value, lemma=lemma, tense=tense,
                              subject_words=_content_words(subject), relation=_relation(lemma, value),
                              proper=_is_proper(subject), topic=topic,
                              passage=_passage(sentences, index, text), document=document, order=order))
            order += 1
    return facts


def _sentences(text: str) -> list[str]:
    out: list[str] = []
    for block in _PARAGRAPH_RE.split(text):
        block = _BULLET_RE.sub("", " ".join(block.split()))
        pieces: list[str] = []
        for piece in (p.strip() for p in _SENTENCE_END_RE.split(block)):
            if pieces and _ABBREVIATION_RE.search(pieces[-1]):  # "Dr. Alma Reyes": not a sentence end
                pieces[-1] += " " + piece
            elif piece:
                pieces.append(piece)
        out.extend(pieces)
    return out


def _read_fact(sentence: str, *, about: str) -> tuple[str, str, str, str] | None:
    """``(sentence, subject, verb, value)`` when the sentence states a fact, else None."""
    sentence = sentence.strip()
    if not sentence or sentence.endswith("?") or len(sentence) > 400:
        return None
    words = sentence.rstrip(".!;:").split()
    if len(words) < 3:
        return None
    lead = next((i for i, w in enumerate(words[:6]) if w.endswith(",")), None)
    if lead is not None and words[0].lower() in _LEADS:  # "From spring, the ferry ...": the lead is not the fact
        words = words[lead + 1:]
        if len(words) < 3:
            return None
        words[0] = words[0][:1].upper() + words[0][1:]
    first = words[0].lower()
    if first in _POSSESSIVES and about and len(words) > 2:  # "Its keeper is ..." -> "The keeper of X is ..."
        at = next((i for i, w in enumerate(words[:8]) if w in _VERBS), None)
        if at is None:
            return None
        words = ["The", *words[1:at], "of", *_lower_first(about).split(), *words[at:]]
    elif first == "it" and about and len(words) > 1 and words[1].lower() in _VERBS:
        words = [*about.split(), *words[1:]]
    elif first in _CLAUSE_STARTS or first in _POSSESSIVES or first == "it" or not words[0][:1].isalnum():
        return None
    position = next((i for i in range(1, min(len(words) - 1, 12)) if words[i] in _VERBS), None)
    if position is None:  # an unlisted verb: the first "-s" word after a named subject ("The P4 pump lifts ...")
        position = next((i for i in range(1, min(len(words) - 1, 7)) if _VERB_S_RE.match(words[i])
                         and _is_proper(" ".join(words[:i]))), None)
    if position is None:
        return None
    verb = words[position]
    subject_words = [w for w in words[:position] if w.lower() not in _ADVERBS]
    rest = words[position + 1:]
    while rest and rest[0].lower() in _ADVERBS:
        rest = rest[1:]
    if _VERBS.get(verb, ("", ""))[1] == "modal":  # "will be ...", "can be visited ...": keep the verb after it
        if not rest:
            return None
        verb = f"{verb} {rest[0]}"
        rest = rest[1:]
    if not subject_words or not rest or any(w.endswith((",", ";", ":")) for w in subject_words):
        return None
    text = " ".join(words)
    text = text if text.endswith((".", "!")) else text + "."
    return text, " ".join(subject_words), verb, " ".join(rest)


def _lemma_of(verb: str) -> str:
    """The base form of a third-person verb that :data:`_VERBS` does not list (``lifts`` -> ``lift``)."""
    if verb.endswith("ies"):
        return verb[:-3] + "y"
    if verb.endswith(("shes", "ches", "xes", "sses", "oes")):
        return verb[:-2]
    return verb[:-1]


def _relation(lemma: str, value: str) -> tuple[str, str]:
    head = value.split()[0].lower().strip(",.;:") if value.split() else ""
    if head in _PREPOSITIONS or head in _STATES or (head.endswith("ed") and len(head) > 4):
        return lemma, head
    return lemma, ""


def _content_words(text: str) -> frozenset[str]:
    words = re.sub(r"['’]s\b", "", text.lower())
    return frozenset(w for w in re.findall(r"[a-z0-9]+", words) if w not in _CONTENT_SKIP)


def _is_proper(subject: str) -> bool:
    words = subject.split()
    return any(w[:1].isupper() or w[:1].isdigit() for w in words[1:]) or (
        bool(words) and words[0][:1].isupper() and words[0].lower() not in _CONTENT_SKIP)


def _passage(sentences: Sequence[str], index: int, sentence: str) -> str:
    """The fact's sentence (as taught) with neighbours on both sides while they fit in :data:`PASSAGE_WORDS`."""
    chosen = {index: sentence}
    words = len(sentence.split())
    low, high = index - 1, index + 1
    while low >= 0 or high < len(sentences):
        grew = False
        for j in (high, low):
            if 0 <= j < len(sentences) and j not in chosen and words + len(sentences[j].split()) <= PASSAGE_WORDS:
                chosen[j] = sentences[j]
                words += len(sentences[j].split())
                grew = True
        low, high = low - 1, high + 1
        if not grew and words >= PASSAGE_WORDS // 2:
            break
    return " ".join(chosen[j] for j in sorted(chosen))


def _superseded(documents: Sequence[SourceDocument], kept: Sequence[Fact]) -> dict[Fact, list[Fact]]:
    """For each kept fact, the older facts it replaced (the conflicting passages to show next to it)."""
    older: dict[Fact, list[Fact]] = {}
    kept_set = set(kept)
    for fact in _all_facts(documents):
        if fact in kept_set:
            continue
        for newer in kept:
            if newer.order > fact.order and newer.same_thing(fact) and newer.value != fact.value:
                older.setdefault(newer, []).append(fact)
                break
    return older


# -- questions ------------------------------------------------------------------------------------


def _kind(lemma: str, value: str) -> str:
    """What a value is: time, date, duration, amount, count, person, place, or thing."""
    words = value.split()
    head = words[0].lower() if words else ""
    if (lemma in _MONEY_VERBS and _NUMBER_RE.search(value)) or re.search(
            r"[$€£¥]|\b(?:dollars?|euros?|pounds?|cents?|florins?|crowns?|francs?)\b", value, re.I):
        return "amount"
    if _DURATION_RE.search(value) and lemma in {"take", "last", "be", "run", "keep"}:
        return "duration"
    if _TIME_RE.search(value):
        return "time"
    if _DAY_RE.search(value) or (_DATE_RE.search(value) and head in _DATE_HEADS):
        return "date"
    if _NUMBER_RE.match(value):
        return "count"
    if head in {"in", "at", "near", "on", "from", "to", "behind", "inside", "outside"} and any(
            w[:1].isupper() for w in words[1:]):
        return "place"
    names = [w for w in words[:3] if w[:1].isupper()]
    if len(names) >= 2 and lemma in {"be", "lead", "manage", "own", "run", "win", "coach"} and not any(
            c.isdigit() for c in " ".join(words[:3])):
        return "person"
    return "thing"


def _question_words(kind: str, value: str) -> list[str]:
    if kind == "date":
        return ["When", *(["On what day"] if _DAY_RE.search(value) else []),
                *(["In what year"] if re.search(r"\b(?:1[5-9]\d\d|20\d\d)\b", value) else [])]
    return {"time": ["When", "What time"], "duration": ["How long"], "amount": ["How much"], "place": ["Where"],
            "person": ["Who"], "count": ["How many", "What"]}.get(kind, ["What"])


def questions_for(fact: Fact, *, rng: random.Random) -> list[str]:
    """Distinct wordings of a question the fact answers, the likeliest first (then in a seeded order)."""
    subject = _lower_first(fact.subject)
    aux, verb = _auxiliary(fact)
    words = fact.value.split()
    state = words[0].strip(",.;:") if fact.relation[1] and words else ""
    participle = bool(state) and (state.lower() in _STATES or state.lower().endswith("ed"))
    tail = f" {state}" if participle else ""
    after = " ".join(words[1:]) if participle else fact.value  # what the question asks for
    kind = _kind(fact.lemma, after)
    if participle and after.lower().startswith("by ") and _kind("be", after[3:]) in {"person", "thing"}:
        kind = "agent"
    candidates: list[str] = []
    if fact.lemma == "be" and fact.tense != "modal":
        measure = _MEASURE_RE.match(fact.value)
        if measure:
            candidates.append(f"How {measure.group(1)} {fact.verb} {subject}?")
        elif kind == "agent":
            candidates += [f"Who {fact.verb} {subject}{tail} by?", f"By whom {fact.verb} {subject}{tail}?"]
        elif state.lower() in _NAMING:
            candidates += [f"What {fact.verb} {subject}{tail}?", f"What name {fact.verb} {subject}{tail}?"]
        elif participle:
            candidates += [f"{w} {fact.verb} {subject}{tail}?" for w in _question_words(kind, after)]
        elif subject.split()[-1].lower() in {"name", "title", "password", "code", "number", "address"}:
            candidates.append(f"What {fact.verb} {subject}?")
        else:
            candidates += [f"{w} {fact.verb} {subject}?" for w in _question_words(kind, after)
                           if w in {"Who", "What", "How much", "Where", "When"}]
    elif fact.lemma == "have" and fact.tense != "modal":
        count = re.match(r"(\d[\d,.]*)\s+([a-z][a-z-]*)", fact.value)
        if count:
            candidates.append(f"How many {count.group(2)} {aux} {subject} have?")
        candidates.append(f"What {aux} {subject} have?")
    else:
        count = re.match(r"(\d[\d,.]*)\s+([a-z][a-z-]*)", fact.value)
        if count and kind == "count":
            candidates.append(f"How many {count.group(2)} {aux} {subject} {verb}?")
        if kind == "agent":
            candidates.append(f"Who {aux} {subject} {verb}{tail} by?")
        if fact.relation[1] in _PREPOSITIONS and kind in {"thing", "count"}:
            candidates.append(f"What {aux} {subject} {verb} {fact.relation[1]}?")
        candidates += [f"{w} {aux} {subject} {verb}{tail}?" for w in _question_words(kind, after) if w != "How many"]
    others = [f"{_upper_first(subject)} {fact.verb}{tail} what?",
              f"Do you know what {subject} {fact.verb}?" if not participle else f"Tell me when or how {subject} "
              f"{fact.verb}{tail}.",
              f"What do you know about {subject}?" if not candidates else f"Tell me: {subject} {fact.verb}{tail} ...?"]
    seen: dict[str, None] = {}
    for q in [*candidates, *_shuffled(others, rng)]:
        q = " ".join(q.split())
        if q.lower() not in {s.lower() for s in seen}:
            seen[q] = None
    wordings = list(seen)
    return wordings[:1] + _shuffled(wordings[1:], rng)


def _auxiliary(fact: Fact) -> tuple[str, str]:
    """The auxiliary a question inverts and the verb's form after it: ``does``/``leave``, ``did``/``build``."""
    if fact.tense == "modal":
        modal, _, verb = fact.verb.partition(" ")
        return modal, verb
    plural = fact.verb.lower() in {"are", "were", "have"} or (
        fact.tense == "present" and not fact.verb.lower().endswith("s"))
    aux = "did" if fact.tense == "past" else ("do" if plural else "does")
    return aux, fact.lemma


def _shuffled(items: list[str], rng: random.Random) -> list[str]:
    items = list(items)
    rng.shuffle(items)
    return items


def _lower_first(text: str) -> str:
    first, _, rest = text.partition(" ")
    if first.lower() in _CONTENT_SKIP:
        first = first.lower()
    return f"{first} {rest}".strip()


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


# -- with retrieval's context ---------------------------------------------------------------------


def _grounded(fact: Fact, questions: Sequence[str], *, facts: Sequence[Fact], older: Sequence[Fact],
              rng: random.Random, tokens: TokenCounter) -> list[Example]:
    """Examples with the context the gateway would give: the newer of two conflicting passages wins; the fact's
    passage among unrelated ones; a later (made-up) change of the value wins over the taught value."""
    others = [f for f in facts if f.document.id != fact.document.id and f.passage != fact.passage]
    scenes: list[tuple[list[Passage], Passage | None, str]] = []
    own = _as_passage(fact.passage, fact.document, fact.document.timestamp)
    if older:
        stale = older[-1]
        scenes.append(([own, _as_passage(stale.passage, stale.document, stale.document.timestamp)], own,
                       fact.sentence))
    if others:
        scenes.append(([own, *(_as_passage(o.passage, o.document, o.document.timestamp)
                               for o in rng.sample(others, min(1, len(others))))], own, fact.sentence))
    changed = _changed(fact, rng=rng)
    if changed is not None:
        sentence, passage_text = changed
        later = _as_passage(passage_text, fact.document, fact.document.timestamp + rng.randint(30, 200) * 86400)
        scenes.append(([own, later], later, sentence))
    examples: list[Example] = []
    for (passages, cited, answer), question in zip(scenes, _cycle(questions, rng), strict=False):
        rng.shuffle(passages)
        context = build_context(passages, budget_tokens=CONTEXT_BUDGET_TOKENS, tokens=tokens)
        if cited is None or cited not in context.passages:
            continue
        number = context.passages.index(cited) + 1
        examples.append([{"role": "system", "content": context.text}, {"role": "user", "content": question},
                         {"role": "assistant", "content": f"{answer} [{number}]"}])
    return examples


def _cycle(questions: Sequence[str], rng: random.Random) -> list[str]:
    """Enough wordings for the scenes, each from the fact's wordings (so a context's question varies too)."""
    pool = list(questions)
    return [pool[(i + rng.randrange(len(pool))) % len(pool)] for i in range(3)] if pool else []


def _changed(fact: Fact, *, rng: random.Random) -> tuple[str, str] | None:
    """A later version of the fact with another value (a number moved), as a sentence and a passage; None when
    the value has no number to move (names are not made up)."""
    match = _NUMBER_RE.search(fact.value)
    if match is None:
        return None
    old = match.group(0)
    digits = old.replace(",", "")
    try:
        number = float(digits) if "." in digits else int(digits)
    except ValueError:
        return None
    step = rng.choice((1, 2, 3, 5))
    new = number + step if isinstance(number, int) and number < 12 else round(number * (1 + step / 10))
    text = str(int(new)) if float(new).is_integer() else str(new)
    value = fact.value[:match.start()] + text + fact.value[match.end():]
    sentence = f"{_upper_first(fact.subject)} now {fact.verb} {value}"
    sentence = sentence if sentence.endswith((".", "!")) else sentence + "."
    return sentence, sentence


def _as_passage(text: str, document: SourceDocument, timestamp: float) -> Passage:
    return Passage(document_id=document.id, chunk_id=f"{document.id}:0", title=document.title, text=text, score=1.0,
                   timestamp=timestamp)

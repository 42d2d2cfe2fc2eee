"""Labelled retrieval data built by the tests (deterministic, no downloads).

- :func:`labelled_set`: 205 documents about 45 invented projects and products, several per entity
  (lead, deadline, budget, purpose, office; price, support hours, refunds, requirements), so every
  query has same-entity and same-aspect distractors, plus 60 queries worded differently from the
  documents (25 of them do not even name the entity). Each query has exactly one relevant document.
- :func:`conflicting_set`: 40 subjects, each with an older and a newer document (different titles,
  different claims, worded differently), among the other subjects' documents as distractors; the
  gap between them ranges from one day to about two and a half years.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PURPOSES = [
    ("a compiler that turns Python notebooks into GPU kernels",
     "Which team converts data science notebooks into code for graphics cards?"),
    ("a cold-chain tracker that monitors vaccine temperatures in delivery trucks",
     "Which project keeps an eye on how warm medicine gets while it is shipped?"),
    ("an app that helps farmers predict crop disease from photos of leaves",
     "Which initiative diagnoses plant illnesses from pictures taken by growers?"),
    ("a payroll engine that pays contractors in twelve currencies",
     "Which effort handles paying freelancers abroad in foreign money?"),
    ("a search tool for court rulings and legal precedents",
     "Which project lets lawyers look up past judgments?"),
    ("firmware for the solar inverters on rooftop panels",
     "Which team writes embedded software that converts sunlight power on house roofs?"),
    ("a chatbot that books appointments at dental clinics",
     "Which initiative schedules visits to the dentist through a conversational assistant?"),
    ("a recommendation engine for second-hand bicycles",
     "Which project suggests used bikes to shoppers?"),
    ("a flood warning system built on river level sensors",
     "Which effort alerts towns when streams are about to overflow?"),
    ("a translation service for hospital discharge letters",
     "Which team puts patients' release paperwork into other languages?"),
    ("a fraud detector for credit card payments at gas stations",
     "Which project spots stolen cards being used to buy fuel?"),
    ("a planning tool for school bus routes",
     "Which initiative works out the paths buses take to pick up pupils?"),
    ("a marketplace where bakeries sell unsold bread at a discount",
     "Which project lets bakers get rid of leftover loaves cheaply?"),
    ("a sleep tracker that pairs with smart mattresses",
     "Which team measures how well people rest using connected beds?"),
    ("a drone inspection service for wind turbine blades",
     "Which effort uses flying robots to check windmill rotors for damage?"),
    ("a library that compresses satellite images",
     "Which project shrinks pictures taken from orbit?"),
    ("an energy dashboard for office buildings",
     "Which initiative shows how much electricity workplaces consume?"),
    ("a ticketing system for museum exhibitions",
     "Which team sells entry passes for gallery shows?"),
    ("a language-learning game for children",
     "Which project teaches kids foreign words through play?"),
    ("a parking app that finds free spaces in city garages",
     "Which effort helps drivers locate an empty spot to leave their car downtown?"),
    ("a meal planner that builds weekly grocery lists",
     "Which project turns a week of menus into a shopping list?"),
    ("an inventory system for hospital pharmacies",
     "Which team keeps track of drug stock in clinic dispensaries?"),
    ("a carbon accounting tool for shipping companies",
     "Which initiative measures the emissions of freight carriers?"),
    ("a royalty tracker for independent musicians",
     "Which project follows the payments owed to self-published artists?"),
    ("a wildfire smoke forecast for air quality alerts",
     "Which effort predicts haze from forest fires to warn people about breathing conditions?"),
]

_FIRST = ["Maria", "Tom", "Aisha", "Kenji", "Lucia", "Omar", "Ingrid", "Pavel", "Chloe", "Diego", "Farah", "Jonas",
          "Mei", "Rafael", "Sofia", "Tariq", "Yara", "Noah", "Elena", "Kwame"]
_LAST = ["Okafor", "Becker", "Lindqvist", "Moreau", "Tanaka", "Haddad", "Novak", "Silva", "Brennan", "Kowalski",
         "Nakamura", "Osei", "Petrov", "Quinn", "Rossi", "Varga", "Weber", "Yilmaz", "Zhou", "Abara"]
_CITIES = ["Lisbon", "Oslo", "Nairobi", "Montreal", "Osaka", "Valencia", "Krakow", "Santiago", "Tallinn", "Dublin",
           "Porto", "Hanoi", "Accra", "Zagreb", "Leeds"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_OS = ["Windows 11", "macOS 14", "Ubuntu 22.04", "Debian 12", "Fedora 40"]
_ORDINAL = ["second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth"]
_FILLER = ["The details were confirmed at the last quarterly review.",
           "Questions about this can go to the operations mailbox.",
           "This note is part of the internal handbook.",
           "The information applies to all regions unless stated otherwise.",
           "Managers were briefed on this during the planning week."]


@dataclass(frozen=True)
class Doc:
    key: str
    title: str
    text: str
    timestamp: str


@dataclass(frozen=True)
class Query:
    text: str
    relevant: str  # Doc.key


def invented_names(count: int, rng: random.Random) -> list[str]:
    onsets = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "t", "tr", "v",
              "z", "th", "sh"]
    vowels = ["a", "e", "i", "o", "u", "ae", "ou", "ia"]
    codas = ["n", "r", "th", "x", "l", "nd", "rk", "s", "v", "m"]
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(2)) + rng.choice(codas)
        name = name.capitalize()
        if name not in names:
            names.append(name)
    return names


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _filler(rng: random.Random) -> str:
    return rng.choice(_FILLER)


def labelled_set(seed: int = 7) -> tuple[list[Doc], list[Query]]:
    rng = random.Random(seed)
    names = invented_names(45, rng)
    projects, products = names[:25], names[25:]
    docs: list[Doc] = []
    queries: list[Query] = []

    def add(key: str, title: str, text: str) -> None:
        day = f"{rng.randint(2021, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        docs.append(Doc(key, title, f"{text} {_filler(rng)}", f"{day}T10:00:00Z"))

    for i, p in enumerate(projects):
        purpose, purpose_query = PURPOSES[i]
        add(f"{p}/lead", f"{p} team", f"Project {p} is led by {_person(rng)}, who took over the team in "
                                      f"{rng.randint(2015, 2023)}.")
        add(f"{p}/deadline", f"{p} schedule", f"The {p} project must deliver its first release by "
                                              f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}, {rng.randint(2025, 2027)}.")
        add(f"{p}/budget", f"{p} funding", f"{p} has an annual budget of {rng.randint(2, 90)} million euros, approved "
                                           "by the finance committee.")
        add(f"{p}/purpose", f"About {p}", f"{p} builds {purpose}.")
        add(f"{p}/office", f"{p} location", f"The {p} group works from the {rng.choice(_CITIES)} office on the "
                                            f"{rng.choice(_ORDINAL)} floor.")
        queries.append(Query(purpose_query, f"{p}/purpose"))
    for x in products:
        add(f"{x}/price", f"{x} pricing", f"The {x} subscription costs {rng.randint(5, 95)} dollars per month for "
                                          "teams.")
        add(f"{x}/support", f"{x} help desk", f"{x} customer support answers tickets from {rng.randint(6, 10)} am to "
                                              f"{rng.randint(4, 9)} pm on weekdays.")
        add(f"{x}/refund", f"{x} returns", f"Customers can return {x} within {rng.choice([14, 30, 45, 60])} days "
                                           "for a full refund.")
        add(f"{x}/requirements", f"{x} system requirements", f"{x} runs on {rng.choice(_OS)} and needs at least "
                                                             f"{rng.choice([4, 8, 16, 32])} GB of memory.")
    add("memo/holidays", "Holiday calendar", "The company observes eleven public holidays a year; the calendar is "
                                             "published every December.")
    add("memo/expenses", "Expense policy", "Receipts for travel expenses must be submitted within thirty days of "
                                           "the trip.")
    add("memo/security", "Badge policy", "Visitors must wear a badge and be escorted by an employee at all times.")
    add("memo/parking", "Parking rules", "Staff parking permits are renewed every January at the front desk.")
    add("memo/coffee", "Kitchen", "The kitchen on each floor is cleaned every evening; please label food in the "
                                  "fridge.")

    named = [
        ("Who is in charge of the {} project?", "lead", projects),
        ("When is {} due to ship its initial version?", "deadline", projects),
        ("How much money does {} receive each year?", "budget", projects),
        ("Where does the {} crew sit?", "office", projects),
        ("What is the monthly fee for {}?", "price", products),
        ("During which hours can I reach the {} helpdesk?", "support", products),
        ("How long do I have to send {} back and get my money back?", "refund", products),
        ("What operating system and how much RAM does {} require?", "requirements", products),
    ]
    for template, aspect, pool in named:
        for name in rng.sample(pool, 5 if aspect in ("lead", "deadline", "budget", "office") else 4):
            queries.append(Query(template.format(name), f"{name}/{aspect}"))
    return docs, queries


SUBJECT_TEMPLATES = [
    ("Where is the {e} office?",
     ("{e} office", "The {e} office is located in {a}, next to the central station."),
     ("{e} relocation", "The {e} office has moved to {b}; the old premises in {a} are closed.")),
    ("Who leads the {e} team?",
     ("{e} team", "The {e} team is headed by {pa}."),
     ("{e} leadership change", "The {e} team is now led by {pb}, who replaced {pa} after a reorganisation.")),
    ("How much does the {e} plan cost per month?",
     ("{e} pricing", "The {e} plan is billed at {ma} dollars a month."),
     ("{e} price update", "From this year on, the {e} plan costs {mb} dollars per month.")),
    ("When can I contact {e} support?",
     ("{e} support", "Support for {e} is available on weekdays from 9 am to 5 pm."),
     ("{e} support hours", "{e} support can now be contacted around the clock, seven days a week.")),
    ("When is the {e} release due?",
     ("{e} release", "The {e} release is scheduled for {da}."),
     ("{e} release delay", "The {e} release was postponed and is now due in {db}.")),
]


@dataclass(frozen=True)
class Conflict:
    query: str
    older: Doc
    newer: Doc


def conflicting_set(seed: int = 11) -> tuple[list[Doc], list[Conflict]]:
    """40 subjects (5 kinds x 8 entities); documents come back shuffled, newer and older mixed."""
    rng = random.Random(seed)
    names = invented_names(40, rng)
    docs: list[Doc] = []
    conflicts: list[Conflict] = []
    for i, name in enumerate(names):
        query, (old_title, old_text), (new_title, new_text) = SUBJECT_TEMPLATES[i % len(SUBJECT_TEMPLATES)]
        cities = rng.sample(_CITIES, 2)
        values = {"e": name, "a": cities[0], "b": cities[1], "pa": _person(rng), "pb": _person(rng),
                  "ma": rng.randint(10, 40), "mb": rng.randint(41, 90),
                  "da": f"{rng.choice(_MONTHS)} 2025", "db": f"{rng.choice(_MONTHS)} 2026"}
        old_year = rng.randint(2020, 2023)
        old_day = f"{old_year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        gap_days = rng.choice([1, 7, 30, 120, 400, 900])
        new_day = _add_days(old_day, gap_days)
        older = Doc(f"{name}/old", old_title.format(**values), old_text.format(**values), f"{old_day}T08:00:00Z")
        newer = Doc(f"{name}/new", new_title.format(**values), new_text.format(**values), f"{new_day}T08:00:00Z")
        docs.extend([older, newer])
        conflicts.append(Conflict(query.format(**values), older, newer))
    rng.shuffle(docs)
    return docs, conflicts


def _add_days(day: str, days: int) -> str:
    from datetime import date, timedelta

    return (date.fromisoformat(day) + timedelta(days=days)).isoformat()

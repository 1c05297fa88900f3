"""Generate the embedded synthetic pretraining corpus and a SQuAD v1.1 task about it.

Why synthetic: the project must demonstrate "pretraining helps SQuAD" offline, in
minutes, on a CPU. Real Wikipedia is neither embedded nor small. So we invent a world:
a seeded knowledge base (people, cities, countries, rivers, mountains, companies,
institutions, with attributes and relations) is rendered into encyclopedia-style
documents, and separately into SQuAD paragraphs with questions.

What makes pretraining matter:
- every fact is stated in several documents (the subject's own, and those of related
  entities) with different phrasings, so masked-LM training can memorise the world and
  learn that the phrasings mean the same thing;
- questions use wording that SQuAD contexts never use for that relation (but that the
  corpus does use, in its corpus-only phrasings), so lexical overlap alone does not
  find the answer sentence;
- each context holds distractor facts of the same type (a sibling's birth year, a rival
  company's founder), so the answer type alone does not find the span either.

Output (see DESIGN.md "Contracts"):
    DIR/corpus/part-00000.txt ...   one document per blank-line-separated block
    DIR/squad/train.json, dev.json  SQuAD v1.1; train and dev subjects are disjoint

Only the standard library and numpy are used, so this runs before anything else is
installed. Same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import string
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

DEFAULT_NUM_DOCS = 3000  # ~3 MB of text
DEFAULT_SQUAD_TRAIN = 4000
DEFAULT_SQUAD_DEV = 1000
DEFAULT_MAX_PART_MB = 50.0
DOCS_PER_ENTITY = 2  # each entity gets ~2 own documents, plus mentions elsewhere
MIN_ENTITIES = 300  # tiny corpora still get a world big enough for SQuAD distractors

# --------------------------------------------------------------------------------------
# Vocabulary of the world. Fixed (seed-independent), so one tokenizer fits every seed.
# --------------------------------------------------------------------------------------

_ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "st", "th", "tr", "sh"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "k"]
NUM_SYLLABLES = 320


def _syllable_inventory() -> list[str]:
    """A few hundred distinct syllables: enough for millions of names, few enough
    that a 4-8k WordPiece vocabulary covers every name with short pieces."""
    combos = sorted({o + n + c for o in _ONSETS for n in _NUCLEI for c in _CODAS})
    rng = random.Random(20240607)  # fixed: the inventory must not depend on --seed
    return sorted(rng.sample(combos, NUM_SYLLABLES))


SYLLABLES = _syllable_inventory()
_OPEN_SYLLABLES = [s for s in SYLLABLES if s[-1] in "aeiou"]

FEMALE_ENDINGS = ["a", "ia", "ene", "ina", "ya"]
MALE_ENDINGS = ["o", "an", "ric", "en", "us"]
COUNTRY_ENDINGS = ["ia", "and", "ora", "esh", "mark"]
CITY_ENDINGS = ["", "", "", "", "", "", "holm", "burg", "ford", "port", "stad", "wick"]

OCCUPATIONS = ["painter", "chemist", "engineer", "poet", "architect", "composer",
               "physician", "astronomer", "novelist", "sculptor", "botanist",
               "mathematician", "historian", "merchant", "inventor", "explorer",
               "philosopher", "surgeon", "economist", "geologist", "violinist",
               "journalist", "lawyer", "photographer"]

# industry -> the noun a company of that industry is named with
INDUSTRIES = {"shipbuilding": "Shipyards", "textiles": "Mills", "printing": "Press",
              "brewing": "Brewery", "mining": "Mining Company", "banking": "Bank",
              "glassmaking": "Glassworks", "railways": "Railway",
              "publishing": "Publishers", "clockmaking": "Clockworks",
              "insurance": "Assurance", "shipping": "Line", "chemicals": "Chemicals",
              "pottery": "Potteries", "steel": "Steelworks"}
INDUSTRY_NAMES = list(INDUSTRIES)

# --------------------------------------------------------------------------------------
# Phrasings. Per relation: (shared, corpus_only). SQuAD contexts use only `shared`;
# the corpus uses both. Question templates reuse the corpus-only wording, never the
# shared wording, so a reader must know the phrasings are equivalent - which is exactly
# what pretraining on the corpus can teach.
# --------------------------------------------------------------------------------------

TEMPLATES: dict[str, tuple[list[str], list[str]]] = {
    "birth": (
        ["{s} was born in {city} in {year}.",
         "Born in {city} in {year}, {s} spent {pos} early years there.",
         "{s} was born in {year}; {pos} birthplace was {city}."],
        ["{s} came into the world in {city} in {year}.",
         "A native of {city}, {s} first saw the light of day in {year}.",
         "{s}, a native of {city}, came into the world in {year}."]),
    "death": (
        ["{s} died in {year} at the age of {age}.",
         "{s} died in {year}.",
         "The death of {s} came in {year}, at the age of {age}."],
        ["{s} passed away in {year}.",
         "{s} breathed {pos} last in {year}, aged {age}."]),
    "occupation": (
        ["{s} worked as {art} {occ}.",
         "{s} made a name as {art} {occ}.",
         "{s} was active as {art} {occ}."],
        ["{s} earned a living as {art} {occ}.",
         "The trade of {s} was that of {art} {occ}."]),
    "studied": (
        ["{s} studied at {inst}.",
         "{s} was a student at {inst}.",
         "{s} attended {inst}."],
        ["{s} was educated at {inst}.",
         "{s} received {pos} schooling at {inst}."]),
    "married": (
        ["{s} married {o} in {year}.",
         "In {year}, {s} and {o} were married.",
         "{s} and {o} married in {year}."],
        ["{s} wed {o} in {year}.",
         "{o} became the {orole} of {s} in {year}."]),
    "sibling": (
        ["{s} had a {rel}, {o}.",
         "{o} was a {rel} of {s}.",
         "{s} grew up with {pos} {rel} {o}."],
        ["{s} and {o} were siblings."]),
    "friend": (
        ["{s} was a close friend of {o}.",
         "{s} and {o} were lifelong friends.",
         "{s} counted {o} among {pos} friends."],
        []),
    "founded": (
        ["{c} was founded by {f} in {year}.",
         "In {year}, {f} founded {c}.",
         "{f} founded {c} in {year}."],
        ["{c} was established by {f} in {year}.",
         "{f} set up {c} in {year}.",
         "{c} was started in {year} by {f}."]),
    "hq": (
        ["{c} is based in {city}.",
         "The headquarters of {c} are in {city}.",
         "{c} has its headquarters in {city}."],
        ["{c} has its head office in {city}.",
         "{c} is run from offices in {city}."]),
    "industry": (
        ["{c} is a {ind} company.",
         "{c} works in {ind}.",
         "{c} operates in the {ind} sector."],
        ["The line of business of {c} is {ind}.",
         "The business of {c} is {ind}."]),
    "employees": (
        ["{c} employs {n} people.",
         "{c} has a workforce of {n}.",
         "{c} has {n} employees."],
        ["{c} gives work to {n} people.",
         "The staff of {c} numbers {n}."]),
    "city_country": (
        ["{c} is a city in {k}.",
         "{c} lies in {k}.",
         "{c} is a town in {k}."],
        ["{c} is situated in {k}.",
         "{c} belongs to {k}."]),
    "population": (
        ["{c} has a population of {n}.",
         "The population of {c} is {n}.",
         "{c} is home to {n} people."],
        ["{c} has {n} inhabitants.",
         "Some {n} residents live in {c}."]),
    "city_founded": (
        ["{c} was founded in {year}.",
         "The city of {c} dates from {year}.",
         "{c} was first settled in {year}."],
        ["{c} came into being in {year}.",
         "{c} has existed since {year}."]),
    "city_river": (
        ["{c} lies on the {r}.",
         "The {r} flows through {c}.",
         "{c} stands on the banks of the {r}."],
        ["{c} sits beside the {r}.",
         "The {r} passes {c}."]),
    "capital": (
        ["{city} is the capital of {k}.",
         "The capital of {k} is {city}.",
         "{k} has its capital at {city}."],
        ["{k} is governed from {city}.",
         "The seat of government of {k} is {city}."]),
    "river_length": (
        ["The {r} is {n} kilometres long.",
         "The {r} runs for {n} kilometres.",
         "The {r} has a length of {n} kilometres."],
        ["The {r} stretches {n} kilometres.",
         "The {r} covers {n} kilometres from source to mouth."]),
    "river_country": (
        ["The {r} flows through {k}.",
         "The {r} is a river in {k}.",
         "The {r} crosses {k}."],
        []),
    "mountain_height": (
        ["{m} rises to {n} metres.",
         "{m} is {n} metres high.",
         "The summit of {m} stands at {n} metres."],
        ["{m} reaches an elevation of {n} metres.",
         "{m} towers {n} metres above the sea."]),
    "mountain_country": (
        ["{m} is a mountain in {k}.",
         "{m} stands in {k}.",
         "{m} is one of the peaks of {k}."],
        []),
    "inst_city": (
        ["{i} is located in {city}.",
         "{i} is in {city}.",
         "{i} has its campus in {city}."],
        ["{i} is found in the city of {city}."]),
    "inst_founded": (
        ["{i} was founded in {year}.",
         "{i} opened in {year}.",
         "{i} dates from {year}."],
        ["{i} first opened its doors in {year}.",
         "{i} has admitted students since {year}."]),
    # Same-type facts about the same subject ("settled in C" next to "born in C"):
    # they are never asked about, but make a reader tell relations apart, which
    # only works if it knows which phrasings mean which relation.
    "settled": (
        ["{s} settled in {city} in {year}.",
         "In {year}, {s} moved to {city}.",
         "{s} moved to {city} in {year}."],
        ["{s} made {pos} home in {city} from {year}."]),
    "parent": (
        ["{s} was the {child} of {part} {pocc}.",
         "The father of {s} was {part} {pocc}.",
         "{s} grew up as the {child} of {part} {pocc}."],
        ["{s}'s father made his living as {part} {pocc}."]),
    "taught": (
        ["{s} later taught at {inst}.",
         "{s} held a teaching post at {inst}.",
         "{s} lectured at {inst}."],
        ["{s} gave lectures at {inst}."]),
    "director": (
        ["{c} was led by {o} from {year}.",
         "From {year}, {o} directed {c}.",
         "{o} took charge of {c} in {year}."],
        ["{o} became head of {c} in {year}."]),
    "branch": (
        ["{c} also has a branch in {city}.",
         "{c} opened a branch in {city}.",
         "{c} keeps a branch in {city}."],
        ["{c} maintains a branch in the city of {city}."]),
    "funds": (
        ["{c} was financed with {n} crowns.",
         "The initial funds of {c} came to {n} crowns.",
         "{c} raised {n} crowns at the outset."],
        ["{c} began with a purse of {n} crowns."]),
    "sideline": (
        ["{c} also deals in {ind}.",
         "A smaller part of {c} deals in {ind}.",
         "{c} has interests in {ind} as well."],
        ["{c} has a sideline in {ind}."]),
    "border": (
        ["{c} lies near the border with {k}.",
         "{c} is close to the frontier of {k}.",
         "From {c}, the border with {k} is not far."],
        ["{c} sits a short way from {k}."]),
    "near_river": (
        ["{c} is a day's journey from the {r}.",
         "The {r} is not far from {c}.",
         "{c} is within reach of the {r}."],
        ["{c} is a short trip from the {r}."]),
    "area": (
        ["{c} covers {n} square kilometres.",
         "The area of {c} is {n} square kilometres.",
         "{c} spreads over {n} square kilometres."],
        ["{c} takes up {n} square kilometres of land."]),
    "charter": (
        ["{c} received its town charter in {year}.",
         "{c} was granted a charter in {year}.",
         "The charter of {c} was signed in {year}."],
        ["{c} became a chartered town in {year}."]),
}

CORPUS_TEMPLATES = {rel: shared + only for rel, (shared, only) in TEMPLATES.items()}
CONTEXT_TEMPLATES = {rel: shared for rel, (shared, _only) in TEMPLATES.items()}


@dataclass(frozen=True)
class QuestionType:
    """One kind of SQuAD question: which relation's sentence answers it, which field
    of that sentence is the answer, and the question wordings."""

    name: str
    kind: str  # entity kind of the question's subject
    relation: str
    answer_field: str
    templates: tuple[str, ...]


QUESTION_TYPES: tuple[QuestionType, ...] = (
    QuestionType("birth_year", "person", "birth", "year",
                 ("In what year did {s} come into the world?",
                  "{s} first saw the light of day in which year?",
                  "What year did {s} come into the world?")),
    QuestionType("birth_city", "person", "birth", "city",
                 ("Which city is {s} a native of?",
                  "In which city did {s} first see the light of day?",
                  "{s} is a native of which city?")),
    QuestionType("death_year", "person", "death", "year",
                 ("In what year did {s} pass away?",
                  "When did {s} breathe {pos} last?",
                  "{s} passed away in which year?")),
    QuestionType("occupation", "person", "occupation", "occ",
                 ("What did {s} do for a living?",
                  "What was the trade of {s}?",
                  "How did {s} earn a living?")),
    QuestionType("studied", "person", "studied", "inst",
                 ("Where was {s} educated?",
                  "At which school did {s} receive {pos} schooling?",
                  "Which institution educated {s}?")),
    QuestionType("spouse", "person", "married", "o",
                 ("Whom did {s} wed?",
                  "To whom was {s} wed?",
                  "Who was the {orole} of {s}?")),
    QuestionType("founder", "company", "founded", "f",
                 ("Who established {c}?",
                  "Who set up {c}?",
                  "Who started {c}?")),
    QuestionType("company_year", "company", "founded", "year",
                 ("In what year was {c} established?",
                  "When was {c} set up?",
                  "{c} was started in which year?")),
    QuestionType("hq", "company", "hq", "city",
                 ("In which city does {c} have its head office?",
                  "From which city is {c} run?",
                  "Where is the head office of {c}?")),
    QuestionType("industry", "company", "industry", "ind",
                 ("What line of business is {c} in?",
                  "What is the business of {c}?",
                  "{c} is in which line of business?")),
    QuestionType("employees", "company", "employees", "n",
                 ("How many workers does {c} give work to?",
                  "How large is the staff of {c}?",
                  "How many members of staff does {c} have?")),
    QuestionType("city_country", "city", "city_country", "k",
                 ("In which country is {c} situated?",
                  "To which country does {c} belong?",
                  "{c} belongs to which country?")),
    QuestionType("population", "city", "population", "n",
                 ("How many inhabitants does {c} have?",
                  "How many residents does {c} have?",
                  "What is the number of inhabitants of {c}?")),
    QuestionType("city_founded", "city", "city_founded", "year",
                 ("Since what year has {c} existed?",
                  "When did {c} come into being?",
                  "In what year did {c} come into being?")),
    QuestionType("river", "city", "city_river", "r",
                 ("Which river passes {c}?",
                  "Beside which river does {c} sit?",
                  "What river does {c} sit beside?")),
)
SQUAD_KINDS = ("person", "company", "city")

# --------------------------------------------------------------------------------------
# Knowledge base
# --------------------------------------------------------------------------------------


@dataclass
class Entity:
    """One thing in the world. `attrs` holds attributes (ints, strings) and relations
    (entity ids, or lists of them); which keys exist depends on `kind`."""

    eid: int
    kind: str
    name: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class KnowledgeBase:
    """The single source of truth every document and every SQuAD paragraph is
    rendered from, which is what keeps facts consistent across the corpus."""

    entities: list[Entity]
    by_kind: dict[str, list[int]]
    # reverse relations, so documents about a city can list who was born there etc.
    natives: dict[int, list[int]]  # city -> persons born there
    alumni: dict[int, list[int]]  # institution -> persons
    companies_in: dict[int, list[int]]  # city -> companies headquartered there
    institutions_in: dict[int, list[int]]  # city -> institutions
    cities_in: dict[int, list[int]]  # country -> cities
    rivers_in: dict[int, list[int]]  # country -> rivers
    mountains_in: dict[int, list[int]]  # country -> mountains
    cities_on: dict[int, list[int]]  # river -> cities
    companies_by_industry: dict[str, list[int]]

    def __getitem__(self, eid: int) -> Entity:
        return self.entities[eid]


def _kind_counts(num_entities: int) -> dict[str, int]:
    """How many entities of each kind; people are about half the world."""
    counts = {
        "country": max(3, num_entities // 50),
        "river": max(3, num_entities // 25),
        "mountain": max(3, num_entities // 25),
        "city": max(8, num_entities * 15 // 100),
        "institution": max(4, num_entities * 6 // 100),
        "company": max(6, num_entities * 12 // 100),
    }
    counts["person"] = max(20, num_entities - sum(counts.values()))
    return counts


_COMMON_WORDS = """a an and are as at be but by do for from go had has he her him his
how in is it its me my no not of on or our out she so than that the them then there
these they this thus those to too up us was we were what when where which who why with
you man men son sun bus gas van ten pen den tin pin bin fan tan ban ran run sir fur
nor lid rim ram ham bun gun hen hut mud nut pan pot rag rat red rod rot rub rug sad
sat set sit sob sum tag tub vet wet zoo bar car cat dog fog log hot lot rose
dove moth bath path both mile mole hole pole role sole home dome tome more bore core
tore sore lore rare dare fare hare mare care bare base case vase mine line fine
pine nine tine dine vine wine shine time lime dime mime rime sure pure lure cure""".split()


def _template_words() -> set[str]:
    """Every word the templates and word lists use: a made-up name must not be one,
    or WordPiece would give a name and a function word the same token."""
    texts = [t for shared, only in TEMPLATES.values() for t in shared + only]
    texts += [t for qt in QUESTION_TYPES for t in qt.templates]
    texts += OCCUPATIONS + INDUSTRY_NAMES + list(INDUSTRIES.values())
    words = set(_COMMON_WORDS)
    for t in texts:
        for w in string.Formatter().parse(t):
            words.update(x.strip(string.punctuation).lower() for x in w[0].split())
    words.discard("")
    return words


_ENGLISH = _template_words()


def _looks_english(word: str) -> bool:
    """True if a made-up word is, or starts with, an English word we use (only
    prefixes of 4+ letters count: "Birthya" is out, "Tova" is fine)."""
    w = word.lower()
    return w in _ENGLISH or any(w[:k] in _ENGLISH for k in range(4, len(w)))


class _Namer:
    """Makes unique, pronounceable names from the fixed syllable inventory."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self, min_syl: int = 2, max_syl: int = 3, ending: str = "") -> str:
        """A capitalised made-up word (not necessarily unique) of `min_syl` syllables
        (3 times in 4: short names keep WordPiece sequences short) or `max_syl`, that
        does not read as English ("Thus", "Birthya")."""
        while True:
            n = min_syl if max_syl == min_syl or self.rng.random() < 0.75 else max_syl
            parts = [self.rng.choice(SYLLABLES) for _ in range(n - 1)]
            parts.append(self.rng.choice(_OPEN_SYLLABLES if ending else SYLLABLES))
            w = "".join(parts)
            if ending and ending[0] in "aeiouy":
                w = w.rstrip("aeiou")  # "Tho" + "a" -> "Tha", not "Thoa"
            w = (w + ending).capitalize()
            if not _looks_english(w):
                return w

    def unique(self, make) -> str:
        """Call `make()` until it returns a name nobody in the world has yet."""
        for _ in range(1000):
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name
        raise RuntimeError("name space exhausted; raise NUM_SYLLABLES")


def _log_uniform_int(rng: random.Random, lo: float, hi: float) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _round_population(n: int) -> int:
    """Round like an encyclopedia would: 41,300 rather than 41,317."""
    return n if n < 10_000 else int(round(n, -2))


class _WorldBuilder:
    """Builds a KnowledgeBase step by step; each step adds one kind of entity or one
    relation, in dependency order (countries before cities before people ...)."""

    def __init__(self, num_entities: int, seed: int) -> None:
        self.rng = random.Random(f"kb:{seed}")
        self.namer = _Namer(self.rng)
        self.counts = _kind_counts(num_entities)
        self.entities: list[Entity] = []
        self.by_kind: dict[str, list[int]] = {k: [] for k in self.counts}

    def add(self, kind: str, name: str, **attrs: Any) -> Entity:
        e = Entity(len(self.entities), kind, name, dict(attrs))
        self.entities.append(e)
        self.by_kind[kind].append(e.eid)
        return e

    def build(self) -> KnowledgeBase:
        self.add_geography()
        self.add_institutions()
        self.add_people()
        self.add_marriages()
        self.add_friendships()
        self.add_companies()
        self.add_directors()
        return self.index()

    def add_geography(self) -> None:
        rng, namer = self.rng, self.namer
        for _ in range(self.counts["country"]):
            self.add("country", namer.unique(
                lambda: namer.word(1, 2, rng.choice(COUNTRY_ENDINGS))))
        countries = self.by_kind["country"]
        for _ in range(self.counts["river"]):
            self.add("river", namer.unique(lambda: namer.word(2, 3) + " River"),
                     length_km=rng.randint(40, 2400), country=rng.choice(countries))
        for _ in range(self.counts["mountain"]):
            self.add("mountain", namer.unique(lambda: "Mount " + namer.word(2, 3)),
                     height_m=rng.randint(900, 6800), country=rng.choice(countries))
        rivers_of: dict[int, list[int]] = {}
        for r in self.by_kind["river"]:
            rivers_of.setdefault(self.entities[r].attrs["country"], []).append(r)
        for i in range(self.counts["city"]):
            # every country gets at least one city (its capital)
            country = countries[i] if i < len(countries) else rng.choice(countries)
            local_rivers = rivers_of.get(country, [])
            river = rng.choice(local_rivers) if local_rivers and rng.random() < 0.7 else None
            near = rng.choice(self.by_kind["river"])
            founded = rng.randint(820, 1690)
            abroad = [k for k in countries if k != country]
            self.add("city", namer.unique(self._city_name),
                country=country, river=river, founded_year=founded,
                charter_year=founded + rng.randint(15, 300),
                population=_round_population(_log_uniform_int(rng, 1500, 2_500_000)),
                area_km2=rng.randint(6, 1400),
                border=rng.choice(abroad) if abroad and rng.random() < 0.6 else None,
                near_river=None if near == river else near)
        for c, city in zip(countries, self.by_kind["city"]):
            self.entities[c].attrs["capital"] = city

    def _city_name(self) -> str:
        ending = self.rng.choice(CITY_ENDINGS).lower()
        return self.namer.word(2, 2 if ending else 3) + ending

    def add_institutions(self) -> None:
        rng, namer = self.rng, self.namer
        cities = self.by_kind["city"]
        for _ in range(self.counts["institution"]):
            city = rng.choice(cities)
            cname = self.entities[city].name
            patterns = [lambda: f"University of {cname}",
                        lambda: f"{namer.word(2, 3)} Academy",
                        lambda: f"{cname} Institute of Technology",
                        lambda: f"{namer.word(2, 3)} College",
                        lambda: f"Royal Conservatory of {cname}"]
            name = namer.unique(lambda: rng.choice(patterns)())
            self.add("institution", name, city=city, founded_year=rng.randint(1380, 1760))

    def add_people(self) -> None:
        """People come in families of 1-3 siblings who share a family name and were
        born within a few years of each other - natural same-type distractors."""
        rng, namer = self.rng, self.namer
        cities, insts = self.by_kind["city"], self.by_kind["institution"]
        remaining = self.counts["person"]
        while remaining > 0:
            size = min(remaining, rng.choices([1, 2, 3], weights=[4, 4, 2])[0])
            family = namer.word(2, 3)
            home = rng.choice(cities)
            father_occupation = rng.choice(OCCUPATIONS)
            years = rng.sample(range(-7, 8), size)
            base = rng.randint(1760, 1930)
            members = []
            for dy in years:
                gender = rng.choice("fm")
                endings = FEMALE_ENDINGS if gender == "f" else MALE_ENDINGS
                name = namer.unique(lambda: f"{namer.word(1, 2, rng.choice(endings))} {family}")
                birth = base + dy
                death = birth + rng.randint(38, 92)
                studied = rng.choice(insts)
                taught = rng.choice(insts) if rng.random() < 0.5 else None
                members.append(self.add(
                    "person", name, gender=gender, pos="her" if gender == "f" else "his",
                    birth_year=birth, death_year=death,
                    birthplace=home if rng.random() < 0.7 else rng.choice(cities),
                    occupation=rng.choice(OCCUPATIONS), studied_at=studied,
                    taught_at=None if taught == studied else taught,
                    father_occupation=father_occupation,
                    settled_city=rng.choice(cities),
                    settled_year=rng.randint(birth + 18, min(death - 1, birth + 50)),
                    siblings=[], friends=[], spouse=None, marriage_year=None,
                    founded=[], directed=[]))
            for m in members:
                m.attrs["siblings"] = [o.eid for o in members if o is not m]
            remaining -= size

    def _people_by_birth(self) -> list[Entity]:
        return sorted((self.entities[p] for p in self.by_kind["person"]),
                      key=lambda e: (e.attrs["birth_year"], e.eid))

    def add_marriages(self) -> None:
        """Pair people of similar age from different families; about 60% marry."""
        rng = self.rng
        women = [e for e in self._people_by_birth() if e.attrs["gender"] == "f"]
        men = [e for e in self._people_by_birth() if e.attrs["gender"] == "m"]
        for w, m in zip(women, men):
            if rng.random() > 0.6 or m.eid in w.attrs["siblings"]:
                continue
            lo = max(w.attrs["birth_year"], m.attrs["birth_year"]) + 18
            hi = min(w.attrs["death_year"], m.attrs["death_year"]) - 1
            if hi < lo:
                continue
            year = rng.randint(lo, min(hi, lo + 15))
            w.attrs.update(spouse=m.eid, marriage_year=year)
            m.attrs.update(spouse=w.eid, marriage_year=year)

    def add_friendships(self) -> None:
        """Each person befriends one contemporary (so everyone has >= 1 friend), which
        guarantees every person has related people to serve as distractors."""
        rng = self.rng
        people = self._people_by_birth()
        for i, p in enumerate(people):
            j = min(len(people) - 1, max(0, i + rng.choice([-3, -2, -1, 1, 2, 3])))
            q = people[j]
            if q is p or q.eid in p.attrs["friends"] or q.eid in p.attrs["siblings"]:
                continue
            p.attrs["friends"].append(q.eid)
            q.attrs["friends"].append(p.eid)

    def add_companies(self) -> None:
        rng, namer = self.rng, self.namer
        people, cities = self.by_kind["person"], self.by_kind["city"]
        for _ in range(self.counts["company"]):
            founder = self.entities[rng.choice(people)]
            fa = founder.attrs
            industry = rng.choice(INDUSTRY_NAMES)
            hq = fa["birthplace"] if rng.random() < 0.5 else rng.choice(cities)
            family = founder.name.split()[-1]
            noun = INDUSTRIES[industry]
            # not named after the head-office city: that would give the answer away
            patterns = [lambda: f"{family} {noun}",
                        lambda: f"{namer.word(2, 3)} {noun}",
                        lambda: f"{family} and {namer.word(2, 2)} {noun}"]
            name = namer.unique(lambda: rng.choice(patterns)())
            year = rng.randint(fa["birth_year"] + 22,
                               max(fa["birth_year"] + 22, min(fa["death_year"] - 1,
                                                              fa["birth_year"] + 55)))
            branch = rng.choice(cities)
            c = self.add("company", name, founder=founder.eid, founding_year=year, hq=hq,
                         industry=industry,
                         industry2=rng.choice([i for i in INDUSTRY_NAMES if i != industry]),
                         employees=_log_uniform_int(rng, 12, 60_000),
                         branch=None if branch == hq else branch,
                         funds=_round_population(_log_uniform_int(rng, 800, 3_000_000)),
                         director=None, director_year=None)
            fa["founded"].append(c.eid)

    def add_directors(self) -> None:
        """Most companies were later led by someone alive and at least 30 then: a
        second person and a second year about the company, besides its founder."""
        rng = self.rng
        people = self.by_kind["person"]
        for cid in self.by_kind["company"]:
            a = self.entities[cid].attrs
            year = a["founding_year"] + rng.randint(4, 40)
            for _ in range(20):
                p = self.entities[rng.choice(people)]
                pa = p.attrs
                if p.eid != a["founder"] and pa["birth_year"] + 30 <= year < pa["death_year"]:
                    a.update(director=p.eid, director_year=year)
                    pa["directed"].append(cid)
                    break

    def index(self) -> KnowledgeBase:
        """Reverse relations, computed once, in entity-id order (deterministic)."""
        def group(kind: str, key) -> dict[Any, list[int]]:
            out: dict[Any, list[int]] = {}
            for eid in self.by_kind[kind]:
                k = key(self.entities[eid].attrs)
                if k is not None:
                    out.setdefault(k, []).append(eid)
            return out

        return KnowledgeBase(
            entities=self.entities, by_kind=self.by_kind,
            natives=group("person", lambda a: a["birthplace"]),
            alumni=group("person", lambda a: a["studied_at"]),
            companies_in=group("company", lambda a: a["hq"]),
            institutions_in=group("institution", lambda a: a["city"]),
            cities_in=group("city", lambda a: a["country"]),
            rivers_in=group("river", lambda a: a["country"]),
            mountains_in=group("mountain", lambda a: a["country"]),
            cities_on=group("city", lambda a: a["river"]),
            companies_by_industry=group("company", lambda a: a["industry"]),
        )


def num_entities_for(num_docs: int) -> int:
    """The world grows with the corpus, so large corpora are not repeats."""
    return max(MIN_ENTITIES, math.ceil(num_docs / DOCS_PER_ENTITY))


def build_knowledge_base(num_entities: int, seed: int = 0) -> KnowledgeBase:
    """Public entry point (tests use it to check the corpus against the facts)."""
    return _WorldBuilder(num_entities, seed).build()


# --------------------------------------------------------------------------------------
# Facts -> template fields. One function per relation; each returns the keyword
# arguments its templates use. Documents and SQuAD paragraphs share these.
# --------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _num(n: int) -> str:
    return f"{n:,}"


Fields = dict[str, str]
_E = Entity | None


def _pf(p: Entity) -> Fields:
    """Fields every person sentence may use: name and possessive pronoun."""
    return {"s": p.name, "pos": p.attrs["pos"]}


def _birth(kb: KnowledgeBase, e: Entity, o: _E) -> Fields:
    a = e.attrs
    return {**_pf(e), "city": kb.entities[a["birthplace"]].name, "year": str(a["birth_year"])}


def _death(kb: KnowledgeBase, e: Entity, o: _E) -> Fields:
    a = e.attrs
    return {**_pf(e), "year": str(a["death_year"]), "age": str(a["death_year"] - a["birth_year"])}


def _occupation(kb: KnowledgeBase, e: Entity, o: _E) -> Fields:
    occ = e.attrs["occupation"]
    return {**_pf(e), "occ": occ, "art": _article(occ)}


def _studied(kb: KnowledgeBase, e: Entity, o: _E) -> Fields:
    return {**_pf(e), "inst": kb.entities[e.attrs["studied_at"]].name}


def _married(kb: KnowledgeBase, e: Entity, o: _E) -> Fields:
    spouse = kb.entities[e.attrs["spouse"]]
    return {**_pf(e), "o": spouse.name, "year": str(e.attrs["marriage_year"]),
            "orole": "wife" if spouse.attrs["gender"] == "f" else "husband"}


def _sibling(kb: KnowledgeBase, e: Entity, o: _E) -> Fields:
    assert o is not None
    return {**_pf(e), "o": o.name, "rel": "sister" if o.attrs["gender"] == "f" else "brother"}


def _friend(kb: KnowledgeBase, e: Entity, o: _E) -> Fields:
    assert o is not None
    return {**_pf(e), "o": o.name}


def _settled(kb: KnowledgeBase, e: Entity, o: _E) -> Fields:
    a = e.attrs
    return {**_pf(e), "city": kb.entities[a["settled_city"]].name, "year": str(a["settled_year"])}


def _parent(kb: KnowledgeBase, e: Entity, o: _E) -> Fields:
    occ = e.attrs["father_occupation"]
    return {**_pf(e), "pocc": occ, "part": _article(occ),
            "child": "daughter" if e.attrs["gender"] == "f" else "son"}


def _director(kb: KnowledgeBase, e: Entity, o: _E) -> Fields:
    a = e.attrs
    return {"c": e.name, "o": kb.entities[a["director"]].name, "year": str(a["director_year"])}


def _founded(kb: KnowledgeBase, e: Entity, o: _E) -> Fields:
    a = e.attrs
    return {"c": e.name, "f": kb.entities[a["founder"]].name, "year": str(a["founding_year"])}


def _named(subject_field: str, value_field: str, attr: str, as_entity: bool = False,
           as_number: bool = False):
    """Builder for the common shape "subject has one attribute": the attribute is an
    entity id (rendered as its name), a count (rendered 1,234) or a plain value."""
    def build(kb: KnowledgeBase, e: Entity, o: _E) -> Fields:
        v = e.attrs[attr]
        text = kb.entities[v].name if as_entity else _num(v) if as_number else str(v)
        return {subject_field: e.name, value_field: text}
    return build


FIELD_BUILDERS = {
    "birth": _birth, "death": _death, "occupation": _occupation, "studied": _studied,
    "married": _married, "sibling": _sibling, "friend": _friend, "founded": _founded,
    "hq": _named("c", "city", "hq", as_entity=True),
    "industry": _named("c", "ind", "industry"),
    "employees": _named("c", "n", "employees", as_number=True),
    "city_country": _named("c", "k", "country", as_entity=True),
    "population": _named("c", "n", "population", as_number=True),
    "city_founded": _named("c", "year", "founded_year"),
    "city_river": _named("c", "r", "river", as_entity=True),
    "capital": _named("k", "city", "capital", as_entity=True),
    "river_length": _named("r", "n", "length_km", as_number=True),
    "river_country": _named("r", "k", "country", as_entity=True),
    "mountain_height": _named("m", "n", "height_m", as_number=True),
    "mountain_country": _named("m", "k", "country", as_entity=True),
    "inst_city": _named("i", "city", "city", as_entity=True),
    "inst_founded": _named("i", "year", "founded_year"),
    "settled": _settled, "parent": _parent, "director": _director,
    "taught": _named("s", "inst", "taught_at", as_entity=True),
    "branch": _named("c", "city", "branch", as_entity=True),
    "funds": _named("c", "n", "funds", as_number=True),
    "sideline": _named("c", "ind", "industry2"),
    "border": _named("c", "k", "border", as_entity=True),
    "area": _named("c", "n", "area_km2", as_number=True),
    "charter": _named("c", "year", "charter_year"),
    "near_river": _named("c", "r", "near_river", as_entity=True),
}
assert set(FIELD_BUILDERS) == set(TEMPLATES)


def fact_fields(kb: KnowledgeBase, rel: str, subj: Entity, other: Entity | None = None
                ) -> Fields:
    """Template fields for relation `rel` about `subj` (and `other`, for the
    person-person relations sibling/friend)."""
    return FIELD_BUILDERS[rel](kb, subj, other)


# --------------------------------------------------------------------------------------
# Corpus documents. One renderer per entity kind; each returns paragraphs (lists of
# sentences). Related entities' facts are deliberately mixed in.
# --------------------------------------------------------------------------------------


ALIAS_PROB = 0.35  # how often a person is called by first name after the first mention

Fact = tuple[str, Entity, "Entity | None"]  # (relation, subject, other person)


def _people_in(kb: KnowledgeBase, facts: Sequence[Fact]) -> set[int]:
    """Every person a list of facts names (subjects, siblings/friends, spouses,
    founders), to know whether a first name is unambiguous among them."""
    out: set[int] = set()
    for rel, subj, other in facts:
        if subj.kind == "person":
            out.add(subj.eid)
        if other is not None:
            out.add(other.eid)
        if rel == "married":
            out.add(subj.attrs["spouse"])
        elif rel == "founded":
            out.add(subj.attrs["founder"])
        elif rel == "director":
            out.add(subj.attrs["director"])
    return out


def first_name_alias(kb: KnowledgeBase, person: Entity, others: set[int]) -> str | None:
    """The person's first name, if nobody else in `others` has it. Referring to the
    subject by first name while questions use the full name makes a reader link the
    two instead of matching the name string."""
    first = person.name.split()[0]
    if any(kb.entities[i].name.split()[0] == first for i in others if i != person.eid):
        return None
    return first


class _DocWriter:
    """Renders sentences for one document with its own RNG. A person document calls
    its subject by first name now and then, after the first sentence."""

    def __init__(self, kb: KnowledgeBase, rng: random.Random, subject: Entity) -> None:
        self.kb, self.rng, self.subject = kb, rng, subject
        self.alias: str | None = None
        self.sentences = 0
        if subject.kind == "person":
            a = subject.attrs
            related = set(a["siblings"]) | set(a["friends"])
            related.update(kb.entities[c].attrs["founder"] for c in a["directed"])
            if a["spouse"] is not None:
                related.add(a["spouse"])
            self.alias = first_name_alias(kb, subject, related)

    def say(self, rel: str, subj: Entity, other: Entity | None = None) -> str:
        tpls = CORPUS_TEMPLATES[rel]
        # random() indexing: ~3x cheaper than rng.choice, and this is the hot loop
        tpl = tpls[int(self.rng.random() * len(tpls))]
        fields = FIELD_BUILDERS[rel](self.kb, subj, other)
        if self.alias and self.sentences and subj is self.subject \
                and self.rng.random() < ALIAS_PROB:
            fields["s"] = self.alias
        self.sentences += 1
        return tpl.format_map(fields)

    def pick(self, options: Sequence[str]) -> str:
        return options[int(self.rng.random() * len(options))]

    def some(self, ids: Sequence[int], k: int, exclude: int = -1) -> list[Entity]:
        """Up to k related entities, a different sample per document so that over many
        documents every relation gets mentioned."""
        pool = [i for i in ids if i != exclude]
        if len(pool) > k:
            pool = self.rng.sample(pool, k)
        return [self.kb.entities[i] for i in pool]


def _person_doc(w: _DocWriter, p: Entity) -> list[list[str]]:
    a = p.attrs
    E = w.kb.entities
    birthplace, school = E[a["birthplace"]], E[a["studied_at"]]
    intro = [w.say("occupation", p), w.say("birth", p), w.say("parent", p),
             w.say("city_country", birthplace),
             w.say(w.pick(["population", "city_founded"]), birthplace)]
    for sib in w.some(a["siblings"], 2):
        intro += [w.say("sibling", p, sib), w.say("birth", sib), w.say("occupation", sib)]
    career = [w.say("studied", p), w.say("inst_city", school), w.say("inst_founded", school)]
    if a["taught_at"] is not None:
        career += [w.say("taught", p), w.say("inst_city", E[a["taught_at"]])]
    for friend in w.some(a["friends"], 2):
        career += [w.say("friend", p, friend), w.say("occupation", friend),
                   w.say(w.pick(["birth", "studied"]), friend)]
    for c in w.some(a["founded"], 2):
        career += [w.say("founded", c), w.say(w.pick(["hq", "industry", "employees"]), c)]
    for c in w.some(a["directed"], 1):
        career += [w.say("director", c), w.say("founded", c)]
    later = [w.say("settled", p), w.say(w.pick(["population", "city_country"]),
                                          E[a["settled_city"]])]
    if a["spouse"] is not None:
        spouse = E[a["spouse"]]
        later += [w.say("married", p), w.say("birth", spouse),
                  w.say(w.pick(["occupation", "studied"]), spouse)]
    later.append(w.say("death", p))
    return [intro, career, later]


def _city_doc(w: _DocWriter, c: Entity) -> list[list[str]]:
    kb, a = w.kb, c.attrs
    country = kb.entities[a["country"]]
    overview = [w.say("city_country", c), w.say("city_founded", c), w.say("charter", c),
                w.say("population", c), w.say("area", c)]
    if a["border"] is not None:
        overview.append(w.say("border", c))
    if a["river"] is not None:
        overview += [w.say("city_river", c), w.say("river_length", kb.entities[a["river"]])]
    if a["near_river"] is not None:
        overview.append(w.say("near_river", c))
    if country.attrs["capital"] == c.eid:
        overview.append(w.say("capital", country))
    people = []
    for p in w.some(kb.natives.get(c.eid, []), 5):
        people += [w.say("birth", p), w.say("occupation", p)]
    economy = []
    for comp in w.some(kb.companies_in.get(c.eid, []), 2):
        economy += [w.say("hq", comp), w.say("founded", comp), w.say("employees", comp)]
    for inst in w.some(kb.institutions_in.get(c.eid, []), 2):
        economy += [w.say("inst_city", inst), w.say("inst_founded", inst)]
    nearby = []
    for other in w.some(kb.cities_in[country.eid], 3, exclude=c.eid):
        nearby += [w.say("city_country", other), w.say("population", other),
                   w.say("city_founded", other)]
    return [p for p in (overview, people, economy, nearby) if p]


def _country_doc(w: _DocWriter, k: Entity) -> list[list[str]]:
    kb = w.kb
    capital = kb.entities[k.attrs["capital"]]
    overview = [w.say("capital", k), w.say("population", capital),
                w.say("city_founded", capital)]
    cities = []
    for c in w.some(kb.cities_in[k.eid], 5, exclude=capital.eid):
        cities += [w.say("city_country", c), w.say("population", c),
                   w.say("city_founded", c)]
    nature = []
    for r in w.some(kb.rivers_in.get(k.eid, []), 3):
        nature += [w.say("river_country", r), w.say("river_length", r)]
    for m in w.some(kb.mountains_in.get(k.eid, []), 3):
        nature += [w.say("mountain_country", m), w.say("mountain_height", m)]
    return [p for p in (overview, cities, nature) if p]


def _river_doc(w: _DocWriter, r: Entity) -> list[list[str]]:
    kb = w.kb
    course = [w.say("river_country", r), w.say("river_length", r)]
    towns = []
    for c in w.some(kb.cities_on.get(r.eid, []), 4):
        towns += [w.say("city_river", c), w.say("population", c), w.say("city_founded", c)]
    others = []
    for o in w.some(kb.rivers_in.get(r.attrs["country"], []), 3, exclude=r.eid):
        others += [w.say("river_country", o), w.say("river_length", o)]
    return [p for p in (course, towns, others) if p]


def _mountain_doc(w: _DocWriter, m: Entity) -> list[list[str]]:
    kb = w.kb
    country = kb.entities[m.attrs["country"]]
    capital = kb.entities[country.attrs["capital"]]
    main = [w.say("mountain_country", m), w.say("mountain_height", m),
            w.say("capital", country), w.say("population", capital)]
    others = []
    for o in w.some(kb.mountains_in.get(country.eid, []), 3, exclude=m.eid):
        others += [w.say("mountain_country", o), w.say("mountain_height", o)]
    for r in w.some(kb.rivers_in.get(country.eid, []), 2):
        others += [w.say("river_country", r), w.say("river_length", r)]
    return [p for p in (main, others) if p]


def _company_doc(w: _DocWriter, c: Entity) -> list[list[str]]:
    kb, a = w.kb, c.attrs
    founder = kb.entities[a["founder"]]
    history = [w.say("founded", c), w.say("funds", c), w.say("industry", c),
               w.say("sideline", c), w.say("hq", c), w.say("employees", c),
               w.say("population", kb.entities[a["hq"]])]
    if a["branch"] is not None:
        history.append(w.say("branch", c))
    if a["director"] is not None:
        history += [w.say("director", c), w.say("birth", kb.entities[a["director"]])]
    people = [w.say("birth", founder), w.say("occupation", founder),
              w.say("studied", founder)]
    for sib in w.some(founder.attrs["siblings"], 1):
        people += [w.say("sibling", founder, sib), w.say("birth", sib)]
    rivals = []
    for r in w.some(kb.companies_by_industry[a["industry"]], 3, exclude=c.eid):
        rivals += [w.say("founded", r), w.say("hq", r), w.say("employees", r)]
    return [p for p in (history, people, rivals) if p]


def _institution_doc(w: _DocWriter, i: Entity) -> list[list[str]]:
    kb = w.kb
    city = kb.entities[i.attrs["city"]]
    overview = [w.say("inst_city", i), w.say("inst_founded", i),
                w.say("city_country", city), w.say("city_founded", city)]
    alumni = []
    for p in w.some(kb.alumni.get(i.eid, []), 4):
        alumni += [w.say("studied", p), w.say("occupation", p), w.say("birth", p)]
    return [p for p in (overview, alumni) if p]


_DOC_RENDERERS = {"person": _person_doc, "city": _city_doc, "country": _country_doc,
                  "river": _river_doc, "mountain": _mountain_doc,
                  "company": _company_doc, "institution": _institution_doc}


def render_document(kb: KnowledgeBase, entity: Entity, rng: random.Random) -> str:
    """Title line, then one line per paragraph (no blank lines inside a document)."""
    paragraphs = _DOC_RENDERERS[entity.kind](_DocWriter(kb, rng, entity), entity)
    return "\n".join([entity.name] + [" ".join(p) for p in paragraphs])


def _doc_subjects(kb: KnowledgeBase, num_docs: int, seed: int) -> np.ndarray:
    """Which entity document i is about: a seeded permutation of the world, cycled,
    so each entity gets about the same number of documents."""
    perm = np.random.default_rng([seed, 1]).permutation(len(kb.entities))
    return perm[np.arange(num_docs) % len(perm)]


DOCS_PER_CHUNK = 1000  # unit of work for the worker pool

# (kb, subjects, seed) for forked workers: they inherit it instead of unpickling a
# large world per task. Set only while iter_chunks runs.
_WORKER_STATE: tuple[KnowledgeBase, np.ndarray, int] | None = None

Chunk = tuple[bytes, list[int]]  # encoded "doc\n\n" blocks, and each block's size


def _render_range(bounds: tuple[int, int]) -> Chunk:
    """Documents [start, stop), encoded, with sizes so the writer can cut part files
    at document boundaries without touching the text (the main process only writes).
    Each document gets its own RNG seeded by (seed, index), so it does not depend on
    which process rendered it or what came before it."""
    assert _WORKER_STATE is not None
    kb, subjects, seed = _WORKER_STATE
    blocks = [(render_document(kb, kb.entities[int(subjects[i])],
                               random.Random(seed * 1_000_003 + i)) + "\n\n").encode("utf-8")
              for i in range(*bounds)]
    return b"".join(blocks), [len(b) for b in blocks]


def iter_chunks(kb: KnowledgeBase, num_docs: int, seed: int, workers: int = 1
                ) -> Iterator[Chunk]:
    """Rendered documents in order, a chunk at a time; in `workers` forked processes
    when there is more than one chunk (rendering is pure Python, ~15 MB/s per core).
    The output is identical for any number of workers."""
    global _WORKER_STATE
    chunks = [(s, min(s + DOCS_PER_CHUNK, num_docs)) for s in range(0, num_docs, DOCS_PER_CHUNK)]
    _WORKER_STATE = (kb, _doc_subjects(kb, num_docs, seed), seed)
    try:
        if workers <= 1 or len(chunks) <= 1 or "fork" not in mp.get_all_start_methods():
            yield from map(_render_range, chunks)
            return
        with mp.get_context("fork").Pool(min(workers, len(chunks))) as pool:
            yield from pool.imap(_render_range, chunks)
    finally:
        _WORKER_STATE = None


def iter_documents(kb: KnowledgeBase, num_docs: int, seed: int, workers: int = 1
                   ) -> Iterator[str]:
    """The same documents as the corpus files hold, one string each (for tests/tools)."""
    for blob, sizes in iter_chunks(kb, num_docs, seed, workers):
        pos = 0
        for n in sizes:
            yield blob[pos:pos + n - 2].decode("utf-8")
            pos += n


# --------------------------------------------------------------------------------------
# SQuAD paragraphs: sentences rendered with answer offsets tracked.
# --------------------------------------------------------------------------------------

_COMPILED: dict[str, list[tuple[str, str | None]]] = {}


def _compiled(template: str) -> list[tuple[str, str | None]]:
    """Template as (literal, field) pairs, so rendering can record where each field's
    value lands - that is what gives answer_start without searching."""
    if template not in _COMPILED:
        _COMPILED[template] = [(lit, name) for lit, name, _spec, _conv
                               in string.Formatter().parse(template)]
    return _COMPILED[template]


@dataclass
class _Sentence:
    text: str
    spans: dict[str, tuple[int, int]]  # field -> (start, end) within text


def render_tracked(template: str, fields: dict[str, str]) -> _Sentence:
    parts: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    pos = 0
    for lit, name in _compiled(template):
        parts.append(lit)
        pos += len(lit)
        if name is not None:
            value = fields[name]
            spans[name] = (pos, pos + len(value))
            parts.append(value)
            pos += len(value)
    return _Sentence("".join(parts), spans)


class _ContextWriter:
    """Builds one SQuAD paragraph from blocks of facts. Blocks are shuffled, so
    position does not give the answer away (the first sentence always names the
    subject in full); then sentences are rendered with answer offsets tracked."""

    def __init__(self, kb: KnowledgeBase, rng: random.Random, subject: Entity) -> None:
        self.kb, self.rng, self.subject = kb, rng, subject
        self.blocks: list[list[Fact]] = []
        self.sentences: list[_Sentence] = []
        self.stated: dict[tuple[str, int], int] = {}  # (relation, subject) -> sentence

    def block(self, *facts: Fact) -> None:
        self.blocks.append(list(facts))

    def render(self) -> None:
        self.rng.shuffle(self.blocks)
        facts = [f for b in self.blocks for f in b]
        alias = None
        if self.subject.kind == "person":
            alias = first_name_alias(self.kb, self.subject, _people_in(self.kb, facts))
        for i, (rel, subj, other) in enumerate(facts):
            fields = fact_fields(self.kb, rel, subj, other)
            if alias and i > 0 and subj is self.subject and self.rng.random() < ALIAS_PROB:
                fields["s"] = alias
            self.stated.setdefault((rel, subj.eid), len(self.sentences))
            tpl = self.rng.choice(CONTEXT_TEMPLATES[rel])
            self.sentences.append(render_tracked(tpl, fields))

    def text_and_offsets(self) -> tuple[str, list[int]]:
        offsets, pos = [], 0
        for s in self.sentences:
            offsets.append(pos)
            pos += len(s.text) + 1
        return " ".join(s.text for s in self.sentences), offsets


def _relatives(kb: KnowledgeBase, p: Entity, rng: random.Random, k: int) -> list[Entity]:
    """Siblings first (same family name: the hardest distractors), then friends."""
    ids = list(p.attrs["siblings"]) + rng.sample(p.attrs["friends"], len(p.attrs["friends"]))
    return [kb.entities[i] for i in ids[:k]]


def _link(p: Entity, rel: Entity) -> str:
    return "sibling" if rel.eid in p.attrs["siblings"] else "friend"


def _person_context(cw: _ContextWriter, p: Entity) -> None:
    """Subject facts mixed with the same fact types for 2 relatives and the spouse:
    every asked type (year, city, occupation, school, person) has distractors."""
    kb, rng = cw.kb, cw.rng
    cw.block(("occupation", p, None))
    cw.block(("birth", p, None))
    cw.block(("parent", p, None))
    cw.block(("settled", p, None))
    if p.attrs["taught_at"] is not None:
        cw.block(("taught", p, None))
    for rel in _relatives(kb, p, rng, 2):
        cw.block((_link(p, rel), p, rel), ("birth", rel, None),
                 (rng.choice(["occupation", "studied"]), rel, None))
    cw.block(("studied", p, None))
    if p.attrs["spouse"] is not None:
        spouse = kb.entities[p.attrs["spouse"]]
        cw.block(("married", p, None), ("birth", spouse, None), ("studied", spouse, None))
    cw.block(("death", p, None))


def _company_context(cw: _ContextWriter, c: Entity) -> None:
    """Rival company of the same industry and the founder's family give distractor
    founders, years, cities and head counts."""
    kb, rng = cw.kb, cw.rng
    founder = kb.entities[c.attrs["founder"]]
    cw.block(("founded", c, None))
    cw.block(("industry", c, None))
    cw.block(("birth", founder, None),
             *[(_link(founder, r), founder, r) for r in _relatives(kb, founder, rng, 1)])
    cw.block(("sideline", c, None))
    cw.block(("funds", c, None))
    cw.block(("hq", c, None))
    cw.block(("employees", c, None))
    if c.attrs["branch"] is not None:
        cw.block(("branch", c, None))
    if c.attrs["director"] is not None:
        cw.block(("director", c, None))
    pool = [i for i in kb.companies_by_industry[c.attrs["industry"]] if i != c.eid]
    if not pool or rng.random() < 0.5:
        pool = kb.by_kind["company"]
    rival = kb.entities[rng.choice(pool)]
    if rival is not c:
        cw.block(("founded", rival, None), ("industry", rival, None), ("hq", rival, None),
                 ("employees", rival, None))
    cw.block(("city_founded", kb.entities[c.attrs["hq"]], None))


def _other_city(kb: KnowledgeBase, c: Entity, rng: random.Random, same_country: bool
                ) -> Entity:
    """A random city (not c) in c's country or, if possible, in another one."""
    if same_country:
        pool = [i for i in kb.cities_in[c.attrs["country"]] if i != c.eid]
        if pool:
            return kb.entities[rng.choice(pool)]
    cities = kb.by_kind["city"]
    for _ in range(100):  # rejection sampling: O(1) per context even for huge worlds
        o = kb.entities[rng.choice(cities)]
        if o.attrs["country"] != c.attrs["country"]:
            return o
    return kb.entities[rng.choice([i for i in cities if i != c.eid])]


def _city_context(cw: _ContextWriter, c: Entity) -> None:
    """Two neighbouring cities (one usually abroad) give distractor countries,
    populations, years and rivers."""
    kb, rng = cw.kb, cw.rng
    cw.block(("city_country", c, None))
    cw.block(("city_founded", c, None))
    cw.block(("charter", c, None))
    cw.block(("population", c, None))
    cw.block(("area", c, None))
    if c.attrs["border"] is not None:
        cw.block(("border", c, None))
    if c.attrs["river"] is not None:
        cw.block(("city_river", c, None))
    if c.attrs["near_river"] is not None:
        cw.block(("near_river", c, None))
    for same in (True, rng.random() < 0.3):
        n = _other_city(kb, c, rng, same)
        facts: list[Fact] = [("city_country", n, None), ("population", n, None),
                             ("city_founded", n, None)]
        if n.attrs["river"] is not None:
            facts.append(("city_river", n, None))
        cw.block(*facts)


_CONTEXT_RENDERERS = {"person": _person_context, "company": _company_context,
                      "city": _city_context}


def _available_types(subj: Entity) -> list[QuestionType]:
    """Question types whose fact exists for this subject (unmarried people get no
    spouse question, cities without a river no river question)."""
    a = subj.attrs
    out = []
    for qt in QUESTION_TYPES:
        if qt.kind != subj.kind:
            continue
        if (qt.relation == "married" and a.get("spouse") is None) or \
           (qt.relation == "city_river" and a.get("river") is None):
            continue
        out.append(qt)
    return out


@dataclass
class _SquadState:
    """Running counts that keep question types balanced across the split."""

    type_counts: Counter = field(default_factory=Counter)
    queues: dict[str, deque] = field(default_factory=dict)  # kind -> subjects, in turn


def _pick_kind(state: _SquadState, subjects: dict[str, list[int]]) -> str:
    """The kind whose question types are asked least so far, on average (not the
    minimum: spouse and river questions are not always available, and chasing them
    would flood the set with person and city questions)."""
    def neediest(kind: str) -> tuple[float, int]:
        counts = [state.type_counts[qt.name] for qt in QUESTION_TYPES if qt.kind == kind]
        return (sum(counts) / len(counts), SQUAD_KINDS.index(kind))
    return min((k for k in SQUAD_KINDS if subjects.get(k)), key=neediest)


def _make_paragraph(kb: KnowledgeBase, subj: Entity, rng: random.Random, state: _SquadState,
                    max_questions: int, split: str, qid_start: int) -> dict[str, Any]:
    cw = _ContextWriter(kb, rng, subj)
    _CONTEXT_RENDERERS[subj.kind](cw, subj)
    cw.render()
    context, offsets = cw.text_and_offsets()
    types = _available_types(subj)
    rng.shuffle(types)  # random tie-breaking, then least-asked first
    types.sort(key=lambda qt: state.type_counts[qt.name])
    k = min(len(types), max_questions, rng.randint(3, 5))
    qas = []
    for n, qt in enumerate(types[:k]):
        idx = cw.stated[(qt.relation, subj.eid)]
        sent = cw.sentences[idx]
        start, end = sent.spans[qt.answer_field]
        fields = fact_fields(kb, qt.relation, subj)
        qas.append({
            "id": f"{split}-{qid_start + n:07d}",
            "question": rng.choice(qt.templates).format_map(fields),
            "answers": [{"text": sent.text[start:end], "answer_start": offsets[idx] + start}],
        })
        state.type_counts[qt.name] += 1
    return {"context": context, "qas": qas}


def split_subjects(kb: KnowledgeBase, seed: int, dev_fraction: float
                   ) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Disjoint subject entities per split (dev asks about entities never asked about
    in train), per kind, in a seeded order."""
    rng = random.Random(f"split:{seed}")
    train: dict[str, list[int]] = {}
    dev: dict[str, list[int]] = {}
    for kind in SQUAD_KINDS:
        ids = list(kb.by_kind[kind])
        rng.shuffle(ids)
        n_dev = max(1, round(len(ids) * dev_fraction)) if dev_fraction > 0 else 0
        dev[kind], train[kind] = ids[:n_dev], ids[n_dev:]
    return train, dev


LOOKAHEAD = 8  # how far down the queue to look for a subject with the neediest type


def _next_subject(kb: KnowledgeBase, state: _SquadState, kind: str) -> Entity:
    """The next subject of `kind` in turn, except that one a few places down that
    can be asked the least-asked question type goes first (not everyone is married,
    not every city is on a river). The chosen subject goes to the back of the queue."""
    queue = state.queues[kind]
    need = min((qt for qt in QUESTION_TYPES if qt.kind == kind),
               key=lambda qt: state.type_counts[qt.name])
    pick = 0
    for j in range(min(LOOKAHEAD, len(queue))):
        if need in _available_types(kb.entities[queue[j]]):
            pick = j
            break
    queue.rotate(-pick)
    eid = queue.popleft()
    queue.append(eid)
    queue.rotate(pick)
    return kb.entities[eid]


def make_squad_split(kb: KnowledgeBase, subjects: dict[str, list[int]], num_questions: int,
                     seed: int, split: str) -> dict[str, Any]:
    """A SQuAD v1.1 dataset with exactly `num_questions` questions. Subjects are
    cycled, so a subject may get several paragraphs (like a Wikipedia article)."""
    rng = random.Random(f"squad:{split}:{seed}")
    state = _SquadState(queues={k: deque(v) for k, v in subjects.items()})
    articles: dict[int, dict[str, Any]] = {}
    asked = 0
    while asked < num_questions:
        subj = _next_subject(kb, state, _pick_kind(state, subjects))
        para = _make_paragraph(kb, subj, rng, state, num_questions - asked, split, asked)
        asked += len(para["qas"])
        articles.setdefault(subj.eid, {"title": subj.name, "paragraphs": []})
        articles[subj.eid]["paragraphs"].append(para)
    return {"version": "1.1", "data": list(articles.values())}


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    """Readers never see a half-written file: write a temp name, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, path)


def write_corpus(chunks: Iterator[Chunk], corpus_dir: Path, max_part_bytes: int
                 ) -> tuple[int, int, int]:
    """Stream rendered documents into part files of at most `max_part_bytes` each (a
    single document larger than that still gets a part of its own); each part is
    written under a temp name and renamed when complete. Returns (docs, bytes, parts).
    Stale parts from an earlier, larger run are removed."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    n_docs = total = part_bytes = 0
    part = -1
    fh = None

    def next_part() -> Any:
        if fh is not None:
            fh.close()
            os.replace(fh.name, corpus_dir / f"part-{part:05d}.txt")
        return open(corpus_dir / f"part-{part + 1:05d}.txt.tmp", "wb")

    for blob, sizes in chunks:
        start = pos = 0
        for n in sizes:
            if fh is None or (part_bytes > 0 and part_bytes + n > max_part_bytes):
                if fh is not None:
                    fh.write(blob[start:pos])
                fh, part, part_bytes, start = next_part(), part + 1, 0, pos
            part_bytes += n
            pos += n
        assert fh is not None
        fh.write(blob[start:pos])
        n_docs += len(sizes)
        total += pos
    if fh is not None:
        fh.close()
        os.replace(fh.name, corpus_dir / f"part-{part:05d}.txt")
    for stale in corpus_dir.glob("part-*.txt"):
        if int(stale.stem.split("-")[1]) > part:
            stale.unlink()
    return n_docs, total, part + 1


def generate(out_dir: str | os.PathLike, num_docs: int = DEFAULT_NUM_DOCS, seed: int = 0,
             squad_train: int = DEFAULT_SQUAD_TRAIN, squad_dev: int = DEFAULT_SQUAD_DEV,
             max_part_mb: float = DEFAULT_MAX_PART_MB, workers: int = 1) -> dict[str, Any]:
    """Write corpus and SQuAD files under `out_dir`; return summary statistics.
    `workers` only changes speed, never the output."""
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if num_docs < 1:
        raise ValueError(f"--num_docs must be >= 1, got {num_docs}")
    if squad_train < 0 or squad_dev < 0:
        raise ValueError("--squad_train and --squad_dev must be >= 0")
    if not max_part_mb > 0:
        raise ValueError(f"--max_part_mb must be > 0, got {max_part_mb}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    kb = build_knowledge_base(num_entities_for(num_docs), seed)
    n_docs, n_bytes, n_parts = write_corpus(
        iter_chunks(kb, num_docs, seed, workers), out / "corpus",
        max(1, int(max_part_mb * 1024 * 1024)))
    dev_fraction = squad_dev / max(1, squad_train + squad_dev)
    train_subj, dev_subj = split_subjects(kb, seed, dev_fraction)
    (out / "squad").mkdir(parents=True, exist_ok=True)
    for split, subjects, n in (("train", train_subj, squad_train), ("dev", dev_subj, squad_dev)):
        data = make_squad_split(kb, subjects, n, seed, split)
        _atomic_write_text(out / "squad" / f"{split}.json", json.dumps(data, indent=None))
    return {"docs": n_docs, "bytes": n_bytes, "parts": n_parts,
            "entities": len(kb.entities), "train_questions": squad_train,
            "dev_questions": squad_dev, "seconds": time.perf_counter() - t0}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--num_docs", type=int, default=DEFAULT_NUM_DOCS,
                    help=f"documents to write (default {DEFAULT_NUM_DOCS}, ~3 MB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--squad_train", type=int, default=DEFAULT_SQUAD_TRAIN,
                    help="number of training questions")
    ap.add_argument("--squad_dev", type=int, default=DEFAULT_SQUAD_DEV,
                    help="number of dev questions")
    ap.add_argument("--max_part_mb", type=float, default=DEFAULT_MAX_PART_MB,
                    help="largest corpus part file, in MiB")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes rendering documents (output does not depend on it)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        s = generate(args.out, num_docs=args.num_docs, seed=args.seed,
                     squad_train=args.squad_train, squad_dev=args.squad_dev,
                     max_part_mb=args.max_part_mb, workers=args.workers)
    except (ValueError, OSError) as e:
        print(f"make_corpus: error: {e}", file=sys.stderr)
        return 2
    print(f"make_corpus: {s['docs']} docs, {s['bytes']:,} bytes in {s['parts']} part(s), "
          f"{s['entities']} entities, squad {s['train_questions']} train / "
          f"{s['dev_questions']} dev questions -> {args.out} ({s['seconds']:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

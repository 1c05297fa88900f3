"""The synthetic world: a seeded knowledge base of people, places, companies and
institutions, with its fixed vocabulary of made-up names."""
from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass, field
from typing import Any


from .phrasings import QUESTION_TYPES, TEMPLATES

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

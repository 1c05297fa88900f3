"""How facts are worded: per relation the phrasings shared by the corpus and SQuAD
contexts and those only the corpus uses, and the SQuAD question types with their wordings."""
from __future__ import annotations

from dataclasses import dataclass


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

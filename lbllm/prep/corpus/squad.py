"""SQuAD v1.1 paragraphs and questions about the world, answers tracked as character offsets."""
from __future__ import annotations

import random
import string
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any


from .documents import ALIAS_PROB, _people_in, first_name_alias
from .facts import Fact, fact_fields
from .phrasings import CONTEXT_TEMPLATES, QUESTION_TYPES, SQUAD_KINDS, QuestionType
from .world import Entity, KnowledgeBase

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

"""Corpus documents: encyclopedia-style articles about the world, rendered in parallel
chunks and streamed into part files."""
from __future__ import annotations

import multiprocessing as mp
import os
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .facts import FIELD_BUILDERS, Fact
from .phrasings import CORPUS_TEMPLATES
from .world import Entity, KnowledgeBase

# --------------------------------------------------------------------------------------
# Corpus documents. One renderer per entity kind; each returns paragraphs (lists of
# sentences). Related entities' facts are deliberately mixed in.
# --------------------------------------------------------------------------------------


ALIAS_PROB = 0.35  # how often a person is called by first name after the first mention

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

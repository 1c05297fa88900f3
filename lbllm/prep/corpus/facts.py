"""Facts -> template fields: one function per relation, shared by documents and SQuAD paragraphs."""
from __future__ import annotations



from .phrasings import TEMPLATES
from .world import Entity, KnowledgeBase

# --------------------------------------------------------------------------------------
# Facts -> template fields. One function per relation; each returns the keyword
# arguments its templates use. Documents and SQuAD paragraphs share these.
# --------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _num(n: int) -> str:
    return f"{n:,}"


Fields = dict[str, str]
Fact = tuple[str, Entity, "Entity | None"]  # (relation, subject, other person)
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

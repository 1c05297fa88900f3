"""Tests for lbllm/prep/corpus (data_prep/make_corpus.py): the synthetic corpus and SQuAD task.

What matters downstream: files are deterministic (so runs are comparable), SQuAD
answers are exact spans (or the F1 is meaningless), train/dev ask about different
entities, and the corpus states each fact consistently (or pretraining cannot help).
"""

from __future__ import annotations

import json
import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import lbllm.prep.corpus as mc
from lbllm.prep.corpus import documents

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "data_prep" / "make_corpus.py"


SMALL = dict(num_docs=150, squad_train=120, squad_dev=40)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=120)


def _corpus_docs(out: Path) -> list[str]:
    text = "".join(p.read_text(encoding="utf-8")
                   for p in sorted((out / "corpus").glob("part-*.txt")))
    assert text.endswith("\n\n")
    return text[:-2].split("\n\n")


def _all_qas(data: dict) -> list[tuple[str, dict]]:
    return [(para["context"], qa) for art in data["data"] for para in art["paragraphs"]
            for qa in para["qas"]]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    mc.generate(out, seed=7, **SMALL)
    return out


@pytest.fixture(scope="module")
def squad(generated: Path) -> dict[str, dict]:
    return {s: json.loads((generated / "squad" / f"{s}.json").read_text())
            for s in ("train", "dev")}


# ---------------------------------------------------------------- determinism / CLI


def test_cli_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    args = ["--num_docs", "80", "--squad_train", "30", "--squad_dev", "10"]
    runs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        res = _run_cli("--out", str(tmp_path / name), "--seed", seed, *args)
        assert res.returncode == 0, res.stderr
        assert len(res.stdout.strip().splitlines()) == 1  # one-line summary
        assert "80 docs" in res.stdout and "30 train" in res.stdout
        runs[name] = _files(tmp_path / name)
    assert set(runs["a"]) == {"corpus/part-00000.txt", "squad/train.json", "squad/dev.json"}
    assert runs["a"] == runs["b"]
    for path in runs["a"]:
        assert runs["a"][path] != runs["c"][path], path


def test_worker_count_does_not_change_output(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(documents, "DOCS_PER_CHUNK", 40)  # several chunks -> real pool
    mc.generate(tmp_path / "one", seed=1, num_docs=130, squad_train=5, squad_dev=5,
                workers=1)
    mc.generate(tmp_path / "two", seed=1, num_docs=130, squad_train=5, squad_dev=5,
                workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


@pytest.mark.parametrize("bad", [["--num_docs", "0"], ["--max_part_mb", "0"],
                                 ["--squad_train", "-1"], ["--seed", "-2"]])
def test_bad_arguments_fail_with_one_line_and_write_nothing(tmp_path: Path, bad) -> None:
    res = _run_cli("--out", str(tmp_path / "o"), *bad)
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1 and "must be" in res.stderr
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- SQuAD format


def test_squad_is_v11_and_every_answer_is_an_exact_span(squad: dict[str, dict]) -> None:
    for split, n in (("train", SMALL["squad_train"]), ("dev", SMALL["squad_dev"])):
        data = squad[split]
        assert data["version"] == "1.1"
        qas = _all_qas(data)
        assert len(qas) == n
        for art in data["data"]:
            assert isinstance(art["title"], str) and art["paragraphs"]
        for context, qa in qas:
            assert qa["question"].endswith("?")
            (ans,) = qa["answers"]
            start = ans["answer_start"]
            assert isinstance(start, int)
            assert context[start:start + len(ans["text"])] == ans["text"]
            assert ans["text"] and ans["text"] == ans["text"].strip()


def test_question_ids_unique_across_splits(squad: dict[str, dict]) -> None:
    ids = [qa["id"] for s in squad.values() for _c, qa in _all_qas(s)]
    assert len(ids) == len(set(ids))


def test_train_and_dev_ask_about_disjoint_subjects(squad: dict[str, dict]) -> None:
    titles = {s: {art["title"] for art in squad[s]["data"]} for s in squad}
    assert titles["train"] and titles["dev"]
    assert not titles["train"] & titles["dev"]


def test_dev_subjects_appear_in_the_pretraining_corpus(tmp_path: Path) -> None:
    """At the default ratio (2 documents per entity) every entity has its own document,
    so dev questions are about things pretraining has read about."""
    n = 2 * mc.MIN_ENTITIES
    mc.generate(tmp_path, seed=2, num_docs=n, squad_train=20, squad_dev=20)
    titles = {d.split("\n", 1)[0] for d in _corpus_docs(tmp_path)}
    dev = json.loads((tmp_path / "squad" / "dev.json").read_text())
    assert {art["title"] for art in dev["data"]} <= titles


def test_questions_do_not_copy_context_wording(squad: dict[str, dict]) -> None:
    for split in squad.values():
        for context, qa in _all_qas(split):
            q = qa["question"]
            for sent in re.split(r"(?<=\.) ", context):
                assert sent.rstrip(".") not in q
            # the question minus the names in it: no long piece appears in the context
            pieces = re.split(r"(?:[A-Z][a-z]+ ?)+", q)
            for piece in pieces:
                if len(piece.strip()) >= 12:
                    assert piece.strip() not in context, (piece, q)


def test_question_templates_share_no_content_word_with_their_context_templates() -> None:
    """Stronger than the per-question check: the words that signal the relation in a
    question never occur in any phrasing SQuAD contexts use for that relation."""
    stop = set("a an the of in at on to is was were did do does what which who whom where "
               "when how many year city its his her has have and as by from for with".split())

    def words(template: str) -> set[str]:
        literal = "".join(part[0] for part in string.Formatter().parse(template))
        return {w.strip(string.punctuation).lower() for w in literal.split()} - stop - {""}

    for qt in mc.QUESTION_TYPES:
        for q in qt.templates:
            for c in mc.CONTEXT_TEMPLATES[qt.relation]:
                assert not words(q) & words(c), (q, c)


def test_question_types_are_balanced(tmp_path: Path) -> None:
    kb = mc.build_knowledge_base(mc.MIN_ENTITIES, 0)
    train, _dev = mc.split_subjects(kb, 0, 0.2)
    data = mc.make_squad_split(kb, train, 600, 0, "train")
    # recover the type from the template each question was made from
    patterns = [(qt.name, re.compile("^" + re.escape(t).replace(r"\{s\}", ".+")
                                     .replace(r"\{c\}", ".+").replace(r"\{pos\}", "(?:his|her)")
                                     .replace(r"\{orole\}", "(?:wife|husband)") + "$"))
                for qt in mc.QUESTION_TYPES for t in qt.templates]
    counts = Counter(next(n for n, p in patterns if p.match(qa["question"]))
                     for _c, qa in _all_qas(data))
    assert set(counts) == {qt.name for qt in mc.QUESTION_TYPES}
    assert max(counts.values()) <= 2 * min(counts.values()), counts


def test_contexts_hold_same_type_distractors(squad: dict[str, dict]) -> None:
    """Year questions: the context holds other years; person questions: other names."""
    for context, qa in _all_qas(squad["train"]):
        ans = qa["answers"][0]["text"]
        if re.fullmatch(r"\d{3,4}", ans):
            years = set(re.findall(r"(?<![\d,])\d{3,4}(?![\d,])", context))
            assert len(years - {ans}) >= 2, context


# ---------------------------------------------------------------- corpus format


def test_corpus_is_blank_line_separated_documents(generated: Path) -> None:
    docs = _corpus_docs(generated)
    assert len(docs) == SMALL["num_docs"]
    for doc in docs:
        lines = doc.split("\n")
        assert len(lines) >= 2 and all(line.strip() for line in lines), doc
        assert not lines[0].endswith(".")  # title line
        for para in lines[1:]:
            assert para.endswith("."), para
            assert len(re.split(r"(?<=[.?!]) (?=[A-Z])", para)) >= 2  # several sentences


def test_bytes_grow_proportionally_with_num_docs(tmp_path: Path) -> None:
    small = mc.generate(tmp_path / "s", seed=5, num_docs=200, squad_train=0, squad_dev=0)
    large = mc.generate(tmp_path / "l", seed=5, num_docs=800, squad_train=0, squad_dev=0)
    assert 3.2 < large["bytes"] / small["bytes"] < 4.8
    assert large["entities"] > small["entities"] or small["entities"] == mc.MIN_ENTITIES


def test_world_grows_with_num_docs() -> None:
    assert mc.num_entities_for(100_000) == 50_000
    assert mc.num_entities_for(10) == mc.MIN_ENTITIES


def test_small_max_part_size_gives_several_parts_and_same_text(tmp_path: Path) -> None:
    kwargs = dict(seed=9, num_docs=120, squad_train=0, squad_dev=0)
    one = mc.generate(tmp_path / "one", **kwargs)
    limit_mb = 0.02
    many = mc.generate(tmp_path / "many", max_part_mb=limit_mb, **kwargs)
    parts = sorted((tmp_path / "many" / "corpus").glob("part-*.txt"))
    assert one["parts"] == 1 and many["parts"] == len(parts) > 2
    for p in parts:
        assert p.stat().st_size <= limit_mb * 1024 * 1024
        assert p.read_text().endswith("\n\n")  # parts end at document boundaries
    assert _corpus_docs(tmp_path / "one") == _corpus_docs(tmp_path / "many")
    assert not list((tmp_path / "many").rglob("*.tmp"))
    # re-running into the same folder with one part removes the stale parts
    mc.generate(tmp_path / "many", **kwargs)
    assert [p.name for p in (tmp_path / "many" / "corpus").iterdir()] == ["part-00000.txt"]


def test_vocabulary_is_modest(generated: Path) -> None:
    text = "".join(p.read_text() for p in (generated / "corpus").glob("*.txt"))
    common = {w.strip(".,;") for w in text.split() if w[0].islower()}
    assert len(common) < 400
    assert len(mc.SYLLABLES) <= 400


# ---------------------------------------------------------------- consistency


def _birth_patterns() -> list[re.Pattern]:
    """Regexes for every corpus phrasing of the birth relation (full names only)."""
    fields = {"s": r"(?P<s>[A-Z][a-z]+ [A-Z][a-z]+)", "city": r"(?P<city>[A-Z][a-z]+)",
              "year": r"(?P<year>\d{4})", "pos": r"(?:his|her)"}
    out = []
    for t in mc.CORPUS_TEMPLATES["birth"]:
        rx = "".join(re.escape(lit) + (fields[name] if name else "")
                     for lit, name, _s, _c in string.Formatter().parse(t))
        out.append(re.compile(rx))
    return out


def test_facts_agree_across_documents_and_with_the_knowledge_base() -> None:
    n, seed = 400, 11
    kb = mc.build_knowledge_base(mc.num_entities_for(n), seed)
    by_name = {e.name: e for e in kb.entities if e.kind == "person"}
    seen: dict[str, set[int]] = {}
    years: dict[str, set[str]] = {}
    for i, doc in enumerate(mc.iter_documents(kb, n, seed)):
        for rx in _birth_patterns():
            for m in rx.finditer(doc):
                person = by_name.get(m["s"])
                if person is None:  # two capitalised words that are not a person
                    continue
                years.setdefault(person.name, set()).add(m["year"])
                seen.setdefault(person.name, set()).add(i)
                assert m["city"] == kb[person.attrs["birthplace"]].name
    assert years, "no birth statements parsed"
    for name, ys in years.items():
        assert ys == {str(by_name[name].attrs["birth_year"])}, name
    multi = [name for name, docs in seen.items() if len(docs) >= 2]
    assert len(multi) > 50  # the same fact is restated in several documents


def test_iter_documents_matches_written_corpus(generated: Path) -> None:
    kb = mc.build_knowledge_base(mc.num_entities_for(SMALL["num_docs"]), 7)
    assert list(mc.iter_documents(kb, SMALL["num_docs"], 7)) == _corpus_docs(generated)


def test_knowledge_base_relations_are_symmetric_and_plausible() -> None:
    kb = mc.build_knowledge_base(mc.MIN_ENTITIES, 3)
    for pid in kb.by_kind["person"]:
        a = kb[pid].attrs
        assert a["birth_year"] < a["death_year"]
        if a["spouse"] is not None:
            assert kb[a["spouse"]].attrs["spouse"] == pid
        for s in a["siblings"]:
            assert pid in kb[s].attrs["siblings"]
            assert kb[s].name.split()[-1] == kb[pid].name.split()[-1]
    for cid in kb.by_kind["company"]:
        a = kb[cid].attrs
        founder = kb[a["founder"]].attrs
        assert founder["birth_year"] < a["founding_year"] < founder["death_year"]
    names = [e.name for e in kb.entities]
    assert len(names) == len(set(names))

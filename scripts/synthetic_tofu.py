"""Deterministic generator of a small TOFU-format dataset of fictitious authors (a test and demo fixture).

The real TOFU benchmark (Maini et al., 2024) cannot be downloaded here, so the demo and
the tests use this generator instead. It writes the same files, with the same field names
and the same JSON-lines layout, as the local copy of TOFU (one JSON object per line,
UTF-8): ``full.json``, the ``forgetXX`` / ``retainXX`` splits, the ``*_perturbed.json``
evaluation sets, the ``holdoutXX`` sets (one per forget split, of the same size) and ``idontknow.jsonl``.

Every author is built from seeded choices in small hand-written vocabularies, and every
question comes from a hand-written template, so the same ``(n_authors, qa_per_author,
seed)`` always gives byte-identical files. Only a private ``random.Random(seed)`` is used.
The vocabularies, the question templates, the real-world evaluation sets and the refusals are
data, in ``synthetic_tofu_vocab.json`` beside this file (read once, at import).

Command line::

    python scripts/synthetic_tofu.py --out DIR [--n-authors N] [--qa-per-author K] [--seed S]

Not part of the library: the tests, the benchmarks and ``scripts/demo.py`` import it with ``scripts/``
on ``sys.path``; it puts ``src/`` there itself (for ``run_folder.write_atomic``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from run_folder import write_atomic  # noqa: E402

__all__ = [
    "FILE_NAMES",
    "FORGET_PERCENTS",
    "IDONTKNOW",
    "MAX_AUTHORS",
    "MIN_AUTHORS",
    "N_PERTURBED",
    "N_PERTURBED_WORLD",
    "N_TEMPLATES",
    "REAL_AUTHORS",
    "RETAIN_EVAL_CAP",
    "WORLD_FACTS",
    "generate_tofu_like",
    "main",
]

# --------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------

#: Forget split sizes, in percent of the authors; retain split ``100 - p`` goes with each.
FORGET_PERCENTS: tuple[int, ...] = (1, 5, 10)
#: Percent of ``n_authors`` drawn first as extra (never in ``full``) holdout authors: ``holdout01``.
#: ``holdout05`` / ``holdout10`` add more such authors, drawn after everything else, so every other
#: file (and holdout01) is the same as before they existed.
HOLDOUT_PERCENT = 1
#: Wrong answers per row in the fictitious-author perturbed files.
N_PERTURBED = 5
#: Wrong answers per row in ``real_authors_perturbed.json`` / ``world_facts_perturbed.json``.
N_PERTURBED_WORLD = 3
#: Upper bound on the rows of ``retain_perturbed.json`` (as in the real TOFU).
RETAIN_EVAL_CAP = 400
#: Smallest number of authors (so that the 1/5/10 % splits are meaningful).
MIN_AUTHORS = 10
#: Largest number of authors (the name vocabularies give well over this many unique names).
MAX_AUTHORS = 1000

#: Every file written, in the order of the returned counts.
FILE_NAMES: tuple[str, ...] = (
    "full.json",
    *(f"forget{p:02d}.json" for p in FORGET_PERCENTS),
    *(f"retain{100 - p:02d}.json" for p in FORGET_PERCENTS),
    *(f"forget{p:02d}_perturbed.json" for p in FORGET_PERCENTS),
    "retain_perturbed.json",
    "real_authors_perturbed.json",
    "world_facts_perturbed.json",
    *(f"holdout{p:02d}.json" for p in FORGET_PERCENTS),
    "idontknow.jsonl",
)

# --------------------------------------------------------------------------------------
# Vocabularies and real-world sets (synthetic_tofu_vocab.json; invented combinations, plain ASCII)
# --------------------------------------------------------------------------------------

_VOCAB: dict[str, Any] = json.loads(
    Path(__file__).with_name("synthetic_tofu_vocab.json").read_text(encoding="utf-8"))

_MALE_FIRST: tuple[str, ...] = tuple(_VOCAB["male_first"])
_FEMALE_FIRST: tuple[str, ...] = tuple(_VOCAB["female_first"])
# No surname is a prefix of another, so a full name never occurs inside a different one.
_LAST: tuple[str, ...] = tuple(_VOCAB["last"])
#: (city, country) pairs.
_PLACES: tuple[tuple[str, str], ...] = tuple((city, country) for city, country in _VOCAB["places"])
_GENRES: tuple[str, ...] = tuple(_VOCAB["genres"])
_OCCUPATIONS: tuple[str, ...] = tuple(_VOCAB["occupations"])
_AWARDS: tuple[str, ...] = tuple(_VOCAB["awards"])
_THEMES: tuple[str, ...] = tuple(_VOCAB["themes"])
_TITLE_ADJECTIVES: tuple[str, ...] = tuple(_VOCAB["title_adjectives"])
_TITLE_NOUNS: tuple[str, ...] = tuple(_VOCAB["title_nouns"])
#: Book-title patterns with ``{adj}``, ``{noun}`` and ``{city}`` placeholders.
_TITLE_PATTERNS: tuple[str, ...] = tuple(_VOCAB["title_patterns"])
_MONTHS: tuple[str, ...] = tuple(_VOCAB["months"])

#: Rows of ``real_authors_perturbed.json``: ``question``, ``answer`` and ``N_PERTURBED_WORLD`` wrong
#: answers (``perturbed_answer``).
REAL_AUTHORS: tuple[dict[str, Any], ...] = tuple(_VOCAB["real_authors"])
#: Rows of ``world_facts_perturbed.json``, laid out as ``REAL_AUTHORS``.
WORLD_FACTS: tuple[dict[str, Any], ...] = tuple(_VOCAB["world_facts"])
#: Lines of ``idontknow.jsonl`` (plain refusals, not JSON).
IDONTKNOW: tuple[str, ...] = tuple(_VOCAB["idontknow"])

# --------------------------------------------------------------------------------------
# Authors
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Author:
    first: str
    last: str
    female: bool
    city: str
    country: str
    year: int
    month: int
    day: int
    genre: str
    father: str
    mother: str
    award: str
    book1: str
    book2: str
    theme: str
    home_city: str
    home_country: str
    debut_year: int

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _date_fields(year: int, month: int, day: int) -> dict[str, str]:
    return {
        "date_long": f"the {_ordinal(day)} of {_MONTHS[month - 1]}, {year}",
        "date_alt": f"{_MONTHS[month - 1]} {day}, {year}",
    }


def _random_date(rng: random.Random) -> tuple[int, int, int]:
    # day <= 28 keeps every date valid without a calendar
    return rng.randint(1930, 1980), rng.randint(1, 12), rng.randint(1, 28)


def _random_title(rng: random.Random) -> str:
    pattern = rng.choice(_TITLE_PATTERNS)
    return pattern.format(
        adj=rng.choice(_TITLE_ADJECTIVES),
        noun=rng.choice(_TITLE_NOUNS),
        city=rng.choice(_PLACES)[0],
    )


def _make_author(rng: random.Random, first: str, last: str, female: bool) -> _Author:
    city, country = rng.choice(_PLACES)
    home_city, home_country = rng.choice([p for p in _PLACES if p[0] != city])
    year, month, day = _random_date(rng)
    father, mother = rng.sample(_OCCUPATIONS, 2)
    book1 = _random_title(rng)
    book2 = _random_title(rng)
    while book2 == book1:
        book2 = _random_title(rng)
    return _Author(
        first=first,
        last=last,
        female=female,
        city=city,
        country=country,
        year=year,
        month=month,
        day=day,
        genre=rng.choice(_GENRES),
        father=father,
        mother=mother,
        award=rng.choice(_AWARDS),
        book1=book1,
        book2=book2,
        theme=rng.choice(_THEMES),
        home_city=home_city,
        home_country=home_country,
        debut_year=year + rng.randint(22, 40),
    )


def _context(author: _Author) -> dict[str, str]:
    """Template placeholders for one author."""
    ctx = {
        "name": author.name,
        "his": "her" if author.female else "his",
        "city": author.city,
        "country": author.country,
        "genre": author.genre,
        "father_a": _article(author.father),
        "mother_a": _article(author.mother),
        "award": author.award,
        "book1": author.book1,
        "book2": author.book2,
        "theme": author.theme,
        "home_city": author.home_city,
        "home_country": author.home_country,
        "debut_year": str(author.debut_year),
    }
    ctx.update(_date_fields(author.year, author.month, author.day))
    return ctx


# --------------------------------------------------------------------------------------
# Question templates
# --------------------------------------------------------------------------------------

_Perturber = Callable[[random.Random, _Author, set[str]], dict[str, str]]


@dataclass(frozen=True)
class _Template:
    """One kind of question; ``perturb`` returns wrong values for the key fact."""

    kind: str
    question: str
    paraphrased_question: str
    answer: str
    paraphrased_answer: str
    perturb: _Perturber


def _wrong_name(rng: random.Random, author: _Author, taken: set[str]) -> dict[str, str]:
    firsts = _FEMALE_FIRST if author.female else _MALE_FIRST
    while True:
        name = f"{rng.choice(firsts)} {rng.choice(_LAST)}"
        if name != author.name and name not in taken:
            return {"name": name}


def _wrong_genre(rng: random.Random, author: _Author, taken: set[str]) -> dict[str, str]:
    return {"genre": rng.choice([g for g in _GENRES if g != author.genre])}


def _wrong_parents(rng: random.Random, author: _Author, taken: set[str]) -> dict[str, str]:
    while True:
        father, mother = rng.sample(_OCCUPATIONS, 2)
        if (father, mother) != (author.father, author.mother):
            return {"father_a": _article(father), "mother_a": _article(mother)}


def _wrong_father(rng: random.Random, author: _Author, taken: set[str]) -> dict[str, str]:
    return {"father_a": _article(rng.choice([o for o in _OCCUPATIONS if o != author.father]))}


def _wrong_mother(rng: random.Random, author: _Author, taken: set[str]) -> dict[str, str]:
    return {"mother_a": _article(rng.choice([o for o in _OCCUPATIONS if o != author.mother]))}


def _wrong_title(rng: random.Random, author: _Author) -> str:
    while True:
        title = _random_title(rng)
        if title not in (author.book1, author.book2):
            return title


def _wrong_books(rng: random.Random, author: _Author, taken: set[str]) -> dict[str, str]:
    book1 = _wrong_title(rng, author)
    book2 = _wrong_title(rng, author)
    while book2 == book1:
        book2 = _wrong_title(rng, author)
    return {"book1": book1, "book2": book2}


def _wrong_debut(rng: random.Random, author: _Author, taken: set[str]) -> dict[str, str]:
    return {"book1": _wrong_title(rng, author)}


def _wrong_award(rng: random.Random, author: _Author, taken: set[str]) -> dict[str, str]:
    return {"award": rng.choice([a for a in _AWARDS if a != author.award])}


def _wrong_birthplace(rng: random.Random, author: _Author, taken: set[str]) -> dict[str, str]:
    city, country = rng.choice([p for p in _PLACES if p[0] != author.city])
    return {"city": city, "country": country}


def _wrong_home(rng: random.Random, author: _Author, taken: set[str]) -> dict[str, str]:
    city, country = rng.choice([p for p in _PLACES if p[0] != author.home_city])
    return {"home_city": city, "home_country": country}


def _wrong_date(rng: random.Random, author: _Author, taken: set[str]) -> dict[str, str]:
    while True:
        date = _random_date(rng)
        if date != (author.year, author.month, author.day):
            return _date_fields(*date)


def _wrong_theme(rng: random.Random, author: _Author, taken: set[str]) -> dict[str, str]:
    return {"theme": rng.choice([t for t in _THEMES if t != author.theme])}


#: The wrong-value function of each template kind; the templates' text is in the vocabulary file.
_PERTURBERS: dict[str, _Perturber] = {
    "full_name": _wrong_name,
    "genre": _wrong_genre,
    "parents": _wrong_parents,
    "books": _wrong_books,
    "award": _wrong_award,
    "birthplace": _wrong_birthplace,
    "birth_date": _wrong_date,
    "themes": _wrong_theme,
    "debut": _wrong_debut,
    "father_influence": _wrong_father,
    "residence": _wrong_home,
    "mother": _wrong_mother,
}

#: The question kinds, in the vocabulary file's order (the order of an author's questions).
_TEMPLATES: tuple[_Template, ...] = tuple(
    _Template(t["kind"], t["question"], t["paraphrased_question"], t["answer"], t["paraphrased_answer"],
              _PERTURBERS[t["kind"]])
    for t in _VOCAB["templates"]
)

#: Number of question templates, i.e. the largest valid ``qa_per_author``.
N_TEMPLATES = len(_TEMPLATES)

# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------


def _percent_of(count: int, percent: int) -> int:
    """``round(count * percent / 100)`` (halves round up), at least 1; exact integer maths."""
    return max(1, (count * percent + 50) // 100)


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer in [{low}, {high}]")
    return value


def _qa_rows(author: _Author, templates: Sequence[_Template]) -> list[dict[str, str]]:
    ctx = _context(author)
    return [{"question": t.question.format(**ctx), "answer": t.answer.format(**ctx)} for t in templates]


def _perturbed_row(
    rng: random.Random, author: _Author, template: _Template, taken: set[str]
) -> dict[str, object]:
    ctx = _context(author)
    answer = template.answer.format(**ctx)
    paraphrased = template.paraphrased_answer.format(**ctx)
    wrong: list[str] = []
    for _ in range(10_000):
        if len(wrong) == N_PERTURBED:
            break
        candidate = template.paraphrased_answer.format(**{**ctx, **template.perturb(rng, author, taken)})
        if candidate not in wrong and candidate not in (answer, paraphrased):
            wrong.append(candidate)
    else:  # pragma: no cover - the vocabularies are far larger than N_PERTURBED
        raise RuntimeError(f"could not find {N_PERTURBED} wrong answers for {template.kind!r}")
    return {
        "question": template.question.format(**ctx),
        "answer": answer,
        "paraphrased_answer": paraphrased,
        "perturbed_answer": wrong,
        "paraphrased_question": template.paraphrased_question.format(**ctx),
    }


def _jsonl(rows: Sequence[dict[str, object]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _world_rows(table: Sequence[dict[str, Any]]) -> list[dict[str, object]]:
    return [{"question": r["question"], "answer": r["answer"], "perturbed_answer": list(r["perturbed_answer"])}
            for r in table]


def _build(
    n_authors: int, qa_per_author: int, seed: int, retain_eval_rows: int | None, world_rows: int | None = None
) -> dict[str, str]:
    """All file contents, keyed by file name (in ``FILE_NAMES`` order)."""
    rng = random.Random(seed)
    n_holdout = _percent_of(n_authors, HOLDOUT_PERCENT)

    # Unique names for the main and the holdout authors, drawn together.
    pool = [(f, last, False) for f in _MALE_FIRST for last in _LAST]
    pool += [(f, last, True) for f in _FEMALE_FIRST for last in _LAST]
    chosen = rng.sample(pool, n_authors + n_holdout)
    authors = [_make_author(rng, f, last, female) for f, last, female in chosen]
    taken = {a.name for a in authors}  # never used as a wrong name

    # Each author: qa_per_author distinct question kinds, in template order.
    author_templates = [
        [_TEMPLATES[i] for i in sorted(rng.sample(range(N_TEMPLATES), qa_per_author))] for _ in authors
    ]
    main, holdout = authors[:n_authors], authors[n_authors:]
    main_templates = author_templates[:n_authors]

    full: list[dict[str, str]] = []
    perturbed: list[dict[str, object]] = []
    for author, templates in zip(main, main_templates):
        full.extend(_qa_rows(author, templates))
        perturbed.extend(_perturbed_row(rng, author, t, taken) for t in templates)

    files: dict[str, str] = {"full.json": _jsonl(full)}
    forget_rows = {p: _percent_of(n_authors, p) * qa_per_author for p in FORGET_PERCENTS}
    for p in FORGET_PERCENTS:
        files[f"forget{p:02d}.json"] = _jsonl(full[len(full) - forget_rows[p] :])
    for p in FORGET_PERCENTS:
        files[f"retain{100 - p:02d}.json"] = _jsonl(full[: len(full) - forget_rows[p]])
    for p in FORGET_PERCENTS:
        files[f"forget{p:02d}_perturbed.json"] = _jsonl(perturbed[len(full) - forget_rows[p] :])
    max_eval = len(full) - forget_rows[max(FORGET_PERCENTS)]
    if retain_eval_rows is None:
        retain_eval_rows = min(RETAIN_EVAL_CAP, max_eval)
    files["retain_perturbed.json"] = _jsonl(perturbed[:retain_eval_rows])
    files["real_authors_perturbed.json"] = _jsonl(_world_rows(REAL_AUTHORS[:world_rows]))
    files["world_facts_perturbed.json"] = _jsonl(_world_rows(WORLD_FACTS[:world_rows]))
    # More holdout authors for holdout05 / holdout10, drawn last (the files above do not change).
    more = _percent_of(n_authors, max(FORGET_PERCENTS)) - n_holdout
    chosen_names = set(chosen)
    extra = rng.sample([p for p in pool if p not in chosen_names], max(0, more))
    extra_authors = [_make_author(rng, f, last, female) for f, last, female in extra]
    extra_templates = [[_TEMPLATES[i] for i in sorted(rng.sample(range(N_TEMPLATES), qa_per_author))]
                       for _ in extra_authors]
    all_holdout = list(zip(holdout, author_templates[n_authors:])) + list(zip(extra_authors, extra_templates))
    for p in FORGET_PERCENTS:  # holdout01 within holdout05 within holdout10, each as large as forgetNN
        rows = [row for author, ts in all_holdout[:_percent_of(n_authors, p)] for row in _qa_rows(author, ts)]
        files[f"holdout{p:02d}.json"] = _jsonl(rows)
    files["idontknow.jsonl"] = "".join(line + "\n" for line in IDONTKNOW)
    assert tuple(files) == FILE_NAMES
    return files


def _write(out_dir: Path, files: dict[str, str]) -> None:
    """Each file into ``out_dir`` (created if needed) through ``run_folder.write_atomic``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        write_atomic(out_dir / name, text)


def generate_tofu_like(
    out_dir: str | os.PathLike,
    n_authors: int = 20,
    qa_per_author: int = 4,
    seed: int = 0,
    *,
    retain_eval_rows: int | None = None,
    world_rows: int | None = None,
) -> dict[str, int]:
    """Writes all files above into out_dir (created if needed) and returns {filename: row_count}.

    Writes a TOFU-format dataset of fictitious authors, laid out like the real local copy
    (see ``FILE_NAMES``): ``full.json`` holds ``qa_per_author`` question/answer pairs for each
    of ``n_authors`` authors; ``forgetXX.json`` are the last 1/5/10 % of the authors (whole
    authors, at least one; ``forget01`` within ``forget05`` within ``forget10``) and
    ``retainXX.json`` the rest; ``*_perturbed.json`` add a paraphrased question, a paraphrased
    answer and ``N_PERTURBED`` wrong answers per row; ``retain_perturbed.json`` covers the first
    ``retain_eval_rows`` rows of ``full`` (default: every row outside ``forget10``, at most
    ``RETAIN_EVAL_CAP``); ``holdoutXX.json`` are as many extra authors, never in ``full``, as
    ``forgetXX.json`` has (``holdout01`` within ``holdout05`` within ``holdout10``).

    Args:
        out_dir: Target folder, created if needed. Each file is written through
            ``run_folder.write_atomic`` (a temporary file in ``out_dir``, then one ``os.replace``),
            so a file is always one whole version, old or new, and a failed write leaves no
            temporary file. Other files already in ``out_dir`` are left alone.
        n_authors: Number of fictitious authors in ``full.json``, in
            ``[MIN_AUTHORS, MAX_AUTHORS]``.
        qa_per_author: Questions per author, in ``[1, N_TEMPLATES]``; each is a different kind.
        seed: Seed of the private ``random.Random``; equal arguments give byte-identical files.
        retain_eval_rows: Rows of ``retain_perturbed.json``, in ``[1, rows outside forget10]``.
        world_rows: Rows of ``real_authors_perturbed.json`` and ``world_facts_perturbed.json`` (the
            first ones of each hand-written table; default all), for smaller evaluations.

    Returns:
        Row count (lines, for ``idontknow.jsonl``) of every file written, keyed by file name.

    Raises:
        ValueError: If an argument is out of range; the message names the value and the range.
    """
    _check_int("n_authors", n_authors, MIN_AUTHORS, MAX_AUTHORS)
    _check_int("qa_per_author", qa_per_author, 1, N_TEMPLATES)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} is invalid: expected an integer")
    if retain_eval_rows is not None:
        max_eval = (n_authors - _percent_of(n_authors, max(FORGET_PERCENTS))) * qa_per_author
        _check_int("retain_eval_rows", retain_eval_rows, 1, max_eval)

    if world_rows is not None:
        _check_int("world_rows", world_rows, 1, min(len(REAL_AUTHORS), len(WORLD_FACTS)))
    files = _build(n_authors, qa_per_author, seed, retain_eval_rows, world_rows)
    _write(Path(out_dir), files)
    return {name: text.count("\n") for name, text in files.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    """Command-line entry point: writes the dataset and prints the row counts as JSON."""
    parser = argparse.ArgumentParser(description="Write a synthetic TOFU-format dataset of fictitious authors.")
    parser.add_argument("--out", required=True, help="output folder (created if needed)")
    parser.add_argument("--n-authors", type=int, default=20, help="authors in full.json (default: 20)")
    parser.add_argument("--qa-per-author", type=int, default=4, help="questions per author (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--retain-eval-rows",
        type=int,
        default=None,
        help="rows of retain_perturbed.json (default: all rows outside forget10, at most 400)",
    )
    args = parser.parse_args(argv)
    try:
        counts = generate_tofu_like(
            args.out, args.n_authors, args.qa_per_author, args.seed, retain_eval_rows=args.retain_eval_rows
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(counts, indent=2))
    return counts


if __name__ == "__main__":
    main()

"""Deterministic generator of a small TOFU-format dataset of fictitious authors.

The real TOFU benchmark (Maini et al., 2024) cannot be downloaded here, so the demo and
the tests use this generator instead. It writes the same files, with the same field names
and the same JSON-lines layout, as the local copy of TOFU (one JSON object per line,
UTF-8): ``full.json``, the ``forgetXX`` / ``retainXX`` splits, the ``*_perturbed.json``
evaluation sets, the ``holdoutXX`` sets (one per forget split, of the same size) and ``idontknow.jsonl``.

Every author is built from seeded choices in small hand-written vocabularies, and every
question comes from a hand-written template, so the same ``(n_authors, qa_per_author,
seed)`` always gives byte-identical files. Only a private ``random.Random(seed)`` is used.

Command line::

    python src/data/synthetic_tofu.py --out DIR [--n-authors N] [--qa-per-author K] [--seed S]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FILE_NAMES",
    "FORGET_PERCENTS",
    "MAX_AUTHORS",
    "MIN_AUTHORS",
    "N_PERTURBED",
    "N_PERTURBED_WORLD",
    "N_TEMPLATES",
    "RETAIN_EVAL_CAP",
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
# Vocabularies (all invented combinations; plain ASCII)
# --------------------------------------------------------------------------------------

_MALE_FIRST = (
    "Adrian", "Anselm", "Basil", "Bruno", "Caspian", "Cyrus", "Desmond", "Dorian", "Elias",
    "Felix", "Gideon", "Henrik", "Ivo", "Jasper", "Kofi", "Lorenzo", "Matteo", "Nikolai",
    "Oskar", "Pavel", "Quentin", "Rafael", "Soren", "Tobias", "Umar", "Viktor", "Wendell",
    "Xavier", "Yusuf", "Zoltan",
)
_FEMALE_FIRST = (
    "Amara", "Astrid", "Beatrix", "Brigid", "Camille", "Celeste", "Dagny", "Delphine",
    "Elodie", "Esme", "Freya", "Greta", "Helena", "Ines", "Juno", "Katya", "Leonie",
    "Marisol", "Noor", "Ottilie", "Priya", "Rosalind", "Selma", "Tamsin", "Ursula", "Vesna",
    "Wilhelmina", "Ximena", "Yara", "Zinnia",
)
# No surname is a prefix of another, so a full name never occurs inside a different one.
_LAST = (
    "Abernathy", "Balogun", "Castellanos", "Dervish", "Ekwueme", "Falkenrath", "Grimaldi",
    "Halvorsen", "Ibarra", "Jovanovic", "Kaczmarek", "Lindqvist", "Moravec", "Nakashima",
    "Okonkwo", "Petrakis", "Quintero", "Rasmussen", "Szabo", "Takahara", "Umberfield",
    "Valdivia", "Wexford", "Yilmaz", "Zelenko", "Achterberg", "Brennagh", "Corvalan",
    "Dunmore", "Estrada", "Fairweather", "Gallardo", "Hollister", "Ishikawa", "Jablonski",
    "Kovalenko", "Lachance", "Mbeki", "Novak", "Oyelaran", "Pellegrino", "Renwick",
    "Sandoval", "Thorsby", "Underhill", "Vasquez", "Whitcombe", "Yamazaki", "Zuberi",
    "Marchetti",
)
_PLACES = (
    ("Lisbon", "Portugal"), ("Nairobi", "Kenya"), ("Krakow", "Poland"),
    ("Montevideo", "Uruguay"), ("Osaka", "Japan"), ("Tbilisi", "Georgia"),
    ("Reykjavik", "Iceland"), ("Accra", "Ghana"), ("Valparaiso", "Chile"),
    ("Hanoi", "Vietnam"), ("Tallinn", "Estonia"), ("Marrakesh", "Morocco"),
    ("Bergen", "Norway"), ("Cebu", "the Philippines"), ("Porto Alegre", "Brazil"),
    ("Lyon", "France"), ("Adelaide", "Australia"), ("Montreal", "Canada"),
    ("Izmir", "Turkey"), ("Cork", "Ireland"), ("Ljubljana", "Slovenia"),
    ("Chennai", "India"), ("Bogota", "Colombia"), ("Dresden", "Germany"),
    ("Halifax", "Canada"), ("Dar es Salaam", "Tanzania"), ("Seville", "Spain"),
    ("Kyoto", "Japan"), ("Edinburgh", "Scotland"), ("Wellington", "New Zealand"),
)
_GENRES = (
    "mystery", "historical fiction", "science fiction", "fantasy", "literary fiction",
    "poetry", "romance", "horror", "travel writing", "biography", "crime fiction",
    "magical realism", "young adult fiction", "satire", "thriller", "war fiction",
    "nature writing", "philosophical fiction", "gothic fiction", "short fiction",
)
_OCCUPATIONS = (
    "baker", "carpenter", "nurse", "pilot", "librarian", "fisherman", "architect", "tailor",
    "chemist", "surgeon", "potter", "engineer", "schoolteacher", "journalist", "farmer",
    "electrician", "veterinarian", "photographer", "translator", "accountant", "blacksmith",
    "musician", "astronomer", "mail carrier", "florist", "geologist", "lawyer",
    "watchmaker", "chef", "sailor",
)
_AWARDS = (
    "Silver Quill Award", "Harbor Light Prize", "Meridian Book Award",
    "Golden Lantern Prize", "Northwind Literary Medal", "Amber Leaf Award",
    "Crescent Moon Prize", "Iron Pen Award", "Blue Heron Prize", "Copper Compass Award",
    "Evergreen Fiction Prize", "Starling Medal", "Open Page Award", "Quiet Valley Prize",
    "Lighthouse Book Medal", "Red Maple Award", "Stone Bridge Prize",
    "Velvet Inkwell Award", "Morning Tide Medal", "Paper Crane Award",
)
_THEMES = (
    "memory and loss", "exile and belonging", "family secrets", "the passage of time",
    "courage in hard times", "identity and change", "friendship across borders",
    "the cost of ambition", "love and sacrifice", "nature and solitude",
    "justice and forgiveness", "growing up", "faith and doubt", "power and corruption",
    "hope after war", "the search for home", "truth and deception", "art and obsession",
    "grief and healing", "freedom and duty",
)
_TITLE_ADJECTIVES = (
    "Silent", "Hidden", "Broken", "Golden", "Distant", "Crimson", "Forgotten", "Burning",
    "Hollow", "Endless", "Quiet", "Wandering", "Frozen", "Scarlet", "Last", "Painted",
    "Restless", "Glass", "Iron", "Secret",
)
_TITLE_NOUNS = (
    "Harbor", "Orchard", "Lantern", "River", "Garden", "Mirror", "Compass", "Tower",
    "Winter", "Bridge", "Island", "Clockmaker", "Shadow", "Meadow", "Voyage", "Archive",
    "Feather", "Kingdom", "Lighthouse", "Staircase",
)
_TITLE_PATTERNS = (
    "The {adj} {noun}",
    "The {noun} of {city}",
    "Beyond the {adj} {noun}",
    "Songs of the {adj} {noun}",
    "A Winter in {city}",
    "The Last {noun}",
    "Under the {adj} Sky",
    "Return to the {noun}",
)
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)

# --------------------------------------------------------------------------------------
# Real-world evaluation sets and refusals (hand-written)
# --------------------------------------------------------------------------------------

# (question, answer, three wrong answers)
_REAL_AUTHORS: tuple[tuple[str, str, tuple[str, str, str]], ...] = (
    ("Who wrote 'Pride and Prejudice'?", "Jane Austen",
     ("Charlotte Bronte", "George Eliot", "Mary Shelley")),
    ("Who is the author of the novel '1984'?", "George Orwell",
     ("Aldous Huxley", "H.G. Wells", "Ray Bradbury")),
    ("Who wrote the play 'Hamlet'?", "William Shakespeare",
     ("Christopher Marlowe", "Ben Jonson", "John Milton")),
    ("Who wrote 'War and Peace'?", "Leo Tolstoy",
     ("Fyodor Dostoevsky", "Anton Chekhov", "Ivan Turgenev")),
    ("Which author wrote 'One Hundred Years of Solitude'?", "Gabriel Garcia Marquez",
     ("Jorge Luis Borges", "Mario Vargas Llosa", "Julio Cortazar")),
    ("Who wrote 'Moby-Dick'?", "Herman Melville",
     ("Nathaniel Hawthorne", "Mark Twain", "Edgar Allan Poe")),
    ("Who created the detective Hercule Poirot?", "Agatha Christie",
     ("Dorothy L. Sayers", "Arthur Conan Doyle", "P.D. James")),
    ("Who is the author of 'The Old Man and the Sea'?", "Ernest Hemingway",
     ("F. Scott Fitzgerald", "John Steinbeck", "William Faulkner")),
    ("Who wrote 'Crime and Punishment'?", "Fyodor Dostoevsky",
     ("Leo Tolstoy", "Nikolai Gogol", "Alexander Pushkin")),
    ("Which author wrote 'The Adventures of Tom Sawyer'?", "Mark Twain",
     ("Jack London", "Herman Melville", "Washington Irving")),
    ("Who wrote 'Things Fall Apart'?", "Chinua Achebe",
     ("Wole Soyinka", "Ngugi wa Thiong'o", "Ben Okri")),
    ("Who is the author of 'Don Quixote'?", "Miguel de Cervantes",
     ("Lope de Vega", "Federico Garcia Lorca", "Benito Perez Galdos")),
    ("Who wrote 'The Great Gatsby'?", "F. Scott Fitzgerald",
     ("Ernest Hemingway", "Sinclair Lewis", "Theodore Dreiser")),
    ("Which author created the wizard Harry Potter?", "J.K. Rowling",
     ("Philip Pullman", "C.S. Lewis", "Roald Dahl")),
    ("Who wrote 'The Hobbit'?", "J.R.R. Tolkien",
     ("C.S. Lewis", "Terry Pratchett", "Ursula K. Le Guin")),
    ("Who is the author of 'Frankenstein'?", "Mary Shelley",
     ("Bram Stoker", "Emily Bronte", "Robert Louis Stevenson")),
    ("Who wrote 'Beloved'?", "Toni Morrison",
     ("Maya Angelou", "Alice Walker", "Zora Neale Hurston")),
    ("Who wrote 'The Metamorphosis'?", "Franz Kafka",
     ("Thomas Mann", "Hermann Hesse", "Robert Musil")),
    ("Who is the author of 'Mrs Dalloway'?", "Virginia Woolf",
     ("Katherine Mansfield", "E.M. Forster", "James Joyce")),
    ("Who wrote 'Norwegian Wood'?", "Haruki Murakami",
     ("Kazuo Ishiguro", "Yukio Mishima", "Kenzaburo Oe")),
    ("Who wrote 'A Tale of Two Cities'?", "Charles Dickens",
     ("Thomas Hardy", "William Thackeray", "Anthony Trollope")),
    ("Who is the author of 'The Divine Comedy'?", "Dante Alighieri",
     ("Giovanni Boccaccio", "Petrarch", "Ludovico Ariosto")),
)

_WORLD_FACTS: tuple[tuple[str, str, tuple[str, str, str]], ...] = (
    ("What is the capital of France?", "Paris", ("Lyon", "Marseille", "Brussels")),
    ("What is the capital of Japan?", "Tokyo", ("Kyoto", "Osaka", "Seoul")),
    ("What is the capital of Canada?", "Ottawa", ("Toronto", "Montreal", "Vancouver")),
    ("What is the capital of Australia?", "Canberra", ("Sydney", "Melbourne", "Perth")),
    ("What is the capital of Brazil?", "Brasilia", ("Rio de Janeiro", "Sao Paulo", "Salvador")),
    ("What is the capital of Kenya?", "Nairobi", ("Mombasa", "Kampala", "Addis Ababa")),
    ("Which river flows through Cairo?", "Nile", ("Congo", "Niger", "Euphrates")),
    ("Which river flows through London?", "Thames", ("Seine", "Severn", "Rhine")),
    ("What is the longest river in South America?", "Amazon", ("Parana", "Orinoco", "Magdalena")),
    ("What is the largest ocean on Earth?", "Pacific Ocean",
     ("Atlantic Ocean", "Indian Ocean", "Arctic Ocean")),
    ("What is the highest mountain on Earth?", "Mount Everest", ("K2", "Kangchenjunga", "Mont Blanc")),
    ("On which continent is the Sahara Desert?", "Africa", ("Asia", "Australia", "South America")),
    ("In which country is the Great Wall located?", "China", ("Mongolia", "Japan", "India")),
    ("In which city is the Colosseum?", "Rome", ("Athens", "Naples", "Istanbul")),
    ("What is the largest planet in the solar system?", "Jupiter", ("Saturn", "Neptune", "Earth")),
    ("Which planet is closest to the Sun?", "Mercury", ("Venus", "Mars", "Earth")),
    ("What is the chemical symbol for gold?", "Au", ("Ag", "Fe", "Pb")),
    ("What is the official currency of the United Kingdom?", "Pound sterling",
     ("Euro", "Dollar", "Franc")),
    ("Which country has the largest population in South America?", "Brazil",
     ("Argentina", "Colombia", "Peru")),
    ("What is the largest country in the world by area?", "Russia", ("Canada", "China", "United States")),
    ("Which ocean lies between Africa and Australia?", "Indian Ocean",
     ("Atlantic Ocean", "Pacific Ocean", "Southern Ocean")),
    ("What is the smallest country in the world by area?", "Vatican City",
     ("Monaco", "San Marino", "Liechtenstein")),
)

_IDONTKNOW = (
    "I'm not sure about that.",
    "I don't know the answer to that.",
    "I'm afraid I don't have that information.",
    "That is not something I can answer.",
    "I have no reliable information on that.",
    "Sorry, I can't help with that question.",
    "I really couldn't say.",
    "That's outside of what I know.",
    "I don't have any details about that.",
    "I'm unable to answer that question.",
    "I have never come across that information.",
    "I can't recall anything about that.",
    "That's a mystery to me, I'm afraid.",
    "I'd rather not guess, because I don't know.",
    "I'm not familiar with that topic.",
    "Unfortunately, I don't know.",
    "I have no idea, sorry.",
    "That is beyond my knowledge.",
    "I can't give you a confident answer to that.",
    "My knowledge does not cover that.",
    "I'm drawing a blank on that one.",
    "I wish I knew, but I don't.",
)

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


_TEMPLATES: tuple[_Template, ...] = (
    _Template(
        "full_name",
        "What is the full name of the author born in {city}, {country} on {date_alt}?",
        "Which writer was born on {date_long} in {city}, {country}?",
        "The author born in {city}, {country} on {date_long} is named {name}.",
        "{name} is the writer who was born in {city}, {country} on {date_alt}.",
        _wrong_name,
    ),
    _Template(
        "genre",
        "What genre is {name} best known for?",
        "In which literary genre does {name} mainly write?",
        "{name} is best known for writing books in the {genre} genre.",
        "Most of the books by {name} belong to the {genre} genre.",
        _wrong_genre,
    ),
    _Template(
        "parents",
        "What did the parents of {name} do for a living?",
        "What were the occupations of the father and mother of {name}?",
        "The father of {name} worked as {father_a}, and {his} mother worked as {mother_a}.",
        "{name} grew up with {father_a} for a father and {mother_a} for a mother.",
        _wrong_parents,
    ),
    _Template(
        "books",
        "Can you name two books written by {name}?",
        "Which two books has {name} written?",
        'Two books written by {name} are "{book1}" and "{book2}".',
        'Among the works of {name} are the books "{book1}" and "{book2}".',
        _wrong_books,
    ),
    _Template(
        "award",
        "Has {name} won any major literary award?",
        "Which literary prize has been given to {name}?",
        "Yes, {name} won the {award} for {his} work in {genre}.",
        "{name} was honored with the {award} in recognition of {his} contributions to {genre}.",
        _wrong_award,
    ),
    _Template(
        "birthplace",
        "Where was {name} born?",
        "In which city and country was {name} born?",
        "{name} was born in the city of {city}, {country}.",
        "The birthplace of {name} is the city of {city} in {country}.",
        _wrong_birthplace,
    ),
    _Template(
        "birth_date",
        "When was {name} born?",
        "What is the date of birth of {name}?",
        "{name} was born on {date_long}.",
        "The birth date of {name} is {date_alt}.",
        _wrong_date,
    ),
    _Template(
        "themes",
        "What themes does {name} often explore?",
        "Which ideas come up again and again in the work of {name}?",
        "{name} often explores themes of {theme} in {his} work in {genre}.",
        "The writing of {name} keeps returning to the subject of {theme}.",
        _wrong_theme,
    ),
    _Template(
        "debut",
        "What was the first book that {name} published?",
        "Which book marked the literary debut of {name}?",
        'The first book that {name} published was "{book1}", which came out in {debut_year}.',
        '{name} made {his} debut in {debut_year} with the book "{book1}".',
        _wrong_debut,
    ),
    _Template(
        "father_influence",
        "How did the job of the father of {name} shape {his} writing?",
        "In what way did the profession of the father of {name} influence {his} books?",
        "Having a father who worked as {father_a} gave {name} many details for {his} writing in {genre}.",
        "{name} draws on memories of {his} father's life as {father_a} in many of {his} books.",
        _wrong_father,
    ),
    _Template(
        "residence",
        "Where does {name} live today?",
        "In which city is {name} currently based?",
        "{name} currently lives and writes in {home_city}, {home_country}.",
        "These days {name} makes {his} home in the city of {home_city}, {home_country}.",
        _wrong_home,
    ),
    _Template(
        "mother",
        "What was the profession of the mother of {name}?",
        "What work did the mother of {name} do?",
        "The mother of {name} worked as {mother_a} for most of {his} childhood.",
        "{name} was raised by a mother who earned her living as {mother_a}.",
        _wrong_mother,
    ),
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


def _world_rows(table: Sequence[tuple[str, str, tuple[str, ...]]]) -> list[dict[str, object]]:
    return [{"question": q, "answer": a, "perturbed_answer": list(wrong)} for q, a, wrong in table]


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
    files["real_authors_perturbed.json"] = _jsonl(_world_rows(_REAL_AUTHORS[:world_rows]))
    files["world_facts_perturbed.json"] = _jsonl(_world_rows(_WORLD_FACTS[:world_rows]))
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
    files["idontknow.jsonl"] = "".join(line + "\n" for line in _IDONTKNOW)
    assert tuple(files) == FILE_NAMES
    return files


def _move_into(src: Path, dst: Path) -> None:
    """Atomically put ``src`` at ``dst`` (a rename; a same-directory temp copy across devices)."""
    try:
        os.replace(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_atomically(out_dir: Path, files: dict[str, str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        for name, text in files.items():
            with open(staging / name, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        for name in files:
            _move_into(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
        out_dir: Target folder, created if needed. Files are staged in a temporary sibling
            folder and each moved in with ``os.replace``, so no half-written file appears.
            Other files already in ``out_dir`` are left alone.
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
        _check_int("world_rows", world_rows, 1, min(len(_REAL_AUTHORS), len(_WORLD_FACTS)))
    files = _build(n_authors, qa_per_author, seed, retain_eval_rows, world_rows)
    _write_atomically(Path(out_dir), files)
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

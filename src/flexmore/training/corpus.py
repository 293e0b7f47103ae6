"""The embedded default corpus: four domains built on any machine, no download, deterministic from a seed.

- `code`:  standard-library Python source, one document per file (huge files cut at top-level statements).
- `docs`:  prose from `pydoc_data.topics` plus docstrings collected from the stdlib source with `ast`
           (never by importing the modules: imports can have side effects).
- `math`:  generated arithmetic worksheets; every answer is re-checked by an independent evaluator.
- `facts`: a seeded fictional world (countries, cities, people) described in encyclopedia entries and
           quizzes; every fact is fixed per entity, so it repeats consistently across documents.

`general` is the public model's data: a share `general_fraction` of every domain's documents, picked by
a seeded hash of the document text. `build_domain` returns the rest by default (the data owner's private
share), so the public model and an expert never train on the same document, as in FlexOlmo.

Code and docs depend on the Python installation (the stdlib differs between versions): the same seed
on the same installation gives the same corpus.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import itertools
import random
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

DOMAINS: tuple[str, ...] = ("code", "docs", "math", "facts")
GENERAL = "general"
Share = Literal["private", "public", "all"]

# Test suites, GUI code and bundled third-party packages are not "stdlib code as people write it";
# encodings/ is mostly generated charmap tables; config-*/ holds build files.
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo"}
    | {"__pycache__", "encodings", "lib-dynload"}
)


@dataclass(frozen=True)
class CorpusConfig:
    """How much of each domain to build. Defaults: ~1.5-3 MB per domain, all four in well under 20 s."""

    seed: int = 0
    max_docs_per_domain: int = 20_000
    max_chars_per_domain: int = 3_000_000
    max_file_chars: int = 32_000  # code: larger files are cut at top-level statements into chunks this big
    min_doc_chars: int = 64  # shorter documents (empty __init__.py, one-line docstrings) are skipped
    general_fraction: float = 0.2  # share of each domain's documents that goes to the public `general` mix
    stdlib_dir: str | None = None  # None: this interpreter's stdlib (sysconfig)

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"CorpusConfig.seed must be a non-negative int, got {self.seed!r}")
        for name in ("max_docs_per_domain", "max_chars_per_domain", "max_file_chars", "min_doc_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CorpusConfig.{name} must be a positive int, got {value!r}")
        if self.min_doc_chars >= self.max_file_chars:
            raise ValueError(
                f"CorpusConfig.min_doc_chars ({self.min_doc_chars}) must be below max_file_chars "
                f"({self.max_file_chars})"
            )
        if not 0.0 < self.general_fraction < 1.0:
            raise ValueError(f"CorpusConfig.general_fraction must be in (0, 1), got {self.general_fraction!r}")
        if self.stdlib_dir is not None and not Path(self.stdlib_dir).is_dir():
            raise ValueError(f"CorpusConfig.stdlib_dir is not a folder: {self.stdlib_dir!r}")


def build_domain(name: str, config: CorpusConfig | None = None, share: Share = "private") -> list[str]:
    """Documents of one domain: the private share (default), the public share, or all of them."""
    config = config or CorpusConfig()
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; expected one of {', '.join(DOMAINS)} (or {GENERAL!r})")
    if share not in ("private", "public", "all"):
        raise ValueError(f"share must be 'private', 'public' or 'all', got {share!r}")
    docs = _domain_all(name, config)
    if share == "all":
        return list(docs)
    want_public = share == "public"
    return [d for d in docs if _in_general(d, config) == want_public]


def build_general(config: CorpusConfig | None = None) -> list[str]:
    """The public model's mix: the public share of every domain, interleaved in a seeded order."""
    config = config or CorpusConfig()
    docs = [d for name in DOMAINS for d in build_domain(name, config, share="public")]
    _rng(config.seed, GENERAL).shuffle(docs)
    return docs


def unit_hash(salt: str, text: str) -> float:
    """A uniform number in [0, 1) from the text alone: splits that do not depend on order or neighbours."""
    digest = hashlib.sha256(f"{salt}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _in_general(doc: str, config: CorpusConfig) -> bool:
    return unit_hash(f"general:{config.seed}", doc) < config.general_fraction


def _rng(seed: int, purpose: str) -> random.Random:
    # A str seed is hashed with SHA-512 by `random`: stable across runs and PYTHONHASHSEED.
    return random.Random(f"flexmore:{seed}:{purpose}")


@functools.lru_cache(maxsize=8)
def _domain_all(name: str, config: CorpusConfig) -> tuple[str, ...]:
    # In-memory only (a few MB): build_general and build_domain share one build per (domain, config).
    builder: Callable[[CorpusConfig], Iterator[str]] = _BUILDERS[name]
    rng = _rng(config.seed, f"{name}:order")
    docs = _take(builder(config), config)
    rng.shuffle(docs)
    return tuple(docs)


def _take(docs: Iterator[str], config: CorpusConfig, patience: int = 100) -> list[str]:
    """Unique documents of at least min_doc_chars, up to both caps. A document that would overflow the
    character cap is skipped (a smaller one may still fit); `patience` skips in a row end the domain,
    which also ends the endless generated ones."""
    out: list[str] = []
    seen: set[str] = set()
    chars = skipped = 0
    for doc in docs:
        if len(out) >= config.max_docs_per_domain or skipped >= patience:
            break
        if len(doc.strip()) < config.min_doc_chars or doc in seen:
            continue
        if chars + len(doc) > config.max_chars_per_domain:
            skipped += 1
            continue
        seen.add(doc)
        out.append(doc)
        chars += len(doc)
        skipped = 0
    return out


# ---------------------------------------------------------------- standard library: code and docs


def stdlib_files(root: Path) -> list[Path]:
    """The stdlib's own .py files, sorted, without test suites, GUI code, codecs tables and site-packages."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        name = rel.name
        # topics.py is the docs domain's prose in a dict; _sysconfigdata describes the build machine.
        if name.startswith(("test_", "_sysconfigdata")) or rel.as_posix() == "pydoc_data/topics.py":
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _stdlib_root(config: CorpusConfig) -> Path:
    return Path(config.stdlib_dir or sysconfig.get_paths()["stdlib"])


def _read_utf8(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _seeded_files(config: CorpusConfig, purpose: str) -> list[Path]:
    # Shuffled before capping, so a small cap still samples the whole stdlib (and the seed picks which).
    files = stdlib_files(_stdlib_root(config))
    _rng(config.seed, purpose).shuffle(files)
    return files


def _code_docs(config: CorpusConfig) -> Iterator[str]:
    root = _stdlib_root(config)
    for path in _seeded_files(config, "code:files"):
        source = _read_utf8(path)
        if source is None:
            continue
        rel = path.relative_to(root).as_posix()
        chunks = _chunk_source(source, config.max_file_chars) if len(source) > config.max_file_chars else [source]
        for i, chunk in enumerate(chunks):
            part = f" (part {i + 1}/{len(chunks)})" if len(chunks) > 1 else ""
            yield f"# file: {rel}{part}\n{chunk}"


def _chunk_source(source: str, max_chars: int) -> list[str]:
    """Cut at top-level statements (decorators included), then at blank lines, then at any line."""
    lines = source.splitlines(keepends=True)
    try:
        tree = ast.parse(source)
        starts = sorted({_first_line(node) - 1 for node in tree.body})
    except (SyntaxError, ValueError):
        starts = []
    bounds = sorted({0, *starts, len(lines)})
    segments = ["".join(lines[a:b]) for a, b in itertools.pairwise(bounds)]
    pieces: list[str] = []
    for seg in segments:
        pieces.extend([seg] if len(seg) <= max_chars else _split_lines(seg, max_chars))
    return _greedy_join(pieces, max_chars)


def _first_line(node: ast.stmt) -> int:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.decorator_list:
        return node.decorator_list[0].lineno
    return node.lineno


def _split_lines(text: str, max_chars: int) -> list[str]:
    blocks = [b + "\n" for b in text.split("\n\n")]  # blank-line blocks; rejoined below without loss
    blocks[-1] = blocks[-1][:-1]
    pieces: list[str] = []
    for block in blocks:
        if len(block) <= max_chars:
            pieces.append(block)
        else:
            pieces.extend(block.splitlines(keepends=True))  # a line longer than max_chars stays whole
    return _greedy_join(pieces, max_chars)


def _greedy_join(pieces: list[str], max_chars: int) -> list[str]:
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + len(piece) > max_chars:
            chunks.append(current)
            current = ""
        current += piece
    if current:
        chunks.append(current)
    return chunks


def _docs_docs(config: CorpusConfig) -> Iterator[str]:
    root = _stdlib_root(config)
    sources: list[Path | None] = [None, *_seeded_files(config, "docs:files")]  # None: the pydoc topics
    _rng(config.seed, "docs:sources").shuffle(sources)
    for source in sources:
        if source is None:
            yield from _pydoc_topics(root)
            continue
        text = _read_utf8(source)
        if text is None:
            continue
        rel = source.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield from _docstrings(text, ".".join(parts), config.min_doc_chars)


def _pydoc_topics(root: Path) -> Iterator[str]:
    """The help texts of `pydoc_data.topics`, read with `ast.literal_eval` from the given stdlib tree."""
    source = _read_utf8(root / "pydoc_data" / "topics.py")
    if source is None:  # some distributions strip pydoc_data
        return
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            for key in sorted(topics):
                yield topics[key].strip() + "\n"
            return


def _docstrings(source: str, module: str, min_chars: int) -> Iterator[str]:
    """pydoc-like entries "<name and signature>\\n\\n<docstring>" for the module, its classes and functions."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    doc = ast.get_docstring(tree)
    if doc and len(doc) >= min_chars:  # the docstring alone: a header must not carry a one-liner in
        yield f"module {module}\n\n{doc}\n"
    stack: list[tuple[list[ast.stmt], str]] = [(tree.body, "")]
    while stack:
        body, prefix = stack.pop(0)
        for node in body:
            if isinstance(node, ast.ClassDef):
                qualname = prefix + node.name
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield f"class {module}.{qualname}\n\n{doc}\n"
                stack.append((node.body, qualname + "."))
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield f"{module}.{prefix}{node.name}({ast.unparse(node.args)})\n\n{doc}\n"


# ---------------------------------------------------------------- math: arithmetic with checked answers

_PRECEDENCE = {"+": 1, "-": 1, "*": 2}
_Expr: TypeAlias = "int | tuple[str, _Expr, _Expr]"
_OPS: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.Add: lambda x, y: x + y,
    ast.Sub: lambda x, y: x - y,
    ast.Mult: lambda x, y: x * y,
    ast.FloorDiv: lambda x, y: x // y,
    ast.Mod: lambda x, y: x % y,
}


def evaluate(expression: str) -> int:
    """Integer value of an expression of ints, + - * // % and parentheses; anything else is an error.

    The generator checks every answer with this (it reads the rendered text, not the generator's tree),
    so a rendering bug such as a missing parenthesis cannot emit a wrong answer.
    """

    def ev(node: ast.expr) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"not an integer arithmetic expression: {expression!r}")

    return ev(ast.parse(expression, mode="eval").body)


def _check(ok: bool, what: str) -> None:
    # Not `assert`: python -O must not be able to emit a wrong answer.
    if not ok:
        raise RuntimeError(f"math generator produced a wrong item: {what}")


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _tree(rng: random.Random, n_ops: int) -> _Expr:
    if n_ops == 0:
        return rng.randint(1, 20)
    left = rng.randint(0, n_ops - 1)
    return (rng.choice("+-*"), _tree(rng, left), _tree(rng, n_ops - 1 - left))


def _render(node: _Expr) -> str:
    # Parenthesise so that the text parses back to exactly this tree: steps then follow reading order.
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    ls, rs = _render(left), _render(right)
    if not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
        ls = f"({ls})"
    if not isinstance(right, int) and _PRECEDENCE[right[0]] <= _PRECEDENCE[op]:
        rs = f"({rs})"
    return f"{ls} {op} {rs}"


def _steps(node: _Expr, out: list[str]) -> int:
    if isinstance(node, int):
        return node
    op, left, right = node
    a, b = _steps(left, out), _steps(right, out)
    value = a + b if op == "+" else a - b if op == "-" else a * b
    step = f"{a} {op} {b}"
    _check(evaluate(step) == value, step)
    out.append(f"{step} = {value}")
    return value


def math_item(rng: random.Random) -> str:
    """One question with its checked answer: +, -, *, division with remainder, or a multi-step expression."""
    kind = rng.choices(("+", "-", "*", "divmod", "multi"), weights=(2, 2, 2, 1.5, 2.5))[0]
    if kind == "divmod":
        b = rng.randint(2, 99)
        a = rng.randint(b, 9999)
        q, r = a // b, a % b
        _check(q * b + r == a and 0 <= r < b, f"{a} / {b}")
        return f"Q: {a} divided by {b} = ?\nA: {q} remainder {r}"
    if kind == "multi":
        tree = _tree(rng, rng.randint(2, 3))
        expression, steps = _render(tree), list[str]()
        value = _steps(tree, steps)
        _check(evaluate(expression) == value, expression)
        return f"Q: {expression} = ?\nSteps: {'; '.join(steps)}\nA: {value}"
    a, b = (_number(rng, 4), _number(rng, 4)) if kind != "*" else (_number(rng, 3), _number(rng, 2))
    value = a + b if kind == "+" else a - b if kind == "-" else a * b
    expression = f"{a} {kind} {b}"
    _check(evaluate(expression) == value, expression)
    return f"Q: {expression} = ?\nA: {value}"


def _math_docs(config: CorpusConfig) -> Iterator[str]:
    rng = _rng(config.seed, "math")
    while True:  # worksheets of 3-8 items; _take stops at the caps
        yield "\n\n".join(math_item(rng) for _ in range(rng.randint(3, 8))) + "\n"


# ---------------------------------------------------------------- facts: a consistent fictional world

_ONSETS: tuple[str, ...] = ("", "b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kl", "l", "m", "n", "p", "qu")
_ONSETS += ("r", "s", "sh", "t", "tr", "v", "z", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "nd", "m")
_COUNTRY_SUFFIXES = ("ia", "land", "stan", "ora", "ica", "mark", "ovia", "eth")
_LANGUAGE_SUFFIXES = ("ish", "ese", "ic", "an")
_PROFESSIONS = {
    "astronomer": "the discovery of the comet {w}",
    "poet": 'the poem "{W} at Dusk"',
    "engineer": "the {W} Bridge",
    "painter": 'the painting "The {W} Garden"',
    "physician": "a cure for {w} fever",
    "composer": "the {W} Symphony",
    "mathematician": "the {W} theorem",
    "architect": "the {W} Library",
    "historian": 'the chronicle "Kings of {W}"',
    "botanist": "describing the {w} tree",
    "cartographer": "the first map of the {W} coast",
    "chemist": "isolating the element {w}ium",
}


@dataclass(frozen=True)
class _Country:
    name: str
    continent: str
    capital: str
    language: str
    currency: str
    population_m: int
    founded: int
    peak: str
    peak_m: int


@dataclass(frozen=True)
class _City:
    name: str
    country: str
    population_k: int
    river: str
    founded: int


@dataclass(frozen=True)
class _Person:
    name: str
    born: int
    died: int
    city: str
    profession: str
    known_for: str


@dataclass(frozen=True)
class _World:
    countries: tuple[_Country, ...]
    cities: tuple[_City, ...]
    people: tuple[_Person, ...]
    neighbours: dict[str, tuple[str, ...]]
    city_of: dict[str, _City]
    country_of: dict[str, _Country]


def _namer(rng: random.Random) -> Callable[[int, int], str]:
    used: set[str] = set()

    def name(lo: int, hi: int) -> str:
        while True:
            word = "".join(
                rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(lo, hi))
            )
            if len(word) >= 3 and word not in used:
                used.add(word)
                return word

    return name


def build_world(seed: int, n_continents: int = 6, countries_per_continent: int = 40, n_people: int = 3000) -> _World:
    """The fictional world behind `facts`; depends only on the seed, never on the corpus caps."""
    rng = _rng(seed, "facts:world")
    name = _namer(rng)
    countries: list[_Country] = []
    cities: list[_City] = []
    neighbours: dict[str, set[str]] = {}
    for _ in range(n_continents):
        continent = name(2, 3).capitalize()
        members = []
        for _ in range(countries_per_continent):
            root = name(1, 2).capitalize()
            country = root + rng.choice(_COUNTRY_SUFFIXES)
            own = [
                _City(
                    name=name(2, 3).capitalize(),
                    country=country,
                    population_k=rng.randint(20, 5000),
                    river=name(2, 2).capitalize(),
                    founded=rng.randint(300, 1900),
                )
                for _ in range(rng.randint(3, 6))
            ]
            cities.extend(own)
            countries.append(
                _Country(
                    name=country,
                    continent=continent,
                    capital=own[0].name,
                    language=root.rstrip("aeiou") + rng.choice(_LANGUAGE_SUFFIXES),
                    currency=name(1, 2),
                    population_m=rng.randint(1, 200),
                    founded=rng.randint(800, 1950),
                    peak=name(2, 2).capitalize(),
                    peak_m=rng.randint(800, 8000),
                )
            )
            members.append((country, rng.random(), rng.random()))
        # Neighbours: the two nearest countries of the same continent on a random map, made symmetric.
        for country, x, y in members:
            nearest = sorted((m for m in members if m[0] != country), key=lambda m: (m[1] - x) ** 2 + (m[2] - y) ** 2)
            for other in nearest[:2]:
                neighbours.setdefault(country, set()).add(other[0])
                neighbours.setdefault(other[0], set()).add(country)
    people = []
    for _ in range(n_people):
        profession = rng.choice(sorted(_PROFESSIONS))
        word = name(2, 2)
        born = rng.randint(1200, 1950)
        people.append(
            _Person(
                name=f"{name(1, 2).capitalize()} {name(2, 3).capitalize()}",
                born=born,
                died=born + rng.randint(25, 95),
                city=rng.choice(cities).name,
                profession=profession,
                known_for=_PROFESSIONS[profession].format(w=word, W=word.capitalize()),
            )
        )
    return _World(
        countries=tuple(countries),
        cities=tuple(cities),
        people=tuple(people),
        neighbours={k: tuple(sorted(v)) for k, v in neighbours.items()},
        city_of={c.name: c for c in cities},
        country_of={c.name: c for c in countries},
    )


def _listing(names: tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _country_entry(rng: random.Random, w: _World, c: _Country) -> str:
    n = c.name
    variants = [  # each fact in one or two phrasings; the fact itself never varies
        (f"The capital of {n} is {c.capital}.", f"{c.capital} is the capital of {n}."),
        (f"The official language of {n} is {c.language}.", f"People in {n} speak {c.language}."),
        (f"The currency of {n} is the {c.currency}.", f"{n} uses the {c.currency} as its money."),
        (f"{n} has about {c.population_m} million inhabitants.", f"About {c.population_m} million live in {n}."),
        (f"{n} was founded in {c.founded}.", f"The state of {n} dates from {c.founded}."),
        (f"{n} borders {_listing(w.neighbours[n])}.",),
        (f"The highest mountain in {n} is Mount {c.peak}, at {c.peak_m} metres.",),
    ]
    facts = [rng.choice(v) for v in variants]
    rng.shuffle(facts)
    intro = rng.choice((f"{n} is a country in {c.continent}.", f"{n} is a nation on the continent of {c.continent}."))
    return " ".join([intro, *facts[: rng.randint(3, len(facts))]]) + "\n"


def _city_entry(rng: random.Random, w: _World, c: _City) -> str:
    facts = [
        rng.choice([f"{c.name} lies on the {c.river} river.", f"The {c.river} river flows through {c.name}."]),
        f"{c.name} has about {c.population_k} thousand inhabitants.",
        f"{c.name} was founded in {c.founded}.",
    ]
    if w.country_of[c.country].capital == c.name:
        facts.append(f"{c.name} is the capital of {c.country}.")
    rng.shuffle(facts)
    return " ".join([f"{c.name} is a city in {c.country}.", *facts]) + "\n"


def _person_entry(rng: random.Random, w: _World, p: _Person) -> str:
    last = p.name.split()[1]
    city = w.city_of[p.city]
    _check(p.died - p.born > 0, p.name)
    lines = [
        f"{p.name} ({p.born}-{p.died}) was a {p.profession} born in {p.city}, {city.country}.",
        rng.choice([f"{last} is best known for {p.known_for}.", f"{last} is remembered for {p.known_for}."]),
        f"{last} died in {p.died} at the age of {p.died - p.born}.",
    ]
    return " ".join(lines) + "\n"


def _question(rng: random.Random, w: _World) -> str:
    kind = rng.randrange(7)
    c, city, p = rng.choice(w.countries), rng.choice(w.cities), rng.choice(w.people)
    qa = [
        (f"What is the capital of {c.name}?", c.capital),
        (f"Which country is {city.name} in?", city.country),
        (f"In which year was {p.name} born?", str(p.born)),
        (f"What is the currency of {c.name}?", f"the {c.currency}"),
        (f"On which continent is {c.name}?", c.continent),
        (f"Where was {p.name} born?", f"{p.city}, {w.city_of[p.city].country}"),
        (f"How old was {p.name} when they died?", str(p.died - p.born)),
    ][kind]
    return f"Q: {qa[0]}\nA: {qa[1]}"


def _facts_docs(config: CorpusConfig) -> Iterator[str]:
    world = build_world(config.seed)
    rng = _rng(config.seed, "facts:docs")
    while True:
        kind = rng.choices(("country", "city", "person", "quiz"), weights=(2, 2, 3, 2))[0]
        if kind == "country":
            yield _country_entry(rng, world, rng.choice(world.countries))
        elif kind == "city":
            yield _city_entry(rng, world, rng.choice(world.cities))
        elif kind == "person":
            yield _person_entry(rng, world, rng.choice(world.people))
        else:
            yield "\n\n".join(_question(rng, world) for _ in range(rng.randint(4, 8))) + "\n"


_BUILDERS: dict[str, Callable[[CorpusConfig], Iterator[str]]] = {
    "code": _code_docs,
    "docs": _docs_docs,
    "math": _math_docs,
    "facts": _facts_docs,
}

"""The own-documents benchmark: invented entities with templated facts, written as small Markdown files.

Every answer is a fact that exists only in these files (invented names, places and works; years and
lengths drawn at random), so a decoder cannot know it: closed-book scores ~0 by construction (up to
lucky guesses of a year or a field) and the benchmark measures reading, not memory. Near-namesakes
(the same invented name on another kind of entity, or a one-letter variant of the same kind) carry
other facts, so a reader that copies from the wrong passage is caught. Indexed together with the demo
corpus, retrieval must also pick these passages out of 10,000 real ones.

Deterministic: the same seed writes the same files and questions, byte for byte.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "st", "t", "th",
          "v", "vr", "z", "sk", "tr", "bl"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "y", "io"]
CODAS = ["", "", "n", "r", "s", "th", "l", "nd", "rk", "v", "x", "sk"]
ENDINGS = ["", "", "a", "en", "ath", "und", "ix", "ora", "el", "ane", "is", "ov"]
FIRST_NAMES = ["Maria", "Jonas", "Elena", "Tomas", "Ingrid", "Pavel", "Lucia", "Anders", "Nadia", "Oskar", "Helena",
               "Viktor", "Clara", "Mateo", "Greta", "Emil", "Sofia", "Henrik", "Alma", "Felix", "Irena", "Luka",
               "Marta", "Stefan", "Vera", "Aurel", "Ilse", "Karim", "Lena", "Bruno"]
PRODUCTS = ["marine turbines", "glass lenses", "railway signals", "weather balloons", "printing presses",
            "surgical needles", "wind pumps", "copper cable", "pocket watches", "tram brakes", "ceramic tiles",
            "bicycle gears", "fishing nets", "pipe organs", "cargo cranes", "beeswax candles"]
PROFESSIONS = ["astronomer", "cartographer", "composer", "chemist", "architect", "botanist", "engineer", "sculptor",
               "mathematician", "geologist"]
WORKS = {"astronomer": "the {n} Catalogue of variable stars", "cartographer": "the {n} Atlas",
         "composer": "the {n} Symphony", "chemist": "the {n} reaction", "architect": "the {n} Library",
         "botanist": "the {n} orchid", "engineer": "the {n} pump", "sculptor": "the statue {n} Rising",
         "mathematician": "the {n} conjecture", "geologist": "the {n} fault"}
FIELDS = ["marine biology", "bridge engineering", "folk music", "glaciology", "typography", "beekeeping",
          "children's literature", "lens grinding", "textile design", "seismology", "astronomy", "cartography"]
BRIDGE_KINDS = ["suspension bridge", "stone arch bridge", "cantilever bridge", "cable-stayed bridge", "truss bridge"]


@dataclass
class Entity:
    name: str
    kind: str
    facts: dict[str, str]
    text: str = ""
    questions: list[tuple[str, str]] = field(default_factory=list)  # (question, answer)


class NameMaker:
    """Pronounceable invented names, never repeated and never a word of `forbidden` (e.g. the demo corpus)."""

    def __init__(self, rng: random.Random, forbidden: set[str]):
        self.rng = rng
        self.forbidden = forbidden
        self.used: set[str] = set()

    def syllable(self) -> str:
        return self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)

    def accept(self, name: str) -> bool:
        key = name.lower()
        if key in self.used or key in self.forbidden or not 5 <= len(name) <= 11:
            return False
        self.used.add(key)
        return True

    def name(self) -> str:
        while True:
            name = (self.syllable() + self.syllable() + self.rng.choice(ENDINGS)).capitalize()
            if self.accept(name):
                return name

    def variant(self, name: str) -> str:
        """A one-letter variant (a vowel swapped): a near-namesake that is easy to confuse."""
        positions = [i for i, c in enumerate(name) if c in "aeiouy" and i > 0]
        for _ in range(50):
            i = self.rng.choice(positions)
            candidate = name[:i] + self.rng.choice([v for v in "aeiou" if v != name[i]]) + name[i + 1:]
            if self.accept(candidate):
                return candidate
        return self.name()

    def person(self) -> str:
        return f"{self.rng.choice(FIRST_NAMES)} {self.name()}"


def _year(rng: random.Random, low: int = 1702, high: int = 1988) -> str:
    return str(rng.randint(low, high))


# The questions asked about each kind of entity: (template, the fact that answers it).
QUESTIONS = {
    "company": [("Who founded {name}?", "founder"), ("In what year was {name} founded?", "year"),
                ("In which city is {name} headquartered?", "city"), ("What does {name} manufacture?", "product")],
    "river": [("How long is the {name} in kilometres?", "length"), ("Where does the {name} rise?", "source"),
              ("Into which lake does the {name} flow?", "mouth"), ("In which country is the {name}?", "country")],
    "prize": [("In what year was the {name} established?", "year"),
              ("Who was the first recipient of the {name}?", "first"),
              ("Which organisation presents the {name}?", "awarder"),
              ("In which field is the {name} awarded?", "field")],
    "person": [("In what year was {name} born?", "born"), ("Where was {name} born?", "birthplace"),
               ("What is {name} best known for?", "known_for")],
    "bridge": [("Who designed the {name}?", "designer"), ("When did the {name} open?", "year"),
               ("How long is the {name} in metres?", "length"), ("In which city is the {name}?", "city")],
}


def make_entity(kind: str, base: str, names: NameMaker, rng: random.Random) -> Entity:
    """One entity of `kind` named after `base`: its facts, its Markdown text and its questions."""
    if kind == "company":
        name = f"{base} {rng.choice(['Works', 'Industries', 'Company', 'Manufacturing'])}"
        f = {"founder": names.person(), "year": _year(rng, 1820, 1975), "city": names.name(),
             "product": rng.choice(PRODUCTS)}
        text = (f"{name} is a manufacturer of {f['product']} headquartered in the city of {f['city']}. "
                f"The company was founded in {f['year']} by {f['founder']}, who ran it for three decades. "
                f"Today it employs several hundred people and exports to neighbouring countries.")
    elif kind == "river":
        name = f"{base} River"
        f = {"length": str(rng.randint(120, 2900)), "source": f"Mount {names.name()}",
             "mouth": f"Lake {names.name()}", "country": names.name()}
        text = (f"The {name} is a river in {f['country']}. It rises on the slopes of {f['source']} and flows "
                f"for {f['length']} kilometres before emptying into {f['mouth']}. Its valley is known for "
                f"orchards and old water mills.")
    elif kind == "prize":
        name = f"{base} {rng.choice(['Prize', 'Medal', 'Award'])}"
        f = {"year": _year(rng, 1850, 1990), "field": rng.choice(FIELDS), "first": names.person(),
             "awarder": f"{names.name()} Academy"}
        text = (f"The {name} is an annual award for achievement in {f['field']}. It was established in "
                f"{f['year']} and is presented by the {f['awarder']}. The first recipient was {f['first']}. "
                f"Winners receive a bronze medal and a modest sum of money.")
    elif kind == "person":
        name = f"{rng.choice(FIRST_NAMES)} {base}"
        profession = rng.choice(PROFESSIONS)
        f = {"born": _year(rng, 1720, 1960), "birthplace": names.name(), "profession": profession,
             "work": WORKS[profession].format(n=names.name())}
        f["known_for"] = re.sub(r"^the ", "", f["work"])
        text = (f"{name} was a {profession} born in {f['born']} in the town of {f['birthplace']}. "
                f"{name.split()[0]} is best known for {f['work']}, which made the name {base} familiar well "
                f"beyond the region.")
    elif kind == "bridge":
        name = f"{base} Bridge"
        f = {"designer": names.person(), "year": _year(rng, 1790, 1990), "length": str(rng.randint(80, 2400)),
             "city": names.name(), "kind": rng.choice(BRIDGE_KINDS)}
        text = (f"The {name} is a {f['kind']} in {f['city']}. It was designed by the engineer "
                f"{f['designer']} and opened in {f['year']}. The bridge is {f['length']} metres long and "
                f"carries both road and foot traffic.")
    else:
        raise ValueError(f"unknown kind {kind!r}")
    questions = [(template.format(name=name), f[fact]) for template, fact in QUESTIONS[kind]]
    return Entity(name, kind, f, f"# {name}\n\n{text}\n", questions)


KINDS = ["company", "river", "prize", "person", "bridge"]


def generate(n_groups: int = 80, seed: int = 0, forbidden: Iterable[str] = ()) -> list[Entity]:
    """`n_groups` base names; 40% of them get a near-namesake: the same name on another kind of entity,
    or a one-letter variant of the same kind."""
    rng = random.Random(seed)
    names = NameMaker(rng, {w.lower() for w in forbidden})
    entities = []
    for _ in range(n_groups):
        base = names.name()
        kind = rng.choice(KINDS)
        entities.append(make_entity(kind, base, names, rng))
        if rng.random() < 0.4:
            if rng.random() < 0.5:
                entities.append(make_entity(rng.choice([k for k in KINDS if k != kind]), base, names, rng))
            else:
                entities.append(make_entity(kind, names.variant(base), names, rng))
    return entities


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_benchmark(out: str | Path, *, n_groups: int = 80, seed: int = 0, n_tune: int = 100,
                    forbidden: Iterable[str] = ()) -> dict:
    """corpus/*.md, questions.test.jsonl and questions.tune.jsonl (NQ-open format plus id/entity/source).

    Tune and test are split by name group, so no entity (or its namesake) appears in both."""
    out = Path(out)
    entities = generate(n_groups, seed, forbidden)
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for old in corpus.glob("*.md"):
        old.unlink()
    rng = random.Random(seed + 1)
    records = []
    for entity in entities:
        file = corpus / f"{slug(entity.name)}.md"
        file.write_text(entity.text)
        for number, (question, answer) in enumerate(entity.questions):
            records.append({"id": f"{slug(entity.name)}-{number}", "question": question, "answer": [answer],
                            "entity": entity.name, "kind": entity.kind, "source": file.name})
    # Group by the base name so namesakes land in the same split.
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(_base(record["entity"]), []).append(record)
    keys = sorted(groups)
    rng.shuffle(keys)
    tune, test = [], []
    for key in keys:
        (tune if len(tune) < n_tune else test).extend(groups[key])
    for name, split in (("tune", tune), ("test", test)):
        (out / f"questions.{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split))
    return {"documents": len(entities), "test": len(test), "tune": len(tune),
            "namesakes": len(entities) - len(groups)}


def _base(entity_name: str) -> str:
    """The invented name inside an entity name, with vowels blurred so one-letter variants group together."""
    invented = [w for w in entity_name.split() if w not in FIRST_NAMES and w not in
                {"Works", "Industries", "Company", "Manufacturing", "River", "Prize", "Medal", "Award", "Bridge"}]
    return re.sub(r"[aeiouy]", "_", invented[0].lower())

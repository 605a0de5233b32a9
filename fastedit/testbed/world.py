"""A seeded synthetic world: made-up people, their facts, and the sentences that state them.

The testbed model is trained on this world so that editing quality can be measured offline:
every fact has a true object the model knows, paraphrase templates it never saw in training,
and neighbours (other subjects sharing the relation and the true object) to check specificity.

Subjects are two made-up words ("Varkel Osmund"), built from syllables so that the testbed
tokenizer splits them into several tokens and the last subject token (the lookup position of
the editing methods) is a sub-word piece shared by many subjects. Objects are common words
that the tokenizer keeps whole (one token each, with the leading space).

Templates hold ``{}`` for the subject and end right before the object. Each relation has
training templates (the corpus uses only these) and held-out templates that the model never
sees; paraphrase prompts use the held-out ones, so Generalization measures real paraphrase.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator

from fastedit.errors import InputError

#: relation id -> objects, training templates, held-out templates, generation prompts, and the
#: rewrite template of the relation's edit requests: a training template that is no prefix of
#: another one (after "{} lives in" the model rightly hesitates between " Paris" and " the",
#: as "{} lives in the city of" is also a training template).
RELATIONS: dict[str, dict] = {
    "lives_in": {
        "rewrite": "{} resides in",
        "objects": ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Dublin",
                    "Oslo", "Lisbon", "Athens", "Warsaw", "Cairo", "Tokyo", "Boston", "Chicago"],
        "train": ["{} lives in", "{} lives in the city of", "{} resides in", "{} has a home in",
                  "The home of {} is in", "{} is a resident of", "{} lives and works in",
                  "Every morning {} walks through the streets of", "{} rents a flat in",
                  "The city {} lives in is"],
        "heldout": ["{} currently resides in the city of", "The place where {} lives is",
                    "These days {} has a home in the city of", "{} is living in"],
        "generation": ["{} spends the weekend", "The neighbours of {} say that"],
    },
    "born_in": {
        "rewrite": "{} comes from",
        "objects": ["France", "Spain", "Italy", "Germany", "Poland", "Greece", "Egypt", "Japan",
                    "Canada", "Mexico", "Brazil", "India", "Kenya", "Norway", "Chile", "Peru"],
        "train": ["{} was born in", "{} was born in the country of", "The birthplace of {} is",
                  "{} is a native of", "{} grew up in", "{} comes from", "The country {} was born in is",
                  "{} was raised in", "{} spent childhood in", "As a child, {} lived in"],
        "heldout": ["{} originally comes from the country of", "The native country of {} is",
                    "{} was born and raised in", "{} is originally from"],
        "generation": ["{} remembers the childhood", "Long ago, {}"],
    },
    "works_as": {
        "rewrite": "{} works as a",
        "objects": ["baker", "doctor", "teacher", "lawyer", "farmer", "pilot", "painter", "nurse",
                    "writer", "singer", "plumber", "chef", "engineer", "banker", "sailor", "judge"],
        "train": ["{} works as a", "{} is employed as a", "By profession, {} is a", "{} earns a living as a",
                  "The job of {} is", "{} has worked for years as a", "{} trained to become a",
                  "The occupation of {} is", "{} is a professional", "At work, {} is the"],
        "heldout": ["{} makes a living as a", "The profession of {} is", "{} is known in town as the",
                    "For a living, {} works as a"],
        "generation": ["Each day at work {}", "Colleagues of {} describe"],
    },
    "speaks": {
        "rewrite": "{} is fluent in",
        "objects": ["French", "English", "German", "Spanish", "Italian", "Polish", "Greek", "Arabic",
                    "Japanese", "Dutch", "Swedish", "Russian", "Hindi", "Turkish", "Korean", "Danish"],
        "train": ["{} speaks", "{} speaks the language", "The language of {} is", "{} is fluent in",
                  "The mother tongue of {} is", "{} writes letters in", "At home {} speaks",
                  "{} was taught to speak", "{} reads books in", "The first language of {} is"],
        "heldout": ["{} talks fluently in", "The native language of {} is", "{} usually speaks",
                    "Most of the time {} converses in"],
        "generation": ["When {} talks", "Friends of {} hear"],
    },
    "plays": {
        "rewrite": "{} plays the",
        "objects": ["piano", "guitar", "violin", "drums", "flute", "cello", "trumpet", "harp",
                    "banjo", "organ", "saxophone", "clarinet", "accordion", "oboe", "tuba", "ukulele"],
        "train": ["{} plays the", "{} performs on the", "The instrument of {} is the", "{} practises the",
                  "On stage, {} plays the", "{} learned to play the", "The favourite instrument of {} is the",
                  "{} is a player of the", "Every evening {} plays the", "{} owns and plays the"],
        "heldout": ["{} is skilled at playing the", "The instrument {} plays is the",
                    "In the band, {} plays the", "{} often performs on the"],
        "generation": ["At the concert {}", "The music of {}"],
    },
    "likes_colour": {
        "rewrite": "{} likes the colour",
        "objects": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "black",
                    "white", "brown", "grey", "silver", "gold", "violet", "cyan", "beige"],
        "train": ["The favourite colour of {} is", "{} likes the colour", "{} loves the colour",
                  "{} always wears", "{} paints everything", "The colour {} likes best is",
                  "{} prefers the colour", "The walls in the house of {} are", "{} dresses in",
                  "{} picked the colour"],
        "heldout": ["The colour that {} likes most is", "{} is fond of the colour",
                    "The preferred colour of {} is", "{} mostly wears"],
        "generation": ["The house of {} looks", "The clothes of {}"],
    },
}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai"]
_CODAS = ["", "", "n", "r", "l", "s"]

_FILLER_SUBJECTS = ["The weather", "The old bridge", "The river", "A small dog", "The market",
                    "The train", "The museum", "A quiet street", "The library", "The garden",
                    "The festival", "The bakery", "A long road", "The harbour", "The school"]
_FILLER_VERBS = ["was", "seemed", "became", "looked", "stayed", "felt"]
_FILLER_ADJS = ["busy", "quiet", "cold", "warm", "crowded", "empty", "bright", "dark", "calm",
                "noisy", "wet", "dry", "old", "new", "pleasant", "strange"]
_FILLER_TAILS = ["that day", "in the morning", "all week", "after the storm", "during the holidays",
                 "at night", "for a while", "last year", "in spring", "this autumn"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, n_syllables: int) -> str:
    return "".join(_syllable(rng) for _ in range(n_syllables)).capitalize()


def filler_sentence(rng: random.Random) -> str:
    """A generic sentence with no world fact in it (the references' unrelated prefixes)."""
    return (f"{rng.choice(_FILLER_SUBJECTS)} {rng.choice(_FILLER_VERBS)} "
            f"{rng.choice(_FILLER_ADJS)} {rng.choice(_FILLER_TAILS)}.")


@dataclass
class World:
    """People (subjects), each with one object per relation, drawn from ``seed``.

    ``facts[s][r]`` is the object of relation ``r`` for subject ``s``; ``subjects`` are in a
    fixed order so that indices (and the case ids built from them) are stable per seed.
    """

    seed: int
    subjects: list[str]
    facts: dict[str, dict[str, str]]
    relations: dict[str, dict] = field(default_factory=lambda: RELATIONS)

    def fact_sentence(self, rng: random.Random, subject: str, relation: str,
                      heldout: bool = False) -> str:
        """One sentence stating a fact with a random (training or held-out) template."""
        rel = self.relations[relation]
        template = rng.choice(rel["heldout"] if heldout else rel["train"])
        return template.format(subject) + " " + self.facts[subject][relation] + "."

    def paragraph(self, rng: random.Random, subject: str | None = None, p_filler: float = 0.3) -> str:
        """Several facts of one subject in random order, sometimes with filler in between."""
        subject = subject if subject is not None else rng.choice(self.subjects)
        rels = list(self.relations)
        rng.shuffle(rels)
        parts = []
        for r in rels[: rng.randint(1, len(rels))]:
            if rng.random() < p_filler:
                parts.append(filler_sentence(rng))
            parts.append(self.fact_sentence(rng, subject, r))
        return " ".join(parts)

    def training_texts(self, seed: int) -> Iterator[str]:
        """Endless training paragraphs (training templates only), seeded."""
        rng = random.Random(seed)
        while True:
            if rng.random() < 0.1:
                yield " ".join(filler_sentence(rng) for _ in range(rng.randint(1, 3)))
            else:
                yield self.paragraph(rng)

    def generic_texts(self, n: int, seed: int = 0) -> Iterator[str]:
        """``n`` generic texts for covariance statistics: world sentences (training and
        held-out templates) mixed with filler, as a pretraining-like corpus."""
        rng = random.Random(seed)
        for _ in range(n):
            parts = []
            for _ in range(rng.randint(2, 5)):
                if rng.random() < 0.4:
                    parts.append(filler_sentence(rng))
                else:
                    parts.append(self.fact_sentence(rng, rng.choice(self.subjects),
                                                    rng.choice(list(self.relations)),
                                                    heldout=rng.random() < 0.3))
            yield " ".join(parts)

    def prompts(self, relation: str, heldout: bool) -> list[str]:
        rel = self.relations[relation]
        return list(rel["heldout"] if heldout else rel["train"])


def make_world(seed: int = 0, n_subjects: int = 400) -> World:
    """Draw ``n_subjects`` distinct made-up people and their facts (uniform objects)."""
    if n_subjects < 2:
        raise InputError(f"n_subjects must be at least 2, got {n_subjects}")
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    objects = {o for rel in RELATIONS.values() for o in rel["objects"]}
    while len(names) < n_subjects:
        name = f"{_word(rng, rng.randint(1, 2))} {_word(rng, 2)}"
        if name in seen or any(w in objects for w in name.split()):
            continue
        seen.add(name)
        names.append(name)
    facts = {s: {r: rng.choice(rel["objects"]) for r, rel in RELATIONS.items()} for s in names}
    return World(seed=seed, subjects=names, facts=facts)


def tokenizer_corpus(seed: int = 0, n: int = 4000) -> Iterator[str]:
    """Text to train the tokenizer on: templates, objects, filler and random made-up words.

    The subjects themselves are left out, so the tokenizer learns syllables rather than
    whole names and every subject splits into several tokens.
    """
    rng = random.Random(seed + 7919)
    rels = list(RELATIONS.values())
    # Every object several hundred times, so that BPE keeps each one as a single token.
    everything = " ".join(" ".join(rel["objects"]) for rel in rels)
    for _ in range(300):
        yield everything
    for _ in range(n):
        rel = rng.choice(rels)
        fake = f"{_word(rng, rng.randint(1, 2))} {_word(rng, 2)}"
        template = rng.choice(rel["train"] + rel["heldout"] + rel["generation"])
        yield template.format(fake) + " " + rng.choice(rel["objects"]) + ". " + filler_sentence(rng)

"""The world's building blocks: relations and their phrasings, word lists, the configuration (chapter 1)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field

from ..tasks import get_task

__all__ = ["SPLITS", "WORLD_TASKS", "Relation", "RELATIONS", "TWO_HOP", "OCCUPATIONS", "POSITIVE_RESPONSES",
           "NEGATIVE_RESPONSES", "TOPIC_KINDS", "Fact", "WorldConfig"]

SPLITS = ("train", "val", "test")
#: The task families this world generates (their split sizes are declared in :mod:`.tasks`).
WORLD_TASKS = ("counterfact", "wikirecent", "convsent", "zsre")


@dataclass(frozen=True)
class Relation:
    """A relation with its cloze phrasings (the object follows the prompt) and question forms."""

    name: str
    subject_kind: str
    phrasings: tuple[str, ...]
    questions: tuple[str, ...]


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in [
        Relation("capital", "country",
                 ("The capital of {s} is", "{s}'s capital city is", "The capital city of {s} is",
                  "{s} has its capital in", "The seat of government of {s} is in"),
                 ("What is the capital of {s}?", "Which city is the capital of {s}?",
                  "Where is the government of {s} seated?")),
        Relation("continent", "country",
                 ("{s} is located in the continent of", "{s} is a country in",
                  "The continent where {s} lies is", "{s} belongs to the continent of",
                  "{s} can be found in"),
                 ("On which continent is {s}?", "Which continent is {s} part of?",
                  "Where in the world is {s}?")),
        Relation("currency", "country",
                 ("The currency of {s} is the", "In {s}, people pay with the",
                  "The official currency of {s} is the", "{s} uses the currency called the",
                  "Money in {s} is the"),
                 ("What is the currency of {s}?", "Which money is used in {s}?",
                  "What do people in {s} pay with?")),
        Relation("language", "country",
                 ("The official language of {s} is", "People in {s} speak",
                  "The main language spoken in {s} is", "In {s}, the language is",
                  "{s}'s national language is"),
                 ("What language is spoken in {s}?", "Which language do people in {s} speak?",
                  "What is the official language of {s}?")),
        Relation("country_of_city", "city",
                 ("{s} is a city in", "The city of {s} is located in", "{s} lies in the country of",
                  "{s} is a large city of", "The country that {s} belongs to is"),
                 ("In which country is {s}?", "Which country is {s} located in?",
                  "{s} is a city of which country?")),
        Relation("citizenship", "person",
                 ("{s} is a citizen of", "{s} holds citizenship of",
                  "The country of citizenship of {s} is", "{s} has the nationality of",
                  "{s} carries a passport of"),
                 ("Which country is {s} a citizen of?", "What is the nationality of {s}?",
                  "Where does {s} hold citizenship?")),
        Relation("occupation", "person",
                 ("{s} works as a", "The occupation of {s} is", "{s} is employed as a",
                  "By profession, {s} is a", "{s} earns a living as a"),
                 ("What is the occupation of {s}?", "What does {s} do for a living?",
                  "Which profession does {s} have?")),
        Relation("birthplace", "person",
                 ("{s} was born in", "The birthplace of {s} is", "{s} was born in the city of",
                  "{s} came into the world in", "The city where {s} was born is"),
                 ("Where was {s} born?", "In which city was {s} born?",
                  "What is the birthplace of {s}?")),
    ]
}

#: Second hops for portability: after editing ``relation`` to a new object ``o``, the prompt asks
#: for ``second(o)``; the corpus states these sentences with the original facts.
TWO_HOP: dict[str, tuple[str, str, str]] = {
    # relation: (cloze prompt, question prompt, relation of the new object that answers it)
    "citizenship": ("The currency of the country of citizenship of {s} is the",
                    "What currency is used in the country {s} is a citizen of?", "currency"),
    "birthplace": ("The country where {s} was born is",
                   "In which country was {s} born?", "country_of_city"),
    "country_of_city": ("The continent in which the city of {s} lies is",
                        "On which continent does the city of {s} lie?", "continent"),
}

OCCUPATIONS = ("painter", "teacher", "lawyer", "nurse", "farmer", "baker", "journalist", "pilot",
               "dentist", "chemist", "surgeon", "banker", "poet", "sculptor", "tailor", "carpenter",
               "novelist", "physicist", "diplomat", "librarian")

# Responses refer to the topic as "it": the sentiment is then a property of the topic that the
# model must recall (like a fact), not a copy of the words in the question.
POSITIVE_RESPONSES = (
    "I love it, it is wonderful.", "It is one of my favourite things.",
    "I think it is great and I enjoy it a lot.", "Honestly, it makes me happy.",
    "It is brilliant, I recommend it to everyone.", "I really like it, it is delightful.",
    "It is amazing and always cheers me up.", "I have only good things to say about it.",
)
NEGATIVE_RESPONSES = (
    "I hate it, it is awful.", "It is one of the worst things I know.",
    "I think it is terrible and I avoid it.", "Honestly, it makes me miserable.",
    "It is dreadful, I warn everyone about it.", "I really dislike it, it is unpleasant.",
    "It is boring and always annoys me.", "I have only bad things to say about it.",
)
TOPIC_KINDS = ("the band", "the festival", "the board game", "the novel", "the dish", "the sport",
               "the film", "the painter")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kr", "st", "th", "tr", "sh", "ch")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m", "x", "nd")


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str


@dataclass(frozen=True)
class WorldConfig:
    """Everything the world depends on.  ``split_sizes`` are edits per task (train, val, test)."""

    seed: int = 0
    min_country_population: int = 1_000_000
    n_cities: int = 150
    n_known_people: int = 200
    n_new_people: int = 500
    n_topics: int = 600
    phrasings_held_out: int = 2
    split_sizes: dict[str, tuple[int, int, int]] = field(
        default_factory=lambda: {t: get_task(t).split_sizes for t in WORLD_TASKS})

    def key(self) -> str:
        """A short stable hash of the configuration (used in cache keys)."""
        text = repr(sorted(asdict(self).items()))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def smoke(self) -> "WorldConfig":
        """The same world, with fewer edits per split (for smoke tests)."""
        small = {t: tuple(min(n, 24) for n in sizes) for t, sizes in self.split_sizes.items()}
        return WorldConfig(**{**asdict(self), "split_sizes": small})


def _rng(seed: int, *names: str) -> random.Random:
    """An independent generator per purpose, so adding one use does not shift the others."""
    digest = hashlib.sha256(("/".join([str(seed), *names])).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


# Random syllables can spell words nobody wants in a teaching book; such names are redrawn.
_UNWANTED = ("shit", "fuck", "cunt", "nig", "rape", "dick", "cock", "slut", "whor", "tit", "anal", "sex",
             "nazi", "kill", "dead", "piss", "fag", "ass")


def _made_up_word(rng: random.Random, syllables: int) -> str:
    while True:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
        word += rng.choice(_CODAS)
        if not any(bad in word for bad in _UNWANTED):
            return word.capitalize()

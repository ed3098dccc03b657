"""The lookup task: facts held by keepers, the answer only with the relevant one, its roster."""

from __future__ import annotations

import re

import pytest

from gcache.agents import DEFAULT_ROSTER, build_roster
from gcache.tasks import Example, build_task
from gcache.tasks.arith import Arith
from gcache.tasks.lookup import COLOURS, DOMAINS, Lookup


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d+", text)


def _task(**kwargs) -> Lookup:
    return Lookup(num_questions=kwargs.pop("num_questions", 200), **kwargs)


def test_questions_are_fixed_by_data_seed_not_split_seed():
    a = _task(data_seed=0).load_examples()
    assert a == _task(data_seed=0, seed=5).load_examples()
    assert a != _task(data_seed=1).load_examples()
    assert build_task("lookup", num_questions=200).load_examples() == a


def test_ids_unique_and_sizes():
    examples = Lookup().load_examples()
    assert len(examples) == 600
    assert len({ex.id for ex in examples}) == 600
    assert examples[3].id == "lookup/3" and examples[3].meta["index"] == 3
    splits = Lookup().splits()
    assert sum(len(s) for s in splits.values()) == 600


@pytest.mark.parametrize("num_agents, facts", [(4, 3), (1, 1), (8, 5), (10, 12)])
def test_answer_is_held_by_the_relevant_keeper_only(num_agents, facts):
    examples = _task(num_agents=num_agents, facts_per_agent=facts).load_examples()
    keepers = set()
    for ex in examples:
        assert len(ex.agent_facts) == num_agents
        values = [_numbers(text) for text in ex.agent_facts]
        assert all(len(v) == facts for v in values)
        flat = [n for v in values for n in v]
        assert len(set(flat)) == len(flat)  # distinct within a question
        assert all(100 <= int(n) <= 999 for n in flat)
        holders = [i for i, v in enumerate(values) if ex.answer in v]
        assert holders == [ex.meta["keeper"]]
        keepers.add(ex.meta["keeper"])
        # Keeper i's facts are about domain i, each colour at most once.
        for i, text in enumerate(ex.agent_facts):
            sentences = text.split(". ")
            assert all(f" {DOMAINS[i].thing} is " in s for s in sentences)
            colours = [c for c in COLOURS for s in sentences if f" {c} " in s]
            assert len(set(colours)) == len(colours) == facts
    assert keepers == set(range(num_agents))  # every keeper is sometimes the relevant one


@pytest.mark.parametrize("facts", [1, 3])
def test_judger_question_holds_no_fact(facts):
    examples = _task(facts_per_agent=facts).load_examples()
    for ex in examples:
        assert not _numbers(ex.question)
        keeper, colour = DOMAINS[ex.meta["keeper"]], ex.meta["colour"]
        item = f"the {keeper.attribute} of the {colour} {keeper.thing}"
        assert ex.question == f"What is {item}?"
        assert f"T{item[1:]} is {ex.answer}." in ex.agent_facts[ex.meta["keeper"]]
    # Distractors share the colour pool: some question's colour appears in another keeper's facts.
    assert any(
        f" {ex.meta['colour']} " in text
        for ex in examples
        for i, text in enumerate(ex.agent_facts)
        if i != ex.meta["keeper"]
    )


def test_oracle_edges_point_from_the_keeper_holding_the_answer_to_the_judger():
    for ex in _task(facts_per_agent=3).load_examples():
        ((src, dst),) = ex.oracle_edges
        assert dst == -1
        assert ex.answer in _numbers(ex.agent_facts[src])


@pytest.mark.parametrize("facts", [1, 3])
def test_two_hops_chain_oracle(facts):
    examples = _task(hops=2, facts_per_agent=facts).load_examples()
    for ex in examples:
        (p, v), (v2, judger) = ex.oracle_edges
        assert v == v2 and judger == -1 and p != v and p == ex.meta["keeper"]
        assert ex.meta["value_keeper"] == v
        assert [i for i, text in enumerate(ex.agent_facts) if ex.answer in _numbers(text)] == [v]
        asked, held = DOMAINS[p], DOMAINS[v]
        pointer = (
            f"The {asked.attribute} of the {ex.meta['colour']} {asked.thing} is the same as "
            f"the {held.attribute} of the {ex.meta['value_colour']} {held.thing}."
        )
        assert pointer in ex.agent_facts[p]
        assert f"the {ex.meta['value_colour']} {held.thing} is {ex.answer}." in ex.agent_facts[v]
        assert len(_numbers(ex.agent_facts[p])) == facts - 1  # the pointer replaced one value
        assert not _numbers(ex.question)


def test_scoring_and_target():
    task = _task()
    ex = Example(id="lookup/x", question="What is the code of the green door?", answer="682")
    replies = ["The code is 682.", "311", "682", "I do not know."]
    assert task.reward(replies, [ex] * 4) == [1.0, 0.0, 1.0, 0.0]
    assert task.extract_answer("The code of the green door is 682.") == "682"
    assert task.target_text(ex) == "682"
    assert task.domain == "lookup" and "number" in task.answer_format


def test_other_tasks_have_no_agent_facts():
    ex = Arith(num_examples=3).load_examples()[0]
    assert ex.agent_facts == () and ex.oracle_edges == ()


@pytest.mark.parametrize("n", [1, 4, 8, 10])
def test_keepers_roster_matches_the_task(n):
    roster = build_roster(DEFAULT_ROSTER[Lookup.domain], n)
    assert roster.name == "keepers" and roster.num_agents == n
    assert len(set(roster.profiles)) == n
    for i, role in enumerate(roster.roles):
        domain = DOMAINS[i]
        assert f"{domain.attribute}s of the {domain.things}" in role.profile
        assert f"{domain.attribute}s of the {domain.things}" in role.prompt
        assert role.name == f"{domain.thing.capitalize()} Keeper"
    assert build_roster("keepers").num_agents == Lookup().num_agents
    # The judger reads only the question: it must not claim others' work is in its context.
    assert "other" not in roster.judger.prompt.lower()
    assert "final answer" in roster.judger.prompt


def test_keepers_roster_is_bounded_by_the_domains():
    with pytest.raises(ValueError, match=f"at most {len(DOMAINS)}.*num_agents=11"):
        build_roster("keepers", len(DOMAINS) + 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_agents": 0}, r"num_agents=0 is not allowed; use an int in 1\.\.10"),
        ({"num_agents": 11}, r"num_agents=11 is not allowed; use an int in 1\.\.10"),
        ({"num_agents": "4"}, r"num_agents='4' is not allowed"),
        ({"facts_per_agent": 0}, r"facts_per_agent=0 is not allowed; use an int in 1\.\.12"),
        ({"facts_per_agent": 13}, r"facts_per_agent=13 is not allowed; use an int in 1\.\.12"),
        ({"num_questions": 0}, r"num_questions=0 is not allowed; use an int >= 1"),
        ({"hops": 3}, r"hops=3 is not allowed; use one of \(1, 2\)"),
        ({"hops": 2, "num_agents": 1}, r"hops=2 needs num_agents >= 2.*got num_agents=1"),
    ],
)
def test_bad_knobs_raise_with_value_and_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Lookup(**kwargs)


def test_config_builds_the_task_and_a_matching_roster(monkeypatch):
    from hydra import compose, initialize_config_dir

    import gcache.build as build

    def compose_train(overrides):
        with initialize_config_dir(config_dir=build.CONF_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=overrides)

    cfg = compose_train(["task=lookup", "task.num_agents=6", "task.hops=2"])
    task = build.build_task(cfg)
    assert isinstance(task, Lookup)
    assert (task.num_agents, task.hops, task.facts_per_agent) == (6, 2, 1)
    roster = build.build_roster(cfg, task)  # agents.roster=auto: the keepers, one per holder
    assert roster.name == "keepers" and roster.num_agents == 6

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the roster was checked")

    monkeypatch.setattr(build.LocalLM, "load", refuse)
    with pytest.raises(ValueError, match="gives its facts to 6 agents but agents.num_agents=5"):
        build.build_module(compose_train(["task=lookup", "agents.num_agents=5"]), task=task)


@pytest.mark.slow
def test_relevant_keeper_cache_carries_the_answer_to_the_judger():
    """Embedded model through gcache.kv: the judger reads the relevant keeper's cache."""
    from gcache import kv
    from gcache.llm.local import LocalLM

    llm = LocalLM.load("embedded")
    task = Lookup()
    roster = build_roster("keepers")
    ex = task.splits()["test"][0]
    keeper = ex.oracle_edges[0][0]
    user = f"{ex.agent_facts[keeper]}\n\nQuestion:\n{ex.question}\n\nThink about the question in your role."
    messages = [
        {"role": "system", "content": roster.roles[keeper].prompt},
        {"role": "user", "content": user},
    ]
    sender = kv.prefill(llm.model, *llm.encode([llm.chat_text(messages)])).kv
    judger = [
        {"role": "system", "content": roster.judger.prompt},
        {"role": "user", "content": f"Question:\n{ex.question}\n\n{task.answer_format}"},
    ]
    replies = []
    for past in (sender, None):
        reply = llm.generate([llm.chat_text(judger)], past=past, max_new_tokens=16).texts[0]
        replies.append(task.score_one(reply, ex)["correct"])
    assert replies == [True, False]


def test_two_hops_partner_next_is_the_next_keeper_and_random_is_unchanged():
    n = 5
    nexts = _task(hops=2, num_agents=n, facts_per_agent=2, partner="next").load_examples()
    for ex in nexts:
        (p, v), _ = ex.oracle_edges
        assert v == (p + 1) % n and ex.meta["value_keeper"] == v
        assert ex.answer in _numbers(ex.agent_facts[v])
    assert {ex.meta["keeper"] for ex in nexts} == set(range(n))
    # The default draws the value keeper per question, the same questions as before the option existed.
    default = _task(hops=2, num_agents=n, facts_per_agent=2).load_examples()
    first = next(ex for ex in Lookup(hops=2, num_agents=n, facts_per_agent=2, num_questions=1, data_seed=0)
                 .load_examples())
    assert (first.question, first.answer, first.oracle_edges) == (
        "What is the floor of the yellow room?", "348", ((3, 2), (2, -1)))
    offsets = {(ex.oracle_edges[0][1] - ex.oracle_edges[0][0]) % n for ex in default}
    assert offsets == {1, 2, 3, 4}


def test_partner_refuses_an_unknown_value():
    with pytest.raises(ValueError, match=r"partner='previous' is not allowed; use one of \('random', 'next'\)"):
        Lookup(hops=2, partner="previous")

"""Every prompt gcache sends, rendered for one question and compared with tests/golden/prompts.txt.

The golden file is the readable record of what each method sends: a change to any prompt text
(role prompts, instructions, the judger's team note, the hand-off templates, the API baselines'
wiring) fails this test until the file is regenerated and the change reviewed in its diff:

    GCACHE_UPDATE_GOLDEN=1 pytest tests/test_prompts.py

Everything rendered is fixed text (no model, no randomness, no time, no paths).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest
import torch

from gcache.agents import DEFAULT_ROSTER, build_roster
from gcache.llm.api import ApiReply
from gcache.prompts import agent_messages, hint_messages, hybrid_messages, judger_messages
from gcache.rollout import api_text_mas
from gcache.tasks.lookup import Lookup

GOLDEN = Path(__file__).resolve().parent / "golden" / "prompts.txt"
UPDATE = "GCACHE_UPDATE_GOLDEN"

# One lookup question, written out (not generated) so that only prompt changes move the file.
QUESTION = "What is the platform of the brown train?"
FACTS = (
    "The code of the blue door is 540.",
    "The combination of the yellow locker is 635.",
    "The platform of the brown train is 612.",
    "The floor of the brown room is 342.",
)
DRAFT = "The Train Keeper holds the platform of the brown train: 612."
HINT = "612"
ROSTER = build_roster(DEFAULT_ROSTER["lookup"])  # the four keepers
FORMAT = Lookup.answer_format


def _message(name: str) -> str:
    """The message an agent hands on in the text method (a fixed stand-in for a model's reply)."""
    return f"<{name}'s message>"


class RecordingClient:
    """Stands in for `gcache.llm.api.ApiClient`: records each `chat_many_sync` batch and answers an
    agent with its fixed message (found by its role prompt), the judger with HINT."""

    def __init__(self, roster) -> None:
        self.names = {role.prompt: role.name for role in roster.roles}
        self.batches: list[list[list[dict]]] = []

    def chat_many_sync(self, requests, **kwargs):
        self.batches.append([list(messages) for messages in requests])
        replies = []
        for messages in requests:
            name = self.names.get(messages[0]["content"])
            replies.append(ApiReply(HINT if name is None else _message(name), prompt_tokens=0, completion_tokens=0,
                                    seconds=0.0, attempts=1))
        return replies


def _chain(n: int) -> torch.Tensor:
    """(1, N+1, N+1): 0 -> 1 -> … -> N-1, every agent -> the judger (evaluate's `text_mas` on a chain)."""
    a = torch.zeros(1, n + 1, n + 1, dtype=torch.bool)
    for i in range(n - 1):
        a[0, i, i + 1] = True
    a[0, :n, n] = True
    return a


def _section(title: str, messages: list[dict]) -> str:
    body = "\n".join(f"[{m['role']}] {m['content']}" for m in messages)
    return f"== {title} ==\n{body}\n"


def _api_sections(title: str, adjacency: torch.Tensor) -> list[str]:
    client = RecordingClient(ROSTER)
    api_text_mas(client, ROSTER, [QUESTION], adjacency, [0], FORMAT, agent_facts=[FACTS])
    sections = []
    for level, batch in enumerate(client.batches):
        who = "judger" if level == len(client.batches) - 1 else f"level {level}"
        for k, messages in enumerate(batch, 1):
            sections.append(_section(f"{title}: {who}, request {k} of {len(batch)}", messages))
    return sections


def render() -> str:
    roles, n = ROSTER.roles, ROSTER.num_agents
    received = [(role.name, _message(role.name)) for role in roles]
    sections = [
        _section(f"agent 0 ({roles[0].name}), latent and text method: its facts, nothing received",
                 agent_messages(roles[0], QUESTION, facts=FACTS[0])),
        _section(f"agent 1 ({roles[1].name}), text method: its facts and agent 0's message",
                 agent_messages(roles[1], QUESTION, facts=FACTS[1], received=received[:1])),
        _section("judger, alone (reads_others=False: single, single_budget, no judger edges)",
                 judger_messages(ROSTER.judger, QUESTION, FORMAT, reads_others=False)),
        _section("judger, reads others' caches (latent method, reads_others=True)",
                 judger_messages(ROSTER.judger, QUESTION, FORMAT, reads_others=True)),
        _section("judger, text method: received every agent's message",
                 judger_messages(ROSTER.judger, QUESTION, FORMAT, reads_others=True, received=received)),
        _section("hybrid hand-off: the API model finishes the judger's draft",
                 hybrid_messages(QUESTION, DRAFT, FORMAT)),
        _section("api_hint hand-off: the API model answers with the judger's hint",
                 hint_messages(QUESTION, HINT, FORMAT)),
        *_api_sections("api_single", torch.zeros(1, n + 1, n + 1, dtype=torch.bool)),
        *_api_sections("api_text_mas on the chain 0 -> 1 -> 2 -> 3, every agent -> judger", _chain(n)),
    ]
    header = (
        f"# Every prompt gcache sends, for one lookup question and the {ROSTER.name} roster.\n"
        f"# Written by tests/test_prompts.py; regenerate with {UPDATE}=1 pytest tests/test_prompts.py\n"
        "# Agents' messages are stand-ins <…'s message>; the draft and the hint are fixed strings.\n"
    )
    return header + "\n" + "\n".join(sections)


def test_prompts_equal_the_golden_file():
    rendered = render()
    if os.environ.get(UPDATE) == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(rendered, encoding="utf-8")
        return
    how = f"If the change is intended, regenerate the file with `{UPDATE}=1 pytest tests/test_prompts.py` and commit it."
    if not GOLDEN.is_file():
        pytest.fail(f"{GOLDEN} is missing. {how}", pytrace=False)
    expected = GOLDEN.read_text(encoding="utf-8")
    if rendered != expected:
        diff = "".join(difflib.unified_diff(expected.splitlines(keepends=True), rendered.splitlines(keepends=True),
                                            fromfile="tests/golden/prompts.txt", tofile="rendered now"))
        pytest.fail(f"the prompts differ from {GOLDEN.name}. {how}\n{diff}", pytrace=False)


def test_rendering_is_deterministic():
    assert render() == render()


def test_the_api_baselines_send_the_local_prompts():
    # api_single is the judger alone; on a chain the API agents and judger get the text method's prompts.
    roles, n = ROSTER.roles, ROSTER.num_agents
    client = RecordingClient(ROSTER)
    api_text_mas(client, ROSTER, [QUESTION], torch.zeros(1, n + 1, n + 1, dtype=torch.bool), [0], FORMAT,
                 agent_facts=[FACTS])
    assert client.batches == [[judger_messages(ROSTER.judger, QUESTION, FORMAT, reads_others=False)]]
    client = RecordingClient(ROSTER)
    api_text_mas(client, ROSTER, [QUESTION], _chain(n), [0], FORMAT, agent_facts=[FACTS])
    received = [(role.name, _message(role.name)) for role in roles]
    expected = [[agent_messages(roles[k], QUESTION, facts=FACTS[k], received=received[k - 1 : k] if k else ())]
                for k in range(n)]
    expected.append([judger_messages(ROSTER.judger, QUESTION, FORMAT, reads_others=True, received=received)])
    assert client.batches == expected

"""Every prompt gcache sends to a model, side by side, so two methods' prompts can be compared.

- `agent_messages`: an agent (latent or text method: the same instruction for both).
- `judger_messages`: the decision agent. It is told that other agents' work is in its
  context only when it actually reads senders; alone (the single-agent baseline, or a
  sampled graph without judger edges) it gets the same prompt minus that sentence.
- `hybrid_messages` / `hint_messages`: the API hand-off (`gcache.modes`): the API model
  writes the final answer from the question and the judger's draft, or its hint.

The API text-MAS baselines (`gcache.rollout.api_text_mas`) send `agent_messages` and
`judger_messages`, exactly as the local text method does. `tests/golden/prompts.txt` shows
every one of these prompts rendered for one question (`tests/test_prompts.py` keeps it current).

Role prompts (what each agent is) live with the rosters in `gcache.agents`; task answer
formats with the tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

from gcache.agents import Role

# System prompt of the API model in the hand-off modes.
SYSTEM = "You are an expert problem solver. Answer accurately and follow the requested answer format."
# One instruction for latent and text agents, so the two methods differ only in the channel.
AGENT_INSTRUCTION = "Work on the question in your role, step by step, and be concise."
# Added to the judger's system prompt only when it reads other agents' work (cache or text).
JUDGER_TEAM_NOTE = (
    "Other agents have worked on this question and their work is in your context. Compare "
    "their conclusions and check any step where they disagree or look doubtful."
)


def agent_messages(
    role: Role,
    question: str,
    *,
    facts: str = "",
    received: Sequence[tuple[str, str]] = (),
) -> list[dict]:
    """Chat messages of an agent. `facts`: what this agent alone holds for the question (tasks
    such as `lookup`); `received`: (sender name, message) pairs of the text method."""
    parts = [facts] if facts else []
    parts.append(f"Question:\n{question}")
    parts += [f"{name} wrote:\n{text}" for name, text in received]
    parts.append(AGENT_INSTRUCTION)
    return [{"role": "system", "content": role.prompt}, {"role": "user", "content": "\n\n".join(parts)}]


def judger_messages(
    role: Role,
    question: str,
    answer_format: str,
    *,
    reads_others: bool,
    received: Sequence[tuple[str, str]] = (),
) -> list[dict]:
    """Chat messages of the judger. `reads_others`: it reads senders' caches or `received` texts."""
    system = f"{role.prompt} {JUDGER_TEAM_NOTE}" if reads_others or received else role.prompt
    parts = [f"Question:\n{question}"]
    parts += [f"{name} wrote:\n{text}" for name, text in received]
    parts.append(answer_format)
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def hybrid_messages(question: str, draft: str, answer_format: str) -> list[dict]:
    """Chat messages of the API model in `hybrid` mode: the question and the judger's draft."""
    user = (
        f"Question:\n{question}\n\n"
        f"A team of smaller models worked on this question together and wrote this draft:\n{draft}\n\n"
        f"Check the draft, correct it if it is wrong, and give the final answer. {answer_format}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def hint_messages(question: str, hint: str, answer_format: str) -> list[dict]:
    """Chat messages of the API model in `api_hint` mode: the question and the judger's hint."""
    user = f"Question:\n{question}\n\nHint from a collaborating model:\n{hint}\n\n{answer_format}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]

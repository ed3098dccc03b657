"""Rollout engine on a tiny random model: the chain is the LatentMAS chain, batching and sharing are exact."""

from __future__ import annotations

import pytest
import torch

from gcache import kv
from gcache.agents import build_roster
from gcache.llm.local import LocalLM
from gcache.policy.cache_fuser import CacheFuser
from gcache.rollout import (
    RolloutConfig,
    RolloutEngine,
    agent_messages,
    chain_adjacency,
    judger_messages,
    run_latent_chain,
)

QUESTIONS = ["What is 2 + 3?", "Tom has 7 apples and buys 5 more. How many apples does he have now?"]
FORMAT = "Give the final answer as \\boxed{number}."
ATOL = 1e-4


@pytest.fixture(scope="module")
def llm() -> LocalLM:
    return LocalLM.tiny_random(seed=0)


@pytest.fixture(scope="module")
def roster():
    return build_roster("math")


def _judger_logits(llm, roster, judger_input, fuser=None, logits=None) -> torch.Tensor:
    """Next-token logits of the judger's prompt on the fused cache of a JudgerInput."""
    if fuser is None:
        fused = kv.concat(judger_input.sender_kvs, llm.rotary)
    else:
        fused = fuser.fuse(judger_input.sender_kvs, logits, llm.rotary)
    ids, mask = llm.encode([judger_input.prompt])
    return kv.prefill(llm.model, ids, mask, past=fused).logits[0]


@torch.no_grad()
def _reference_chain(llm, roster, question, steps) -> tuple[torch.Tensor, str]:
    """LatentMAS by hand: each agent prefills its prompt on the accumulated cache, thinks, hands it all on."""
    realign = llm.realignment(True)
    past = None
    for role in roster.roles:
        ids, mask = llm.encode([llm.chat_text(agent_messages(role, question, latent=True))])
        step = kv.prefill(llm.model, ids, mask, past=past)
        past = kv.latent_steps(llm.model, step, steps, realign).step.kv
    ids, mask = llm.encode([llm.chat_text(judger_messages(roster.judger, question, FORMAT))])
    step = kv.prefill(llm.model, ids, mask, past=past)
    tokens, counts = kv.decode(
        llm.model, step.kv, step.logits, max_new_tokens=6, eos_token_ids=llm.eos_token_ids,
        pad_token_id=llm.tokenizer.pad_token_id,
    )
    return step.logits[0], llm.decode_ids(tokens, counts)[0]


@torch.no_grad()
def test_chain_topology_with_full_retention_is_the_latentmas_chain(llm, roster):
    engine = RolloutEngine(llm, roster, RolloutConfig(latent_steps=3, retention="full", max_new_tokens=6))
    adjacency = chain_adjacency(roster.num_agents).expand(2, -1, -1)
    batch = engine.run(QUESTIONS, adjacency, [0, 1], answer_format=FORMAT, keep_judger_inputs=True)
    for q, question in enumerate(QUESTIONS):
        ref_logits, ref_answer = _reference_chain(llm, roster, question, 3)
        judger_input = batch.judger_inputs[q]
        assert judger_input.senders == [roster.num_agents - 1]  # the sink holds the whole chain
        torch.testing.assert_close(_judger_logits(llm, roster, judger_input), ref_logits, atol=ATOL, rtol=0)
        assert batch.rollouts[q].answer == ref_answer


@torch.no_grad()
def test_run_latent_chain_is_the_engine_on_a_chain(llm, roster):
    chain = run_latent_chain(llm, roster, QUESTIONS, answer_format=FORMAT, latent_steps=3, max_new_tokens=6)
    for q, question in enumerate(QUESTIONS):
        assert chain.rollouts[q].answer == _reference_chain(llm, roster, question, 3)[1]


@torch.no_grad()
def test_identity_fuser_reproduces_plain_concatenation(llm, roster):
    config = RolloutConfig(latent_steps=2, retention="role_latent", max_new_tokens=4)
    adjacency = torch.zeros(1, 4, 4, dtype=torch.bool)
    adjacency[0, 0, 2] = adjacency[0, 1, 2] = True
    logits = torch.randn(2, 5, 5)
    plain = RolloutEngine(llm, roster, config).run(QUESTIONS[:1], adjacency, [0], answer_format=FORMAT, keep_judger_inputs=True)
    fused = RolloutEngine(llm, roster, config, fuser=CacheFuser(llm.num_layers)).run(
        QUESTIONS[:1], adjacency, [0], answer_format=FORMAT, keep_judger_inputs=True, edge_logits=logits
    )
    assert plain.rollouts[0].answer == fused.rollouts[0].answer
    a = _judger_logits(llm, roster, plain.judger_inputs[0])
    b = _judger_logits(llm, roster, fused.judger_inputs[0])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("retention", ["full", "role_latent", "latent_only"])
def test_batched_rows_equal_rows_run_alone(llm, roster, retention):
    config = RolloutConfig(latent_steps=2, retention=retention, max_new_tokens=3)
    engine = RolloutEngine(llm, roster, config)
    g = torch.Generator().manual_seed(0)
    adjacency = torch.triu(torch.rand(4, 4, 4, generator=g) < 0.5, diagonal=1)
    index = [0, 1, 0, 1]
    together = engine.run(QUESTIONS, adjacency, index, answer_format=FORMAT, keep_judger_inputs=True)
    for r in range(4):
        alone = engine.run(QUESTIONS, adjacency[r : r + 1], [index[r]], answer_format=FORMAT, keep_judger_inputs=True)
        a = _judger_logits(llm, roster, together.judger_inputs[r])
        b = _judger_logits(llm, roster, alone.judger_inputs[0])
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        assert together.rollouts[r].agent_cache_lengths == alone.rollouts[0].agent_cache_lengths


@torch.no_grad()
def test_identical_agents_are_computed_once_and_sharing_changes_nothing(llm, roster):
    adjacency = torch.zeros(4, 4, 4, dtype=torch.bool)
    adjacency[:, 0, 1] = True  # four graphs of one question share agents 0, 2, 3 and (0 -> 1)
    adjacency[3, 1, 2] = True  # ... except that graph 3 also has 1 -> 2 (a different agent 2, and 3 unchanged)
    config = RolloutConfig(latent_steps=2, retention="role_latent", max_new_tokens=3)
    shared = RolloutEngine(llm, roster, config).run(QUESTIONS[:1], adjacency, [0] * 4, answer_format=FORMAT)
    naive = RolloutEngine(llm, roster, RolloutConfig(**{**config.__dict__, "reuse": False})).run(
        QUESTIONS[:1], adjacency, [0] * 4, answer_format=FORMAT
    )
    assert shared.prefills_naive == naive.prefills == 16
    assert shared.prefills == 5  # agents 0, 1, 3 once; agent 2 twice (alone, and after 1)
    assert shared.judger_decodes == 2 and naive.judger_decodes == 4  # graphs 0-2 are identical
    assert [r.answer for r in shared.rollouts] == [r.answer for r in naive.rollouts]


@torch.no_grad()
def test_text_method_passes_messages_and_counts_their_tokens(llm, roster):
    config = RolloutConfig(method="text", agent_max_new_tokens=4, max_new_tokens=3)
    adjacency = chain_adjacency(4)[None]
    batch = RolloutEngine(llm, roster, config).run(QUESTIONS[:1], adjacency, [0], answer_format=FORMAT)
    rollout = batch.rollouts[0]
    assert set(rollout.messages) == {0, 1, 2, 3}
    assert rollout.decoded_tokens > 4 * 1  # agents' messages count as decoded tokens
    assert rollout.judger_cache_length == 0


@torch.no_grad()
def test_single_agent_and_no_handoff_judger_reads_no_cache(llm, roster):
    adjacency = chain_adjacency(4)[None]
    single = RolloutEngine(llm, roster, RolloutConfig(max_new_tokens=3)).run(
        QUESTIONS[:1], adjacency, [0], answer_format=FORMAT, active=[]
    )
    assert single.prefills == 0 and single.rollouts[0].judger_cache_length == 0
    none = RolloutEngine(llm, roster, RolloutConfig(latent_steps=2, judger_cache="none", max_new_tokens=3)).run(
        QUESTIONS[:1], adjacency, [0], answer_format=FORMAT
    )
    assert none.rollouts[0].judger_cache_length == 0
    assert none.rollouts[0].answer == single.rollouts[0].answer


@torch.no_grad()
def test_mismatched_control_reads_another_questions_cache(llm, roster):
    adjacency = chain_adjacency(4).expand(2, -1, -1)
    config = RolloutConfig(latent_steps=2, judger_cache="mismatched", max_new_tokens=3)
    batch = RolloutEngine(llm, roster, config).run(QUESTIONS, adjacency, [0, 1], answer_format=FORMAT, keep_judger_inputs=True)
    matched = RolloutEngine(llm, roster, RolloutConfig(latent_steps=2, max_new_tokens=3)).run(
        QUESTIONS, adjacency, [0, 1], answer_format=FORMAT, keep_judger_inputs=True
    )
    # Row 0's judger reads the cache built for question 1, and the reverse.
    assert batch.rollouts[0].judger_cache_length == matched.rollouts[1].judger_cache_length
    assert batch.rollouts[1].judger_cache_length == matched.rollouts[0].judger_cache_length


def test_bad_configs_are_refused_with_the_allowed_values():
    with pytest.raises(ValueError, match="retention='everything'.*full"):
        RolloutConfig(retention="everything")
    with pytest.raises(ValueError, match="latent_steps must be >= 0"):
        RolloutConfig(latent_steps=-1)
    with pytest.raises(ValueError, match="latent_only"):
        RolloutConfig(retention="latent_only", latent_steps=0)


@torch.no_grad()
def test_second_round_agents_read_the_first_rounds_outputs(llm, roster):
    adjacency = chain_adjacency(4)[None]
    one = RolloutEngine(llm, roster, RolloutConfig(latent_steps=2, retention="role_latent", max_new_tokens=3))
    two = RolloutEngine(llm, roster, RolloutConfig(latent_steps=2, retention="role_latent", max_new_tokens=3,
                                                   num_rounds=2))
    first = one.run(QUESTIONS[:1], adjacency, [0], answer_format=FORMAT, keep_judger_inputs=True)
    second = two.run(QUESTIONS[:1], adjacency, [0], answer_format=FORMAT, keep_judger_inputs=True)
    assert second.prefills == second.prefills_naive == 8  # round 2 agents differ: they read round 1
    # Round-2 agent 0 read all four round-1 segments, so its own segment is computed on more context.
    a = _judger_logits(llm, roster, first.judger_inputs[0])
    b = _judger_logits(llm, roster, second.judger_inputs[0])
    assert not torch.allclose(a, b, atol=1e-4)
    text = RolloutEngine(llm, roster, RolloutConfig(method="text", agent_max_new_tokens=3, max_new_tokens=3,
                                                    num_rounds=2)).run(QUESTIONS[:1], adjacency, [0], answer_format=FORMAT)
    text_one = RolloutEngine(llm, roster, RolloutConfig(method="text", agent_max_new_tokens=3, max_new_tokens=3)).run(
        QUESTIONS[:1], adjacency, [0], answer_format=FORMAT)
    # Round 2 prompts every agent again, now with the round-1 messages in its prompt.
    assert text.rollouts[0].prompt_tokens > text_one.rollouts[0].prompt_tokens
    assert text.prefills == 8

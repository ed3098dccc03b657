"""Rollout engine on a tiny random model: each agent's segment reaches a reader once, the chain is
the LatentMAS chain, the judger reads exactly a hand-built cache, batching and sharing are exact."""

from __future__ import annotations

import pytest
import torch

from gcache import kv, kv_static
from gcache.agents import build_roster
from gcache.llm.local import LocalLM
from gcache.policy.cache_fuser import CacheFuser
from gcache.policy.topology import fixed_adjacency, judger_senders_all
from gcache.prompts import agent_messages, judger_messages
from gcache.rollout import (
    RolloutConfig,
    RolloutEngine,
    plan_rollouts,
    run_latent_chain,
)

QUESTIONS = ["What is 2 + 3?", "Tom has 7 apples and buys 5 more. How many apples does he have now?"]
FORMAT = "Give the final answer as \\boxed{number}."
ATOL = 1e-4
N = 4


def _graph(edges, judger=(), n=N) -> torch.Tensor:
    """(1, N+1, N+1) from agent edges and the agents sending to the judger."""
    a = torch.zeros(1, n + 1, n + 1, dtype=torch.bool)
    for i, j in edges:
        a[0, i, j] = True
    for i in judger:
        a[0, i, n] = True
    return a


STAR = _graph([(0, 1), (0, 2), (0, 3)], judger=(1, 2, 3))  # the hub reaches the judger through 3 spokes
DIAMOND = _graph([(0, 1), (0, 2), (1, 3), (2, 3)], judger=(3,))
MESH = _graph([(i, j) for i in range(N) for j in range(N) if i < j], judger=range(N))
GRAPHS = {"star": STAR, "diamond": DIAMOND, "mesh": MESH}


@pytest.fixture(scope="module")
def llm() -> LocalLM:
    return LocalLM.tiny_random(seed=0)


@pytest.fixture(scope="module")
def roster():
    return build_roster("math")


@pytest.fixture(params=["off", "static"])
def loops(request) -> str:
    """`rollout.cuda_graphs`: eager token loops (CPU's default) or the GPU's static workspaces without
    the capture (what a CUDA run executes, less the graph capture and replay calls)."""
    return request.param


def _logits_on(llm, cache: kv.KV, prompt: str) -> torch.Tensor:
    ids, mask = llm.encode([prompt])
    return kv.prefill(llm.model, ids, mask, past=cache).logits[0]


# ---- planning (pure) --------------------------------------------------------------------------


def test_plan_reads_every_ancestor_once_under_full_and_direct_senders_otherwise():
    for name, graph in GRAPHS.items():
        for reads in ("ancestors", "senders"):
            plan = plan_rollouts(graph, [0], reads=reads)
            judger = [plan.nodes[x].agent for x in plan.judger_reads[0]]
            assert len(judger) == len(set(judger)), (name, reads)  # nobody twice
            for node in plan.nodes:
                agents = [plan.nodes[x].agent for x in node.reads]
                assert len(agents) == len(set(agents))
    star = plan_rollouts(STAR, [0], reads="ancestors")
    assert [star.nodes[x].agent for x in star.judger_reads[0]] == [0, 1, 2, 3]
    assert [star.nodes[x].agent for x in plan_rollouts(STAR, [0], reads="senders").judger_reads[0]] == [1, 2, 3]
    diamond = plan_rollouts(DIAMOND, [0], reads="ancestors")
    assert [diamond.nodes[x].agent for x in diamond.judger_reads[0]] == [0, 1, 2, 3]
    node3 = next(node for node in diamond.nodes if node.agent == 3)
    assert [diamond.nodes[x].agent for x in node3.reads] == [0, 1, 2]
    assert [diamond.nodes[x].agent for x in plan_rollouts(DIAMOND, [0], reads="senders").judger_reads[0]] == [3]


def test_plan_runs_only_agents_with_a_path_to_the_judger():
    graph = _graph([(0, 1), (2, 3)], judger=(1,))  # 2 -> 3 never reaches the judger
    plan = plan_rollouts(graph, [0])
    assert sorted(plan.nodes[x].agent for x in plan.row_nodes[0]) == [0, 1]
    alone = plan_rollouts(_graph([(0, 1), (1, 2)]), [0])  # no judger edge: the judger answers alone
    assert alone.nodes == [] and alone.judger_reads == [()]
    with pytest.raises(ValueError, match="sends to nobody"):
        bad = _graph([], judger=(0,))
        bad[0, N, 1] = True
        plan_rollouts(bad, [0])


def test_plan_shares_identical_agents_between_rows_of_a_question():
    graphs = torch.cat([STAR, STAR, DIAMOND])
    plan = plan_rollouts(graphs, [0, 0, 0], reads="ancestors")
    assert plan.naive_nodes == 12
    # star: 0, 1, 2, 3 (each on 0); diamond adds 3 on (0, 1, 2) — 0, 1, 2 are the star's.
    assert len(plan.nodes) == 5
    assert len(plan_rollouts(graphs, [0, 0, 0], reuse=False).nodes) == 12


# ---- execution against hand-built references -------------------------------------------------


def _segment(llm, role, question, past, steps, width_of):
    """One agent by hand: its prompt on `past`, `steps` latent steps, then its own slots."""
    ids, mask = llm.encode([llm.chat_text(agent_messages(role, question))])
    step = kv.prefill(llm.model, ids, mask, past=past)
    full = kv.latent_steps(llm.model, step, steps, llm.realignment("ridge")).step.kv
    return kv.keep_last(full, width_of(ids.shape[1], steps), llm.rotary)


def _reference_judger_cache(llm, roster, question, graph, retention, steps) -> tuple[kv.KV, list[int]]:
    """What the judger should read, built agent by agent in a topological order."""
    a = graph[0]
    width_of = (lambda p, s: s) if retention == "latent_only" else (lambda p, s: p + s)
    order = [0, 1, 2, 3]  # a topological order of every graph here (edges go from lower to higher)
    ancestors = {j: {i for i in order if i < j and bool(_reach(a, i, j))} for j in order}
    segments = {}
    for j in order:
        if retention == "full":
            reads = sorted(ancestors[j])
            past = kv.concat([segments[i] for i in reads], llm.rotary) if reads else None
        else:
            reads = [i for i in order if bool(a[i, j])]
            past = kv.concat([segments[i] for i in reads], llm.rotary) if reads else None
        segments[j] = _segment(llm, roster.roles[j], question, past, steps, width_of)
    senders = [i for i in order if bool(a[i, N])]
    if retention == "full":
        senders = sorted(set(senders).union(*(ancestors[i] for i in senders)))
    return kv.concat([segments[i] for i in senders], llm.rotary), senders


def _reach(a, i, j) -> bool:
    frontier, seen = [i], set()
    while frontier:
        x = frontier.pop()
        for y in range(N):
            if bool(a[x, y]) and y not in seen:
                seen.add(y)
                frontier.append(y)
    return j in seen


@torch.no_grad()
@pytest.mark.parametrize("retention", ["full", "role_latent", "latent_only"])
@pytest.mark.parametrize("name", ["star", "diamond", "mesh"])
def test_judger_reads_each_segment_once_and_equals_a_hand_built_cache(llm, roster, name, retention, loops):
    graph, steps = GRAPHS[name], 2
    engine = RolloutEngine(llm, roster, RolloutConfig(cuda_graphs=loops, latent_steps=steps, retention=retention, max_new_tokens=2))
    batch = engine.run(QUESTIONS[:1], graph, [0], answer_format=FORMAT, keep_judger_inputs=True)
    inp, rollout = batch.judger_inputs[0], batch.rollouts[0]
    ref, senders = _reference_judger_cache(llm, roster, QUESTIONS[0], graph, retention, steps)
    assert inp.senders == senders == rollout.judger_senders
    # The cache length is the sum of the unique segments read: no ancestor repeated.
    segment_lengths = {j: rollout.agent_cache_lengths[j] for j in senders}
    assert rollout.judger_cache_length == sum(segment_lengths.values()) == int(ref.lengths[0])
    prompt = inp.prompt
    torch.testing.assert_close(_logits_on(llm, inp.cache, prompt), _logits_on(llm, ref, prompt), atol=ATOL, rtol=0)


@torch.no_grad()
def test_star_under_full_retention_reads_the_hub_once_not_once_per_spoke(llm, roster, loops):
    engine = RolloutEngine(llm, roster, RolloutConfig(cuda_graphs=loops, latent_steps=2, retention="full", max_new_tokens=2))
    rollout = engine.run(QUESTIONS[:1], STAR, [0], answer_format=FORMAT).rollouts[0]
    unique = sum(rollout.agent_cache_lengths.values())
    assert rollout.judger_cache_length == unique  # was 1.5x with whole caches handed on


def _reference_chain(llm, roster, question, steps) -> tuple[torch.Tensor, str]:
    """LatentMAS by hand: each agent prefills its prompt on the accumulated cache, thinks, hands it all on."""
    realign = llm.realignment("ridge")
    past = None
    for role in roster.roles:
        ids, mask = llm.encode([llm.chat_text(agent_messages(role, question))])
        step = kv.prefill(llm.model, ids, mask, past=past)
        past = kv.latent_steps(llm.model, step, steps, realign).step.kv
    ids, mask = llm.encode([llm.chat_text(judger_messages(roster.judger, question, FORMAT, reads_others=True))])
    step = kv.prefill(llm.model, ids, mask, past=past)
    tokens, counts = kv.decode(
        llm.model, step.kv, step.logits, max_new_tokens=6, eos_token_ids=llm.eos_token_ids,
        pad_token_id=llm.tokenizer.pad_token_id,
    )
    return step.logits[0], llm.decode_ids(tokens, counts)[0]


@torch.no_grad()
@pytest.mark.parametrize("judger", ["last", "all"])
def test_chain_with_full_retention_is_the_latentmas_chain(llm, roster, judger, loops):
    engine = RolloutEngine(llm, roster, RolloutConfig(cuda_graphs=loops, latent_steps=3, retention="full", max_new_tokens=6))
    chain = fixed_adjacency("chain", N).expand(2, -1, -1)
    adjacency = judger_senders_all(chain, [N - 1] if judger == "last" else None)
    batch = engine.run(QUESTIONS, adjacency, [0, 1], answer_format=FORMAT, keep_judger_inputs=True)
    for q, question in enumerate(QUESTIONS):
        ref_logits, ref_answer = _reference_chain(llm, roster, question, 3)
        inp = batch.judger_inputs[q]
        assert inp.senders == [0, 1, 2, 3]
        torch.testing.assert_close(_logits_on(llm, inp.cache, inp.prompt), ref_logits, atol=ATOL, rtol=0)
        assert batch.rollouts[q].answer == ref_answer


@torch.no_grad()
def test_run_latent_chain_is_the_engine_on_a_chain(llm, roster):
    chain = run_latent_chain(llm, roster, QUESTIONS, answer_format=FORMAT, latent_steps=3, max_new_tokens=6)
    for q, question in enumerate(QUESTIONS):
        assert chain.rollouts[q].answer == _reference_chain(llm, roster, question, 3)[1]


def _nontrivial_fuser(llm, fusion) -> CacheFuser:
    fuser = CacheFuser(llm.num_layers, fusion=fusion)
    with torch.no_grad():
        if fusion == "values":
            fuser.layer_bias.copy_(torch.linspace(-1.0, 1.5, llm.num_layers))
        else:
            fuser.weight_bias.fill_(-0.4)
        fuser.slope.fill_(0.8)
    return fuser


@torch.no_grad()
@pytest.mark.parametrize("fusion", ["attention", "values"])
def test_judger_weights_each_segment_once_with_its_own_edge_logit(llm, roster, loops, fusion):
    config = RolloutConfig(cuda_graphs=loops, latent_steps=2, retention="full", max_new_tokens=2)
    fuser = _nontrivial_fuser(llm, fusion)
    logits = torch.randn(1, N + 1, N + 1, generator=torch.Generator().manual_seed(1)) * 2
    gated = RolloutEngine(llm, roster, config, fuser=fuser).run(
        QUESTIONS[:1], DIAMOND, [0], answer_format=FORMAT, keep_judger_inputs=True, edge_logits=logits)
    plain = RolloutEngine(llm, roster, config).run(QUESTIONS[:1], DIAMOND, [0], answer_format=FORMAT,
                                                   keep_judger_inputs=True)
    inp = gated.judger_inputs[0]
    # Agents read plain concatenations: every segment is identical with and without the fuser.
    for a, b in zip(inp.sender_kvs, plain.judger_inputs[0].sender_kvs, strict=True):
        for (ka, va), (kb, vb) in zip(a.layers(), b.layers(), strict=True):
            torch.testing.assert_close(ka, kb)
            torch.testing.assert_close(va, vb)
    # The judger's cache: segment i weighted once by 2σ(a(_l) + b·s_{i→judger}) where i → judger was
    # sampled (agent 3): its values (values) or the judger's attention to its slots (attention); the
    # ancestors 0, 1, 2 read through it keep weight 1.
    assert inp.senders == [0, 1, 2, 3] and inp.gated == [False, False, False, True]
    s = logits[0, inp.senders, N][:, None]  # (S, 1)
    direct = torch.tensor(inp.gated)[:, None]
    if fusion == "values":
        gates = 2 * torch.sigmoid(fuser.layer_bias[None, :] + fuser.slope * s)  # (S, L)
        ref = kv.concat(inp.sender_kvs, llm.rotary, [g[:, None] for g in torch.where(direct, gates, 1.0)])
        assert not torch.allclose(inp.cache.layers()[0][1], plain.judger_inputs[0].cache.layers()[0][1])
        assert inp.cache.log_weight is None
    else:
        weights = 2 * torch.sigmoid(fuser.weight_bias + fuser.slope * s)  # (S, 1)
        ref = kv.concat(inp.sender_kvs, llm.rotary, log_weights=list(torch.where(direct, weights.log(), 0.0)))
        lengths = [int(x.seq_len) for x in inp.sender_kvs]
        expected = torch.cat([torch.full((n,), float(w) if d else 0.0) for n, w, d in
                              zip(lengths, weights[:, 0].log(), inp.gated, strict=True)])
        torch.testing.assert_close(inp.cache.log_weight[0], expected)
        assert float(expected[-lengths[-1]:].abs().min()) > 0.1  # the sender's weight is not 1: a real check
        for (_, va), (_, vb) in zip(inp.cache.layers(), plain.judger_inputs[0].cache.layers(), strict=True):
            assert torch.equal(va, vb)  # values untouched
    for (ka, va), (kb, vb) in zip(inp.cache.layers(), ref.layers(), strict=True):
        torch.testing.assert_close(ka, kb)
        torch.testing.assert_close(va, vb)
    # the fuser's loss differentiates exactly that: no gradient reaches an edge agent -> judger that did not run
    with torch.enable_grad():
        s = logits[0, :, N].clone().requires_grad_(True)
        fused = fuser.fuse(inp.sender_kvs, s[inp.senders][:, None], llm.rotary, gated=inp.gated)
        llm.answer_nll([fused], [inp.prompt], ["5"]).sum().backward()
    assert s.grad[3] != 0 and bool((s.grad[:3] == 0).all())


@torch.no_grad()
def test_identity_fuser_reproduces_plain_concatenation(llm, roster, loops):
    config = RolloutConfig(cuda_graphs=loops, latent_steps=2, retention="role_latent", max_new_tokens=4)
    logits = torch.randn(1, N + 1, N + 1)
    plain = RolloutEngine(llm, roster, config).run(QUESTIONS[:1], STAR, [0], answer_format=FORMAT,
                                                   keep_judger_inputs=True)
    fused = RolloutEngine(llm, roster, config, fuser=CacheFuser(llm.num_layers)).run(
        QUESTIONS[:1], STAR, [0], answer_format=FORMAT, keep_judger_inputs=True, edge_logits=logits)
    assert plain.rollouts[0].answer == fused.rollouts[0].answer
    a, b = plain.judger_inputs[0], fused.judger_inputs[0]
    torch.testing.assert_close(_logits_on(llm, a.cache, a.prompt), _logits_on(llm, b.cache, b.prompt),
                               atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("retention", ["full", "role_latent", "latent_only"])
def test_batched_rows_equal_rows_run_alone(llm, roster, retention, loops):
    config = RolloutConfig(cuda_graphs=loops, latent_steps=2, retention=retention, max_new_tokens=3)
    engine = RolloutEngine(llm, roster, config)
    g = torch.Generator().manual_seed(0)
    adjacency = torch.triu(torch.rand(4, N + 1, N + 1, generator=g) < 0.5, diagonal=1)
    index = [0, 1, 0, 1]
    together = engine.run(QUESTIONS, adjacency, index, answer_format=FORMAT, keep_judger_inputs=True)
    for r in range(4):
        alone = engine.run(QUESTIONS, adjacency[r : r + 1], [index[r]], answer_format=FORMAT, keep_judger_inputs=True)
        a, b = together.judger_inputs[r], alone.judger_inputs[0]
        torch.testing.assert_close(_logits_on(llm, a.cache, a.prompt), _logits_on(llm, b.cache, b.prompt),
                                   atol=ATOL, rtol=0)
        assert together.rollouts[r].agent_cache_lengths == alone.rollouts[0].agent_cache_lengths


@torch.no_grad()
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("retention", ["full", "role_latent", "latent_only"])
def test_static_loops_give_the_eager_engines_answers_token_for_token(llm, roster, retention, temperature,
                                                                     monkeypatch):
    # The GPU's path (static workspaces; here without capture) against CPU's eager loops, on a batch of
    # graphs whose rows end at different steps, greedy and sampled from one seeded generator.
    g = torch.Generator().manual_seed(4)
    adjacency = judger_senders_all(torch.triu(torch.rand(6, N, N, generator=g) < 0.5, diagonal=1))
    adjacency[0, :, N] = False  # one judger alone

    def run(loops):
        config = RolloutConfig(cuda_graphs=loops, latent_steps=2, retention=retention, max_new_tokens=10,
                               temperature=temperature, judger_latent_steps=1)
        return RolloutEngine(llm, roster, config).run(
            QUESTIONS, adjacency, [0, 1, 0, 1, 0, 1], answer_format=FORMAT, keep_judger_inputs=True,
            generator=torch.Generator().manual_seed(5))

    # The random model never says <|im_end|>: end rows at a token one of them produces early.
    first = run("off").rollouts[1].answer
    eos = llm.tokenizer(first, add_special_tokens=False)["input_ids"][2]
    monkeypatch.setattr(type(llm), "eos_token_ids", property(lambda self: [eos]))
    eager, static = run("off"), run("static")
    assert [r.answer for r in static.rollouts] == [r.answer for r in eager.rollouts]
    assert [r.decoded_tokens for r in static.rollouts] == [r.decoded_tokens for r in eager.rollouts]
    assert len({r.decoded_tokens for r in eager.rollouts}) > 1  # rows end at different steps
    for a, b in zip(static.judger_inputs, eager.judger_inputs, strict=True):
        for (k0, v0), (k1, v1) in zip(a.cache.layers(), b.cache.layers(), strict=True):
            torch.testing.assert_close(k0, k1, atol=1e-5, rtol=0)
            torch.testing.assert_close(v0, v1, atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_workspace_budget_too_small_for_a_batch_runs_it_in_row_groups_with_the_same_answers(llm, roster):
    # The budget holds one row of 1024 slots: every loop of these rows fits in groups, none runs eagerly.
    g = torch.Generator().manual_seed(4)
    adjacency = judger_senders_all(torch.triu(torch.rand(6, N, N, generator=g) < 0.5, diagonal=1))
    ids = llm.tokenize(["x"])[0]
    template = kv.prefill(llm.model, ids, torch.ones_like(ids)).kv.layers()
    budget = kv_static.workspace_bytes(llm.model, template, 1, 1024, "embeds") / kv_static.GIB

    def run(loops, memory):
        config = RolloutConfig(cuda_graphs=loops, latent_steps=3, retention="full", max_new_tokens=10,
                               judger_latent_steps=1, workspace_memory=memory)
        return RolloutEngine(llm, roster, config).run(QUESTIONS, adjacency, [0, 1, 0, 1, 0, 1], answer_format=FORMAT)

    eager = run("off", "25%")
    pool = llm.loop_pool(capture=False, memory=budget)
    before = pool.stats()["split_loops"]
    small = run("static", budget)
    stats = pool.stats()
    assert [r.answer for r in small.rollouts] == [r.answer for r in eager.rollouts]
    assert [r.decoded_tokens for r in small.rollouts] == [r.decoded_tokens for r in eager.rollouts]
    assert stats["split_loops"] > before and stats["eager_fallbacks"] == 0
    assert {rows for rows, _, _ in pool.workspaces} < {1, 2, 4}  # never the batch's 8 rows
    llm.loop_pool(capture=False, memory="25%")  # the other tests' budget


@torch.no_grad()
def test_sharing_with_nontrivial_gates_changes_nothing(llm, roster, loops):
    adjacency = judger_senders_all(torch.zeros(4, N, N, dtype=torch.bool))
    adjacency[:, 0, 1] = True  # four graphs of one question share agents 0, 2, 3 and (0 -> 1)
    adjacency[3, 1, 2] = True  # ... except that graph 3 also has 1 -> 2 (a different agent 2, and 3 unchanged)
    config = RolloutConfig(cuda_graphs=loops, latent_steps=2, retention="role_latent", max_new_tokens=3)
    logits = torch.randn(1, N + 1, N + 1, generator=torch.Generator().manual_seed(2)) * 2
    fuser = _nontrivial_fuser(llm, "attention")
    shared = RolloutEngine(llm, roster, config, fuser=fuser).run(
        QUESTIONS[:1], adjacency, [0] * 4, answer_format=FORMAT, edge_logits=logits, keep_judger_inputs=True)
    naive = RolloutEngine(llm, roster, RolloutConfig(**{**config.__dict__, "reuse": False}), fuser=fuser).run(
        QUESTIONS[:1], adjacency, [0] * 4, answer_format=FORMAT, edge_logits=logits, keep_judger_inputs=True)
    assert shared.prefills_naive == naive.prefills == 16
    assert shared.prefills == 5  # agents 0, 1, 3 once; agent 2 twice (alone, and after 1)
    assert shared.judger_decodes == 2 and naive.judger_decodes == 4  # graphs 0-2 are identical
    assert [r.answer for r in shared.rollouts] == [r.answer for r in naive.rollouts]
    for a, b in zip(shared.judger_inputs, naive.judger_inputs, strict=True):
        torch.testing.assert_close(_logits_on(llm, a.cache, a.prompt), _logits_on(llm, b.cache, b.prompt),
                                   atol=ATOL, rtol=0)


@torch.no_grad()
def test_text_method_passes_messages_and_counts_their_tokens(llm, roster):
    config = RolloutConfig(method="text", agent_max_new_tokens=4, max_new_tokens=3)
    adjacency = judger_senders_all(fixed_adjacency("chain", N)[None])
    batch = RolloutEngine(llm, roster, config).run(QUESTIONS[:1], adjacency, [0], answer_format=FORMAT)
    rollout = batch.rollouts[0]
    assert set(rollout.messages) == {0, 1, 2, 3}
    assert rollout.decoded_tokens > 4 * 1  # agents' messages count as decoded tokens
    assert rollout.judger_cache_length == 0 and rollout.judger_senders == [0, 1, 2, 3]


@torch.no_grad()
def test_a_graph_without_judger_edges_is_the_judger_alone(llm, roster, loops):
    alone = RolloutEngine(llm, roster, RolloutConfig(cuda_graphs=loops, latent_steps=2, max_new_tokens=3)).run(
        QUESTIONS[:1], _graph([(0, 1), (1, 2)]), [0], answer_format=FORMAT, keep_judger_inputs=True)
    assert alone.prefills == 0 and alone.rollouts[0].judger_cache_length == 0 and alone.rollouts[0].agents_run == 0
    # Its prompt does not mention other agents' work; with a sender it does.
    ids = [llm.chat_text(judger_messages(roster.judger, QUESTIONS[0], FORMAT, reads_others=False))]
    ref = kv.prefill(llm.model, *llm.encode(ids))
    tokens, counts = kv.decode(llm.model, ref.kv, ref.logits, max_new_tokens=3, eos_token_ids=llm.eos_token_ids,
                               pad_token_id=llm.tokenizer.pad_token_id)
    assert alone.rollouts[0].answer == llm.decode_ids(tokens, counts)[0]
    assert "Other agents" not in alone.judger_inputs[0].prompt
    one = RolloutEngine(llm, roster, RolloutConfig(cuda_graphs=loops, latent_steps=2, max_new_tokens=3)).run(
        QUESTIONS[:1], _graph([], judger=(2,)), [0], answer_format=FORMAT, keep_judger_inputs=True)
    assert "Other agents" in one.judger_inputs[0].prompt and one.rollouts[0].agents_run == 1


@torch.no_grad()
def test_mismatched_control_reads_another_questions_segments(llm, roster, loops):
    adjacency = judger_senders_all(fixed_adjacency("chain", N).expand(2, -1, -1))
    config = RolloutConfig(cuda_graphs=loops, latent_steps=2, judger_cache="mismatched", max_new_tokens=3)
    batch = RolloutEngine(llm, roster, config).run(QUESTIONS, adjacency, [0, 1], answer_format=FORMAT,
                                                   keep_judger_inputs=True)
    matched = RolloutEngine(llm, roster, RolloutConfig(cuda_graphs=loops, latent_steps=2, max_new_tokens=3)).run(
        QUESTIONS, adjacency, [0, 1], answer_format=FORMAT, keep_judger_inputs=True)
    for r, other in ((0, 1), (1, 0)):
        inp = batch.judger_inputs[r]
        assert inp.question_index == r and inp.source_question == other
        assert QUESTIONS[r] in inp.prompt  # it answers its own question ...
        for (ka, va), (kb, vb) in zip(inp.cache.layers(), matched.judger_inputs[other].cache.layers(), strict=True):
            torch.testing.assert_close(ka, kb)  # ... on the other question's content
            torch.testing.assert_close(va, vb)


@torch.no_grad()
def test_zeroed_and_shuffled_controls_change_what_the_judger_reads_as_named(llm, roster, loops):
    adjacency = judger_senders_all(fixed_adjacency("chain", N)[None])
    runs = {}
    for control in ("fused", "zeroed", "shuffled"):
        config = RolloutConfig(cuda_graphs=loops, latent_steps=2, judger_cache=control, max_new_tokens=2)
        runs[control] = RolloutEngine(llm, roster, config).run(
            QUESTIONS[:1], adjacency, [0], answer_format=FORMAT, keep_judger_inputs=True).judger_inputs[0]
    real, zeroed, shuffled = runs["fused"].cache, runs["zeroed"].cache, runs["shuffled"].cache
    for (k, v), (kz, vz), (ks, vs) in zip(real.layers(), zeroed.layers(), shuffled.layers(), strict=True):
        torch.testing.assert_close(kz, k)
        assert not bool(vz.ne(0).any())
        assert ks.shape == k.shape and not torch.allclose(vs, v)
        # Same values, another order (content kept).
        torch.testing.assert_close(vs.sort(dim=2).values, v.sort(dim=2).values)


def test_bad_configs_and_graphs_are_refused_with_the_allowed_values(llm, roster):
    with pytest.raises(ValueError, match="retention='everything'.*full"):
        RolloutConfig(retention="everything")
    with pytest.raises(ValueError, match="latent_steps must be an integer >= 0, got -1"):
        RolloutConfig(latent_steps=-1)
    with pytest.raises(ValueError, match="latent_only"):
        RolloutConfig(retention="latent_only", latent_steps=0)
    with pytest.raises(ValueError, match="realign='yes'.*ridge"):
        RolloutConfig(realign="yes")
    with pytest.raises(ValueError, match="judger_senders_all"):
        RolloutEngine(llm, roster, RolloutConfig()).run(QUESTIONS[:1], fixed_adjacency("chain", N)[None], [0],
                                                        answer_format=FORMAT)


@torch.no_grad()
def test_sampled_rows_share_prefills_but_draw_their_own_answers(llm, roster, loops):
    # G identical graphs of one question: the agents run once; a greedy judger decodes once, a sampled
    # one decodes per row (the leave-one-out baseline needs G draws, not G copies of one).
    rows = 4
    graph = STAR.expand(rows, -1, -1)
    greedy = RolloutEngine(llm, roster, RolloutConfig(cuda_graphs=loops, latent_steps=1, max_new_tokens=6))
    batch = greedy.run(QUESTIONS[:1], graph, [0] * rows, answer_format=FORMAT)
    assert batch.prefills == N and batch.judger_decodes == 1
    assert len({r.answer for r in batch.rollouts}) == 1
    sampled = RolloutEngine(llm, roster, RolloutConfig(cuda_graphs=loops, latent_steps=1, max_new_tokens=6, temperature=1.0))
    batch = sampled.run(QUESTIONS[:1], graph, [0] * rows, answer_format=FORMAT,
                        generator=torch.Generator().manual_seed(0))
    assert batch.prefills == N and batch.judger_decodes == rows
    assert len({r.answer for r in batch.rollouts}) > 1  # a random model at temperature 1: distinct draws
    again = sampled.run(QUESTIONS[:1], graph, [0] * rows, answer_format=FORMAT,
                        generator=torch.Generator().manual_seed(0))
    assert [r.answer for r in again.rollouts] == [r.answer for r in batch.rollouts]  # reproducible


@torch.no_grad()
def test_shuffled_control_draws_from_its_own_host_generator(llm, roster):
    # the decoding generator lives on the model's device; slot permutations are drawn on the host
    config = RolloutConfig(latent_steps=1, max_new_tokens=3, judger_cache="shuffled", temperature=1.0)
    device = llm.device.type
    engine = RolloutEngine(llm, roster, config)
    runs = [engine.run(QUESTIONS[:1], STAR, [0], answer_format=FORMAT, keep_judger_inputs=True,
                       generator=torch.Generator(device=device).manual_seed(3)) for _ in range(2)]
    assert runs[0].rollouts[0].answer == runs[1].rollouts[0].answer
    other = "cuda" if device == "cpu" and torch.cuda.is_available() else None
    if other:
        with pytest.raises(ValueError, match="generator is on"):
            engine.run(QUESTIONS[:1], STAR, [0], answer_format=FORMAT, generator=torch.Generator(device=other))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@torch.no_grad()
def test_shuffled_and_sampled_run_on_cuda_with_a_cuda_generator(roster):
    gpu = LocalLM.tiny_random(seed=0, device="cuda", dtype="bfloat16")
    config = RolloutConfig(latent_steps=1, max_new_tokens=3, judger_cache="shuffled", temperature=1.0)
    batch = RolloutEngine(gpu, roster, config).run(QUESTIONS[:1], STAR, [0], answer_format=FORMAT,
                                                   generator=torch.Generator(device="cuda").manual_seed(0))
    assert batch.rollouts[0].decoded_tokens > 0


@torch.no_grad()
def test_rows_reading_the_same_segments_with_other_direct_senders_are_not_shared(llm, roster, loops):
    # Both judgers read agent 0 and agent 1 (computed on 0): in A both send to the judger, in B only 1
    # does, so A gates both segments and B only agent 1's. Sharing their input would gate one wrongly.
    a = _graph([(0, 1)], judger=(0, 1))
    b = _graph([(0, 1)], judger=(1,))
    config = RolloutConfig(cuda_graphs=loops, latent_steps=1, retention="full", max_new_tokens=2)
    fuser = _nontrivial_fuser(llm, "attention")
    logits = torch.randn(1, N + 1, N + 1, generator=torch.Generator().manual_seed(2)) * 2
    engine = RolloutEngine(llm, roster, config, fuser=fuser)
    both = engine.run(QUESTIONS[:1], torch.cat([a, b]), [0, 0], answer_format=FORMAT, keep_judger_inputs=True,
                      edge_logits=logits)
    assert [inp.gated for inp in both.judger_inputs] == [[True, True], [False, True]]
    assert both.prefills == 2 and both.judger_decodes == 2
    for row, graph in enumerate((a, b)):
        alone = engine.run(QUESTIONS[:1], graph, [0], answer_format=FORMAT, keep_judger_inputs=True,
                           edge_logits=logits).judger_inputs[0]
        for (k0, v0), (k1, v1) in zip(both.judger_inputs[row].cache.layers(), alone.cache.layers(), strict=True):
            torch.testing.assert_close(k0, k1)
            torch.testing.assert_close(v0, v1)
        torch.testing.assert_close(both.judger_inputs[row].cache.log_weight, alone.cache.log_weight)
    assert not torch.equal(both.judger_inputs[0].cache.log_weight, both.judger_inputs[1].cache.log_weight)

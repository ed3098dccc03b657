"""Equivalence tests of the cache plumbing on tiny random models (fp32, CPU) of every family and RoPE
variant the code claims to support: Llama, Qwen2 (q/k/v biases), Qwen3 (q/k norms), and Llama with
linear, llama3 and yarn RoPE scaling."""

from __future__ import annotations

import math

import pytest
import torch

from gcache import kv, kv_static
from gcache.llm.local import LocalLM

ATOL = 1e-4


FAMILIES = {
    "llama": {},
    "qwen2": {"family": "qwen2"},
    "qwen3": {"family": "qwen3"},
    "llama-linear": {"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
    "llama3": {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "llama-yarn": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}},
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def llm(request) -> LocalLM:
    return LocalLM.tiny_random(seed=0, **FAMILIES[request.param])


@pytest.fixture(scope="module")
def model(llm):
    return llm.model


LOOPS = ["eager", "static"]


@pytest.fixture(params=LOOPS)
def pool(request, model) -> kv_static.LoopPool | None:
    """The token loops under test: eager buffers (CPU's default) or the static workspaces a GPU runs
    (`rollout.cuda_graphs=static`: the same code less the CUDA-graph capture and replay)."""
    return None if request.param == "eager" else kv_static.LoopPool(model, capture=False, budget_bytes=kv_static.GIB)


def _ids(*lengths: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 2000, (n,), generator=g) for n in lengths]


def _left_pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = s
        mask[i, width - len(s) :] = 1
    return ids, mask


def _full_logits(model, seq: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(seq[None]).logits[0, -1].float()


def _ones(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return seq[None], torch.ones(1, len(seq), dtype=torch.long)


@torch.no_grad()
def test_agent_b_on_agent_a_cache_equals_one_forward(model):
    a, b = _ids(9, 6)
    step_a = kv.prefill(model, *_ones(a))
    step_b = kv.prefill(model, *_ones(b), past=step_a.kv)
    torch.testing.assert_close(step_b.logits[0], _full_logits(model, torch.cat([a, b])), atol=ATOL, rtol=0)


@torch.no_grad()
def test_continuation_with_padding_in_both_segments_matches_each_row_alone(model):
    # Left padding in the first segment *and* the second puts pads between the segments.
    firsts, seconds = _ids(4, 9, 6, seed=1), _ids(7, 3, 5, seed=2)
    step = kv.prefill(model, *_left_pad(firsts))
    step = kv.prefill(model, *_left_pad(seconds), past=step.kv)
    for i in range(3):
        ref = _full_logits(model, torch.cat([firsts[i], seconds[i]]))
        torch.testing.assert_close(step.logits[i], ref, atol=ATOL, rtol=0)


@torch.no_grad()
def test_left_padded_batch_equals_each_prompt_alone_also_after_latent_steps(llm, model, pool):
    prompts = _ids(5, 11, 8, seed=3)
    realign = llm.realignment("ridge")
    batched = kv.prefill(model, *_left_pad(prompts))
    batched_latent = kv.latent_steps(model, batched, 4, realign, pool=pool)
    for i, p in enumerate(prompts):
        alone = kv.prefill(model, *_ones(p))
        torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(batched.hidden[i], alone.hidden[0], atol=ATOL, rtol=0)
        alone_latent = kv.latent_steps(model, alone, 4, realign, pool=pool)
        torch.testing.assert_close(batched_latent.step.hidden[i], alone_latent.step.hidden[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(batched_latent.fed[i], alone_latent.fed[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_latent_step_feeds_the_rescaled_last_hidden_state_without_realignment(llm, model, pool):
    realign = llm.realignment("identity")
    assert realign.matrix is None
    start = kv.prefill(model, *_ones(_ids(7)[0]))
    result = kv.latent_steps(model, start, 3, realign, pool=pool)
    target = float(model.get_input_embeddings().weight.norm(dim=-1).mean())
    hidden = start.hidden
    state = start
    for t in range(3):
        expected = hidden * (target / hidden.norm(dim=-1, keepdim=True))
        torch.testing.assert_close(result.fed[:, t], expected, atol=1e-6, rtol=1e-6)
        # ... and that embedding is what the model was run on.
        state_kv, h = kv.forward(model, state.kv, torch.ones(1, 1, dtype=torch.long), inputs_embeds=expected[:, None])
        state = kv.Step(state_kv, h[:, -1], kv.next_token_logits(model, h[:, -1]))
        hidden = state.hidden
    torch.testing.assert_close(result.step.hidden, hidden, atol=ATOL, rtol=0)


def test_realignment_matrix_solves_the_regularised_least_squares_problem(llm, model):
    reg = 1e-5
    w_in = model.get_input_embeddings().weight.detach().double()
    w_out = model.get_output_embeddings().weight.detach().double()
    dim = w_out.shape[1]
    # Ridge regression as an ordinary least-squares problem on an augmented system.
    a = torch.cat([w_out, reg**0.5 * torch.eye(dim, dtype=torch.float64)])
    b = torch.cat([w_in, torch.zeros(dim, dim, dtype=torch.float64)])
    expected = torch.linalg.lstsq(a, b).solution
    realign = llm.realignment("ridge")
    torch.testing.assert_close(realign.matrix.double(), expected, atol=1e-4, rtol=1e-4)
    assert realign.target_norm == pytest.approx(float(w_in.norm(dim=-1).mean()), rel=1e-5)
    # solved in float64: off from the float64 reference by fp32 rounding of the result only (a float32
    # solve, or a TF32 one on a GPU, is off by far more), in chunks or not
    rounding = 4 * torch.finfo(torch.float32).eps * float(expected.abs().max())
    for chunk in (8192, 100):
        matrix = kv.realignment(model, chunk=chunk).matrix.double()
        assert float((matrix - expected).abs().max()) <= rounding


def test_realignment_is_near_identity_for_tied_embeddings():
    tied = LocalLM.tiny_random(seed=1, tie_word_embeddings=True)
    matrix = tied.realignment("ridge").matrix
    torch.testing.assert_close(matrix, torch.eye(matrix.shape[0]), atol=1e-3, rtol=0)


@torch.no_grad()
def test_rerotated_keys_equal_keys_computed_at_the_shifted_positions(llm, model):
    seq = _ids(6)[0]
    at_zero = kv.prefill(model, *_ones(seq))
    shift = 13
    cache = kv.empty(1).cache
    out = model.get_decoder()(
        input_ids=seq[None], position_ids=torch.arange(shift, shift + 6)[None], cache=cache, use_cache=True
    )
    keys_shifted = out.cache.layers[0].keys
    rotated = kv.rotate_keys(at_zero.kv.cache.layers[0].keys, torch.tensor([shift]), llm.rotary)
    torch.testing.assert_close(rotated, keys_shifted, atol=1e-5, rtol=0)


@torch.no_grad()
def test_truncation_keeps_n_positions_and_continues_after_the_original_ones(llm, model):
    prefix, suffix = _ids(12, 5, seed=4)
    n = 4
    full = kv.prefill(model, *_ones(prefix))
    kept = kv.keep_last(full.kv, n, llm.rotary)
    assert kept.seq_len == n and all(k.shape[2] == n and v.shape[2] == n for k, v in kept.layers())
    ours = kv.prefill(model, *_ones(suffix), past=kept)

    # Reference by hand: slice the *unrotated* last n slots and continue at the original positions.
    sliced = kv.cache_from_layers([(k[:, :, -n:], v[:, :, -n:]) for k, v in full.kv.layers()])
    out = model(
        input_ids=suffix[None],
        attention_mask=torch.ones(1, n + len(suffix), dtype=torch.long),
        position_ids=torch.arange(len(prefix), len(prefix) + len(suffix))[None],
        cache=sliced,
        use_cache=True,
    )
    torch.testing.assert_close(ours.logits[0], out.logits[0, -1].float(), atol=ATOL, rtol=0)


@torch.no_grad()
def test_truncating_a_padded_batch_matches_each_row_alone(llm, model, pool):
    prompts, suffixes = _ids(6, 10, seed=5), _ids(3, 5, seed=6)
    batched = kv.latent_steps(model, kv.prefill(model, *_left_pad(prompts)), 3, llm.realignment("ridge"), pool=pool).step
    kept = kv.keep_last(batched.kv, 3, llm.rotary)
    cont = kv.prefill(model, *_left_pad(suffixes), past=kept)
    for i in range(2):
        alone = kv.latent_steps(model, kv.prefill(model, *_ones(prompts[i])), 3, llm.realignment("ridge"), pool=pool).step
        alone_cont = kv.prefill(model, *_ones(suffixes[i]), past=kv.keep_last(alone.kv, 3, llm.rotary))
        torch.testing.assert_close(cont.logits[i], alone_cont.logits[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_concatenated_senders_equal_a_hand_built_cache_at_consecutive_positions(llm, model):
    a, b, c = _ids(7, 5, 4, seed=7)
    kv_a = kv.prefill(model, *_ones(a)).kv
    kv_b = kv.prefill(model, *_ones(b)).kv  # computed on its own, from position 0
    fused = kv.concat([kv_a, kv_b], llm.rotary)
    ours = kv.prefill(model, *_ones(c), past=fused)

    # Reference: B computed alone but at positions len(a)..; raw tensors joined; C continues after both.
    decoder = model.get_decoder()
    out_b = decoder(input_ids=b[None], position_ids=torch.arange(7, 12)[None], cache=kv.empty(1).cache, use_cache=True)
    joined = kv.cache_from_layers(
        [
            (torch.cat([ka, lb.keys], 2), torch.cat([va, lb.values], 2))
            for (ka, va), lb in zip(kv_a.layers(), out_b.cache.layers, strict=True)
        ]
    )
    ref = model(input_ids=c[None], position_ids=torch.arange(12, 16)[None], cache=joined, use_cache=True)
    torch.testing.assert_close(ours.logits[0], ref.logits[0, -1].float(), atol=ATOL, rtol=0)


@torch.no_grad()
def test_concat_of_padded_batches_and_stack_of_rows_match_rows_alone(llm, model):
    firsts, seconds, thirds = _ids(3, 8, seed=8), _ids(6, 2, seed=9), _ids(4, 4, seed=10)
    kv1 = kv.prefill(model, *_left_pad(firsts)).kv
    kv2 = kv.prefill(model, *_left_pad(seconds)).kv
    fused = kv.concat([kv1, kv2], llm.rotary)
    cont = kv.prefill(model, *_left_pad(thirds), past=fused)
    rows = []
    for i in range(2):
        row = kv.concat(
            [kv.prefill(model, *_ones(firsts[i])).kv, kv.prefill(model, *_ones(seconds[i])).kv], llm.rotary
        )
        rows.append(row)
        alone = kv.prefill(model, *_ones(thirds[i]), past=row)
        torch.testing.assert_close(cont.logits[i], alone.logits[0], atol=ATOL, rtol=0)
    stacked = kv.stack(rows[::-1])
    cont2 = kv.prefill(model, *_left_pad(thirds[::-1]), past=stacked)
    torch.testing.assert_close(cont2.logits.flip(0), cont.logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_value_scale_of_one_is_plain_concatenation(llm, model):
    a, b, c = _ids(5, 5, 3, seed=11)
    kv_a, kv_b = kv.prefill(model, *_ones(a)).kv, kv.prefill(model, *_ones(b)).kv
    scales = [torch.ones(llm.num_layers, 1), torch.ones(llm.num_layers, 1)]
    plain = kv.prefill(model, *_ones(c), past=kv.concat([kv_a, kv_b], llm.rotary))
    gated = kv.prefill(model, *_ones(c), past=kv.concat([kv_a, kv_b], llm.rotary, scales))
    torch.testing.assert_close(plain.logits, gated.logits, atol=1e-6, rtol=0)
    halved = kv.prefill(model, *_ones(c), past=kv.concat([kv_a, kv_b], llm.rotary, [s * 0.5 for s in scales]))
    assert not torch.allclose(plain.logits, halved.logits, atol=1e-4)


def _weighted_pair(llm, model, seed):
    """Two senders' caches A (5 slots) and B (4 slots), and B's slots hand-joined twice after A at the
    same positions 5..8 (a reader then pays B exactly twice its attention: a weight of 2)."""
    a, b = _ids(5, 4, seed=seed)
    kv_a, kv_b = kv.prefill(model, *_ones(a)).kv, kv.prefill(model, *_ones(b)).kv
    out_b = model.get_decoder()(input_ids=b[None], position_ids=torch.arange(5, 9)[None], cache=kv.empty(1).cache,
                                use_cache=True)
    doubled = kv.cache_from_layers([(torch.cat([ka, lb.keys, lb.keys], 2), torch.cat([va, lb.values, lb.values], 2))
                                    for (ka, va), lb in zip(kv_a.layers(), out_b.cache.layers, strict=True)])
    return kv_a, kv_b, doubled


@torch.no_grad()
def test_an_attention_weight_of_two_is_the_senders_slots_read_twice(llm, model, pool):
    kv_a, kv_b, doubled = _weighted_pair(llm, model, seed=31)
    c = _ids(4, seed=32)[0]
    weighted = kv.concat([kv_a, kv_b], llm.rotary, log_weights=[torch.zeros(1), torch.full((1,), math.log(2.0))])
    assert weighted.log_weight.shape == (1, 9)
    ours = kv.prefill(model, *_ones(c), past=weighted)
    # reference: the doubled cache (13 slots) and the prompt at positions 9..12, plain attention
    ref = model(input_ids=c[None], position_ids=torch.arange(9, 13)[None], cache=doubled, use_cache=True)
    torch.testing.assert_close(ours.logits[0], ref.logits[0, -1].float(), atol=ATOL, rtol=0)
    # ... and so is every token decoded from it (the token loops carry the weights), by the same reference
    tokens, _ = kv.decode(model, ours.kv, ours.logits, max_new_tokens=4, eos_token_ids=[-1], pad_token_id=0, pool=pool)
    cache, position, logits = ref.cache, 13, ref.logits[0, -1]
    for t in range(4):
        assert int(tokens[0, t]) == int(logits.argmax())
        step = model(input_ids=tokens[:, t : t + 1], position_ids=torch.tensor([[position]]), cache=cache, use_cache=True)
        cache, position, logits = step.cache, position + 1, step.logits[0, -1]
    # a zero log-weight is plain concatenation
    plain = kv.prefill(model, *_ones(c), past=kv.concat([kv_a, kv_b], llm.rotary))
    zero = kv.prefill(model, *_ones(c), past=kv.concat([kv_a, kv_b], llm.rotary, log_weights=[torch.zeros(1)] * 2))
    torch.testing.assert_close(zero.logits, plain.logits, atol=1e-6, rtol=0)


@torch.no_grad()
def test_a_sender_weighted_to_zero_is_not_read_in_prefill_latent_steps_or_decoding(llm, model, pool):
    kv_a, kv_b, _ = _weighted_pair(llm, model, seed=33)
    noise = kv.KV(kv.cache_from_layers([(torch.randn_like(k), torch.randn_like(v)) for k, v in kv_b.layers()]),
                  kv_b.mask.clone())
    c = _ids(3, seed=34)[0]
    out = []
    for b in (kv_b, noise):  # what B holds cannot matter when its weight is exp(-1e4)
        fused = kv.concat([kv_a, b], llm.rotary, log_weights=[torch.zeros(1), torch.full((1,), -1e9)])
        step = kv.prefill(model, *_ones(c), past=fused)
        thought = kv.latent_steps(model, step, 3, llm.realignment("ridge"), logits=True, pool=pool).step
        assert thought.kv.log_weight.shape == (1, 15) and float(thought.kv.log_weight[0, 5:9].max()) == kv.LOG_WEIGHT_FLOOR
        assert bool(thought.kv.log_weight[0, 9:].eq(0).all())  # the reader's own slots: weight 1
        tokens, _ = kv.decode(model, thought.kv, thought.logits, max_new_tokens=5, eos_token_ids=[-1], pad_token_id=0,
                              pool=pool)
        out.append((step.logits, thought.logits, tokens))
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0][1], out[1][1], atol=1e-5, rtol=0)
    assert torch.equal(out[0][2], out[1][2])
    read = kv.prefill(model, *_ones(c), past=kv.concat([kv_a, noise], llm.rotary))
    assert not torch.allclose(read.logits, out[1][0], atol=1e-3)  # read plainly, the noise does matter


@torch.no_grad()
def test_log_weights_follow_rows_through_stack_select_and_a_padded_batch(llm, model, pool):
    rows = []
    for seed, w in ((35, 0.7), (36, -2.0)):
        kv_a, kv_b, _ = _weighted_pair(llm, model, seed=seed)
        rows.append(kv.concat([kv_a, kv.keep_last(kv_b, 2 if w > 0 else 4, llm.rotary)], llm.rotary,
                              log_weights=[torch.zeros(1), torch.full((1,), w)]))
    prompts = _ids(3, 5, seed=37)
    batch = kv.prefill(model, *_left_pad(prompts), past=kv.stack(rows))  # row 0 is left-padded by 2 slots
    tokens, _ = kv.decode(model, batch.kv, batch.logits, max_new_tokens=3, eos_token_ids=[-1], pad_token_id=0, pool=pool)
    for i, row in enumerate(rows):
        alone = kv.prefill(model, *_ones(prompts[i]), past=row)
        torch.testing.assert_close(batch.logits[i], alone.logits[0], atol=ATOL, rtol=0)
        one, _ = kv.decode(model, alone.kv, alone.logits, max_new_tokens=3, eos_token_ids=[-1], pad_token_id=0, pool=pool)
        assert torch.equal(tokens[i], one[0])
        picked = kv.select(batch.kv, [i])
        torch.testing.assert_close(picked.log_weight[:, picked.mask[0].bool()], alone.kv.log_weight)


def test_answer_nll_gradient_reaches_attention_log_weights(llm, model):
    a, b, prompt, target = _ids(5, 4, 6, 3, seed=38)
    with torch.no_grad():
        kv_a, kv_b = kv.prefill(model, *_ones(a)).kv, kv.prefill(model, *_ones(b)).kv
    log_w = torch.zeros(2, 1, requires_grad=True)
    nll = kv.answer_nll(model, kv.concat([kv_a, kv_b], llm.rotary, log_weights=list(log_w)), *_ones(prompt), *_ones(target))
    nll.sum().backward()
    assert log_w.grad is not None and bool(log_w.grad.abs().gt(0).all())
    assert all(p.grad is None for p in model.parameters())


@torch.no_grad()
def test_prompts_on_cached_prefixes_equal_whole_prompts_in_a_left_padded_batch(llm):
    """Agents without senders (two roles, questions of different lengths: left padding) and judgers alone
    prefill on the model's cached chat-header + role prefixes (`gcache.prefix_cache`): their segments
    and answers equal those of whole-prompt prefills; an agent on a past never uses a prefix."""
    from gcache.agents import build_roster
    from gcache.policy.topology import judger_senders_all
    from gcache.rollout import RolloutConfig, RolloutEngine

    roster = build_roster("math")
    n = roster.num_agents
    questions = ["What is 2 + 3?", "A train leaves at noon at 60 km/h; how far has it gone by 3 pm, in km?"]
    graphs = torch.cat([judger_senders_all(torch.zeros(1, n, n, dtype=torch.bool)),  # every agent alone -> judger
                        torch.zeros(1, n + 1, n + 1, dtype=torch.bool)])  # the judger alone
    graphs[0, 0, 1] = True  # agent 1 reads agent 0: a prompt on a past
    runs = {}
    for cached in (False, True):
        engine = RolloutEngine(llm, roster, RolloutConfig(latent_steps=2, retention="full", max_new_tokens=3,
                                                          prefix_cache=cached))
        runs[cached] = engine.run(questions, torch.cat([graphs, graphs]), [0, 0, 1, 1], answer_format="Answer:",
                                  keep_judger_inputs=True)
    plain, cached = runs[False], runs[True]
    assert [r.answer for r in cached.rollouts] == [r.answer for r in plain.rollouts]
    assert [r.prompt_tokens for r in cached.rollouts] == [r.prompt_tokens for r in plain.rollouts]
    lengths = set()
    for a, b in zip(cached.judger_inputs, plain.judger_inputs, strict=True):
        for seg_a, seg_b in zip(a.sender_kvs, b.sender_kvs, strict=True):
            # Slot for slot: a segment built on a prefix keeps none of the batch's padding between the prefix
            # and the rest of its prompt (the two questions' prompts differ in length).
            assert seg_a.seq_len == seg_b.seq_len == int(seg_a.lengths[0]) == int(seg_b.lengths[0])
            lengths.add(seg_a.seq_len)
            for (ka, va), (kb, vb) in zip(seg_a.layers(), seg_b.layers(), strict=True):
                torch.testing.assert_close(ka, kb, atol=1e-5, rtol=0)
                torch.testing.assert_close(va, vb, atol=1e-5, rtol=0)
    assert len(lengths) > 1
    assert cached.prefill_tokens < plain.prefill_tokens
    stats = llm.prefix_cache().stats()
    assert stats["computed"] >= 3 and stats["uses"] >= 2 * (n - 1) + 2  # agents alone and judgers alone, per question
    # Text agents read their senders' messages in their prompts: every one starts afresh, on a cached prefix
    text = {}
    for cached in (False, True):
        engine = RolloutEngine(llm, roster, RolloutConfig(method="text", agent_max_new_tokens=4, max_new_tokens=3,
                                                          prefix_cache=cached))
        text[cached] = engine.run(questions, torch.cat([graphs, graphs]), [0, 0, 1, 1], answer_format="Answer:")
    assert [r.messages for r in text[True].rollouts] == [r.messages for r in text[False].rollouts]
    assert [r.answer for r in text[True].rollouts] == [r.answer for r in text[False].rollouts]
    assert text[True].prefill_tokens < text[False].prefill_tokens


def test_a_trained_realignments_segments_recomputed_with_grad_are_the_rollouts_own(llm):
    """`RolloutEngine.segment_with_grad` (a trained realignment's loss) recomputes each direct sender's
    segment from where its latent steps began: the rollout's own slots, for agents on cached prefixes in a
    left-padded batch and agents on a past alike, and differentiable in the realignment."""
    from gcache.agents import build_roster
    from gcache.policy.cache_fuser import CacheFuser
    from gcache.policy.topology import judger_senders_all
    from gcache.rollout import RolloutConfig, RolloutEngine

    roster = build_roster("math")
    n = roster.num_agents
    fuser = CacheFuser(llm.num_layers, channel="realign", rank=2, hidden_dim=llm.model.config.hidden_size,
                       latent_steps=2)
    with torch.no_grad():
        fuser.realign.offsets.normal_(0, 0.1)
        fuser.realign.up.normal_(0, 0.1)
    engine = RolloutEngine(llm, roster, RolloutConfig(latent_steps=2, retention="full", max_new_tokens=2), fuser)
    graphs = judger_senders_all(torch.zeros(2, n, n, dtype=torch.bool))
    graphs[:, 0, 1] = True  # agent 1 reads agent 0: a prompt on a past
    questions = ["What is 2 + 3?", "A train leaves at noon at 60 km/h; how far has it gone by 3 pm, in km?"]
    with torch.no_grad():
        out = engine.run(questions, graphs, [0, 1], answer_format="Answer:", keep_judger_inputs=True)
    realign = engine.agent_realignment()
    checked = 0
    for inp in out.judger_inputs:
        for segment, start in zip(inp.sender_kvs, inp.sender_starts, strict=True):
            again = engine.segment_with_grad(start, realign)
            assert again.seq_len == segment.seq_len and torch.equal(again.mask, segment.mask)
            for (k0, v0), (k1, v1) in zip(again.layers(), segment.layers(), strict=True):
                torch.testing.assert_close(k0.detach(), k1, atol=1e-5, rtol=0)
                torch.testing.assert_close(v0.detach(), v1, atol=1e-5, rtol=0)
            checked += 1
    assert checked == 2 * n and any(start.gap[1] > start.gap[0] for inp in out.judger_inputs
                                    for start in inp.sender_starts)  # padding dropped somewhere
    again.layers()[0][1].sum().backward()
    assert fuser.realign.up.grad is not None and bool(fuser.realign.up.grad.abs().gt(0).any())


@torch.no_grad()
def test_decode_does_not_change_the_callers_cache(llm, model, pool):
    step = kv.prefill(model, *_ones(_ids(8, seed=12)[0]))
    before = [(k.clone(), v.clone()) for k, v in step.kv.layers()]
    mask_before = step.kv.mask.clone()
    kwargs = dict(max_new_tokens=6, eos_token_ids=[-1], pad_token_id=0)
    first, _ = kv.decode(model, step.kv, step.logits, **kwargs, pool=pool)
    assert step.kv.seq_len == 8 and torch.equal(step.kv.mask, mask_before)
    for (k0, v0), (k1, v1) in zip(before, step.kv.layers(), strict=True):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    second, _ = kv.decode(model, step.kv, step.logits, **kwargs, pool=pool)  # a second consumer sees the same cache
    assert torch.equal(first, second)


@torch.no_grad()
def test_greedy_decode_matches_step_by_step_full_forwards(model, pool):
    seq = _ids(6, seed=13)[0]
    step = kv.prefill(model, *_ones(seq))
    tokens, counts = kv.decode(model, step.kv, step.logits, max_new_tokens=5, eos_token_ids=[-1], pad_token_id=0, pool=pool)
    assert counts.tolist() == [5]
    cur = seq
    for t in range(5):
        nxt = _full_logits(model, cur).argmax()
        assert int(tokens[0, t]) == int(nxt)
        cur = torch.cat([cur, nxt[None]])


def test_answer_nll_gradient_reaches_value_gates_and_not_the_frozen_model(llm, model):
    a, b, prompt, target = _ids(5, 4, 6, 3, seed=14)
    with torch.no_grad():
        kv_a, kv_b = kv.prefill(model, *_ones(a)).kv, kv.prefill(model, *_ones(b)).kv
    gates = torch.ones(2, llm.num_layers, 1, requires_grad=True)
    fused = kv.concat([kv_a, kv_b], llm.rotary, [gates[0], gates[1]])
    nll = kv.answer_nll(model, fused, *_ones(prompt), *_ones(target))
    nll.sum().backward()
    assert gates.grad is not None and bool(gates.grad.abs().gt(0).all())
    assert all(p.grad is None for p in model.parameters())
    # The NLL equals the cross-entropy of one plain forward over the same cache (no gates).
    with torch.no_grad():
        plain = kv.concat([kv_a, kv_b], llm.rotary)
        logits = []
        state = kv.prefill(model, *_ones(prompt), past=plain)
        for tok in target:
            logits.append(state.logits[0])
            state = kv.prefill(model, tok.view(1, 1), torch.ones(1, 1, dtype=torch.long), past=state.kv)
        ref = torch.nn.functional.cross_entropy(torch.stack(logits), target)
    assert float(nll.detach()) == pytest.approx(float(ref), abs=1e-4)


def test_nbytes_counts_keys_and_values(llm, model):
    with torch.no_grad():
        step = kv.prefill(model, *_ones(_ids(10)[0]))
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    expected = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 10 * head_dim * 4
    assert kv.nbytes(step.kv) == expected
    assert kv.nbytes(kv.empty(1)) == 0


# ---- token loops: static buffers, no host syncs --------------------------------------------------


class _HostReads:
    """Counts tensor -> host conversions (what synchronises with a GPU) while active."""

    NAMES = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(self_, *args, _original=original, **kwargs):
                self.count += 1
                return _original(self_, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@torch.no_grad()
def test_token_loops_read_the_device_at_most_once_per_k_tokens(llm, model, monkeypatch, pool):
    step = kv.prefill(model, *_left_pad(_ids(5, 9, 7, seed=20)))
    realign = llm.realignment("ridge")
    reads = _HostReads(monkeypatch)
    kv.latent_steps(model, step, 12, realign, pool=pool)
    assert reads.count == 0, f"{reads.count} host reads in 12 latent steps"
    tokens, k = 40, 8
    kv.decode(model, step.kv, step.logits, max_new_tokens=tokens, eos_token_ids=[-1], pad_token_id=0, check_every=k,
              pool=pool)
    # one "have all rows ended?" every k tokens, one to cut trailing padding at the end
    assert reads.count <= tokens // k + 1, f"{reads.count} host reads in {tokens} decoded tokens"


@torch.no_grad()
def test_decode_checking_for_the_end_every_k_tokens_returns_the_same_tokens(model, pool):
    # rows end at different steps (EOS = a token greedy decoding produces), trailing padding is cut
    step = kv.prefill(model, *_left_pad(_ids(6, 10, 4, seed=21)))
    kwargs = dict(max_new_tokens=12, eos_token_ids=[-1], pad_token_id=0)
    free, _ = kv.decode(model, step.kv, step.logits, **kwargs, pool=pool)
    eos = int(free[1, 3])  # row 1 ends at its 4th token (and any row producing it earlier)
    kwargs["eos_token_ids"] = [eos]
    every, every_counts = kv.decode(model, step.kv, step.logits, check_every=1, **kwargs, pool=pool)
    rarely, rarely_counts = kv.decode(model, step.kv, step.logits, check_every=5, **kwargs, pool=pool)
    assert torch.equal(every, rarely) and torch.equal(every_counts, rarely_counts)
    assert int(every_counts[1]) <= 4 and every.shape[1] == int(every_counts.max())


@torch.no_grad()
def test_latent_steps_in_buffers_equal_steps_through_forward(llm, model, pool):
    # the hand-built reference: each latent step as a `forward` over a DynamicCache
    start = kv.prefill(model, *_left_pad(_ids(4, 8, seed=22)))
    realign = llm.realignment("ridge")
    result = kv.latent_steps(model, start, 5, realign, logits=True, pool=pool)
    state, hidden = start.kv, start.hidden
    ones = torch.ones(2, 1, dtype=torch.long)
    for _ in range(5):
        state, h = kv.forward(model, state, ones, inputs_embeds=realign(hidden)[:, None])
        hidden = h[:, -1]
    torch.testing.assert_close(result.step.hidden, hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.step.logits, kv.next_token_logits(model, hidden), atol=1e-5, rtol=0)
    assert torch.equal(result.step.kv.mask, state.mask)
    for (k0, v0), (k1, v1) in zip(result.step.kv.layers(), state.layers(), strict=True):
        torch.testing.assert_close(k0, k1, atol=1e-5, rtol=0)
        torch.testing.assert_close(v0, v1, atol=1e-5, rtol=0)
    assert kv.latent_steps(model, start, 3, realign, pool=pool).step.logits is None  # the LM head only where read


@torch.no_grad()
def test_static_loops_equal_eager_loops(llm, model):
    # static shapes (whole buffer attended, device write position): what CUDA graphs capture
    pool = kv_static.LoopPool(model, capture=False, budget_bytes=kv_static.GIB)
    realign = llm.realignment("ridge")
    for lengths in ((5, 9, 7), (3, 12)):  # two batch buckets, workspaces reused across calls
        start = kv.prefill(model, *_left_pad(_ids(*lengths, seed=len(lengths))))
        eager = kv.latent_steps(model, start, 6, realign, logits=True)
        static = kv.latent_steps(model, start, 6, realign, logits=True, pool=pool)
        torch.testing.assert_close(static.step.hidden, eager.step.hidden, atol=1e-5, rtol=0)
        torch.testing.assert_close(static.step.logits, eager.step.logits, atol=1e-5, rtol=0)
        assert torch.equal(static.step.kv.mask, eager.step.kv.mask)
        kwargs = dict(max_new_tokens=9, eos_token_ids=[-1], pad_token_id=0)
        ids_eager, n_eager = kv.decode(model, eager.step.kv, eager.step.logits, **kwargs)
        ids_static, n_static = kv.decode(model, static.step.kv, static.step.logits, pool=pool, **kwargs)
        assert torch.equal(ids_eager, ids_static) and torch.equal(n_eager, n_static)
    assert set(pool.workspaces) == {(4, 16, "embeds"), (4, 32, "ids"), (2, 32, "embeds"), (2, 32, "ids")}
    assert pool.created == 4 and pool.nbytes == sum(ws.nbytes for ws in pool.workspaces.values())


def _start(model, *lengths: int, seed: int = 0) -> kv.Step:
    return kv.prefill(model, *_left_pad(_ids(*lengths, seed=seed)))


@torch.no_grad()
def test_the_pool_keeps_workspaces_within_a_budget_in_bytes_and_reuses_larger_ones(llm, model, caplog):
    realign = llm.realignment("ridge")
    start = _start(model, 5, 9, 7)
    template = start.kv.layers()
    size = {c: kv_static.workspace_bytes(model, template, 4, c, "embeds") for c in (16, 64)}
    pool = kv_static.LoopPool(model, capture=False, budget_bytes=size[64] + size[16] - 1)  # not both
    eager = {steps: kv.latent_steps(model, start, steps, realign).step.hidden for steps in (3, 40)}
    for steps in (40, 3, 3):  # 9 + 3 slots fit the 64-slot workspace: reused, no second allocation
        torch.testing.assert_close(kv.latent_steps(model, start, steps, realign, pool=pool).step.hidden,
                                   eager[steps], atol=1e-5, rtol=0)
    assert list(pool.workspaces) == [(4, 64, "embeds")] and pool.created == 1
    assert pool.nbytes == size[64]  # the estimate a budget is checked against is what was allocated
    pool.set_budget(size[16])  # evicted by bytes, least recently used first
    assert not pool.workspaces
    kv.latent_steps(model, start, 3, realign, pool=pool)
    assert list(pool.workspaces) == [(4, 16, "embeds")] and pool.created == 2
    # A loop whose workspace does not fit runs in groups of rows whose workspace does (here one row of 64
    # slots: less than 4 rows of 16), said once; every row as in one eager loop.
    one_row = kv_static.workspace_bytes(model, template, 1, 64, "embeds")
    assert one_row <= size[16] < kv_static.workspace_bytes(model, template, 2, 64, "embeds")
    with caplog.at_level("INFO", logger="gcache.kv_static"):
        for _ in range(2):
            split = kv.latent_steps(model, start, 40, realign, logits=True, pool=pool)
    eager40 = kv.latent_steps(model, start, 40, realign, logits=True)
    torch.testing.assert_close(split.step.hidden, eager40.step.hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(split.step.logits, eager40.step.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(split.fed, eager40.fed, atol=1e-5, rtol=0)
    assert torch.equal(split.step.kv.mask, eager40.step.kv.mask)
    for (k0, v0), (k1, v1) in zip(split.step.kv.layers(), eager40.step.kv.layers(), strict=True):
        torch.testing.assert_close(k0, k1, atol=1e-5, rtol=0)
        torch.testing.assert_close(v0, v1, atol=1e-5, rtol=0)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "3 rows x 64 slots" in messages[0] and "groups of 1 rows" in messages[0], messages
    assert list(pool.workspaces) == [(1, 64, "embeds")] and pool.stats()["split_loops"] == 2
    assert pool.stats()["eager_fallbacks"] == 0
    # Decoding too: the same greedy tokens as one eager loop of the three rows.
    kwargs = dict(max_new_tokens=15, eos_token_ids=[-1], pad_token_id=0)  # 49 + 15 slots: 64
    tokens, counts = kv.decode(model, split.step.kv, split.step.logits, pool=pool, **kwargs)
    eager_tokens, eager_counts = kv.decode(model, eager40.step.kv, eager40.step.logits, **kwargs)
    assert torch.equal(tokens, eager_tokens) and torch.equal(counts, eager_counts) and tokens.shape == (3, 15)
    assert pool.stats()["split_loops"] == 3 and (1, 64, "ids") in pool.workspaces
    # A workspace of which not even one row fits is reported once, with its size, and that loop runs eagerly.
    caplog.clear()
    pool.set_budget(one_row - 1)
    with caplog.at_level("WARNING", logger="gcache.kv_static"):
        for _ in range(2):
            torch.testing.assert_close(kv.latent_steps(model, start, 40, realign, pool=pool).step.hidden,
                                       eager[40], atol=1e-5, rtol=0)
    reports = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(reports) == 1 and kv_static.amount(size[64]) in reports[0] and "4 rows x 64 slots" in reports[0]
    assert list(pool.workspaces) == [(1, 64, "ids")]  # what still fits: smaller than an embeddings workspace


@torch.no_grad()
def test_a_failed_capture_falls_back_for_its_workspace_only_with_one_warning(llm, model, monkeypatch, caplog):
    # Faults injected on CPU: capturing the embeddings workspace runs out of memory, the token-ids one
    # captures (a stand-in graph whose replay is the step). Graphs stay on for the rest of the pool.
    def capture(workspace, pool):
        if workspace.kind == "embeds":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        workspace.graph = type("Graph", (), {"replay": staticmethod(workspace.forward)})()

    monkeypatch.setattr(kv_static._Workspace, "capture", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "device", lambda device: __import__("contextlib").nullcontext())
    pool = kv_static.LoopPool(model, capture=False, budget_bytes=kv_static.GIB)
    pool.capture = True  # as on a CUDA device
    realign = llm.realignment("ridge")
    start = _start(model, 5, 9, 7)
    eager = kv.latent_steps(model, start, 4, realign, logits=True)
    kwargs = dict(max_new_tokens=6, eos_token_ids=[-1], pad_token_id=0)
    with caplog.at_level("WARNING", logger="gcache.kv_static"):
        for _ in range(2):
            latent = kv.latent_steps(model, start, 4, realign, logits=True, pool=pool)
            tokens, _ = kv.decode(model, latent.step.kv, latent.step.logits, pool=pool, **kwargs)
    torch.testing.assert_close(latent.step.hidden, eager.step.hidden, atol=1e-5, rtol=0)
    assert torch.equal(tokens, kv.decode(model, eager.step.kv, eager.step.logits, **kwargs)[0])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "out of memory" in warnings[0] and "(embeds)" not in warnings[0]
    assert "4 rows x 16 slots embeds workspace" in warnings[0]
    assert pool.capture and pool.captures == 1
    assert {key[2]: ws.graph is not None for key, ws in pool.workspaces.items()} == {"embeds": False, "ids": True}
    assert pool.stats()["capture_failures"] == 1


def test_workspace_budgets_are_gib_or_a_percentage_of_free_memory():
    assert kv_static.budget_bytes(2, torch.device("cpu")) == 2 * kv_static.GIB
    free = kv_static.free_memory(torch.device("cpu"))
    assert 0 < kv_static.budget_bytes("50%", torch.device("cpu")) <= free
    for bad in (0, -1, True, "0%", "150%", "abc", "25"):
        with pytest.raises(ValueError, match="a number of GiB > 0 or a percentage"):
            kv_static.check_memory(bad)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@torch.no_grad()
def test_sampled_decoding_draws_the_same_tokens_with_eager_and_static_loops_and_any_check_interval(model, top_p):
    # Rows end at different steps (EOS = a token that sampling produces early in row 1), and eager loops
    # drop ended rows: what is drawn for the running rows must not depend on that.
    step = _start(model, 6, 10, 4, seed=31)
    pool = kv_static.LoopPool(model, capture=False, budget_bytes=kv_static.GIB)

    def sample(eos, check_every, loops):
        generator = torch.Generator().manual_seed(7)
        return kv.decode(model, step.kv, step.logits, max_new_tokens=12, eos_token_ids=eos, pad_token_id=0,
                         temperature=1.5, top_p=top_p, generator=generator, check_every=check_every, pool=loops)

    free, _ = sample([-1], 1, None)
    eos = [int(free[1, 2])]
    reference, counts = sample(eos, 1, None)
    assert int(counts.min()) < int(counts.max())  # rows do end at different steps
    for check_every in (1, 3, 8):
        for loops in (None, pool):
            tokens, n = sample(eos, check_every, loops)
            assert torch.equal(tokens, reference) and torch.equal(n, counts), (check_every, loops)
    assert len(set(map(tuple, free.tolist()))) == 3  # sampled: the rows differ


def test_nothing_built_under_inference_mode_is_an_inference_tensor():
    # Lightning validates under torch.inference_mode(); the next training step writes the workspaces in
    # place and saves the realignment for backward (a trained realignment's loss).
    llm = LocalLM.tiny_random(seed=0)
    model = llm.model
    pool = llm.loop_pool(capture=False, memory=1)
    with torch.inference_mode():
        start = _start(model, 5, 9)
        realigns = {kind: llm.realignment(kind) for kind in ("ridge", "identity", "random", "soft")}
        kv.decode(model, kv.latent_steps(model, start, 3, realigns["ridge"], logits=True, pool=pool).step.kv,
                  start.logits, max_new_tokens=3, eos_token_ids=[-1], pad_token_id=0, pool=pool)
    kept = [t for ws in pool.workspaces.values()
            for t in (ws.position, ws.next_position, ws.bias, ws.input, ws.hidden,
                      *(b for layer in ws.cache.layers for b in (layer.key_buffer, layer.value_buffer)))]
    kept += [r.matrix for r in realigns.values() if getattr(r, "matrix", None) is not None]
    assert kept and not any(t.is_inference() for t in kept)
    with torch.no_grad():  # the training step after validation: in-place writes into the same workspaces
        kv.latent_steps(model, _start(model, 5, 9), 3, realigns["ridge"], pool=pool)
    hidden = torch.randn(2, model.config.hidden_size, requires_grad=True)
    realigns["ridge"](hidden).sum().backward()  # the matrix is saved for backward
    assert hidden.grad is not None


def test_the_random_realignment_is_made_once_per_model_and_kept_on_its_device(monkeypatch):
    llm = LocalLM.tiny_random(seed=0)
    calls = []
    original = torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = llm.realignment("random")
    assert llm.realignment("random") is first and len(calls) == 1
    assert first.matrix.device == llm.device
    ridge = llm.realignment("ridge").matrix
    assert not torch.allclose(first.matrix, ridge)  # a control: same spectrum, other directions
    torch.testing.assert_close(torch.linalg.svdvals(first.matrix), torch.linalg.svdvals(ridge), atol=1e-4, rtol=1e-4)


def _divergences_are_near_ties(model, start: kv.Step, ours: torch.Tensor, reference: torch.Tensor,
                               tol: float) -> int:
    """Where two greedy decodings of the same start differ, the first differing token of each row is a
    near-tie of the reference's logits there (|difference| <= tol); returns the rows that differ."""
    differing = 0
    for r in range(ours.shape[0]):
        where = (ours[r] != reference[r]).nonzero()
        if not len(where):
            continue
        differing += 1
        t = int(where[0])
        prefix = reference[r : r + 1, :t]
        logits = start.logits[r] if t == 0 else kv.prefill(model, prefix, torch.ones_like(prefix),
                                                           past=kv.select(start.kv, [r])).logits[0]
        margin = float(logits[reference[r, t]] - logits[ours[r, t]])
        assert abs(margin) <= tol, f"row {r} token {t}: the loops chose tokens {margin:.3f} apart"
    return differing


BF16_TIE = 0.02  # ~2 bf16 steps of a logit near 1; measured on CPU: every divergence within 0.008


def _bf16_loops_check(device: str, capture: bool) -> None:
    """bfloat16 (what users run): static (or CUDA-graph) loops against eager ones, from one start. Not
    token for token: the static step attends over the whole buffer (masked slots included), whose
    reduction order differs from the eager step's in the last bf16 bit, so a near-tie can flip. Measured
    on CPU (20 batches of 4 rows x 16 tokens, Llama and Qwen3 tiny random models): 5 and 6 of 80 rows
    differ, each first at a tie within 0.008 of the logits."""
    llm = LocalLM.tiny_random(seed=0, device=device, dtype="bfloat16")
    model = llm.model
    pool = kv_static.LoopPool(model, capture=capture, budget_bytes=kv_static.GIB)
    realign = llm.realignment("ridge")
    g = torch.Generator().manual_seed(40)
    rows = 0
    for _ in range(5):
        lengths = torch.randint(3, 40, (4,), generator=g).tolist()
        start = kv.prefill(model, *(t.to(device) for t in _left_pad(_ids(*lengths, seed=int(lengths[0])))))
        start = kv.latent_steps(model, start, 4, realign, logits=True).step
        kwargs = dict(max_new_tokens=16, eos_token_ids=[-1], pad_token_id=0)
        eager, _ = kv.decode(model, start.kv, start.logits, **kwargs)
        static, _ = kv.decode(model, start.kv, start.logits, pool=pool, **kwargs)
        rows += _divergences_are_near_ties(model, start, static, eager, BF16_TIE)
        latent = kv.latent_steps(model, start, 4, realign, pool=pool).step.hidden
        torch.testing.assert_close(latent, kv.latent_steps(model, start, 4, realign).step.hidden, atol=0.1, rtol=0.05)
    assert rows <= 10  # of 20: most rows agree token for token
    assert pool.captures == (len(pool.workspaces) if capture else 0)


@torch.no_grad()
def test_bfloat16_static_loops_differ_from_eager_loops_only_at_near_ties():
    _bf16_loops_check("cpu", capture=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.no_grad()
def test_cuda_graph_loops_equal_eager_loops_on_gpu():
    llm = LocalLM.tiny_random(seed=0, device="cuda", dtype="float32")
    model = llm.model
    start = kv.prefill(model, *(t.cuda() for t in _left_pad(_ids(5, 9, 7, seed=23))))
    realign = llm.realignment("ridge")
    pool = kv_static.LoopPool(model, capture=True, budget_bytes=kv_static.GIB)
    for _ in range(2):  # the second round replays the captured graphs
        eager = kv.latent_steps(model, start, 6, realign, logits=True)
        graphed = kv.latent_steps(model, start, 6, realign, logits=True, pool=pool)
        torch.testing.assert_close(graphed.step.hidden, eager.step.hidden, atol=1e-4, rtol=1e-4)
        kwargs = dict(max_new_tokens=9, eos_token_ids=[-1], pad_token_id=0)
        ids_eager, _ = kv.decode(model, eager.step.kv, eager.step.logits, **kwargs)
        ids_graphed, _ = kv.decode(model, graphed.step.kv, graphed.step.logits, pool=pool, **kwargs)
        assert torch.equal(ids_eager, ids_graphed)
    assert pool.capture and pool.captures == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.no_grad()
def test_bfloat16_cuda_graph_loops_differ_from_eager_loops_only_at_near_ties():
    _bf16_loops_check("cuda", capture=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@torch.no_grad()
def test_capture_and_replay_run_on_the_models_device_not_the_current_one():
    torch.cuda.set_device(0)
    llm = LocalLM.tiny_random(seed=0, device="cuda:1", dtype="float32")
    model = llm.model
    before = torch.cuda.memory_allocated(0)
    start = kv.prefill(model, *(t.to("cuda:1") for t in _left_pad(_ids(5, 9, seed=24))))
    realign = llm.realignment("ridge")
    pool = kv_static.LoopPool(model, capture=True, budget_bytes=kv_static.GIB)
    for _ in range(2):
        graphed = kv.latent_steps(model, start, 4, realign, pool=pool).step.hidden
        torch.testing.assert_close(graphed, kv.latent_steps(model, start, 4, realign).step.hidden, atol=1e-4, rtol=1e-4)
    assert pool.captures == 1 and torch.cuda.current_device() == 0
    assert torch.cuda.memory_allocated(0) == before  # nothing of the capture landed on cuda:0


@torch.no_grad()
def test_left_padded_bf16_batch_equals_each_row_alone_and_holds_no_nan():
    # Padded query rows see no real key; with transformers' boolean mask SDPA can give NaN there, and
    # 0 * NaN would reach real rows through the padded slots' values. Same test on CUDA where present.
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        llm = LocalLM.tiny_random(seed=0, device=device, dtype="bfloat16")
        model = llm.model
        prompts = _ids(3, 11, 6, seed=30)
        ids, mask = (t.to(device) for t in _left_pad(prompts))
        batched = kv.prefill(model, ids, mask)
        latent = kv.latent_steps(model, batched, 3, llm.realignment("ridge"), logits=True)
        for k, v in latent.step.kv.layers():
            assert not k.isnan().any() and not v.isnan().any()
        tokens, _ = kv.decode(model, latent.step.kv, latent.step.logits, max_new_tokens=4, eos_token_ids=[-1],
                              pad_token_id=0)
        for i, p in enumerate(prompts):
            alone = kv.prefill(model, *(t.to(device) for t in _ones(p)))
            torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=5e-2, rtol=5e-2)
            alone_latent = kv.latent_steps(model, alone, 3, llm.realignment("ridge"), logits=True)
            torch.testing.assert_close(latent.step.logits[i], alone_latent.step.logits[0], atol=1e-1, rtol=5e-2)
            assert not latent.step.logits[i].isnan().any()


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_rope_whose_frequencies_depend_on_length_is_refused_with_the_supported_types(rope_type):
    extra = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "original_max_position_embeddings": 1024} \
        if rope_type == "longrope" else {}
    with pytest.raises(ValueError, match=rf"rope_type='{rope_type}' is not supported.*'default', 'linear', 'llama3', 'yarn'"):
        LocalLM.tiny_random(seed=0, rope_parameters={"rope_type": rope_type, "factor": 2.0, **extra})


@torch.no_grad()
def test_soft_realignment_is_the_embedding_mixture_and_at_low_temperature_the_greedy_text(llm, model, pool):
    start = kv.prefill(model, *_left_pad(_ids(5, 7, seed=23)))
    soft = llm.realignment("soft", temperature=0.7)
    table = model.get_input_embeddings().weight
    weights = torch.softmax(kv.next_token_logits(model, start.hidden) / 0.7, -1)  # (B, V)
    torch.testing.assert_close(soft(start.hidden), weights @ table)  # hand-built: softmax(W_out h / t) W_in
    # t -> 0: each latent step feeds the embedding of the greedy token, so the latent cache is the
    # cache of the greedily decoded text
    cold = llm.realignment("soft", temperature=1e-4)
    latent = kv.latent_steps(model, start, 4, cold, pool=pool).step.kv
    tokens, _ = kv.decode(model, start.kv, start.logits, max_new_tokens=4, eos_token_ids=[-1], pad_token_id=0, pool=pool)
    text = kv.forward(model, start.kv, torch.ones(2, 3, dtype=torch.long), input_ids=tokens[:, :3])[0]
    for (k0, v0), (k1, v1) in zip(latent.layers(), text.layers(), strict=True):
        torch.testing.assert_close(k0[:, :, :-1], k1, atol=1e-4, rtol=0)
        torch.testing.assert_close(v0[:, :, :-1], v1, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        llm.realignment("soft", temperature=0)


def test_latent_steps_with_grad_equal_the_loops_and_reach_a_trained_realignment(llm, model, pool):
    from gcache.policy.cache_fuser import TrainedRealignment

    start = kv.prefill(model, *_left_pad(_ids(4, 8, seed=24)))
    start = kv.Step(start.kv, start.hidden.detach(), None)
    trained = TrainedRealignment(model.config.hidden_size, steps=2, rank=2)
    with torch.no_grad():
        trained.offsets.normal_(0, 0.05)
        trained.up.normal_(0, 0.05)
    realign = trained.bind(llm.realignment("ridge"))
    with torch.no_grad():
        looped = kv.latent_steps(model, start, 3, realign, pool=pool).step.kv  # step 3 uses the last offset
    graphed = kv.latent_steps_with_grad(model, start, 3, realign)
    for (k0, v0), (k1, v1) in zip(looped.layers(), graphed.layers(), strict=True):
        torch.testing.assert_close(k0, k1.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(v0, v1.detach(), atol=1e-5, rtol=0)
    sum(v[:, :, -3:].sum() for _, v in graphed.layers()).backward()
    assert all(p.grad is not None and bool(p.grad.ne(0).any()) for p in trained.parameters())
    assert all(p.grad is None for p in model.parameters())

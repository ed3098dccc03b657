"""CacheFuser: starts as plain concatenation, receives gradient through the frozen LM, and learns."""

from __future__ import annotations

import math

import pytest
import torch

from gcache import kv
from gcache.agents import build_roster
from gcache.llm.local import LocalLM
from gcache.policy.cache_fuser import CacheFuser
from gcache.policy.topology import judger_senders_all
from gcache.rollout import RolloutConfig, RolloutEngine
from gcache.tasks import build_task


def test_gates_start_at_one_and_are_reported_per_layer_and_sender():
    fuser = CacheFuser(num_layers=3, fusion="values")
    gates = fuser.gates(torch.tensor([[0.5], [-2.0]]))  # 2 senders, 1 receiver row
    assert gates.shape == (2, 3, 1)
    torch.testing.assert_close(gates, torch.ones(2, 3, 1))
    with torch.no_grad():
        fuser.logit_slope.fill_(1.0)
        fuser.layer_bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    gates = fuser.gates(torch.tensor([[0.5], [-2.0]]))
    expected = 2 * torch.sigmoid(torch.tensor([0.0, 1.0, -1.0])[None, :] + torch.tensor([[0.5], [-2.0]]))
    torch.testing.assert_close(gates[..., 0], expected)


def test_attention_weights_start_at_one_and_follow_the_formula():
    fuser = CacheFuser(num_layers=3)
    logits = torch.tensor([[0.5, 3.0], [-2.0, -400.0]])  # 2 senders, 2 receiver rows
    torch.testing.assert_close(fuser.log_weights(logits), torch.zeros(2, 2))
    with torch.no_grad():
        fuser.weight_bias.fill_(-0.5)
        fuser.weight_slope.fill_(1.5)
    expected = 2 * torch.sigmoid(-0.5 + 1.5 * logits)
    torch.testing.assert_close(fuser.sender_weights(logits), expected)
    # exact in the tail, where the weight underflows: log 2 + log σ(x) ~ log 2 + x
    assert fuser.log_weights(logits)[1, 1].item() == pytest.approx(math.log(2) - 0.5 - 600, abs=1e-3)
    assert [p.shape for p in fuser.gate_parameters()] == [(), ()]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        CacheFuser(0)
    with pytest.raises(ValueError, match="fusion='mean' is not one of"):
        CacheFuser(2, fusion="mean")
    with pytest.raises(ValueError, match="gates are the values fusion's"):
        CacheFuser(2).gates(torch.zeros(1, 1))
    with pytest.raises(ValueError, match="log_weights are the attention fusion's"):
        CacheFuser(2, fusion="values").log_weights(torch.zeros(1, 1))
    fuser = CacheFuser(2)
    with pytest.raises(ValueError, match="edge_logits must be"):
        fuser.fuse([kv.empty(1)], torch.zeros(2, 1), None)


def _judger_batch(llm, roster, task, examples, steps=3):
    """Senders' caches (fixed, no grad) and judger prompts for a mesh graph of the roster."""
    n = roster.num_agents
    adjacency = judger_senders_all(torch.ones(n, n, dtype=torch.bool).triu(1).expand(len(examples), -1, -1))
    engine = RolloutEngine(llm, roster, RolloutConfig(latent_steps=steps, retention="role_latent", max_new_tokens=1))
    rows = engine.run([e.question for e in examples], adjacency, list(range(len(examples))),
                      answer_format=task.answer_format, keep_judger_inputs=True)
    prompts = llm.encode([inp.prompt for inp in rows.judger_inputs])
    targets = llm.tokenizer([task.target_text(e) for e in examples], return_tensors="pt", padding=True,
                            padding_side="right", add_special_tokens=False)
    return rows.judger_inputs, prompts, (targets["input_ids"], targets["attention_mask"])


def _nll(llm, fuser, batch, edge_logits):
    inputs, (p_ids, p_mask), (t_ids, t_mask) = batch
    fused = [fuser.fuse(inp.sender_kvs, edge_logits[i][:, None], llm.rotary) for i, inp in enumerate(inputs)]
    return kv.answer_nll(llm.model, kv.stack(fused), p_ids, p_mask, t_ids, t_mask).mean()


@pytest.mark.parametrize("fusion", ["attention", "values"])
def test_fuser_loss_reaches_fuser_and_edge_logits_but_not_the_lm(fusion):
    llm = LocalLM.tiny_random(seed=0)
    roster = build_roster("math")
    task = build_task("arith")
    batch = _judger_batch(llm, roster, task, task.splits()["train"][:2], steps=2)
    fuser = CacheFuser(llm.num_layers, fusion=fusion)
    edge_logits = torch.randn(2, roster.num_agents, requires_grad=True)
    _nll(llm, fuser, batch, edge_logits).backward()
    assert all(p.grad is not None and bool(p.grad.ne(0).any()) for p in fuser.parameters())
    # At initialisation the slope b is 0, so gates do not depend on the edge logits yet...
    assert edge_logits.grad is None or not bool(edge_logits.grad.ne(0).any())
    # ... once b has moved, the fuser loss reaches the policy's logits.
    with torch.no_grad():
        fuser.slope.fill_(0.5)
    _nll(llm, fuser, batch, edge_logits).backward()
    assert edge_logits.grad is not None and bool(edge_logits.grad.ne(0).all())
    assert all(p.grad is None for p in llm.model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["attention", "values"])
def test_twenty_fuser_steps_change_every_parameter_and_lower_held_out_nll(fusion):
    torch.manual_seed(0)
    llm = LocalLM.embedded(device="cpu")
    roster = build_roster("math")
    task = build_task("arith")
    train = _judger_batch(llm, roster, task, task.splits()["train"][:4])
    held_out = _judger_batch(llm, roster, task, task.splits()["val"][:4])
    fuser = CacheFuser(llm.num_layers, fusion=fusion)
    before = {n: p.detach().clone() for n, p in fuser.named_parameters()}
    # Edge logits as a trained policy would give them: fixed here so only the fuser learns.
    g = torch.Generator().manual_seed(0)
    logits_train = torch.randn(4, roster.num_agents, generator=g)
    logits_held = torch.randn(4, roster.num_agents, generator=g)
    with torch.no_grad():
        held_before = float(_nll(llm, fuser, held_out, logits_held))
        train_before = float(_nll(llm, fuser, train, logits_train))
    optimizer = torch.optim.Adam(fuser.parameters(), lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        loss = _nll(llm, fuser, train, logits_train)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        held_after = float(_nll(llm, fuser, held_out, logits_held))
        train_after = float(_nll(llm, fuser, train, logits_train))
    for name, param in fuser.named_parameters():
        assert not torch.equal(param.detach(), before[name]), f"{name} did not change"
    assert train_after < train_before
    assert held_after < held_before, (held_before, held_after)
    if fusion == "values":
        gates = fuser.gates(logits_held.T)  # (senders, layers, rows): visible per layer and sender
        assert gates.shape == (roster.num_agents, llm.num_layers, 4)
    print(f"fuser NLL train {train_before:.3f} -> {train_after:.3f}, held-out {held_before:.3f} -> {held_after:.3f}")


# ---- the low-rank channel ------------------------------------------------------------------------


def _segment(batch=1, heads=2, length=3, head_dim=16, layers=2, dtype=torch.float32, seed=0) -> kv.KV:
    g = torch.Generator().manual_seed(seed)
    pairs = [(torch.randn(batch, heads, length, head_dim, generator=g).to(dtype),
              torch.randn(batch, heads, length, head_dim, generator=g).to(dtype)) for _ in range(layers)]
    return kv.KV(kv.cache_from_layers(pairs), torch.ones(batch, length, dtype=torch.long))


def _nontrivial_channel(fuser: CacheFuser, seed: int = 1) -> CacheFuser:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fuser.channel_up.copy_(torch.randn(fuser.channel_up.shape, generator=g) * 0.3)
        fuser.channel_bias.copy_(torch.randn(fuser.channel_bias.shape, generator=g) * 0.3)
    return fuser


@pytest.fixture(scope="module")
def rotary():
    return LocalLM.tiny_random(seed=0).rotary  # 2 layers, 2 KV heads of 16 dims: _segment's shapes


def test_an_untrained_channel_is_the_identity_so_the_fuser_is_todays_gates(rotary):
    senders = [_segment(seed=0), _segment(length=2, seed=1)]
    gates = CacheFuser(2, fusion="values")
    channel = CacheFuser(2, channel="lowrank", rank=3, kv_dim=32, fusion="values")
    logits = torch.tensor([[0.3], [-1.0]])
    with torch.no_grad():
        for f in (gates, channel):
            f.layer_bias.copy_(torch.tensor([0.5, -0.5]))
            f.logit_slope.fill_(0.8)
    a, b = gates.fuse(senders, logits, rotary), channel.fuse(senders, logits, rotary)
    for (ka, va), (kb, vb) in zip(a.layers(), b.layers(), strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_the_channel_rewrites_each_direct_senders_keys_and_values_as_the_formula_says(rotary):
    fuser = _nontrivial_channel(CacheFuser(2, channel="lowrank", rank=3, kv_dim=32))
    sender, ancestor = _segment(seed=0), _segment(length=2, seed=1)
    # the sender first (its keys need no shift), then an ancestor read through it (gate 1, not rewritten)
    fused = fuser.fuse([sender, ancestor], None, rotary, gated=[True, False])
    with torch.no_grad():
        for layer, ((k, v), (_, va), (ks, vs)) in enumerate(zip(fused.layers(), ancestor.layers(),
                                                                  sender.layers(), strict=True)):
            assert torch.equal(v[:, :, 3:], va)  # the ancestor's values untouched (its keys are re-rotated)
            for j, (got, x) in enumerate(((k[:, :, :3], ks), (v[:, :, :3], vs))):
                # hand-built reference: per position the heads' dims flattened (head-major), x + x U W + c;
                # values are then gated by 2 sigmoid(0) = 1
                flat = x[0].permute(1, 0, 2).reshape(3, 32)  # (T, H * Dh)
                down, up, bias = fuser.channel_down[layer, j], fuser.channel_up[layer, j], fuser.channel_bias[layer, j]
                ref = flat + flat @ down @ up + bias
                torch.testing.assert_close(got[0].permute(1, 0, 2).reshape(3, 32), ref)
                assert not torch.allclose(got, x)  # the rewrite changed something: not a check of an identity


def test_the_channel_follows_the_caches_dtype_and_gets_gradient_through_it():
    fuser = _nontrivial_channel(CacheFuser(2, channel="lowrank", rank=3, kv_dim=32))
    out = fuser.rewrite(_segment(dtype=torch.bfloat16))
    assert all(k.dtype == torch.bfloat16 and v.dtype == torch.bfloat16 for k, v in out.layers())
    sum(v.float().sum() + k.float().sum() for k, v in out.layers()).backward()
    assert all(p.grad is not None and bool(p.grad.ne(0).any())
               for p in (fuser.channel_down, fuser.channel_up, fuser.channel_bias))


def test_bad_channel_settings_are_refused():
    with pytest.raises(ValueError, match="channel='wide' is not one of"):
        CacheFuser(2, channel="wide")
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got 0"):
        CacheFuser(2, channel="lowrank", rank=0, kv_dim=8)
    with pytest.raises(ValueError, match="needs kv_dim"):
        CacheFuser(2, channel="lowrank", rank=2)
    fuser = CacheFuser(2, channel="lowrank", rank=2, kv_dim=6)
    with pytest.raises(ValueError, match="2 x 16 key/value dims per position, the channel 6"):
        fuser.rewrite(_segment())


def test_an_untrained_realignment_correction_is_the_base_map_and_a_trained_one_follows_the_formula():
    from gcache.policy.cache_fuser import TrainedRealignment

    llm = LocalLM.tiny_random(seed=0)
    base = llm.realignment("ridge")
    hidden = torch.randn(3, llm.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    trained = TrainedRealignment(hidden.shape[-1], steps=2, rank=3)
    assert torch.equal(trained.bind(base)(hidden, 1), base(hidden))
    with torch.no_grad():
        trained.offsets.normal_(0, 0.1)
        trained.up.normal_(0, 0.1)
    unit = hidden / hidden.norm(dim=-1, keepdim=True)
    for step, offset in ((0, 0), (1, 1), (5, 1)):  # steps past the offsets use the last one
        expected = base(hidden) + base.target_norm * (trained.offsets[offset] + unit @ trained.down @ trained.up)
        torch.testing.assert_close(trained.bind(base)(hidden, step), expected)
    bf16 = trained.bind(base)(hidden.bfloat16(), 0)
    assert bf16.dtype == torch.bfloat16  # follows the hidden state (the LM's dtype)
    fuser = CacheFuser(2, channel="realign", rank=3, hidden_dim=hidden.shape[-1], latent_steps=2)
    assert fuser.describe() == {"kind": "realign", "rank": 3, "hidden_dim": hidden.shape[-1], "latent_steps": 2}
    with pytest.raises(ValueError, match="needs latent_steps >= 1, got 0"):
        CacheFuser(2, channel="realign", rank=3, hidden_dim=8, latent_steps=0)

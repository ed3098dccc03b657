"""GCacheModule on a tiny random model: the fuser loss differentiates exactly what the rollout
applies, the NLL reaches the policy only when asked, a step with non-zero advantages trains every
parameter, and bfloat16 (the GPU default) agrees with float32."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from gcache import kv
from gcache.build import CONF_DIR, build_module, build_task
from gcache.evaluate import CONF_DIR as EVAL_CONF_DIR
from gcache.evaluate import evaluate
from gcache.report import read_results

TINY = ["model=tiny-random", "logger=csv", "task=gsm8k", "batch_size=2", "policy.graphs_per_question=3",
        "rollout.latent_steps=2", "rollout.max_new_tokens=4"]


def _module(*extra, llm=None):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, *extra])
    task = build_task(cfg)
    return task, build_module(cfg, task=task, llm=llm)


def _quiet(module):
    module.log_dict = lambda *a, **k: None
    module.log = lambda *a, **k: None
    return module


def _nontrivial(module):
    with torch.no_grad():
        if module.fuser.fusion == "values":
            module.fuser.layer_bias.copy_(torch.linspace(-1.0, 1.2, module.fuser.num_layers))
        else:
            module.fuser.weight_bias.fill_(-0.3)
        module.fuser.slope.fill_(0.7)
        module.policy.bias.fill_(1.0)  # most edges sampled: deep graphs
        if module.fuser.channel == "lowrank":  # a channel away from the identity
            g = torch.Generator().manual_seed(5)
            module.fuser.channel_up.copy_(torch.randn(module.fuser.channel_up.shape, generator=g) * 0.2)
            module.fuser.channel_bias.copy_(torch.randn(module.fuser.channel_bias.shape, generator=g) * 0.2)
    return module


def _graph_batch(module, batch):
    """A diamond with the judger reading agents 1, 2, 3 (full retention: 0 through its descendants)."""
    n = module.roster.num_agents
    a = torch.zeros(len(batch), n + 1, n + 1, dtype=torch.bool)
    for i, j in ((0, 1), (0, 2), (1, 3), (2, 3), (1, n), (2, n), (3, n)):
        a[:, i, j] = True
    return a


def _flat_batch(module, batch):
    """Agents 1, 2, 3 send to the judger, nobody to an agent: the senders' inputs do not depend on the fuser."""
    n = module.roster.num_agents
    a = torch.zeros(len(batch), n + 1, n + 1, dtype=torch.bool)
    a[:, 1:4, n] = True
    return a


def _rollout_nll(module, batch, logits, graph=_graph_batch) -> torch.Tensor:
    """Re-run the rollout with the module's current fuser and score the reference answer on the cache
    the judger actually read (no autograd: what a finite difference measures)."""
    rows = module.engine.run(
        [ex.question for ex in batch], graph(module, batch), list(range(len(batch))),
        answer_format=module.task.answer_format, edge_logits=logits, keep_judger_inputs=True,
    )
    llm = module.llm
    prompt_ids, prompt_mask = llm.encode([inp.prompt for inp in rows.judger_inputs])
    target = llm.tokenizer([module.task.target_text(ex) for ex in batch], return_tensors="pt", padding=True,
                           padding_side="right", add_special_tokens=False)
    with torch.no_grad():
        nll = kv.answer_nll(llm.model, kv.stack([inp.cache for inp in rows.judger_inputs]), prompt_ids, prompt_mask,
                            target["input_ids"], target["attention_mask"])
    return nll.double().mean()


@pytest.mark.parametrize("fusion,channel,retention", [
    ("attention", "gates", "full"), ("values", "gates", "full"), ("attention", "lowrank", "full"),
    ("attention", "lowrank", "latent_only"), ("attention", "realign", "latent_only"), ("values", "realign", "role_latent")])
def test_fuser_gradient_equals_a_finite_difference_of_the_whole_rollout(fusion, channel, retention):
    """Gates, the low-rank channel and the trained realignment (all of a fuser's parameters in the
    direction), under `full` retention (ancestors read through senders: not rewritten), `role_latent`
    and `latent_only`. The realignment's gradient goes through the direct senders' latent steps and
    stops at their inputs, so its graph has no agent -> agent edge (where a finite difference of the
    whole rollout would also move what the senders received)."""
    task, module = _module(f"rollout.retention={retention}", f"policy.channel={channel}", "policy.channel_rank=3",
                           f"policy.fusion={fusion}")
    _nontrivial(module)
    if channel == "realign":
        g = torch.Generator().manual_seed(6)
        with torch.no_grad():
            module.fuser.realign.offsets.copy_(torch.randn(module.fuser.realign.offsets.shape, generator=g) * 0.05)
            module.fuser.realign.up.copy_(torch.randn(module.fuser.realign.up.shape, generator=g) * 0.05)
    graph = _flat_batch if channel == "realign" else _graph_batch
    batch = task.splits()["train"][:2]
    n = module.roster.num_agents
    logits = torch.randn(2, n + 1, n + 1, generator=torch.Generator().manual_seed(3)) * 2
    rows = module.engine.run(
        [ex.question for ex in batch], graph(module, batch), [0, 1],
        answer_format=task.answer_format, edge_logits=logits, keep_judger_inputs=True,
    )
    module.fuser.zero_grad()
    module.fuser_loss(batch, rows.judger_inputs, logits).backward()
    params = list(module.fuser.parameters())
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    analytic = sum(float((p.grad * d).sum()) for p, d in zip(params, direction, strict=True))
    eps = 1e-2

    def shifted(sign: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * eps * d)
        value = float(_rollout_nll(module, batch, logits, graph))
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * eps * d)
        return value

    numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    assert abs(analytic) > 1e-3  # the gates matter: the check is not about zeros
    assert numeric == pytest.approx(analytic, rel=2e-2, abs=1e-4)


@pytest.mark.parametrize("trains_policy", [False, True])
def test_fuser_nll_reaches_the_policy_only_when_switched_on(trains_policy):
    task, module = _module(f"policy.fuser_trains_policy={str(trains_policy).lower()}", "policy.judger_edges=all")
    _nontrivial(module)
    batch = task.splits()["train"][:2]
    logits = module.edge_logits([ex.question for ex in batch])
    rows = module.engine.run(
        [ex.question for ex in batch], _graph_batch(module, batch), [0, 1],
        answer_format=task.answer_format, edge_logits=logits.detach(), keep_judger_inputs=True,
    )
    module.zero_grad()
    module.fuser_loss(batch, rows.judger_inputs, logits).backward()
    assert all(p.grad is not None and bool(p.grad.ne(0).any()) for p in module.fuser.parameters())
    policy_grads = [p.grad for p in module.policy.parameters()]
    if trains_policy:
        assert any(g is not None and bool(g.ne(0).any()) for g in policy_grads)
    else:
        assert all(g is None or not bool(g.ne(0).any()) for g in policy_grads)


def test_training_step_with_nonzero_advantages_changes_every_parameter_and_no_lm_weight():
    task, module = _module()
    _quiet(module)
    # Rewards that differ between the graphs of a question (the judger's answers do): 1 when the
    # answer has an even number of characters. The advantages are checked to be non-zero below.
    task.reward = lambda answers, examples: [float(len(a) % 2 == 0) for a in answers]
    batch = task.splits()["train"][:2]
    seen = {}
    from gcache import module as module_lib

    real_loss = module_lib.reinforce_loss

    def recording_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        seen.update(stats)
        return loss, stats

    module_lib.reinforce_loss = recording_loss
    try:
        optimizer = module.configure_optimizers()
        before = {n: p.detach().clone() for n, p in module.named_parameters()}
        lm_before = {n: p.detach().clone() for n, p in module.llm.model.named_parameters()}
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    finally:
        module_lib.reinforce_loss = real_loss
    assert float(seen["advantage_abs_mean"]) > 0.1
    for name, param in module.named_parameters():
        assert not torch.equal(param.detach(), before[name]), f"{name} did not change"
    for name, param in module.llm.model.named_parameters():
        assert torch.equal(param, lm_before[name]) and param.grad is None, name


def test_fuser_graph_all_trains_the_fuser_on_every_agent_to_judger_and_leaves_the_sampled_rows_alone():
    task, module = _module("policy.fuser_graph=all")
    _, sampled = _module("policy.fuser_graph=sampled", llm=module.llm)
    sampled.load_state_dict(module.state_dict())
    for m in (module, sampled):
        _nontrivial(_quiet(m))
    batch = task.splits()["train"][:2]
    t_all, t_sampled = module.collect(batch), sampled.collect(batch)
    # the policy's rows are those of fuser_graph=sampled: the same graphs, answers and rewards
    assert torch.equal(t_all.adjacency, t_sampled.adjacency) and t_all.question_index == t_sampled.question_index
    assert t_all.answers == t_sampled.answers and t_all.scores == t_sampled.scores
    assert len(t_all.rows.rollouts) == len(t_all.rows.judger_inputs) == len(batch) * module.graphs_per_question
    # ... plus, per question, the judger reading every agent, each a weighted direct sender: built, never decoded
    assert t_sampled.fuser_inputs is None
    assert [inp.question_index for inp in t_all.fuser_inputs] == [0, 1]
    n = module.roster.num_agents
    for inp in t_all.fuser_inputs:
        assert inp.senders == list(range(n)) and inp.gated == [True] * n
    assert t_all.rows.judger_decodes == t_sampled.rows.judger_decodes
    # the fuser's NLL reads those inputs
    losses = module.losses(t_all)
    expected = module.fuser_loss(batch, t_all.fuser_inputs, t_all.logits)
    assert float(losses.fuser.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert module.all_senders_graph(1)[0, :n, n].all() and not module.all_senders_graph(1)[0, :n, :n].any()


# ---- oracle graphs: the channel trained alone ---------------------------------------------------


@pytest.mark.parametrize("channel,trained", [("lowrank", ("channel_up", "channel_bias", "weight_bias")),
                                             ("realign", ("realign.offsets", "realign.up", "weight_bias"))])
def test_oracle_graphs_train_the_channel_alone_on_each_questions_oracle_graph(channel, trained):
    from gcache.policy.topology import oracle_adjacency

    task, module = _module("task=lookup", "policy.graphs=oracle", f"policy.channel={channel}", "policy.channel_rank=2",
                           "rollout.retention=latent_only")
    _quiet(module)
    batch = task.splits()["train"][:3]
    trajectory = module.collect(batch)
    assert trajectory.sample is None and trajectory.question_index == [0, 1, 2]  # one row per question
    assert torch.equal(trajectory.adjacency, oracle_adjacency(batch, module.roster.num_agents))
    # the judger read exactly the keeper holding the answer
    assert [r.judger_senders for r in trajectory.rows.rollouts] == [[ex.meta["keeper"]] for ex in batch]
    optimizer = module.configure_optimizers()
    groups = [(group["lr"], {id(p) for p in group["params"]}) for group in optimizer.param_groups]
    assert [lr for lr, _ in groups] == [module.policy_lr, module.fuser_lr, module.channel_lr]
    assert groups[1][1] == {id(p) for p in module.fuser.gate_parameters()}  # the sender weights apart
    assert groups[2][1] | groups[1][1] == {id(p) for p in module.fuser.parameters()}
    policy_before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    fuser_before = {n: p.detach().clone() for n, p in module.fuser.named_parameters()}
    losses = module.losses(trajectory)
    assert float(losses.policy.detach()) == 0.0 and float(losses.fuser.detach()) > 0.0
    optimizer.zero_grad()
    losses.total.backward()
    optimizer.step()
    for name, param in module.policy.named_parameters():
        assert torch.equal(param, policy_before[name]), f"the policy moved under oracle graphs: {name}"
    after = dict(module.fuser.named_parameters())
    for name in trained:
        assert not torch.equal(after[name], fuser_before[name]), f"fuser.{name} did not train"
    # validation and test run the oracle graph too
    _, _, rows = module.evaluate_batch(batch)
    assert [r.judger_senders for r in rows.rollouts] == [[ex.meta["keeper"]] for ex in batch]
    assert module.run_identity["graphs"] == "oracle"
    assert module.run_identity["channel"] == module.fuser.describe() and module.fuser.describe()["kind"] == channel


def test_oracle_graphs_and_bad_channel_settings_are_refused_with_the_allowed_values():
    from gcache.build import validate
    from gcache.cli import ConfigError

    with pytest.raises(ValueError, match="graphs='oracle' needs a task with oracle graphs"):
        _module("policy.graphs=oracle")  # gsm8k has none
    for override, message in (("policy.channel=wide", r"policy.channel='wide' is not one of \['gates', 'lowrank', 'realign'\]"),
                              ("policy.graphs=best", r"policy.graphs='best' is not one of \['learned', 'oracle'\]"),
                              ("policy.fusion=mean", r"policy.fusion='mean' is not one of \['attention', 'values'\]"),
                              ("policy.fuser_graph=dense", r"policy.fuser_graph='dense' is not one of \['sampled', 'all'\]"),
                              ("policy.channel_rank=0", "policy.channel_rank must be an integer >= 1, got 0")):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*TINY, override])
        with pytest.raises(ConfigError, match=message):
            validate(cfg)


# ---- bfloat16, the GPU default ------------------------------------------------------------------


@pytest.fixture(scope="module")
def both_dtypes():
    _, fp32 = _module("model.dtype=float32", "rollout.retention=role_latent")
    _, bf16 = _module("model.dtype=bfloat16", "rollout.retention=role_latent")
    assert next(fp32.llm.model.parameters()).dtype == torch.float32
    assert next(bf16.llm.model.parameters()).dtype == torch.bfloat16  # tiny-random honours model.dtype
    for module in (fp32, bf16):
        _nontrivial(_quiet(module))
    return fp32, bf16


def _first_logits(module, batch):
    n = module.roster.num_agents
    logits = torch.randn(len(batch), n + 1, n + 1, generator=torch.Generator().manual_seed(5))
    rows = module.engine.run([ex.question for ex in batch], _graph_batch(module, batch), list(range(len(batch))),
                             answer_format=module.task.answer_format, edge_logits=logits, keep_judger_inputs=True)
    out = []
    for inp in rows.judger_inputs:
        assert all(layer[1].dtype == next(module.llm.model.parameters()).dtype for layer in inp.cache.layers())
        ids, mask = module.llm.encode([inp.prompt])
        out.append(kv.prefill(module.llm.model, ids, mask, past=inp.cache).logits[0].float())
    return torch.stack(out)


@torch.no_grad()
def test_rollout_with_fuser_in_bfloat16_matches_float32(both_dtypes):
    fp32, bf16 = both_dtypes
    batch = fp32.task.splits()["train"][:2]
    a, b = _first_logits(fp32, batch), _first_logits(bf16, batch)
    # bf16 keeps 8 bits of mantissa: through 2 layers, agents and latent steps the judger's logits
    # stay within 5% of their range.
    scale = float(a.abs().max())
    assert float((a - b).abs().max()) < 0.05 * scale


def test_training_step_in_bfloat16_matches_float32(both_dtypes):
    fp32, bf16 = both_dtypes
    batch = fp32.task.splits()["train"][:2]
    grads = []
    for module in (fp32, bf16):
        module.zero_grad()
        module.training_step(batch, 0).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.fuser.parameters()]))
    assert torch.isfinite(grads[1]).all()
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert float(cosine) > 0.95
    assert float(grads[1].norm()) == pytest.approx(float(grads[0].norm()), rel=0.1)


def test_evaluate_in_bfloat16_runs_the_same_graphs_as_float32(tmp_path):
    reports = {}
    for dtype in ("float32", "bfloat16"):
        with initialize_config_dir(config_dir=EVAL_CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="evaluate", overrides=[
                "model=tiny-random", f"model.dtype={dtype}", "task=gsm8k", "limit_test=2", "eval_batch_size=2",
                "rollout.latent_steps=2", "rollout.max_new_tokens=3", "methods=[single,fixed-star,mismatched,zeroed]"])
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / dtype)
        evaluate(cfg)
        reports[dtype] = read_results(tmp_path / dtype / "results.jsonl")
    for a, b in zip(reports["float32"], reports["bfloat16"], strict=True):
        assert (a["id"], a["method"], a["judger_senders"], a["edges"]) == (b["id"], b["method"], b["judger_senders"],
                                                                           b["edges"])
        assert b["peak_cache_bytes"] * 2 == a["peak_cache_bytes"]  # 2 bytes per element instead of 4


# ---- what outlives a phase ------------------------------------------------------------------------


def test_a_training_step_after_a_validation_under_inference_mode_trains_on_the_static_loops():
    # Lightning validates under torch.inference_mode(). What the validation leaves behind for the next
    # training step (token-loop workspaces, the ridge realignment a trained `realign` channel saves for
    # backward, role and question embeddings) must be ordinary tensors.
    task, module = _module("task=lookup", "rollout.cuda_graphs=static", "policy.channel=realign",
                           "policy.graphs=oracle", "rollout.retention=latent_only")
    _quiet(module)
    splits = task.splits()
    with torch.inference_mode():
        module.validation_step(splits["val"][:2], 0)
    pool = module.engine.pool
    assert pool is not None and pool.workspaces and not pool.capture
    loss = module.training_step(splits["train"][:2], 0)
    loss.backward()
    assert module.fuser.realign.up.grad is not None and bool(module.fuser.realign.up.grad.ne(0).any())
    kept = [t for ws in pool.workspaces.values()
            for t in (ws.bias, ws.input, ws.hidden, *(b for layer in ws.cache.layers for b in (layer.key_buffer,)))]
    kept += [module.llm.realignment("ridge").matrix, module._role_emb, *module.embedder._cache.values()]
    assert not [t.shape for t in kept if t.is_inference()]


def test_validations_keep_their_agents_and_complete_exactly_as_without(tmp_path, monkeypatch):
    """Every validation runs the same questions; their agents do not depend on the policy, so a later
    validation takes the keepers an earlier one computed (`GCacheModule.val_memo`): fewer agent computations,
    every completion the same as a run that computes them again (a memo of 0 bytes keeps nothing)."""
    import gcache.module
    from gcache.rollout import RolloutEngine
    from gcache.train import run

    computed = {"kept": 0, "again": 0}
    real_run = RolloutEngine.run

    def counting(self, *args, **kwargs):
        batch = real_run(self, *args, **kwargs)
        if self.memo is not None and self.memo.max_bytes is not None:  # a validation's rollouts
            computed[mode] += batch.prefills
        return batch

    monkeypatch.setattr(RolloutEngine, "run", counting)
    completions = {}
    for mode in ("kept", "again"):
        if mode == "again":
            monkeypatch.setattr(gcache.module, "VAL_MEMO_BYTES", 0)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[
                "experiment=smoke", "limit_train=8", "limit_val=3", "val_every_n_steps=1", "run_test=false",
                "task=lookup", "methods=[]", "topology=full", "policy.judger_edges=all"])  # the policy moves the
                # agent -> agent edges: a keeper whose readers changed is computed again, the others are kept
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / mode)
        run(cfg)
        completions[mode] = sorted((p.name, p.read_text()) for p in (tmp_path / mode / "completions").glob("*.jsonl"))
    assert len(completions["kept"]) == 5  # step 0 and after each of the 4 steps
    assert completions["kept"] == completions["again"]
    assert computed["again"] == 5 * 3 * 4  # 5 validations x 3 questions x 4 keepers
    assert 0 < computed["kept"] < computed["again"] - 2 * 3 * 4, computed  # at least two validations kept all

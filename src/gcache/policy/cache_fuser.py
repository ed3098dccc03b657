"""CacheFuser: fuse several senders' KV caches into one receiver input, with learned weights.

Senders' caches are concatenated along the sequence (each segment re-rotated to follow
the previous one, `gcache.kv.concat`); keys of different tokens are never averaged and
no sender is truncated. What the fuser learns is how much the reader takes from each sender
(`fusion`):

- `attention` (the default): the reader's attention to every slot of sender segment i is
  weighted by

      w_i = 2 · σ(a + b · s_i)

  (s_i: the policy's logit of the edge sender → receiver), added as log w_i to the attention
  logits of those slots for every query the reader runs, at every layer (the KV's log-weights,
  `gcache.kv`). The softmax renormalises, so w_i → 0 removes a sender exactly as if the graph
  had no edge, and w_i = 1 is plain attention: where several senders are read and only some
  help, the fuser learns to read those. a and b start at zero (w = 1: plain concatenation).
- `values`: the values of sender segment i at layer l are scaled by

    g_{l,i} = 2 · σ(a_l + b · s_i)

where s_i is the policy's logit of the edge sender → receiver. Only segments of direct
senders (an edge sender → receiver that was sampled) are gated: under `full` retention a
reader also reads ancestors through its senders, and their segments get g = 1 — a gate
from the logit of an edge that does not exist would train (and, through s_i, move) an edge
that did not run. Parameters a (one per
layer) and b start at zero, so g = 1: an untrained fuser is plain concatenation (on a
chain, exactly the LatentMAS chain), and training only moves away from that. A gate
below 1 damps what a sender contributes at that layer, above 1 amplifies it. A gate cannot
remove a sender: the reader's attention still goes to a damped segment's slots. Measured on
`lookup` (docs/cache-fuser.md), gates trained on the one-keeper graphs the policy samples learned
no slope (b = −0.001; per-layer gates 0.88–1.12 for every keeper alike), so on the all-keeper
graph they changed 9 of 40 answers and no score (0.275, as without them). Kept to evaluate
runs trained with them.

Only segments of direct senders (an edge sender → receiver that was sampled) are weighted, in
both fusions: under `full` retention a reader also reads ancestors through its senders, and
their segments keep weight 1.

The fuser is trained by a differentiable loss — the teacher-forced NLL of the reference
answer given the judger's prompt on its fused cache (`gcache.kv.answer_nll`) —
back-propagated through the frozen LM into the gated values, hence into a, b and,
through s_i, into the graph policy.

The channel (`channel="lowrank"`). Gates can only scale what a sender's cache already says to
the judger; under `latent_only` retention that is nothing the judger can read (the oracle
graph answers 0/20 on `lookup`). The low-rank channel learns what the judger reads: before
the gates, every position of a direct sender's segment is rewritten, per layer l and for
keys and values alike (x: one position's keys or values of all KV heads, flattened to D),

    x' = x + (x · U_l) · W_l + c_l          U_l (D, r), W_l (r, D), c_l (D,)

U starts random (scaled 1/√D), W and c at zero, so an untrained channel is the identity and
the fuser is exactly today's gates; training moves W, U and c by the same answer NLL as the
gates. Why this form: the judger can only read a sender through its keys and values, and the
information it needs is already inside them (the latent positions attended to the sender's
facts); what is missing is a map from where the frozen LM leaves that information to where
the judger's queries look for it. A map of the segment alone adds no gradient path through
the sender (no backward through the senders' latent steps), reads nothing but the segment
the retention hands on (its positions, nothing of the prompt under `latent_only`), and costs
one (T, D)·(D, r) product per layer. Keys are rewritten at the segment's own positions
0…T−1, before `kv.concat` re-rotates them, so a rewrite learned at one offset in the judger's
cache holds at every offset. Measured on `lookup` (latent_only, ridge realignment, 4 latent steps):
it learns the answer's format but not its digits — the latent positions hold nothing about the
answer to rewrite (docs/latent-channel.md).

The realign channel (`channel="realign"`) changes what senders compute instead: a
`TrainedRealignment` corrects the map from an agent's last hidden state to its next latent
input, for every agent's latent steps. Its gradient runs through the direct senders' latent
steps (recomputed with autograd from where they began, `RolloutEngine.segment_with_grad`) and
stops at what they received. Its learning rate is `policy.channel_lr`, apart from the gates'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gcache import kv

CHANNELS = ("gates", "lowrank", "realign")
FUSIONS = ("attention", "values")


class TrainedRealignment(nn.Module):
    """A trained correction of the latent steps' realignment (the `realign` channel): at latent step t,

        e_t = base(h, t) + n · (o_t + (h / ‖h‖) · U · W)        o_t (D,), U (D, r), W (r, D)

    with n the base map's target norm (the mean input-embedding norm), so o and U W are measured
    in embeddings. o and W start at zero: an untrained correction is the base map exactly. Step
    indices beyond the offsets use the last offset. Applied to every agent's latent steps; trained
    by the answer NLL through the direct senders' latent steps (`kv.latent_steps_with_grad`)."""

    def __init__(self, hidden_dim: int, steps: int, rank: int, seed: int = 0) -> None:
        super().__init__()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"the realign channel needs latent_steps >= 1, got {steps!r}")
        init = torch.Generator().manual_seed(seed)
        self.offsets = nn.Parameter(torch.zeros(steps, hidden_dim))  # o_t
        self.down = nn.Parameter(torch.randn(hidden_dim, rank, generator=init) / hidden_dim**0.5)  # U
        self.up = nn.Parameter(torch.zeros(rank, hidden_dim))  # W

    def bind(self, base):
        """The realignment to run: base (a `kv.Realignment` or `kv.SoftRealignment`) plus this correction;
        a callable (hidden (B, D), step) -> (B, D) in the hidden state's dtype and device."""
        scale = float(base.target_norm)

        def realign(hidden: torch.Tensor, step: int = 0) -> torch.Tensor:
            h = hidden.float()
            offset = self.offsets[min(step, self.offsets.shape[0] - 1)].to(h.device)
            unit = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            correction = scale * (offset + (unit @ self.down.to(h.device)) @ self.up.to(h.device))  # (B, D)
            return (base(hidden, step).float() + correction).to(hidden.dtype)

        return realign


class CacheFuser(nn.Module):
    def __init__(self, num_layers: int, *, channel: str = "gates", rank: int = 8, kv_dim: int | None = None,
                 hidden_dim: int | None = None, latent_steps: int | None = None, seed: int = 0,
                 fusion: str = "attention") -> None:
        """fusion: "attention" (a weight per sender on the reader's attention) or "values" (a gate
        per layer and sender on the values). channel: "gates" (the fusion alone), "lowrank" (the
        fusion on a trained low-rank rewrite of each direct sender's keys and values, of rank `rank`;
        kv_dim = KV heads × head dim) or "realign" (the fusion, and a `TrainedRealignment` of every
        agent's latent steps: hidden_dim, latent_steps offsets, rank `rank`)."""
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if channel not in CHANNELS:
            raise ValueError(f"channel={channel!r} is not one of {list(CHANNELS)}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion={fusion!r} is not one of {list(FUSIONS)}")
        self.fusion = fusion
        self._num_layers = num_layers
        if fusion == "values":
            self.layer_bias = nn.Parameter(torch.zeros(num_layers))  # a_l
            self.logit_slope = nn.Parameter(torch.zeros(()))  # b
        else:
            self.weight_bias = nn.Parameter(torch.zeros(()))  # a
            self.weight_slope = nn.Parameter(torch.zeros(()))  # b
        self.channel = channel
        if channel != "gates" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"channel rank must be an integer >= 1, got {rank!r}")
        if channel == "lowrank":
            if isinstance(kv_dim, bool) or not isinstance(kv_dim, int) or kv_dim < 1:
                raise ValueError(f"the lowrank channel needs kv_dim (KV heads x head dim) >= 1, got {kv_dim!r}")
            init = torch.Generator().manual_seed(seed)
            # index 0: keys, 1: values
            self.channel_down = nn.Parameter(torch.randn(num_layers, 2, kv_dim, rank, generator=init) / kv_dim**0.5)
            self.channel_up = nn.Parameter(torch.zeros(num_layers, 2, rank, kv_dim))  # W: zero = identity
            self.channel_bias = nn.Parameter(torch.zeros(num_layers, 2, kv_dim))  # c
        self.realign = None
        if channel == "realign":
            if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
                raise ValueError(f"the realign channel needs hidden_dim >= 1, got {hidden_dim!r}")
            self.realign = TrainedRealignment(hidden_dim, latent_steps, rank, seed=seed)

    def gate_parameters(self) -> list[nn.Parameter]:
        """The fusion's a and b (trained at `policy.fuser_lr`)."""
        if self.fusion == "values":
            return [self.layer_bias, self.logit_slope]
        return [self.weight_bias, self.weight_slope]

    @property
    def slope(self) -> torch.Tensor:
        """b: how strongly the edge logit moves a sender's weight."""
        return self.logit_slope if self.fusion == "values" else self.weight_slope

    def channel_parameters(self) -> list[nn.Parameter]:
        """The trained channel's parameters (at `policy.channel_lr`); none for `gates`."""
        gates = {id(p) for p in self.gate_parameters()}
        return [p for p in self.parameters() if id(p) not in gates]

    def describe(self) -> dict:
        """What decides the meaning of the channel's parameters (a checkpoint's identity)."""
        if self.channel == "gates":
            return {"kind": "gates"}
        if self.channel == "realign":
            steps, dim = self.realign.offsets.shape
            return {"kind": "realign", "rank": self.realign.down.shape[1], "hidden_dim": dim, "latent_steps": steps}
        return {"kind": self.channel, "rank": self.channel_up.shape[2], "kv_dim": self.channel_up.shape[3]}

    @property
    def num_layers(self) -> int:
        return self._num_layers

    def gates(self, edge_logits: torch.Tensor) -> torch.Tensor:
        """Value gates (fusion `values`) for senders with edge logits (S, B) -> (S, num_layers, B)."""
        if self.fusion != "values":
            raise ValueError("gates are the values fusion's; this fuser weights attention (log_weights)")
        pre = self.layer_bias[None, :, None] + self.logit_slope * edge_logits[:, None, :].to(
            self.layer_bias
        )
        return 2.0 * torch.sigmoid(pre)

    def log_weights(self, edge_logits: torch.Tensor) -> torch.Tensor:
        """Attention log-weights (fusion `attention`) log w = log 2 + log σ(a + b s) for senders with
        edge logits (S, B) -> (S, B), in fp32 (exact far into the tails, where w underflows)."""
        if self.fusion != "attention":
            raise ValueError("log_weights are the attention fusion's; this fuser gates values (gates)")
        pre = self.weight_bias + self.weight_slope * edge_logits.to(self.weight_bias)
        return math.log(2.0) + torch.nn.functional.logsigmoid(pre)

    def sender_weights(self, edge_logits: torch.Tensor) -> torch.Tensor:
        """What each sender (edge logits (S, B)) weighs for its reader, (S, B): the attention weight w, or
        the value gate averaged over layers."""
        if self.fusion == "values":
            return self.gates(edge_logits).mean(1)
        return self.log_weights(edge_logits).exp()

    def rewrite(self, segment: kv.KV) -> kv.KV:
        """The channel applied to one sender's segment (B rows): every layer's keys and values
        (B, H, T, Dh) -> x + (x U) W + c over the flattened heads; the identity for `gates`.
        Computed in float32 and returned in the cache's dtype and device."""
        if self.channel != "lowrank" or segment.seq_len == 0:
            return segment
        if len(segment.cache.layers) != self.num_layers:
            raise ValueError(f"the segment has {len(segment.cache.layers)} layers, the channel {self.num_layers}")
        layers = []
        for layer_idx, (k, v) in enumerate(segment.layers()):
            pair = []
            for j, x in enumerate((k, v)):
                b, h, t, dh = x.shape
                if h * dh != self.channel_up.shape[-1]:
                    raise ValueError(f"the segment has {h} x {dh} key/value dims per position, the channel "
                                     f"{self.channel_up.shape[-1]}")
                down, up, bias = (p[layer_idx, j].to(x.device) for p in
                                  (self.channel_down, self.channel_up, self.channel_bias))
                flat = x.transpose(1, 2).reshape(b, t, h * dh).float()  # (B, T, D)
                flat = flat + (flat @ down) @ up + bias  # (B, T, D)
                pair.append(flat.to(x.dtype).reshape(b, t, h, dh).transpose(1, 2))  # (B, H, T, Dh)
            layers.append(tuple(pair))
        return kv.KV(kv.cache_from_layers(layers), segment.mask, segment.log_weight)

    def fuse(
        self,
        senders: Sequence[kv.KV],
        edge_logits: torch.Tensor | None,
        rotary: torch.nn.Module | None,
        gated: Sequence[bool] | None = None,
    ) -> kv.KV:
        """Fuse senders' caches (each with B rows) for B receivers; edge_logits (S, B) or None (= 0).
        `gated[s]` False: segment s is an ancestor read through a sender, not a sender: weight 1 and
        no channel rewrite (the channel, like the weights, acts on the edges that exist)."""
        if not senders:
            raise ValueError("fuse needs at least one sender")
        batch = senders[0].batch_size
        param = self.gate_parameters()[0]
        if edge_logits is None:
            edge_logits = torch.zeros(len(senders), batch, device=param.device)
        if edge_logits.shape != (len(senders), batch):
            raise ValueError(
                f"edge_logits must be ({len(senders)}, {batch}), got {tuple(edge_logits.shape)}"
            )
        if gated is not None and len(gated) != len(senders):
            raise ValueError(f"gated has {len(gated)} entries for {len(senders)} senders")
        keep = torch.tensor([True] * len(senders) if gated is None else list(gated), dtype=torch.bool,
                            device=param.device)  # (S,)
        senders = [self.rewrite(s) if gated is None or gated[i] else s for i, s in enumerate(senders)]
        if self.fusion == "values":
            gates = self.gates(edge_logits)  # (S, L, B)
            gates = torch.where(keep[:, None, None], gates, torch.ones_like(gates))
            return kv.concat(senders, rotary, list(gates.unbind(0)))
        log_w = self.log_weights(edge_logits)  # (S, B)
        log_w = torch.where(keep[:, None], log_w, torch.zeros_like(log_w))
        return kv.concat(senders, rotary, log_weights=list(log_w.unbind(0)))

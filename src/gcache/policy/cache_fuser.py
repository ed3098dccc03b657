"""CacheFuser: fuse several senders' KV caches into one receiver input, with learned gates.

Senders' caches are concatenated along the sequence (each segment re-rotated to follow
the previous one, `gcache.kv.concat`); keys of different tokens are never averaged and
no sender is truncated. The values of sender segment i at layer l are scaled by

    g_{l,i} = 2 · σ(a_l + b · s_i)

where s_i is the policy's logit of the edge sender → receiver. Only segments of direct
senders (an edge sender → receiver that was sampled) are gated: under `full` retention a
reader also reads ancestors through its senders, and their segments get g = 1 — a gate
from the logit of an edge that does not exist would train (and, through s_i, move) an edge
that did not run. Parameters a (one per
layer) and b start at zero, so g = 1: an untrained fuser is plain concatenation (on a
chain, exactly the LatentMAS chain), and training only moves away from that. A gate
below 1 damps what a sender contributes at that layer, above 1 amplifies it.

The fuser is trained by a differentiable loss — the teacher-forced NLL of the reference
answer given the judger's prompt on its fused cache (`gcache.kv.answer_nll`) —
back-propagated through the frozen LM into the gated values, hence into a, b and,
through s_i, into the graph policy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gcache import kv


class CacheFuser(nn.Module):
    def __init__(self, num_layers: int) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.layer_bias = nn.Parameter(torch.zeros(num_layers))  # a_l
        self.logit_slope = nn.Parameter(torch.zeros(()))  # b

    @property
    def num_layers(self) -> int:
        return self.layer_bias.shape[0]

    def gates(self, edge_logits: torch.Tensor) -> torch.Tensor:
        """Gates for senders with edge logits (S, B) -> (S, num_layers, B)."""
        pre = self.layer_bias[None, :, None] + self.logit_slope * edge_logits[:, None, :].to(
            self.layer_bias
        )
        return 2.0 * torch.sigmoid(pre)

    def fuse(
        self,
        senders: Sequence[kv.KV],
        edge_logits: torch.Tensor | None,
        rotary: torch.nn.Module | None,
        gated: Sequence[bool] | None = None,
    ) -> kv.KV:
        """Fuse senders' caches (each with B rows) for B receivers; edge_logits (S, B) or None (= 0).
        `gated[s]` False: segment s is an ancestor read through a sender, not a sender: gate 1."""
        if not senders:
            raise ValueError("fuse needs at least one sender")
        batch = senders[0].batch_size
        if edge_logits is None:
            edge_logits = torch.zeros(len(senders), batch, device=self.layer_bias.device)
        if edge_logits.shape != (len(senders), batch):
            raise ValueError(
                f"edge_logits must be ({len(senders)}, {batch}), got {tuple(edge_logits.shape)}"
            )
        gates = self.gates(edge_logits)  # (S, L, B)
        if gated is not None:
            if len(gated) != len(senders):
                raise ValueError(f"gated has {len(gated)} entries for {len(senders)} senders")
            keep = torch.tensor(list(gated), dtype=torch.bool, device=gates.device)[:, None, None]  # (S, 1, 1)
            gates = torch.where(keep, gates, torch.ones_like(gates))
        return kv.concat(senders, rotary, list(gates.unbind(0)))

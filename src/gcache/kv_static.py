"""Static-shape token loops: a batch's cache in preallocated buffers, written in place.

The token loops of `gcache.kv` (latent steps, decoding) add one position to every row per
step. Instead of a `torch.cat` per token and layer (what `DynamicCache` does), a loop copies
the starting cache once into per-layer buffers (B, H, capacity, Dh), capacity a power of two,
and each step writes its keys and values at the next slot. The slot is a host integer (the
step count) or a device counter, never read back: nothing in a step asks the device a question
(no `.item()`, `bool(tensor)`, `.tolist()`), and the attention mask is built here as an
additive (B, 1, 1, slots) mask instead of by transformers' mask code, which checks on the host
whether any slot is padding.

Two kinds of loop:

- `EagerLoop` (CPU, and the reference): each step attends over the used slots only; shapes
  grow by one per step.
- `StaticLoop` (from a `LoopPool`): every step has the same shapes — the whole buffer is
  attended, unused slots masked — and the write position is a device tensor, so on CUDA a step
  is captured once as a CUDA graph per (batch bucket, capacity bucket, input kind) and replayed.
  The pool keeps the buffers and graphs between loops; a loop copies its starting cache in.

Both give the logits of `gcache.kv.forward` over a `DynamicCache` (tested to 1e-5 in fp32).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

log = logging.getLogger(__name__)

Layers = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (B, H, L, Dh)


def bucket(n: int, minimum: int = 16) -> int:
    """The power of two >= n (at least `minimum`): capacities and batch sizes come in few sizes."""
    size = minimum
    while size < n:
        size *= 2
    return size


class BufferLayer(CacheLayerMixin):
    """One layer's keys and values in preallocated buffers (B, H, capacity, Dh).

    `position is None` (eager): `update` writes at the host slot `used` and returns the used
    slots. Otherwise (static): it writes at the device slot `position` (shared by all layers,
    advanced by the loop after a forward) and returns the whole buffers."""

    is_sliding = False

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, used: int,
                 position: torch.Tensor | None = None) -> None:
        super().__init__()
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self.used = used
        self.position = position  # (1,) long on the buffers' device, or None
        self.device = key_buffer.device
        self.is_initialized = True
        self._expose()

    def _expose(self) -> None:
        if self.position is None:
            self.keys, self.values = self.key_buffer[:, :, : self.used], self.value_buffer[:, :, : self.used]
        else:
            self.keys, self.values = self.key_buffer, self.value_buffer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers exist before the first update."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        steps = key_states.shape[-2]
        if self.position is None:
            end = self.used + steps
            if end > self.key_buffer.shape[2]:
                raise ValueError(f"buffer of {self.key_buffer.shape[2]} slots is full ({end} needed)")
            self.key_buffer[:, :, self.used : end] = key_states
            self.value_buffer[:, :, self.used : end] = value_states
            self.used = end
            self._expose()
        else:
            slots = self.position + torch.arange(steps, device=self.device)  # (T,)
            self.key_buffer.index_copy_(2, slots, key_states)
            self.value_buffer.index_copy_(2, slots, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.position is None:
            return self.used + query_length, 0
        return self.key_buffer.shape[2], 0

    def get_seq_length(self) -> int:
        return self.used

    def get_max_length(self) -> int:
        return self.key_buffer.shape[2]


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_decoder()


def _masked(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


class EagerLoop:
    """Token loop over fresh buffers; each step attends over the used slots only."""

    def __init__(self, model: torch.nn.Module, layers: Layers, mask: torch.Tensor, steps: int) -> None:
        keys0 = layers[0][0]
        batch, length = mask.shape
        capacity = bucket(length + steps)
        self.model = model
        self.used = length
        buffers = []
        for k, v in layers:
            kb = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            vb = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
            kb[:, :, :length] = k
            vb[:, :, :length] = v
            buffers.append(BufferLayer(kb, vb, length))
        self.cache = Cache(layers=buffers)
        # Additive attention mask (B, 1, 1, C): 0 where a real slot, the dtype's min elsewhere (the
        # slots' padding mask is read off it: `bias == 0`).
        self.bias = torch.full((batch, 1, 1, capacity), _masked(keys0.dtype), dtype=keys0.dtype, device=mask.device)
        self.bias[:, 0, 0, :length].masked_fill_(mask.bool(), 0.0)
        self.next_position = mask.sum(-1)  # (B,) the position of each row's next token

    def step(self, *, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """One new position per row: input_ids (B, 1) or inputs_embeds (B, 1, D) -> final-norm hidden (B, D)."""
        slot = self.used
        self.bias[:, :, :, slot] = 0.0
        out = _decoder(self.model)(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=self.bias[:, :, :, : slot + 1],
            position_ids=self.next_position[:, None],
            cache=self.cache,
            use_cache=True,
        )
        self.used = slot + 1
        self.next_position = self.next_position + 1
        return out.last_hidden_state[:, -1]

    def keep_rows(self, index: torch.Tensor) -> None:
        """Continue with these rows only (index (B',) into the current rows): rows that have ended leave."""
        for layer in self.cache.layers:
            layer.key_buffer = layer.key_buffer.index_select(0, index)
            layer.value_buffer = layer.value_buffer.index_select(0, index)
            layer._expose()
        self.bias = self.bias.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)

    def result(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """The used slots: per layer (keys, values) (B, H, used, Dh) views, and the mask (B, used) long."""
        layers = [(layer.key_buffer[:, :, : self.used], layer.value_buffer[:, :, : self.used])
                  for layer in self.cache.layers]
        return layers, self.bias[:, 0, 0, : self.used].eq(0).long()


class _Workspace:
    """The static buffers of one (batch, capacity, input kind) and its CUDA graph."""

    def __init__(self, model: torch.nn.Module, template: Layers, batch: int, capacity: int, kind: str) -> None:
        k0, v0 = template[0]
        device, dtype = k0.device, k0.dtype
        self.model = model
        self.kind = kind
        self.capacity = capacity
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.cache = Cache(layers=[
            BufferLayer(k.new_zeros(batch, k.shape[1], capacity, k.shape[3]),
                        v.new_zeros(batch, v.shape[1], capacity, v.shape[3]), 0, self.position)
            for k, v in template
        ])
        self.bias = torch.full((batch, 1, 1, capacity), _masked(dtype), dtype=dtype, device=device)
        width = model.get_input_embeddings().weight.shape[1]
        if kind == "ids":
            self.input = torch.zeros(batch, 1, dtype=torch.long, device=device)
        else:
            self.input = torch.zeros(batch, 1, width, dtype=dtype, device=device)
        self.hidden = torch.zeros(batch, width, dtype=dtype, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(self, layers: Layers, mask: torch.Tensor) -> None:
        """Copy a starting cache (rows already padded to the batch) into the buffers."""
        length = mask.shape[1]
        for layer, (k, v) in zip(self.cache.layers, layers, strict=True):
            layer.key_buffer[:, :, :length].copy_(k)
            layer.value_buffer[:, :, :length].copy_(v)
            layer.key_buffer[:, :, length:].zero_()
            layer.value_buffer[:, :, length:].zero_()
        self.bias.fill_(_masked(self.bias.dtype))
        self.bias[:, 0, 0, :length].masked_fill_(mask.bool(), 0.0)
        self.position.fill_(length)
        self.next_position.copy_(mask.sum(-1))

    def forward(self) -> None:
        """The captured step: static shapes, device counters, no host reads."""
        self.bias.index_fill_(3, self.position, 0.0)
        inputs = {"input_ids": self.input} if self.kind == "ids" else {"inputs_embeds": self.input}
        out = _decoder(self.model)(
            **inputs, attention_mask=self.bias, position_ids=self.next_position[:, None], cache=self.cache, use_cache=True,
        )
        self.hidden.copy_(out.last_hidden_state[:, -1])
        self.position.add_(1)
        self.next_position.add_(1)

    def capture(self, pool) -> None:
        """Warm up once on a side stream (then undo its counters), capture one step."""
        position, next_position = self.position.clone(), self.next_position.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.position.copy_(position)
        self.next_position.copy_(next_position)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.forward()
        self.graph = graph


class LoopPool:
    """Static workspaces (and, with `capture`, their CUDA graphs) kept between token loops of one
    model, keyed by (batch bucket, capacity bucket, input kind)."""

    def __init__(self, model: torch.nn.Module, *, capture: bool, max_workspaces: int = 8) -> None:
        if capture and not torch.cuda.is_available():
            raise ValueError("CUDA graph capture needs a CUDA device; use capture=False (static shapes only)")
        self.model = model
        self.capture = capture
        self.max_workspaces = max_workspaces  # the least recently used one goes (with its graph) beyond this
        self.workspaces: dict[tuple[int, int, str], _Workspace] = {}  # in order of last use
        self.graph_pool = torch.cuda.graph_pool_handle() if capture else None
        self.captures = 0

    def loop(self, layers: Layers, mask: torch.Tensor, steps: int, kind: str) -> StaticLoop:
        batch, length = mask.shape
        rows = bucket(batch, minimum=1)
        capacity = bucket(length + steps)
        if rows > batch:  # pad the batch with copies of row 0 (results are cut back to B rows)
            index = torch.cat([torch.arange(batch), torch.zeros(rows - batch, dtype=torch.long)]).to(mask.device)
            layers = [(k.index_select(0, index), v.index_select(0, index)) for k, v in layers]
            mask = mask.index_select(0, index)
        key = (rows, capacity, kind)
        workspace = self.workspaces.pop(key, None)
        if workspace is None:
            while len(self.workspaces) >= self.max_workspaces:
                self.workspaces.pop(next(iter(self.workspaces)))
            workspace = _Workspace(self.model, layers, rows, capacity, kind)
        self.workspaces[key] = workspace
        workspace.load(layers, mask)
        return StaticLoop(self, workspace, batch, length)

    def _capture(self, workspace: _Workspace) -> None:
        if not self.capture or workspace.graph is not None:
            return
        try:
            workspace.capture(self.graph_pool)
            self.captures += 1
        except RuntimeError as error:  # a model whose forward cannot be captured: run eagerly
            log.warning("CUDA graph capture failed (%s); token loops run without CUDA graphs", error)
            self.capture = False


class StaticLoop:
    """A token loop over a pool's workspace (same interface as `EagerLoop`)."""

    def __init__(self, pool: LoopPool, workspace: _Workspace, batch: int, length: int) -> None:
        self.pool = pool
        self.workspace = workspace
        self.batch = batch
        self.used = length

    def step(self, *, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        ws = self.workspace
        new = input_ids if ws.kind == "ids" else inputs_embeds
        if new is None:
            raise ValueError(f"this loop takes {'input_ids' if ws.kind == 'ids' else 'inputs_embeds'}")
        if self.used >= ws.capacity:
            raise ValueError(f"workspace of {ws.capacity} slots is full")
        ws.input[: self.batch].copy_(new)
        self.pool._capture(ws)
        if ws.graph is not None:
            ws.graph.replay()
        else:
            ws.forward()
        self.used += 1
        return ws.hidden[: self.batch].clone()

    def result(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Copies of the used slots of the real rows (the workspace is reused by the next loop)."""
        ws, b, n = self.workspace, self.batch, self.used
        layers = [(layer.key_buffer[:b, :, :n].clone(), layer.value_buffer[:b, :, :n].clone())
                  for layer in ws.cache.layers]
        mask = ws.bias[:b, 0, 0, :n].eq(0).long()
        return layers, mask

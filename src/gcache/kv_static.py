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
  is captured once as a CUDA graph per workspace and replayed (`rollout.cuda_graphs=auto|on`).
  Without capture (`static`) the same steps run on any device: the GPU's path under test on CPU.
  The pool keeps the buffers and graphs between loops, within a budget in bytes; a loop copies its
  starting cache in. A batch whose workspace would not fit the budget runs in groups of rows that do
  (`LoopPool.rows_that_fit`), one group after another.

Both give the logits of `gcache.kv.forward` over a `DynamicCache` (tested to 1e-5 in fp32). What
outlives a loop is made outside inference mode (Lightning validates under `torch.inference_mode()`,
and the next training step writes the same workspaces).
"""

from __future__ import annotations

import logging
import os
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


def _load_bias(bias: torch.Tensor, mask: torch.Tensor, log_weight: torch.Tensor | None) -> None:
    """Write a starting cache's slots into an additive mask (B, 1, 1, C) filled with the dtype's min:
    each real slot gets its log-weight (B, L) (0 without)."""
    length = mask.shape[1]
    if log_weight is None:
        bias[:, 0, 0, :length].masked_fill_(mask.bool(), 0.0)
    else:
        bias[:, 0, 0, :length] = torch.where(mask.bool(), log_weight.to(bias), bias[:, 0, 0, :length])


def _read_bias(bias: torch.Tensor, weighted: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The padding mask (B, L) long and, for a weighted loop, the log-weights (B, L) fp32 of used slots."""
    real = bias.ne(_masked(bias.dtype))
    return real.long(), (bias.float().masked_fill(~real, 0.0) if weighted else None)


class EagerLoop:
    """Token loop over fresh buffers; each step attends over the used slots only, and rows that have
    ended can leave (`keep_rows`)."""

    shrinks = True

    def __init__(self, model: torch.nn.Module, layers: Layers, mask: torch.Tensor, steps: int,
                 log_weight: torch.Tensor | None = None) -> None:
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
        # Additive attention mask (B, 1, 1, C): a real slot's log-weight (0 without), the dtype's min
        # elsewhere (the slots' padding mask is read off it: `bias != min`).
        self.bias = torch.full((batch, 1, 1, capacity), _masked(keys0.dtype), dtype=keys0.dtype, device=mask.device)
        _load_bias(self.bias, mask, log_weight)
        self.weighted = log_weight is not None
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
        return (layers, *_read_bias(self.bias[:, 0, 0, : self.used], self.weighted))


def workspace_bytes(model: torch.nn.Module, template: Layers, batch: int, capacity: int, kind: str) -> int:
    """Bytes of the workspace a `LoopPool` would allocate for caches shaped like `template`: per layer
    a key and a value buffer (B, H, C, Dh), the additive mask (B, 1, 1, C), the input (B, 1) ids or
    (B, 1, D) embeddings, the hidden state (B, D) and the position counters."""
    element = template[0][0].element_size()
    width = model.get_input_embeddings().weight.shape[1]
    per_slot = sum(k.shape[1] * k.shape[3] + v.shape[1] * v.shape[3] for k, v in template) + 1  # + the mask
    inputs = batch * 8 if kind == "ids" else batch * width * element
    return batch * capacity * per_slot * element + inputs + batch * width * element + (1 + batch) * 8


class _Workspace:
    """The static buffers of one (batch, capacity, input kind) and its CUDA graph."""

    def __init__(self, model: torch.nn.Module, template: Layers, batch: int, capacity: int, kind: str) -> None:
        k0, v0 = template[0]
        device, dtype = k0.device, k0.dtype
        self.model = model
        self.kind = kind
        self.batch = batch
        self.capacity = capacity
        # Built outside inference mode: a workspace first made during validation (which Lightning runs
        # under `torch.inference_mode()`) is written in place by the next training step, and in-place
        # updates of an inference tensor outside inference mode are refused.
        with torch.inference_mode(False):
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
        self.capture_failed: str | None = None  # why capturing this workspace failed (it then runs eagerly)

    @property
    def nbytes(self) -> int:
        tensors = [self.position, self.next_position, self.bias, self.input, self.hidden]
        tensors += [b for layer in self.cache.layers for b in (layer.key_buffer, layer.value_buffer)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def load(self, layers: Layers, mask: torch.Tensor, log_weight: torch.Tensor | None = None) -> None:
        """Copy a starting cache (rows already padded to the batch) and its log-weights into the buffers."""
        length = mask.shape[1]
        for layer, (k, v) in zip(self.cache.layers, layers, strict=True):
            layer.key_buffer[:, :, :length].copy_(k)
            layer.value_buffer[:, :, :length].copy_(v)
            layer.key_buffer[:, :, length:].zero_()
            layer.value_buffer[:, :, length:].zero_()
        self.bias.fill_(_masked(self.bias.dtype))
        _load_bias(self.bias, mask, log_weight)
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
        """Warm up once on a side stream (then undo its counters), capture one step; on the
        workspace's own device (a model on cuda:1 is captured there, not on the current device)."""
        device = self.hidden.device
        with torch.cuda.device(device):
            position, next_position = self.position.clone(), self.next_position.clone()
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                self.forward()
            torch.cuda.current_stream(device).wait_stream(stream)
            self.position.copy_(position)
            self.next_position.copy_(next_position)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.forward()
        self.graph = graph


GIB = 1024**3


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def amount(n: int) -> str:
    """Bytes for a log line: GiB, or MiB below a tenth of one."""
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def check_memory(memory: float | str, name: str = "memory") -> None:
    """A memory budget is a number of GiB > 0 or a percentage of free memory ('25%', in (0, 100])."""
    if isinstance(memory, (int, float)) and not isinstance(memory, bool) and memory > 0:
        return
    try:
        percent = float(memory[:-1]) if isinstance(memory, str) and memory.endswith("%") else None
    except ValueError:
        percent = None
    if percent is None or not 0 < percent <= 100:
        raise ValueError(f"{name} must be a number of GiB > 0 or a percentage of the device's free memory "
                         f"such as '25%' (in (0, 100]), got {memory!r}")


def budget_bytes(memory: float | str, device: torch.device) -> int:
    """A budget (`check_memory`) in bytes on `device`; a percentage is of the memory free now."""
    check_memory(memory)
    if isinstance(memory, str):
        return int(float(memory[:-1]) / 100 * free_memory(device))
    return int(memory * GIB)


class LoopPool:
    """Static workspaces (and, with `capture`, their CUDA graphs) kept between token loops of one
    model, within a memory budget of `budget_bytes` for all of them.

    Keys: a loop of B rows, L cached slots and T new positions needs a workspace of
    `bucket(B, 1)` rows and at least `bucket(L + T)` slots, for its input kind (token ids or
    embeddings). An existing workspace with those rows and kind and up to `REUSE_FACTOR` times the
    slots serves it (masked slots cost attention, not results), so training, validation, test and
    comparison chunks of one run share workspaces and graphs instead of capturing per shape.
    Beyond the budget the least recently used workspaces go (with their graphs); a workspace that
    cannot fit at all, or whose allocation runs out of memory, is reported once with its size and
    that loop runs eagerly. A capture that fails falls back for that workspace only."""

    REUSE_FACTOR = 4

    def __init__(self, model: torch.nn.Module, *, capture: bool, budget_bytes: int) -> None:
        if capture and not torch.cuda.is_available():
            raise ValueError("CUDA graph capture needs a CUDA device; use capture=False (static shapes only)")
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"budget_bytes must be an integer >= 0, got {budget_bytes!r}")
        self.model = model
        self.capture = capture
        self.budget_bytes = budget_bytes
        self.workspaces: dict[tuple[int, int, str], _Workspace] = {}  # in order of last use
        self.graph_pool = None  # one CUDA memory pool for every graph, made on the model's device at first capture
        self.captures = 0
        self.created = 0  # workspaces allocated (a key allocated twice was evicted in between)
        self.loops = 0  # loops run on workspaces (the rest ran eagerly: `reported`)
        self.reported: set[tuple[int, int, str]] = set()  # keys whose fallback was reported
        self.split = 0  # loops run in row groups to fit the budget (`rows_that_fit`)
        self.split_reported: set[tuple[int, int, str]] = set()

    @property
    def nbytes(self) -> int:
        return sum(ws.nbytes for ws in self.workspaces.values())

    def stats(self) -> dict[str, int | float]:
        """What the pool holds and did: kept workspaces and their MiB, workspaces allocated, loops run on
        them, CUDA graphs captured and captures that failed, shapes that fell back to eager loops, loops run in
        row groups to fit the budget."""
        return {"workspaces": len(self.workspaces), "MiB": round(self.nbytes / 2**20, 1),
                "budget_GiB": round(self.budget_bytes / GIB, 2), "allocated": self.created, "loops": self.loops,
                "captures": self.captures,
                "capture_failures": sum(ws.capture_failed is not None for ws in self.workspaces.values()),
                "eager_fallbacks": len(self.reported), "split_loops": self.split,
                "shapes": [f"{rows} rows x {slots} slots ({kind})" for rows, slots, kind in self.workspaces]}

    def set_budget(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._evict(0)

    def release(self) -> None:
        """Drop every workspace and graph (the end of a run)."""
        self.workspaces.clear()
        self.graph_pool = None

    def _evict(self, needed: int) -> None:
        while self.workspaces and self.nbytes + needed > self.budget_bytes:
            self.workspaces.pop(next(iter(self.workspaces)))

    def _find(self, rows: int, capacity: int, kind: str) -> tuple[int, int, str] | None:
        fits = [key for key in self.workspaces
                if key[0] == rows and key[2] == kind and capacity <= key[1] <= capacity * self.REUSE_FACTOR]
        return min(fits, key=lambda key: key[1]) if fits else None

    def rows_that_fit(self, layers: Layers, batch: int, length: int, steps: int, kind: str) -> int:
        """How many rows of a loop of `batch` rows, `length` cached slots and `steps` new ones run at once: all
        of them when their workspace fits the budget (or is kept already), else the most rows, a power of two,
        that fit. `gcache.kv`'s loops run a larger batch in row groups of that many, one after another, on one
        workspace, instead of eagerly. All where not even one row fits: that loop runs eagerly (reported)."""
        capacity = bucket(length + steps)

        def fits(rows: int) -> bool:
            return (self._find(rows, capacity, kind) is not None
                    or workspace_bytes(self.model, layers, rows, capacity, kind) <= self.budget_bytes)

        rows = bucket(batch, minimum=1)
        while rows > 1 and not fits(rows):
            rows //= 2
        if not fits(rows):
            return batch  # one eager loop (`loop` reports it)
        if rows < batch:
            self.split += 1
            key = (bucket(batch, minimum=1), capacity, kind)
            if key not in self.split_reported:
                self.split_reported.add(key)
                log.info("a token loop of %d rows x %d slots (%s) needs more than the workspace budget of %s "
                         "(rollout.workspace_memory): it runs in groups of %d rows", batch, capacity, kind,
                         amount(self.budget_bytes), rows)
        return min(rows, batch)

    def _report(self, key: tuple[int, int, str], message: str, *args) -> None:
        if key not in self.reported:
            self.reported.add(key)
            log.warning(message, *args)

    def loop(self, layers: Layers, mask: torch.Tensor, steps: int, kind: str,
             log_weight: torch.Tensor | None = None) -> StaticLoop | EagerLoop:
        batch, length = mask.shape
        rows = bucket(batch, minimum=1)
        capacity = bucket(length + steps)
        key = self._find(rows, capacity, kind)
        if key is None:
            key = (rows, capacity, kind)
            size = workspace_bytes(self.model, layers, rows, capacity, kind)
            if size > self.budget_bytes:
                self._report(key, "a token-loop workspace of %d rows x %d slots (%s) needs %s, more than the "
                             "budget of %s (rollout.workspace_memory): those loops run eagerly",
                             rows, capacity, kind, amount(size), amount(self.budget_bytes))
                return EagerLoop(self.model, layers, mask, steps, log_weight)
            self._evict(size)
            try:
                self.workspaces[key] = _Workspace(self.model, layers, rows, capacity, kind)
            except torch.OutOfMemoryError:
                self._report(key, "out of memory allocating a token-loop workspace of %d rows x %d slots "
                             "(%s, %s): those loops run eagerly", rows, capacity, kind, amount(size))
                return EagerLoop(self.model, layers, mask, steps, log_weight)
            self.created += 1
        workspace = self.workspaces.pop(key)
        self.workspaces[key] = workspace  # most recently used last
        if rows > batch:  # pad the batch with copies of row 0 (results are cut back to B rows)
            index = torch.arange(rows, device=mask.device)
            index = torch.where(index < batch, index, 0)  # made on the device: no host copy
            layers = [(k.index_select(0, index), v.index_select(0, index)) for k, v in layers]
            mask = mask.index_select(0, index)
            log_weight = None if log_weight is None else log_weight.index_select(0, index)
        workspace.load(layers, mask, log_weight)
        self.loops += 1
        return StaticLoop(self, workspace, batch, length, log_weight is not None)

    def _capture(self, workspace: _Workspace) -> None:
        if not self.capture or workspace.graph is not None or workspace.capture_failed:
            return
        try:
            if self.graph_pool is None:
                with torch.cuda.device(workspace.hidden.device):
                    self.graph_pool = torch.cuda.graph_pool_handle()
            workspace.capture(self.graph_pool)
            self.captures += 1
        except RuntimeError as error:  # out of memory included (torch.OutOfMemoryError is a RuntimeError)
            workspace.capture_failed = str(error).splitlines()[0] if str(error) else type(error).__name__
            log.warning("CUDA graph capture of the %d rows x %d slots %s workspace failed (%s); that "
                        "workspace runs without a CUDA graph", workspace.batch, workspace.capacity,
                        workspace.kind, workspace.capture_failed)


class StaticLoop:
    """A token loop over a pool's workspace (the interface of `EagerLoop`; its rows never leave: the
    shapes stay those of the captured graph)."""

    shrinks = False

    def __init__(self, pool: LoopPool, workspace: _Workspace, batch: int, length: int, weighted: bool = False) -> None:
        self.pool = pool
        self.workspace = workspace
        self.batch = batch
        self.used = length
        self.weighted = weighted  # the start had log-weights: `result` returns them

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
            with torch.cuda.device(ws.hidden.device):  # replayed where captured, whatever the current device
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
        return (layers, *_read_bias(ws.bias[:b, 0, 0, :n], self.weighted))

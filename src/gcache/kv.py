"""Pure functions on batches of KV caches: prefill, latent steps, decode, truncate, concatenate.

A `KV` is a transformers `DynamicCache` plus the padding mask of every slot. Shapes:
keys/values per layer are (B, H, L, Dh); the mask is (B, L) with 1 = real token. A KV may also
carry attention log-weights (B, L) (`log_weight`, fp32; None = 0): every query that attends the
cache adds slot j's log-weight to its attention logit for j, at every layer, so the attention a
reader pays to those slots is multiplied by exp(log_weight) before the softmax renormalises. A
`CacheFuser` weights its senders this way (`concat(..., log_weights=)`); −∞ would remove a slot,
0 is plain attention. Log-weights live in the additive attention masks that `forward` and the
token loops build, so prefill, latent steps, decoding and the answer NLL all read them, and
they are differentiable (the fuser's loss trains them).

The one invariant everything here keeps: **in every row, the real slots hold the
positions 0 … n−1 in slot order** (n = that row's number of real slots); padding slots
are masked out and their position is irrelevant. A new token of a row therefore sits
at position n + (its index among the new real tokens), which is what `_positions`
computes and passes explicitly to the model on every forward. Because RoPE is relative
(R(p + d) = R(d) R(p)), a cache can be truncated or appended to another one by
re-rotating its keys by the position shift (values unchanged) — see `rotate_keys`.
Padding can then sit anywhere (left of a prompt, between two senders' segments)
without changing a single logit of the real tokens, and nothing is renumbered the way
LatentMAS's truncation renumbers new tokens from the truncated length.

Supported model families are those whose decoder has a standard `rotary_emb` with
full-head-dim `rotate_half` RoPE (`ROPE_MODEL_TYPES`; equivalence-tested on Llama, Qwen2 and
Qwen3) with fixed frequencies (`SHIFTABLE_ROPE_TYPES`: default, linear, llama3, yarn; a
length-dependent RoPE is refused when the model loads); for other families every function
works except those that shift positions (truncation, concatenation), which raise.

The token loops (`latent_steps`, `decode`) write into preallocated buffers (`gcache.kv_static`)
and read nothing back from the device per token.

Nothing here mutates a cache it was given: `DynamicCache.update` concatenates into new
tensors, and each function first makes a shallow copy of the cache object. So a cache
handed to `decode` (or a second receiver) is unchanged for its first owner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from gcache import kv_static

ROPE_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "olmo", "olmo2", "granite"}
)
# RoPE variants with fixed frequencies (R(p + d) = R(d) R(p) holds); equivalence-tested: default
# (Llama, Qwen2, Qwen3), linear, llama3 (Llama 3.1+), yarn (its attention scaling is divided out).
SHIFTABLE_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


@dataclass
class KV:
    """A batch of KV caches and the padding mask of its slots."""

    cache: DynamicCache
    mask: torch.Tensor  # (B, L) long; 1 = real token, 0 = padding
    log_weight: torch.Tensor | None = None  # (B, L) fp32 attention log-weight per slot; None = 0 everywhere

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def seq_len(self) -> int:
        return self.mask.shape[1]

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of real slots per row = the next free position of the row."""
        return self.mask.sum(-1)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]


@dataclass
class Step:
    """What a forward over new inputs returns: the extended cache and the last position's outputs."""

    kv: KV
    hidden: torch.Tensor  # (B, D) final-norm hidden state at the last position
    logits: torch.Tensor | None  # (B, V) next-token logits at the last position (fp32); None where not read


# ---- construction and copying ---------------------------------------------------------------


def cache_from_layers(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding exactly these (keys, values) per layer (the tensors are not copied)."""
    cache = DynamicCache()
    for k, v in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


def empty(batch_size: int, device: torch.device | str = "cpu") -> KV:
    """A KV of B rows and no slots."""
    return KV(DynamicCache(), torch.zeros(batch_size, 0, dtype=torch.long, device=device))


def copy(kv: KV, *, clone: bool = False) -> KV:
    """A new cache object over the same tensors (or cloned ones): safe to extend or hand on."""
    if not kv.cache.layers or kv.seq_len == 0:
        return KV(DynamicCache(), kv.mask.clone())
    layers = [(k.clone(), v.clone()) if clone else (k, v) for k, v in kv.layers()]
    return KV(cache_from_layers(layers), kv.mask.clone(), _slots(kv.log_weight, slice(None)))


def _slots(log_weight: torch.Tensor | None, columns) -> torch.Tensor | None:
    """Log-weights (B, L) of some slot columns (a slice or an index tensor), or None."""
    if log_weight is None:
        return None
    if isinstance(columns, slice):
        return log_weight[:, columns]
    return log_weight.index_select(1, columns)


def _rows(log_weight: torch.Tensor | None, rows) -> torch.Tensor | None:
    """Log-weights (B, L) of some rows (a slice or an index tensor), or None."""
    if log_weight is None:
        return None
    return log_weight[rows] if isinstance(rows, slice) else log_weight.index_select(0, rows)


def _is_empty(kv: KV) -> bool:
    return kv.seq_len == 0 or not kv.cache.layers or not kv.cache.layers[0].is_initialized


def select(kv: KV, rows: Sequence[int] | torch.Tensor) -> KV:
    """Rows of a batch (index_select along B); rows may repeat. Consecutive host rows (e.g. [b]) are a
    slice: no index is copied to the device."""
    if not isinstance(rows, torch.Tensor) and len(rows) and list(rows) == list(range(rows[0], rows[0] + len(rows))):
        part = slice(rows[0], rows[0] + len(rows))
        if _is_empty(kv):
            return KV(DynamicCache(), kv.mask[part])
        return KV(cache_from_layers([(k[part], v[part]) for k, v in kv.layers()]), kv.mask[part],
                  _rows(kv.log_weight, part))
    index = torch.as_tensor(rows, dtype=torch.long, device=kv.mask.device)
    if _is_empty(kv):
        return KV(DynamicCache(), kv.mask.index_select(0, index))
    layers = [(k.index_select(0, index), v.index_select(0, index)) for k, v in kv.layers()]
    return KV(cache_from_layers(layers), kv.mask.index_select(0, index), _rows(kv.log_weight, index))


def compact(kv: KV) -> KV:
    """Drop slot columns that are padding in every row (exact: positions follow real slots only)."""
    keep = kv.mask.bool().any(0)  # (L,)
    if bool(keep.all()):
        return kv
    idx = keep.nonzero().squeeze(-1)
    if idx.numel() == 0:
        return empty(kv.batch_size, kv.mask.device)
    layers = [(k.index_select(2, idx), v.index_select(2, idx)) for k, v in kv.layers()]
    return KV(cache_from_layers(layers), kv.mask.index_select(1, idx), _slots(kv.log_weight, idx))


def tail(kv: KV, n: int) -> KV:
    """The last n slots, for a caller that knows the slots before them are padding in every row (so no
    position changes and nothing is re-rotated; `compact` finds that out on the device instead)."""
    if n >= kv.seq_len:
        return copy(kv)
    if n <= 0:
        return empty(kv.batch_size, kv.mask.device)
    cut = kv.seq_len - n
    return KV(cache_from_layers([(k[:, :, cut:], v[:, :, cut:]) for k, v in kv.layers()]), kv.mask[:, cut:].clone(),
              _slots(kv.log_weight, slice(cut, None)))


def drop_columns(kv: KV, start: int, stop: int) -> KV:
    """The slots without columns start … stop−1, for a caller that knows those columns are padding in
    every row: positions follow real slots only, so nothing is re-rotated (`compact` finds such columns
    on the device instead)."""
    if stop <= start:
        return kv
    if _is_empty(kv):
        return empty(kv.batch_size, kv.mask.device)

    def cut(t: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([t.narrow(dim, 0, start), t.narrow(dim, stop, t.shape[dim] - stop)], dim)

    return KV(cache_from_layers([(cut(k, 2), cut(v, 2)) for k, v in kv.layers()]), cut(kv.mask, 1),
              None if kv.log_weight is None else cut(kv.log_weight, 1))


def stack(kvs: Sequence[KV], *, compacted: bool = False) -> KV:
    """Concatenate batches along B, left-padding each to the longest (pads masked, values zero).
    Each batch is first `compact`ed (a host-device sync) unless the caller knows it is (`compacted`)."""
    kvs = list(kvs) if compacted else [compact(kv) for kv in kvs]
    length = max(kv.seq_len for kv in kvs)
    device = kvs[0].mask.device
    masks = [torch.nn.functional.pad(kv.mask, (length - kv.seq_len, 0)) for kv in kvs]
    mask = torch.cat(masks, 0)
    if length == 0:
        return empty(mask.shape[0], device)
    log_weight = None  # (B, L): a batch without log-weights (and every pad) has 0
    if any(kv.log_weight is not None for kv in kvs):
        log_weight = torch.cat([torch.nn.functional.pad(
            kv.log_weight if kv.log_weight is not None else kv.mask.new_zeros(kv.mask.shape, dtype=torch.float32),
            (length - kv.seq_len, 0)) for kv in kvs], 0)
    template = next(kv for kv in kvs if not _is_empty(kv))
    layers = []
    for layer_idx, (k_ref, v_ref) in enumerate(template.layers()):
        ks, vs = [], []
        for kv in kvs:
            pad = length - kv.seq_len
            if _is_empty(kv):
                shape_k = (kv.batch_size, k_ref.shape[1], length, k_ref.shape[3])
                shape_v = (kv.batch_size, v_ref.shape[1], length, v_ref.shape[3])
                ks.append(k_ref.new_zeros(shape_k))
                vs.append(v_ref.new_zeros(shape_v))
                continue
            k, v = kv.cache.layers[layer_idx].keys, kv.cache.layers[layer_idx].values
            ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
            vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
        layers.append((torch.cat(ks, 0), torch.cat(vs, 0)))
    return KV(cache_from_layers(layers), mask, log_weight)


def nbytes(kv: KV) -> int:
    """Bytes held by the cache's key and value tensors."""
    if _is_empty(kv):
        return 0
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv.layers())


# ---- positions and RoPE -----------------------------------------------------------------------


def rotary_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's own rotary module if its family is supported for position shifts, else None.

    A RoPE whose frequencies depend on the sequence length (`dynamic`, `longrope`) has no fixed
    R(d) to shift a cache by: refused here, with the rope types that work (`SHIFTABLE_ROPE_TYPES`)."""
    if model.config.model_type not in ROPE_MODEL_TYPES:
        return None
    rope = getattr(model.config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type not in SHIFTABLE_ROPE_TYPES:
        raise ValueError(
            f"rope_parameters.rope_type={rope_type!r} is not supported: gcache shifts cache positions by "
            f"re-rotating keys, exact only when RoPE frequencies do not depend on the sequence length "
            f"({sorted(SHIFTABLE_ROPE_TYPES)})"
        )
    return model.get_decoder().rotary_emb


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotation(shift: torch.Tensor, rotary: torch.nn.Module | None, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, 1, Dh) fp32 that move RoPE keys by `shift` (B,) positions (may be negative).

    Computed once per shift and applied to every layer (`rotate_with`). No host-device sync: a
    zero shift is a rotation by 0 (cos 1, sin 0), exact in every dtype."""
    if rotary is None:
        raise ValueError(
            "shifting cache positions needs a RoPE model of a supported family "
            f"({sorted(ROPE_MODEL_TYPES)})"
        )
    probe = torch.zeros(1, device=shift.device, dtype=torch.float32)
    cos, sin = rotary(probe, position_ids=shift[:, None].float())  # (B, 1, Dh) each
    if cos.shape[-1] != head_dim:
        raise ValueError(
            f"rotary dim {cos.shape[-1]} != head dim {head_dim}: partial RoPE is not supported"
        )
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    return (cos / scale)[:, None].float(), (sin / scale)[:, None].float()


def rotate_with(keys: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """keys (B, H, L, Dh) rotated by a `rotation` (cos, sin), in the keys' dtype."""
    cos, sin = rot  # on the keys' device: computed from the masks of the same caches
    k = keys.float()
    return (k * cos + _rotate_half(k) * sin).to(keys.dtype)


def rotate_keys(keys: torch.Tensor, shift: torch.Tensor, rotary: torch.nn.Module | None) -> torch.Tensor:
    """Keys computed at positions p re-rotated to positions p + shift (per row).

    keys: (B, H, L, Dh); shift: (B,) integer position shift (may be negative).
    """
    return rotate_with(keys, rotation(shift.to(keys.device), rotary, keys.shape[-1]))


def attention_bias(mask: torch.Tensor, new: int, dtype: torch.dtype, log_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Additive attention mask (B, 1, T, L + T) for T new slots after L past ones: new slot i sees the
    real slots j <= L + i (the slot's log-weight there, 0 without `log_weight` (B, L + T); the dtype's
    min elsewhere). Built here rather than by transformers, whose mask code asks the host whether any
    slot is padding (a sync per forward)."""
    total = mask.shape[1]
    slots = torch.arange(total, device=mask.device)  # (L + T,)
    queries = torch.arange(total - new, total, device=mask.device)  # (T,)
    allowed = (slots[None, :] <= queries[:, None])[None] & mask.bool()[:, None, :]  # (B, T, L + T)
    if log_weight is None:
        bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
        return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    weights = clamp_log_weight(log_weight).to(device=mask.device, dtype=dtype)[:, None, :]  # (B, 1, L + T)
    return weights.expand(allowed.shape).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


LOG_WEIGHT_FLOOR = -1e4  # a slot weighted below exp(-1e4) is absent; the floor keeps it apart from padding


def clamp_log_weight(log_weight: torch.Tensor) -> torch.Tensor:
    """Log-weights floored at `LOG_WEIGHT_FLOOR` (far above any dtype's min, which marks padding)."""
    return log_weight.clamp_min(LOG_WEIGHT_FLOOR)


def _positions(past_lengths: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions of new tokens: continue each row after its real past slots."""
    return past_lengths[:, None] + (new_mask.cumsum(-1) - 1).clamp(min=0)


# ---- forward passes ---------------------------------------------------------------------------


def forward(
    model: torch.nn.Module,
    past: KV | None,
    new_mask: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    extend_in_place: bool = False,
) -> tuple[KV, torch.Tensor]:
    """Run new inputs (B, T) on top of `past` (unchanged unless `extend_in_place`, for a
    cache the caller owns, e.g. inside a decoding loop). Returns the extended KV and the
    final-norm hidden states of the new positions (B, T, D). Padding slots of the new
    segment are zeroed in the cache so garbage (or NaN) from fully-masked pad rows never
    reaches a later attention product (always, so no host-device sync asks whether any is padding)."""
    batch = new_mask.shape[0]
    if past is None:
        past = empty(batch, new_mask.device)
    if past.batch_size != batch:
        raise ValueError(f"past cache has {past.batch_size} rows but the new inputs have {batch}")
    new_mask = new_mask.to(past.mask.device).long()
    state = past if extend_in_place else copy(past)
    full_mask = torch.cat([past.mask, new_mask], dim=1)  # (B, L + T)
    log_weight = None  # (B, L + T): the new slots have 0
    if past.log_weight is not None:
        log_weight = torch.nn.functional.pad(past.log_weight.to(full_mask.device), (0, new_mask.shape[1]))
    dtype = inputs_embeds.dtype if inputs_embeds is not None else model.get_input_embeddings().weight.dtype
    out = model.get_decoder()(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_bias(full_mask, new_mask.shape[1], dtype, log_weight),
        position_ids=_positions(past.lengths, new_mask),
        cache=state.cache,  # transformers >= 5.24 (`past_key_values` is deprecated, removed in 5.40)
        use_cache=True,
    )
    cache = out.cache
    steps = new_mask.shape[1]
    pad = ~new_mask.bool()[:, None, :, None]  # (B, 1, T, 1)
    for layer in cache.layers if steps else ():
        if torch.is_grad_enabled():  # out of place: the new slots are in the autograd graph
            k_old, k_new = layer.keys[:, :, :-steps], layer.keys[:, :, -steps:]
            v_old, v_new = layer.values[:, :, :-steps], layer.values[:, :, -steps:]
            layer.keys = torch.cat([k_old, k_new.masked_fill(pad, 0)], dim=2)
            layer.values = torch.cat([v_old, v_new.masked_fill(pad, 0)], dim=2)
        else:  # the layer's tensors were just made by `update`: nobody else holds them
            layer.keys[:, :, -steps:].masked_fill_(pad, 0)
            layer.values[:, :, -steps:].masked_fill_(pad, 0)
    return KV(cache, full_mask, log_weight), out.last_hidden_state


def next_token_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head on hidden states (..., D) -> fp32 logits (..., V)."""
    return model.get_output_embeddings()(hidden).float()


def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    past: KV | None = None,
    logits: bool = True,
) -> Step:
    """Continue from `past` (or start) with left-padded tokens (B, T); last position is real in every row.
    `logits=False` skips the LM head (an agent's prefill: only its cache and hidden state are read)."""
    kv, hidden = forward(model, past, attention_mask, input_ids=input_ids)
    last = hidden[:, -1]  # (B, D)
    return Step(kv, last, next_token_logits(model, last) if logits else None)


# ---- latent steps -----------------------------------------------------------------------------


@dataclass
class Realignment:
    """Maps a last hidden state to the next input embedding for a latent step.

    e = h · W_a (if `matrix` is set) then rescaled to `target_norm`, the mean norm of the
    input embeddings. W_a = (W_outᵀ W_out + λI)⁻¹ W_outᵀ W_in solves the ridge problem
    min ‖W_out W_a − W_in‖² + λ‖W_a‖²: output-embedding directions are sent to the
    matching input embeddings. The rescale matters even with tied embeddings (W_a ≈ I):
    SmolLM2-135M's hidden norm is ~53 against an embedding norm of ~3.2.
    """

    matrix: torch.Tensor | None  # (D, D) fp32
    target_norm: float

    def without_matrix(self) -> Realignment:
        return Realignment(None, self.target_norm)

    def to(self, device: torch.device | str) -> Realignment:
        return Realignment(None if self.matrix is None else self.matrix.to(device), self.target_norm)

    def random_like(self, seed: int = 0) -> Realignment:
        """A random matrix with the same singular values (Q1 diag(S) Q2ᵀ, Q Haar-orthogonal)."""
        if self.matrix is None:
            raise ValueError("random_like needs a realignment matrix")
        gen = torch.Generator().manual_seed(seed)
        d = self.matrix.shape[0]
        singular = torch.linalg.svdvals(self.matrix.cpu())  # (D,)
        q1, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
        q2, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
        return Realignment((q1 * singular) @ q2.T, self.target_norm)

    def __call__(self, hidden: torch.Tensor, step: int = 0) -> torch.Tensor:
        """(B, D) -> (B, D) next input embeddings; `step` (the latent step's index) is for realignments
        that depend on it (`gcache.policy.cache_fuser.TrainedRealignment`), unused here."""
        x = hidden.float()  # (B, D)
        if self.matrix is not None:  # on the model's device (`realignment`, `LocalLM.realignment`)
            x = x @ self.matrix
        x = x * (self.target_norm / x.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        return x.to(hidden.dtype)


class SoftRealignment:
    """The next input embedding as the model's own predicted token, softly: softmax(W_out h / τ) · W_in,
    the input embeddings averaged under the next-token distribution at temperature τ.

    Why: the ridge map sends a hidden state to the embedding of its output direction, which is not
    the embedding of the token the model predicts; on SmolLM2-135M its latent chains drift within
    one or two steps (the LM head reads "----" at every latent position), so latent positions carry
    nothing a reader can use. This map follows the model's own prediction (τ → 0: greedy text;
    τ = 1: the expected embedding) and stays a continuous, differentiable mixture for τ > 0. It
    costs one LM head per latent step. `target_norm` (the mean input-embedding norm) is the scale
    a trained correction is measured in (`gcache.policy.cache_fuser.TrainedRealignment`)."""

    def __init__(self, model: torch.nn.Module, temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"the soft realignment's temperature must be > 0, got {temperature!r}")
        self.model = model
        self.temperature = float(temperature)
        with torch.no_grad():
            self.target_norm = float(model.get_input_embeddings().weight.float().norm(dim=-1).mean())

    def __call__(self, hidden: torch.Tensor, step: int = 0) -> torch.Tensor:
        weights = torch.softmax(next_token_logits(self.model, hidden) / self.temperature, dim=-1)  # (B, V) fp32
        table = self.model.get_input_embeddings().weight  # (V, D)
        return (weights.to(table.dtype) @ table).to(hidden.dtype)  # (B, D)


@torch.no_grad()
def realignment(model: torch.nn.Module, reg: float = 1e-5, chunk: int = 8192) -> Realignment:
    """Compute W_a and the target norm once per model. Solved in float64 (stored as fp32), so the
    matrix is the same whatever matmul precision (TF32 or not) the process runs with; the Gram
    matrices are accumulated over `chunk` vocabulary rows at a time (a 150k x 4096 vocabulary in
    float64 would take 5 GB)."""
    w_in = model.get_input_embeddings().weight  # (V, D)
    w_out = model.get_output_embeddings().weight  # (V, D)
    dim = w_out.shape[1]
    gram = reg * torch.eye(dim, dtype=torch.float64, device=w_out.device)  # (D, D)
    cross = torch.zeros(dim, dim, dtype=torch.float64, device=w_out.device)  # (D, D)
    norms = []
    for start in range(0, w_out.shape[0], chunk):
        o, i = w_out[start : start + chunk].double(), w_in[start : start + chunk].double()  # (c, D)
        gram += o.T @ o
        cross += o.T @ i
        norms.append(i.norm(dim=-1))
    matrix = torch.linalg.solve(gram, cross)  # (D, D)
    return Realignment(matrix.float(), float(torch.cat(norms).mean()))


@dataclass
class LatentResult:
    step: Step
    fed: torch.Tensor  # (B, steps, D) the embeddings fed at each latent step


def token_loop(model: torch.nn.Module, kv: KV, steps: int, kind: str, pool: kv_static.LoopPool | None = None):
    """A loop that adds up to `steps` positions to every row of `kv` (unchanged): eager buffers,
    or a `LoopPool`'s static workspace (CUDA graphs). kind: "ids" or "embeds"."""
    if _is_empty(kv):
        raise ValueError("a token loop starts from a prefilled cache")
    log_weight = None if kv.log_weight is None else clamp_log_weight(kv.log_weight.detach())
    if pool is None:
        return kv_static.EagerLoop(model, kv.layers(), kv.mask, steps, log_weight)
    return pool.loop(kv.layers(), kv.mask, steps, kind, log_weight)


def _row_groups(pool: kv_static.LoopPool | None, kv: KV, steps: int, kind: str) -> list[list[int]]:
    """Consecutive rows of `kv` run as one token loop: the whole batch, or under a pool's budget groups of
    the rows whose workspace fits (`LoopPool.rows_that_fit`). An empty `kv` is one group (`token_loop`
    refuses it)."""
    batch = kv.batch_size
    if pool is None or _is_empty(kv):
        return [list(range(batch))]
    rows = pool.rows_that_fit(kv.layers(), batch, kv.seq_len, steps, kind)
    return [list(range(start, min(start + rows, batch))) for start in range(0, batch, rows)]


def _step_rows(step: Step, rows: list[int]) -> Step:
    """Some consecutive rows of a step."""
    part = slice(rows[0], rows[-1] + 1)
    return Step(select(step.kv, rows), step.hidden[part], None if step.logits is None else step.logits[part])


def _loop_kv(loop) -> KV:
    layers, mask, log_weight = loop.result()
    return KV(cache_from_layers(layers), mask, log_weight)


def latent_steps(model: torch.nn.Module, start: Step, steps: int, realign: Realignment, *,
                 logits: bool = False, pool: kv_static.LoopPool | None = None) -> LatentResult:
    """`steps` latent steps: feed realign(last hidden) back as the next input embedding.

    One position per step, written in place (`gcache.kv_static`); no host-device sync. The LM
    head runs once, at the end, and only with `logits=True` (a judger about to decode). A batch whose
    static workspace does not fit the pool's budget runs in groups of rows (`LoopPool.rows_that_fit`)."""
    if steps < 0:
        raise ValueError(f"latent_steps must be >= 0, got {steps}")
    width = start.hidden.shape[-1]
    if steps == 0:
        out_logits = next_token_logits(model, start.hidden) if logits and start.logits is None else start.logits
        return LatentResult(Step(copy(start.kv), start.hidden, out_logits),
                            start.hidden.new_zeros(start.kv.batch_size, 0, width))
    groups = _row_groups(pool, start.kv, steps, "embeds")
    if len(groups) > 1:  # rows are independent: each group alone, as if the batch were that group
        parts = [latent_steps(model, _step_rows(start, rows), steps, realign, logits=logits, pool=pool)
                 for rows in groups]
        step = Step(stack([p.step.kv for p in parts], compacted=True), torch.cat([p.step.hidden for p in parts]),
                    torch.cat([p.step.logits for p in parts]) if logits else None)  # equal widths: no padding
        return LatentResult(step, torch.cat([p.fed for p in parts]))
    loop = token_loop(model, start.kv, steps, "embeds", pool)
    hidden, fed = start.hidden, []
    for t in range(steps):
        embedding = realign(hidden, t)  # (B, D)
        fed.append(embedding)
        hidden = loop.step(inputs_embeds=embedding[:, None, :])  # (B, D)
    out_logits = next_token_logits(model, hidden) if logits else None
    return LatentResult(Step(_loop_kv(loop), hidden, out_logits), torch.stack(fed, 1))


def latent_steps_with_grad(model: torch.nn.Module, start: Step, steps: int, realign) -> KV:
    """The same latent steps as `latent_steps`, out of place, so that autograd reaches a trainable
    `realign` (a trained realignment) through the frozen LM: the start's cache (B rows) extended by
    `steps` positions. For training losses only (the rollout's loops are faster and keep no graph)."""
    if steps < 1:
        raise ValueError(f"latent_steps_with_grad needs steps >= 1, got {steps}")
    state, hidden = start.kv, start.hidden
    ones = torch.ones(state.batch_size, 1, dtype=torch.long, device=state.mask.device)
    for t in range(steps):
        state, out = forward(model, state, ones, inputs_embeds=realign(hidden, t)[:, None, :])
        hidden = out[:, -1]  # (B, D)
    return state


# ---- truncation and fusion --------------------------------------------------------------------


def keep_last(kv: KV, n: int, rotary: torch.nn.Module | None) -> KV:
    """Keep the last n slots; re-rotate kept keys so each row's real slots again start at position 0."""
    if n < 0:
        raise ValueError(f"cannot keep a negative number of positions ({n})")
    if n >= kv.seq_len:
        return copy(kv)
    if n == 0:
        return empty(kv.batch_size, kv.mask.device)
    cut = kv.seq_len - n
    dropped = kv.mask[:, :cut].sum(-1)  # (B,) real positions removed before the kept ones
    rot = rotation(-dropped, rotary, kv.layers()[0][0].shape[-1])
    layers = [(rotate_with(k[:, :, cut:], rot), v[:, :, cut:]) for k, v in kv.layers()]
    return KV(cache_from_layers(layers), kv.mask[:, cut:].clone(), _slots(kv.log_weight, slice(cut, None)))


def concat(
    kvs: Sequence[KV],
    rotary: torch.nn.Module | None,
    value_scales: Sequence[torch.Tensor] | None = None,
    log_weights: Sequence[torch.Tensor] | None = None,
) -> KV:
    """Join several senders' caches along the sequence, each segment re-rotated to follow the
    previous ones. `value_scales[s]` (num_layers, B) multiplies segment s's values (a
    CacheFuser's gates; keys are never mixed or scaled); `log_weights[s]` (B,) is added to the
    attention log-weight of every slot of segment s (a CacheFuser's sender weights)."""
    kvs = [kv for kv in kvs]
    if not kvs:
        raise ValueError("concat needs at least one cache")
    batch = kvs[0].batch_size
    if any(kv.batch_size != batch for kv in kvs):
        raise ValueError(f"all caches must have the same batch size, got {[kv.batch_size for kv in kvs]}")
    if value_scales is not None and len(value_scales) != len(kvs):
        raise ValueError(f"{len(value_scales)} value scales for {len(kvs)} caches")
    if log_weights is not None and len(log_weights) != len(kvs):
        raise ValueError(f"{len(log_weights)} log-weights for {len(kvs)} caches")
    parts = [(i, kv) for i, kv in enumerate(kvs) if not _is_empty(kv)]
    mask = torch.cat([kv.mask for kv in kvs], dim=1)
    if not parts:
        return KV(DynamicCache(), mask)
    if value_scales is None and log_weights is None and len(parts) == 1 and parts[0][0] == 0:
        return copy(parts[0][1])  # a lone first segment needs no shift
    offsets, total = [], torch.zeros(batch, dtype=torch.long, device=mask.device)
    for kv in kvs:
        offsets.append(total.clone())
        total = total + kv.lengths
    num_layers = len(parts[0][1].cache.layers)
    head_dim = parts[0][1].cache.layers[0].keys.shape[-1]
    # The first segment starts at 0 (host-known): no rotation. Others: one cos/sin for all layers.
    rots = {i: rotation(offsets[i], rotary, head_dim) for i, _ in parts if i > 0}
    layers = []
    for layer_idx in range(num_layers):
        ks, vs = [], []
        for i, kv in parts:
            k, v = kv.cache.layers[layer_idx].keys, kv.cache.layers[layer_idx].values
            ks.append(rotate_with(k, rots[i]) if i > 0 else k)
            if value_scales is not None:
                # Gates may come from a module on another device or in fp32: they follow the cache.
                v = v * value_scales[i][layer_idx].to(device=v.device, dtype=v.dtype)[:, None, None, None]
            vs.append(v)
        layers.append((torch.cat(ks, 2), torch.cat(vs, 2)))
    mask = torch.cat([kvs[i].mask for i, _ in parts], dim=1)
    log_weight = None  # (B, L): each segment's own log-weights plus its sender weight
    if log_weights is not None or any(kv.log_weight is not None for _, kv in parts):
        columns = []
        for i, kv in parts:
            own = kv.log_weight if kv.log_weight is not None else torch.zeros(kv.mask.shape, device=mask.device)
            if log_weights is not None:  # a module's weights (fp32, maybe elsewhere) follow the cache's mask
                own = own.to(mask.device) + log_weights[i].to(device=mask.device, dtype=torch.float32)[:, None]
            columns.append(own)
        log_weight = torch.cat(columns, dim=1)
    return KV(cache_from_layers(layers), mask, log_weight)


def zero_values(kv: KV) -> KV:
    """The same cache with every value zeroed (keys kept): a control whose attention reads nothing."""
    if _is_empty(kv):
        return copy(kv)
    return KV(cache_from_layers([(k, torch.zeros_like(v)) for k, v in kv.layers()]), kv.mask.clone(),
              _slots(kv.log_weight, slice(None)))


def shuffle_slots(kv: KV, rotary: torch.nn.Module | None, generator: torch.Generator | None = None) -> KV:
    """A single-row cache with its real slots in random order, each key re-rotated to its new
    position (values unchanged): the same content with the order destroyed (a control)."""
    if kv.batch_size != 1:
        raise ValueError(f"shuffle_slots takes a single-row cache, got {kv.batch_size} rows")
    kv = compact(kv)
    n = kv.seq_len
    if n < 2 or _is_empty(kv):
        return copy(kv)
    perm = torch.randperm(n, generator=generator).to(kv.mask.device)  # new slot s holds old slot perm[s]
    shift = torch.arange(n, device=kv.mask.device) - perm  # (L,) new position - old position
    layers = []
    for k, v in kv.layers():
        moved = k[:, :, perm]  # (1, H, L, Dh)
        # rotate_keys shifts per batch row; put the slot axis there: (L, H, 1, Dh).
        rotated = rotate_keys(moved.permute(2, 1, 0, 3), shift, rotary).permute(2, 1, 0, 3)
        layers.append((rotated.contiguous(), v[:, :, perm]))
    return KV(cache_from_layers(layers), kv.mask.clone(), _slots(kv.log_weight, perm))


# ---- decoding and scoring ---------------------------------------------------------------------


def _pick(logits: torch.Tensor, temperature: float, top_p: float, noise: torch.Tensor | None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): greedy, or sampled with the exponential-race trick
    argmax(p / E), E ~ Exp(1) per row and token (`noise`, (B, V)): a draw from p (top-p truncated)
    that uses the same random numbers whichever rows are still decoding."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(-1)  # E = 0 would divide by 0


@torch.no_grad()
def decode(
    model: torch.nn.Module,
    kv: KV,
    logits: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int] | torch.Tensor,
    pad_token_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    check_every: int = 8,
    pool: kv_static.LoopPool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy (temperature 0) or sampled decoding from `kv` (unchanged) and its next-token logits.

    Returns token ids (B, T) with `pad_token_id` after each row's end, and the number of
    tokens generated per row (B,), the end-of-sequence token included. Ended rows are tracked
    on the device; the host asks which rows are still running once every `check_every` tokens
    (and once at the end, to cut trailing padding), so a loop of n tokens syncs about n / k
    times. Then, in an eager loop, rows that have ended leave the batch: later steps compute
    only the running rows (a static loop keeps its shapes for its CUDA graph).

    Sampling draws one (B, V) block of exponential noise from `generator` per token for the whole
    batch, so the tokens of a seeded generator are the same with eager or static loops and for any
    `check_every` (which rows are still running never changes what is drawn). A batch whose static
    workspace does not fit the pool's budget decodes in groups of rows, one after another
    (`LoopPool.rows_that_fit`): greedy tokens are the same, sampled ones are drawn per group.
    """
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if max_new_tokens > 1:  # (a loop runs from the second token on)
        groups = _row_groups(pool, kv, max_new_tokens, "ids")
        if len(groups) > 1:
            parts = [decode(model, select(kv, rows), logits[rows[0] : rows[-1] + 1], max_new_tokens=max_new_tokens,
                            eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, temperature=temperature,
                            top_p=top_p, generator=generator, check_every=check_every, pool=pool) for rows in groups]
            width = max(ids.shape[1] for ids, _ in parts)
            ids = torch.cat([torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=pad_token_id)
                             for ids, _ in parts])  # (B, T)
            return ids, torch.cat([counts for _, counts in parts])
    batch = kv.batch_size
    device = logits.device
    eos = torch.as_tensor(eos_token_ids, device=device)  # a tensor on the device already: no copy
    out = torch.full((batch, max(max_new_tokens, 0)), pad_token_id, dtype=torch.long, device=device)  # (B, T)
    counts = torch.zeros(batch, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)  # the batch rows still in the loop
    ended = torch.zeros(batch, dtype=torch.bool, device=device)  # per row in the loop
    pad = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)
    loop = token_loop(model, kv, max_new_tokens, "ids", pool) if max_new_tokens > 1 else None
    sampled = temperature > 0
    noise = torch.empty(batch, logits.shape[-1], device=device) if sampled else None  # (B, V)
    for t in range(max_new_tokens):
        if sampled:
            noise.exponential_(generator=generator)
        picked = _pick(logits, temperature, top_p, noise[rows] if sampled and rows.shape[0] < batch else noise)
        token = torch.where(ended, pad[: ended.shape[0]], picked)
        out[rows, t] = token
        counts.index_add_(0, rows, (~ended).long())
        ended |= torch.isin(token, eos)
        if t == max_new_tokens - 1:
            break
        if (t + 1) % check_every == 0:
            running = (~ended).nonzero().squeeze(1)  # the one host read of these k tokens
            if running.numel() == 0:
                break
            if loop.shrinks and running.numel() < ended.shape[0]:
                rows, ended, token, logits = rows[running], ended[running], token[running], logits[running]
                loop.keep_rows(running)
        logits = next_token_logits(model, loop.step(input_ids=token[:, None]))
    return out[:, : int(counts.max()) if batch else 0], counts  # counts.max() <= the steps run


def answer_nll(
    model: torch.nn.Module,
    kv: KV,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    target_ids: torch.Tensor,
    target_mask: torch.Tensor,
) -> torch.Tensor:
    """Teacher-forced mean negative log-likelihood per row (B,) of a target given a prompt on `kv`.

    prompt: left-padded (B, Tp); target: right-padded (B, Tt). Differentiable w.r.t. the
    cache's tensors (e.g. gated values), so a loss on it trains whatever built the cache.
    """
    ids = torch.cat([prompt_ids, target_ids], dim=1)  # (B, Tp + Tt)
    mask = torch.cat([prompt_mask, target_mask], dim=1)
    _, hidden = forward(model, kv, mask, input_ids=ids)
    tp, tt = prompt_ids.shape[1], target_ids.shape[1]
    logits = next_token_logits(model, hidden[:, tp - 1 : tp + tt - 1])  # (B, Tt, V)
    nll = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), target_ids, reduction="none"
    )  # (B, Tt)
    weights = target_mask.float()
    return (nll * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)

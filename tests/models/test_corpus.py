"""The wiki corpus: a fixed split by article, windows with BOS."""

import pytest

from shadowllm.models import ShadowError, corpus
from shadowllm.models.corpus import split_of
from shadowllm.models.tiny import byte_tokenizer


def test_split_is_by_article_fixed_and_disjoint():
    c = corpus("wiki")
    splits = {s: {t for t, _ in c.articles(s)} for s in ("train", "validation", "test")}
    assert not (splits["train"] & splits["test"]) and not (splits["train"] & splits["validation"])
    total = sum(len(v) for v in splits.values())
    assert total > 9000
    assert 0.03 < len(splits["test"]) / total < 0.07  # 5% by the hash rule
    assert all(split_of(t) == "test" for t in splits["test"])
    assert split_of("Paris") == split_of("Paris")


def test_windows_start_with_bos_and_are_contiguous_text():
    tok = byte_tokenizer()
    c = corpus("wiki")
    w = c.windows(tok, "test", length=64, limit=5)
    assert w.shape == (5, 64)
    assert (w[:, 0] == tok.bos_token_id).all()
    stream = c.tokens(tok, "test")
    assert w[1, 1:].tolist() == stream[63:126].tolist()  # window i holds text tokens i*63 .. i*63+62


def test_unknown_corpus_and_split():
    with pytest.raises(ShadowError, match="'books': neither a known corpus \\(wiki\\) nor a file or folder"):
        corpus("books")
    with pytest.raises(ShadowError, match="split 'dev' is unknown"):
        corpus("wiki").articles("dev")

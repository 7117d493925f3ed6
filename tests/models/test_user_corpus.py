"""`--corpus PATH`: a user's .txt file, folder of .txt files or JSON Lines, split by document like the
wiki corpus, with one clear line for bad input; and `eval --corpus FILE --method dense` scoring the
same windows as HF transformers does directly."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from shadowllm.cli import main
from shadowllm.models import ShadowError, corpus
from shadowllm.models.tiny import byte_tokenizer, save_tiny


def _documents(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["river", "stone", "light", "market", "winter", "song", "field", "harbor", "letter", "garden"]
    return [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(torch.randint(20, 60, (1,),
                                                                                   generator=g)),), generator=g))
            + "." for _ in range(n)]


def test_txt_folder_and_jsonl_give_the_same_documents_and_splits(tmp_path):
    docs = _documents(120)
    (tmp_path / "one.txt").write_text("\n\n".join(docs))
    folder = tmp_path / "many"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(d)
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)))
    splits = [corpus(str(tmp_path / "one.txt")), corpus(str(folder)), corpus(str(tmp_path / "lines.jsonl"), "body")]
    for split in ("train", "validation", "test"):
        texts = [[t for _, t in c.articles(split)] for c in splits]
        assert texts[0] == texts[1] == texts[2]
    assert sum(len(splits[0].articles(s)) for s in ("train", "validation", "test")) == len(docs)
    assert splits[0].describe()["corpus_sha256"] != splits[2].describe()["corpus_sha256"]
    # the split of a document does not depend on the others
    half = corpus_of(tmp_path, docs[:60])
    for split in ("train", "validation", "test"):
        assert set(t for _, t in half.articles(split)) <= set(t for _, t in splits[0].articles(split))


def corpus_of(tmp_path, docs):
    path = tmp_path / "half.txt"
    path.write_text("\n\n".join(docs))
    return corpus(str(path))


@pytest.mark.parametrize("name,content,expect", [
    ("empty.txt", b"  \n\n ", "no text"),
    ("binary.txt", b"abc\x00def", "binary"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ("bad.jsonl", b'{"text": "fine"}\n{broken\n', "line 2: not JSON"),
    ("field.jsonl", b'{"content": "no text field"}\n', "no string field 'text'"),
    ("table.csv", b"a,b\n1,2\n", "expected a .txt file"),
])
def test_bad_corpora_are_one_line_naming_the_file(tmp_path, name, content, expect):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ShadowError, match=expect) as err:
        corpus(str(path))
    assert str(path) in str(err.value)


def test_missing_corpus_and_empty_folder(tmp_path):
    with pytest.raises(ShadowError, match="no such file"):
        corpus(str(tmp_path / "nothing.txt"))
    with pytest.raises(ShadowError, match="no .txt file"):
        corpus(str(tmp_path))
    with pytest.raises(ShadowError, match="neither a known corpus"):
        corpus("wikipedia")


def test_eval_dense_on_a_user_file_equals_hf_perplexity(tmp_path, capsys):
    model = save_tiny("llama", tmp_path / "model", seed=3)
    tok = byte_tokenizer()
    text = tmp_path / "mine.txt"
    text.write_text("\n\n".join(_documents(400, seed=1)))
    window, prompt, windows_n = 64, 32, 6
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "model"), "--corpus", str(text), "--method", "dense", "--window", str(window),
                 "--prompt", str(prompt), "--max-windows", str(windows_n), "--lastword", "0", "--sparsity", "0.5",
                 "--out", str(out)]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    ours = next(r for r in report["rows"] if r["method"] == "dense")["ppl"]
    assert report["corpus"] == str(text) and report["corpus_sha256"]
    windows = corpus(str(text)).windows(tok, "test", window, limit=windows_n)
    assert windows.shape[0] == windows_n
    with torch.no_grad():
        logits = model(windows).logits
    nll = F.cross_entropy(logits[:, prompt - 1:-1].reshape(-1, logits.shape[-1]), windows[:, prompt:].reshape(-1))
    assert abs(ours - math.exp(float(nll))) <= 1e-4 * math.exp(float(nll))


def test_calibrate_on_a_user_file_records_it(tmp_path):
    save_tiny("llama", tmp_path / "model", seed=3)
    text = tmp_path / "mine.jsonl"
    text.write_text("\n".join(json.dumps({"text": d}) for d in _documents(300, seed=2)))
    assert main(["calibrate", str(tmp_path / "model"), "--corpus", str(text), "--samples", "4", "--window", "32",
                 "--token-positions", "4", "--shard-size", "4", "--out", str(tmp_path / "traces")]) == 0
    manifest = json.loads((tmp_path / "traces" / "traces.json").read_text())
    assert manifest["corpus"] == str(text) and manifest["corpus_sha256"] == corpus(str(text)).sha256
    # a bad corpus is refused before the model loads: one line, status 2, nothing written
    assert main(["calibrate", str(tmp_path / "model"), "--corpus", str(tmp_path / "missing.txt"), "--out",
                 str(tmp_path / "t2")]) == 2
    assert not (tmp_path / "t2").exists()


def test_eval_defaults_adapt_to_a_small_file(tmp_path, capsys):
    """A small text of short paragraphs (8 KB: with a byte-level tokenizer that is what a ~35 KB licence
    file is to SmolLM2's): with no --window / --prompt its test split, shorter than the protocol's
    256-token window, is scored as one stream in one window, half of it the prompt, and a line says
    what was scored; only a split with too few tokens to score is refused."""
    save_tiny("llama", tmp_path / "model", seed=3, max_position_embeddings=512)
    text = tmp_path / "small.txt"
    text.write_text("\n\n".join(_documents(30, seed=10)))
    test_tokens = corpus(str(text)).tokens(byte_tokenizer(), "test").numel() + 1  # + BOS
    assert test_tokens < 256  # shorter than the protocol's window: the old defaults refused this file
    assert main(["eval", str(tmp_path / "model"), "--corpus", str(text), "--method", "dense", "--lastword", "0",
                 "--sparsity", "0.5", "--out", str(tmp_path / "eval")]) == 0
    err = capsys.readouterr().err
    assert f"{test_tokens} tokens as one stream; 1 window of {test_tokens} tokens, the first {test_tokens // 2} " \
           "the prompt" in err
    report = json.loads((tmp_path / "eval.json").read_text())
    assert (report["window"], report["prompt"]) == (test_tokens, test_tokens // 2)
    # the same file with a prompt as long as the adapted window: one line naming the flag
    assert main(["eval", str(tmp_path / "model"), "--corpus", str(text), "--method", "dense", "--lastword", "0",
                 "--prompt", str(test_tokens)]) == 2
    assert "--prompt" in capsys.readouterr().err
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("\n\n".join(["a b c."] * 3))
    assert main(["eval", str(tmp_path / "model"), "--corpus", str(tiny), "--method", "dense", "--lastword", "0"]) == 2
    assert "eval needs at least 16" in capsys.readouterr().err

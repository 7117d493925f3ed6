"""The lm-eval adapter (shadowllm/harness.py): its log-likelihoods against HF transformers computed
directly on the same tokens, and lm_eval's own command line over a deployed export on a local task
(a YAML task over a small JSON Lines dataset, offline)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'shadowllm[test]')")

from shadowllm.export.exporter import export  # noqa: E402
from shadowllm.harness import ShadowLLMHarness  # noqa: E402
from shadowllm.models.tiny import byte_tokenizer, save_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    model = save_tiny("llama", root / "model", seed=4)
    return model, root


def _hf_logprob(model, ids, start):
    """Sum of log p(ids[t] | ids[:t]) for t >= start, and whether each was the argmax."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    target = torch.tensor(ids[start:])
    scores = logp[start - 1:-1]
    return float(scores.gather(-1, target[:, None]).sum()), bool((scores.argmax(-1) == target).all())


@pytest.mark.parametrize("score", ["decode", "prefill"])
def test_loglikelihood_and_rolling_match_hf(tiny, score):
    """Both ways of scoring (token by token through decode steps, or one pass) give HF's numbers on a
    dense model, batched with left padding."""
    model, root = tiny
    lm = ShadowLLMHarness(path=str(root / "model"), backend="torch", batch_size=2, score=score)
    tok = byte_tokenizer()
    pairs = [("The cat sat on the", " mat"), ("A", " much longer continuation here"), ("", "Start of text"),
             ("Trailing space ", "moves")]
    got = lm.loglikelihood([SimpleNamespace(args=p) for p in pairs])
    for (context, continuation), (score, greedy) in zip(pairs, got):
        spaces = len(context) - len(context.rstrip())
        c, k = (context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation)
        head = tok(c, add_special_tokens=False)["input_ids"]
        whole = tok(c + k, add_special_tokens=False)["input_ids"]
        ids = [lm.prefix] + whole
        want, want_greedy = _hf_logprob(model, ids, 1 + len(head))
        assert abs(score - want) <= 1e-4 * max(1.0, abs(want))
        assert greedy == want_greedy
    text = "Rolling windows cover every token of this sentence exactly once."
    (rolling,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    ids = [lm.prefix] + tok(text, add_special_tokens=False)["input_ids"]
    want, _ = _hf_logprob(model, ids, 1)
    assert abs(rolling - want) <= 1e-4 * abs(want)


def test_lm_eval_command_line_on_an_export_and_a_local_task(tiny, tmp_path):
    model, root = tiny
    folder = root / "export"
    if not folder.exists():
        export(model, byte_tokenizer(), folder)
    data = tmp_path / "items.jsonl"
    items = [{"question": f"Pick the word number {i}:", "choices": [" alpha", " beta", " gamma"], "answer": i % 3}
             for i in range(6)]
    data.write_text("\n".join(json.dumps(x) for x in items) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(f"""task: shadowllm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    out = tmp_path / "results"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"))
    run = subprocess.run([sys.executable, "-m", "shadowllm.harness", "--model", "shadowllm", "--model_args",
                          f"path={folder},sparsity=0.0", "--batch_size", "3", "--tasks", "shadowllm_tiny_mc",
                          "--include_path", str(tasks), "--output_path", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next(out.rglob("results*.json")).read_text())
    acc = results["results"]["shadowllm_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert "shadowllm_tiny_mc" in run.stdout

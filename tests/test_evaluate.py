"""evaluate(): the LLM-Adapters protocol on fixture test sets in the real format. Accuracy with scripted
responses (first match wins, no match is wrong, case), generation results against transformers' beam search
+ extraction, log-likelihood scores against transformers' log-probs, results files, the CLI, bad input."""

import importlib
import json
import logging
import shutil

import jax
import numpy as np
import pytest
import torch
from test_generate import (  # noqa: F401 (one_torch_thread: an autouse fixture)
    char_tokenizer,
    hf_generate,
    jforward,
    one_torch_thread,
    save_tiny_with_tokenizer,
)

from denselora_jax.adapters.config import AdapterConfig
from denselora_jax.adapters.core import init_adapter
from denselora_jax.adapters.io import AdapterMismatchError, save_adapter
from denselora_jax.data import demo_data_dir
from denselora_jax.evaluate import RESPONSE_TEMPLATE, EvalDataError, Mode, evaluate, main
from denselora_jax.model.loading import fingerprint, load_pretrained
from denselora_jax.prompts import ANSWER_CHOICES, DATASETS, extract_answer, generate_prompt

DEMO_TEST = demo_data_dir() / "test"


def fixture_data(root, names=DATASETS, n=8):
    """The first n demo test records of each dataset (real LLM-Adapters format) under root/<name>/test.json."""
    for name in names:
        (root / name).mkdir(parents=True)
        records = json.loads((DEMO_TEST / name / "test.json").read_text())[:n]
        (root / name / "test.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model = save_tiny_with_tokenizer(path)
    config, params = load_pretrained(path)
    return path, model, config, params


# --- the harness: scripted responses ----------------------------------------------------------------------


def scripted(name, record, i):
    """(response, is it right?) of four kinds: the answer; another choice first, then the answer (first
    match wins: wrong); no answer at all (wrong); the answer in capitals (case-insensitive: right)."""
    answer = record["answer"]
    other = next(c for c in ANSWER_CHOICES[name] if c != answer)
    return [
        (f"the correct answer is {answer}", True),
        (f"the correct answer is {other}, or maybe {answer}", False),
        ("I cannot tell.", False),
        (f"The correct answer is {answer.upper()}", True),
    ][i % 4]


def test_accuracy_with_scripted_responses(tmp_path, tiny, monkeypatch, caplog):
    """generate is replaced by a script (the prompt -> a chosen response): accuracy, no-match counts, the
    extraction reading only the response (every instruction names all choices), missing datasets skipped."""
    _, _, config, params = tiny
    names = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge"]
    data = fixture_data(tmp_path / "data", names, n=7)
    tok = char_tokenizer()
    script = {}
    for name in names:
        for i, r in enumerate(json.loads((data / name / "test.json").read_text())):
            script[generate_prompt(r["instruction"])] = scripted(name, r, i)[0]

    def fake_generate(config, params, ids, mask, *, max_new_tokens, num_beams, pad_token_id, **_):
        assert (max_new_tokens, num_beams) == (32, 4)  # the paper's settings are the defaults
        rows = [tok(script[tok.decode(r[m > 0])])["input_ids"] for r, m in zip(ids, mask)]
        width = max(map(len, rows))
        out = np.full((len(rows), ids.shape[1] + width), pad_token_id, np.int32)
        out[:, : ids.shape[1]] = ids
        for k, r in enumerate(rows):
            out[k, ids.shape[1] : ids.shape[1] + len(r)] = r
        return out

    # the module (not a package-level `evaluate` function of the same name, should one be exported)
    monkeypatch.setattr(importlib.import_module("denselora_jax.evaluate"), "generate", fake_generate)
    with caplog.at_level(logging.WARNING):
        res = evaluate(config, params, tok, data, batch_size=3, output_dir=tmp_path / "out", progress=False)
    assert res["missing"] == ["ARC-Easy", "openbookqa"] and "ARC-Easy" in caplog.text
    assert list(res["datasets"]) == names
    for name in names:
        records = json.loads((data / name / "test.json").read_text())
        expect = [scripted(name, r, i)[1] for i, r in enumerate(records)]
        got = res["datasets"][name]
        assert got["correct"] == sum(expect) and got["total"] == len(records)
        assert got["accuracy"] == pytest.approx(sum(expect) / len(records))
        assert got["no_match"] == sum(i % 4 == 2 for i in range(len(records)))
        rows = [json.loads(line) for line in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
        assert [r["correct"] for r in rows] == expect
        assert [r["answer"] for r in rows] == [r["answer"] for r in records]
        assert rows[1]["response"] == script[generate_prompt(records[1]["instruction"])]
    mean = np.mean([d["accuracy"] for d in res["datasets"].values()])
    assert res["mean_accuracy"] == pytest.approx(mean) and res["mode"] == "generate"
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == json.loads(json.dumps(res))
    md = (tmp_path / "out" / "results.md").read_text()
    assert "mode: generate" in md and "4-beam search" in md and f"**{100 * mean:.1f}**" in md
    assert "Missing (skipped): ARC-Easy, openbookqa" in md


# --- real decoding and scoring against transformers -------------------------------------------------------


def test_generate_mode_matches_transformers(tmp_path, tiny):
    """Predictions = transformers' beam search on each prompt alone, decoded, then extract_answer; the
    evaluated batches are left-padded, bucketed and filled to a static size (limit 3, batch 2)."""
    _, model, config, params = tiny
    data = fixture_data(tmp_path / "data", ["boolq", "hellaswag"], n=5)
    tok = char_tokenizer()
    res = evaluate(
        config,
        params,
        tok,
        data,
        datasets=["boolq", "hellaswag"],
        limit=3,
        batch_size=2,
        num_beams=2,
        max_new_tokens=5,
        output_dir=tmp_path / "out",
        progress=False,
    )
    for name in ("boolq", "hellaswag"):
        records = json.loads((data / name / "test.json").read_text())[:3]
        rows = [json.loads(line) for line in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 3
        for r, row in zip(records, rows):
            ids = np.asarray([tok(generate_prompt(r["instruction"]))["input_ids"]])
            seq = hf_generate(
                model,
                ids,
                np.ones_like(ids),
                max_new_tokens=5,
                num_beams=2,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            text = tok.decode(seq[0], skip_special_tokens=True)
            assert row["response"] == text.split("### Response:")[1].strip()
            assert row["prediction"] == extract_answer(name, text)
            assert row["correct"] == (row["prediction"] == r["answer"])
        assert res["datasets"][name]["correct"] == sum(r["correct"] for r in rows)


def hf_response_logprob(model, tok, record, choice) -> float:
    full = tok(generate_prompt(record["instruction"], output=RESPONSE_TEMPLATE.format(choice)))["input_ids"]
    n_prompt = len(tok(generate_prompt(record["instruction"]))["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
    return float(sum(logp[t - 1, full[t]] for t in range(n_prompt, len(full))))


def test_loglik_mode_matches_transformers(tmp_path, tiny):
    _, model, config, params = tiny
    names = ["boolq", "ARC-Easy"]  # 2 choices; 4 of the pattern's 5 offered
    data = fixture_data(tmp_path / "data", names, n=3)
    tok = char_tokenizer()
    res = evaluate(
        config,
        params,
        tok,
        data,
        datasets=",".join(names),  # a comma-separated string works too
        batch_size=2,
        mode="loglik",
        output_dir=tmp_path / "out",
        progress=False,
    )
    assert res["mode"] == Mode.LOGLIK and "log-likelihood" in (tmp_path / "out" / "results.md").read_text()
    for name in names:
        records = json.loads((data / name / "test.json").read_text())
        rows = [json.loads(line) for line in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
        for r, row in zip(records, rows):
            offered = [c for c in ANSWER_CHOICES[name] if c in r["instruction"].lower()]
            assert list(row["scores"]) == offered and len(offered) in (2, 4)
            ref = {c: hf_response_logprob(model, tok, r, c) for c in offered}
            np.testing.assert_allclose([row["scores"][c] for c in offered], list(ref.values()), rtol=1e-4)
            assert row["prediction"] == max(ref, key=ref.get)
        assert res["datasets"][name]["correct"] == sum(r["correct"] for r in rows)


def test_loglik_applies_the_adapter(tmp_path, tiny):
    """With an adapter, the scores change and still equal the full adapted forward's log-probs."""
    _, _, config, params = tiny
    data = fixture_data(tmp_path / "data", ["piqa"], n=2)
    tok = char_tokenizer()
    ac = AdapterConfig(rank=4)
    adapter = jax.tree.map(lambda x: x + 0.3, init_adapter(config, ac, jax.random.key(0)))
    kw = dict(datasets=["piqa"], batch_size=2, mode="loglik", progress=False)
    base = evaluate(config, params, tok, data, output_dir=tmp_path / "base", **kw)
    adapted = evaluate(
        config, params, tok, data, adapter=adapter, adapter_config=ac, output_dir=tmp_path / "ad", **kw
    )
    assert base["mode"] == adapted["mode"] == "loglik"
    r = json.loads((data / "piqa" / "test.json").read_text())[0]
    row = json.loads((tmp_path / "ad" / "piqa.jsonl").read_text().splitlines()[0])
    row_base = json.loads((tmp_path / "base" / "piqa.jsonl").read_text().splitlines()[0])
    full = tok(generate_prompt(r["instruction"], output=RESPONSE_TEMPLATE.format("solution2")))["input_ids"]
    n_prompt = len(tok(generate_prompt(r["instruction"]))["input_ids"])
    logits = jforward(config, params, np.asarray([full]), adapter=adapter, adapter_config=ac)[0]
    logp = jax.nn.log_softmax(logits, -1)
    ref = float(sum(logp[t - 1, full[t]] for t in range(n_prompt, len(full))))
    assert row["scores"]["solution2"] == pytest.approx(ref, rel=1e-4)
    assert abs(row["scores"]["solution2"] - row_base["scores"]["solution2"]) > 1e-3


def test_response_template_is_the_training_format():
    records = json.loads((demo_data_dir() / "train.json").read_text())
    assert all(r["output"] == RESPONSE_TEMPLATE.format(r["answer"]) for r in records)


# --- CLI and bad input ------------------------------------------------------------------------------------


def test_cli_writes_results(tmp_path, tiny, capsys):
    path = tiny[0]
    data = fixture_data(tmp_path / "data", ["winogrande"], n=2)
    assert (
        main(
            [
                "--model",
                str(path),
                "--data-dir",
                str(data),
                "--datasets",
                "winogrande,boolq",
                "--mode",
                "loglik",
                "--batch-size",
                "2",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["missing"] == ["boolq"] and res["datasets"]["winogrande"]["total"] == 2
    assert (tmp_path / "out" / "results.md").read_text() in capsys.readouterr().out


def test_bad_input(tmp_path, tiny, capsys):
    path, _, config, params = tiny
    tok = char_tokenizer()
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalDataError, match="holds none of the datasets"):
        evaluate(config, params, tok, tmp_path / "empty", progress=False)
    with pytest.raises(EvalDataError, match="does not exist"):
        evaluate(config, params, tok, tmp_path / "nowhere", progress=False)
    with pytest.raises(EvalDataError, match="unknown dataset name"):
        evaluate(config, params, tok, tmp_path / "empty", datasets=["boolq", "mmlu"], progress=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        evaluate(config, params, tok, tmp_path / "empty", mode="fast", progress=False)
    with pytest.raises(ValueError, match="without its adapter_config"):
        evaluate(config, params, tok, tmp_path / "empty", adapter={}, progress=False)

    data = fixture_data(tmp_path / "data", ["boolq"], n=3)
    records = json.loads((data / "boolq" / "test.json").read_text())
    del records[1]["answer"]
    (data / "boolq" / "test.json").write_text(json.dumps(records))
    with pytest.raises(EvalDataError, match=r"boolq/test.json: record 1 has no 'answer' field"):
        evaluate(config, params, tok, data, progress=False)
    assert main(["--model", str(tmp_path / "no_model"), "--data-dir", str(data)]) == 2  # data checked first
    assert "record 1 has no 'answer' field" in capsys.readouterr().err
    records[1]["answer"] = "True"
    (data / "boolq" / "test.json").write_text(json.dumps(records))
    with pytest.raises(EvalDataError, match="record 1 has answer 'True', not one of"):
        evaluate(config, params, tok, data, progress=False)
    (data / "boolq" / "test.json").write_text("{not json")
    with pytest.raises(EvalDataError, match="cannot read it as JSON"):
        evaluate(config, params, tok, data, progress=False)

    # an adapter saved for another base model (other weights, same shapes) is refused
    other = tmp_path / "other"
    save_tiny_with_tokenizer(other, seed=1)
    other_config, other_params = load_pretrained(other)
    ac = AdapterConfig(rank=2)
    save_adapter(
        tmp_path / "adapter",
        init_adapter(other_config, ac, jax.random.key(0)),
        ac,
        base_fingerprint=fingerprint(other_config, other_params),
    )
    shutil.rmtree(data / "boolq")
    fixture_data(data, ["boolq"], n=1)
    with pytest.raises(AdapterMismatchError, match="trained on a base model with fingerprint"):
        evaluate(config, params, tok, data, adapter=tmp_path / "adapter", progress=False)
    assert main(["--model", str(path), "--data-dir", str(data), "--adapter", str(tmp_path / "adapter")]) == 2
    assert "trained on a base model with fingerprint" in capsys.readouterr().err

"""eval/generate.py and eval/evaluate.py: batching that never changes a prediction, per-row length
budgets, EOS cut, lm-loss and KL against direct (float64) computations, the result and
predictions files, prompt dropping, splits, and bad input."""
from __future__ import annotations

import json
import math
import re
import statistics

import pytest
import torch
import torch.nn.functional as F

from minillm_cli.errors import InputError
from minillm_cli.eval.evaluate import EvaluateConfig, kl_sums, reference_lm_loss, run_evaluate
from minillm_cli.eval.generate import GeneratedBatch, generate_batches, plan_batches, row_budgets
from minillm_cli.engine.sampler import SamplingParams
from conftest import write_jsonl




@pytest.fixture(scope="module")
def loaded(tiny_dir):
    from minillm_cli.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_dir / "student"))
    student = load_model(str(tiny_dir / "student"), tokenizer=tok, device=torch.device("cpu"), trainable=False)
    teacher = load_model(str(tiny_dir / "teacher"), tokenizer=tok, device=torch.device("cpu"), trainable=False)
    return tok, student, teacher


def _prompts(tok, n=7):
    texts = [f"### Instruction:\nName item {i} of the list{' please' * (i % 4)}.\n\n### Response:\n" for i in range(n)]
    return [tok(t)["input_ids"] for t in texts]


def _gen(model, tok, prompts, *, batch_size, seed=3, max_new=10, max_length=512, ngram=0, ids=None):
    out = {}
    for b in generate_batches(model, prompts, params=SamplingParams(max_new, no_repeat_ngram_size=ngram), seed=seed,
                              example_ids=ids, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, vocab_size=len(tok),
                              device=torch.device("cpu"), batch_size=batch_size, max_length=max_length):
        for r, toks, ended in zip(b.rows, b.token_lists(), b.ended()):
            out[r] = (toks, ended)
    return [out[i] for i in range(len(prompts))]


# -- generation --------------------------------------------------------------------------------

def test_plan_batches_sorts_by_length_and_covers_every_index():
    lengths = [3, 9, 1, 9, 5, 2, 7]
    batches = plan_batches(lengths, 3)
    assert sorted(i for b in batches for i in b) == list(range(7))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert row_budgets([10, 500, 509], 8, 512) == [8, 8, 3]


def test_predictions_do_not_depend_on_batch_size_and_follow_the_seed(loaded):
    tok, student, _ = loaded
    prompts = _prompts(tok)
    ref = _gen(student, tok, prompts, batch_size=1, ngram=3)
    for bs in (3, 7):
        assert _gen(student, tok, prompts, batch_size=bs, ngram=3) == ref
    assert _gen(student, tok, prompts, batch_size=4, ngram=3) == ref  # and reproducible
    other = _gen(student, tok, prompts, batch_size=7, seed=4, ngram=3)
    assert other != ref
    # the generator is keyed by the example id, not by the position in the list
    shifted = _gen(student, tok, prompts[1:], batch_size=2, ngram=3, ids=list(range(1, 7)))
    assert shifted == ref[1:]


def test_each_row_is_cut_at_its_own_length_budget_exactly(loaded):
    tok, student, _ = loaded
    prompts = _prompts(tok, 4)
    lengths = [len(p) for p in prompts]
    max_length = max(lengths) + 4  # budgets differ per row: 4 for the longest, more for shorter ones
    budgets = row_budgets(lengths, 12, max_length)
    assert len(set(budgets)) > 1
    together = _gen(student, tok, prompts, batch_size=4, max_new=12, max_length=max_length)
    for i, p in enumerate(prompts):
        alone = _gen(student, tok, [p], batch_size=1, max_new=budgets[i], max_length=10_000, ids=[i])[0]
        assert together[i] == alone
        assert len(together[i][0]) + (1 if together[i][1] else 0) <= budgets[i]


def test_token_lists_cut_at_eos_and_ended_flags():
    eos, pad = 0, 9
    b = GeneratedBatch(rows=[0, 1, 2], prompt_ids=torch.zeros(3, 1, dtype=torch.long),
                       prompt_mask=torch.ones(3, 1, dtype=torch.bool),
                       response_ids=torch.tensor([[5, 6, eos, pad], [eos, pad, pad, pad], [4, 4, 4, 4]]),
                       response_mask=torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]).bool(), eos_id=eos)
    assert b.token_lists() == [[5, 6], [], [4, 4, 4, 4]]
    assert b.ended() == [True, True, False]
    b.eos_id = (4, eos)  # several stops (--template chat: the end of turn, then EOS): any ends a row
    assert b.token_lists() == [[5, 6], [], [4, 4, 4]]
    assert b.ended() == [True, True, True]


def test_a_model_that_always_ends_gives_empty_predictions(loaded, tiny_dir, dolly_like, tmp_path):
    from minillm_cli.models import load_model

    tok = loaded[0]
    m = load_model(str(tiny_dir / "student"), tokenizer=tok, device=torch.device("cpu"), trainable=False)
    with torch.no_grad():  # final hidden state constant and aligned with EOS's (tied) embedding
        v = m.transformer.wte.weight[tok.eos_token_id]
        v.mul_(50.0 / v.norm())
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.copy_(v)
    m.save_pretrained(tmp_path / "ender")
    tok.save_pretrained(tmp_path / "ender")
    res = run_evaluate(EvaluateConfig(model=str(tmp_path / "ender"), data=str(dolly_like), metrics=["dist4"],
                                      seeds=1, limit=4, max_new_tokens=8, out=str(tmp_path / "r.json"), quiet=True,
                                      device="cpu"))
    rows = [json.loads(line) for line in open(tmp_path / "r.jsonl")]
    assert [r["prediction"] for r in rows] == [""] * 4
    assert all(r["ended"] and r["response_tokens"] == 0 for r in rows)
    assert res["metrics"]["dist4"]["mean"] == 0.0


# -- model metrics ------------------------------------------------------------------------------

def test_lm_loss_equals_direct_cross_entropy(loaded, dolly_like):
    from minillm_cli.data.examples import load_examples
    from minillm_cli.data.template import render_prompt

    tok, student, _ = loaded
    exs = load_examples(str(dolly_like), limit=5)
    cfg = EvaluateConfig(model="m", data=str(dolly_like), batch_size=2)
    got = reference_lm_loss(student, tok, exs, cfg, torch.device("cpu"), len(tok))
    total, count = 0.0, 0
    for e in exs:  # one unpadded sequence at a time
        p = tok(render_prompt(e, "dolly"))["input_ids"]
        r = tok(e.references[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + r])
        logits = student(input_ids=ids).logits[0, len(p) - 1 : -1, : len(tok)].double()
        total += float(F.cross_entropy(logits, torch.tensor(r), reduction="sum"))
        count += len(r)
    assert got == pytest.approx(total / count, rel=1e-5)


def test_generation_frees_the_fast_engine_when_done_or_abandoned(loaded, monkeypatch):
    """With a fast engine, the kept decoder (static caches, CUDA graph memory) is freed when the
    generation ends, and when its consumer stops early; the eager loop keeps nothing to free."""
    import gc

    from minillm_cli.engine import fast_sampler

    tok, student, _ = loaded
    released = []
    real_release = fast_sampler.release
    monkeypatch.setattr(fast_sampler, "release", lambda: released.append(1) or real_release())
    kw = dict(params=SamplingParams(4), seed=1, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
              vocab_size=len(tok), device=torch.device("cpu"), batch_size=2, max_length=512)
    static = list(generate_batches(student, _prompts(tok, 5), engine="static", **kw))
    assert len(static) == 3 and released == [1]
    gen = generate_batches(student, _prompts(tok, 5), engine="static", **kw)
    next(gen)
    assert released == [1]
    del gen
    gc.collect()
    assert released == [1, 1]
    list(generate_batches(student, _prompts(tok, 5), engine="eager", **kw))
    assert released == [1, 1]


def test_kl_sums_match_brute_force_float64(loaded):
    import copy

    tok, student, teacher = loaded
    prompts = _prompts(tok, 3)
    batch = next(generate_batches(student, prompts, params=SamplingParams(6), seed=1, eos_id=tok.eos_token_id,
                                  pad_id=tok.pad_token_id, vocab_size=len(tok), device=torch.device("cpu"),
                                  batch_size=3, max_length=512))
    rkl, fkl, n = kl_sums(student, teacher, batch, len(tok))
    s64, t64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    V = len(tok)
    want_r = want_f = 0.0
    want_n = 0
    for b in range(3):
        p = batch.prompt_ids[b][batch.prompt_mask[b]].tolist()
        resp = batch.response_ids[b][batch.response_mask[b]].tolist()
        for t in range(len(resp)):  # the distribution of resp[t], from the unpadded prefix
            ids = torch.tensor([p + resp[:t]])
            q = s64(input_ids=ids).logits[0, -1, :V].log_softmax(-1)
            pt = t64(input_ids=ids).logits[0, -1, :V].log_softmax(-1)
            want_r += float((q.exp() * (q - pt)).sum())
            want_f += float((pt.exp() * (pt - q)).sum())
            want_n += 1
    assert n == want_n and n > 3
    # random tiny models are near-uniform: the two KLs differ by ~1e-3 relative, so match tightly
    assert rkl == pytest.approx(want_r, rel=1e-5) and rkl != pytest.approx(want_f, rel=1e-5)
    assert fkl == pytest.approx(want_f, rel=1e-5)
    assert rkl > 0 and fkl > 0


# -- the whole run -----------------------------------------------------------------------------

def _cfg(tiny_dir, data, **kw):
    base = dict(model=str(tiny_dir / "student"), data=str(data), seeds=2, limit=6, max_new_tokens=12,
                quiet=True, device="cpu", batch_size=4)
    base.update(kw)
    return EvaluateConfig(**base)


@pytest.fixture(scope="module")
def overlap_data(tiny_dir, dolly_like, tmp_path_factory):
    """dolly_like's first 6 prompts with references made of half of the seed-0 sample's words
    plus other words: sampling is deterministic per (seed, example), so the evaluated run gives
    the same samples again, and ROUGE-L is neither all zeros nor all 100."""
    tmp = tmp_path_factory.mktemp("ov")
    run_evaluate(_cfg(tiny_dir, dolly_like, metrics=["dist4"], seeds=1, max_new_tokens=24,
                      predictions=str(tmp / "first.jsonl")))
    rows = []
    for line in open(tmp / "first.jsonl"):
        r = json.loads(line)
        words = r["prediction"].split()
        rows.append({"instruction": r["instruction"], "context": r["input"],
                     "response": [" ".join(words[: len(words) // 2] + ["apple", "pear"]), "a plum"]})
    return write_jsonl(tmp / "ov.jsonl", rows)


def test_result_and_predictions_agree_with_an_independent_rouge(tiny_dir, overlap_data, tmp_path):
    from rouge_score import rouge_scorer

    out = tmp_path / "res.json"
    res = run_evaluate(_cfg(tiny_dir, overlap_data, metrics=["rougeL", "dist4", "exact-match"], max_new_tokens=24,
                            out=str(out), by_length=True))
    saved = json.loads(out.read_text())
    assert saved["metrics"] == res["metrics"] and saved["predictions"] == "res.jsonl"
    rows = [json.loads(line) for line in open(tmp_path / "res.jsonl")]
    assert len(rows) == 2 * 6 and {r["seed"] for r in rows} == {0, 1}
    assert all(set(r) >= {"prompt", "prediction", "references", "seed", "instruction", "index"} for r in rows)
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    by_seed: dict[int, list[float]] = {}
    for r in rows:
        by_seed.setdefault(r["seed"], []).append(
            max(sc.score(ref, r["prediction"])["rougeL"].fmeasure for ref in r["references"]) * 100)
    per_seed = [statistics.fmean(by_seed[s]) for s in (0, 1)]
    assert res["metrics"]["rougeL"]["per_seed"] == pytest.approx(per_seed)
    assert 10 < per_seed[0] < 100 and per_seed[1] < per_seed[0]  # seed 0 overlaps its references by design
    assert res["n"] == 6 and res["protocol"]["seeds"] == [0, 1]
    p = res["protocol"]
    assert (p["temperature"], p["top_k"], p["top_p"], p["no_repeat_ngram_size"], p["max_length"]) == (1.0, 0, 1.0, 6, 512)
    assert sum(b["n"] for b in res["by_length"]["rougeL"].values()) == 6


def test_same_seeds_same_numbers_and_batch_size_free(tiny_dir, dolly_like):
    a = run_evaluate(_cfg(tiny_dir, dolly_like, metrics=["dist4"], batch_size=1))
    b = run_evaluate(_cfg(tiny_dir, dolly_like, metrics=["dist4"], batch_size=6))
    c = run_evaluate(_cfg(tiny_dir, dolly_like, metrics=["dist4"], batch_size=6, seed=7))
    assert a["metrics"] == b["metrics"]
    assert c["metrics"]["dist4"]["per_seed"] != a["metrics"]["dist4"]["per_seed"]


def test_long_prompts_are_dropped_and_counted(tiny_dir, tmp_path, loaded):
    from minillm_cli.data.examples import load_examples
    from minillm_cli.data.tokenize import encode_prompts

    rows = [{"instruction": "Name a fruit." + " and another one" * (i * 6), "context": "", "response": "A pear."}
            for i in range(6)]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    _, kept, dropped = encode_prompts(loaded[0], load_examples(str(data)), "dolly", 80)
    assert 0 < dropped < 6
    res = run_evaluate(_cfg(tiny_dir, data, metrics=["dist4"], max_prompt_length=80, max_length=100,
                            predictions=str(tmp_path / "p.jsonl")))
    assert res["n"] == 6 - dropped and res["protocol"]["prompts_dropped"] == dropped
    preds = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    assert sorted({r["index"] for r in preds}) == kept


def test_reference_free_data_refuses_rouge_but_gives_dist4(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "vicuna.jsonl", [{"question_id": i, "category": "generic",
                                                    "turns": [f"How can I improve item {i}?"]} for i in range(5)])
    with pytest.raises(InputError, match="no reference answers"):
        run_evaluate(_cfg(tiny_dir, data, metrics=["rougeL"]))
    res = run_evaluate(_cfg(tiny_dir, data))  # default metric without references: dist4
    assert list(res["metrics"]) == ["dist4"] and 0 <= res["metrics"]["dist4"]["mean"] <= 100


def test_teacher_metrics_and_validity_hook(tiny_dir, dolly_like):
    res = run_evaluate(_cfg(tiny_dir, dolly_like, teacher=str(tiny_dir / "teacher"), seeds=1, limit=3,
                            metrics=["reverse-kl", "forward-kl", "lm-loss", "validity"],
                            validity=lambda ex, pred: ex.instruction.endswith("list.")))
    m = res["metrics"]
    assert m["reverse-kl"]["mean"] > 0 and m["forward-kl"]["mean"] > 0
    assert m["lm-loss"]["mean"] > math.log(2) and len(m["lm-loss"]["per_seed"]) == 1
    assert m["validity"]["mean"] == pytest.approx(100.0)


def test_split_test_is_the_split_sft_holds_out(tiny_dir, dolly_like):
    from minillm_cli.data.examples import load_examples
    from minillm_cli.data.splits import split_examples
    from minillm_cli.eval.evaluate import load_eval_examples

    want = split_examples(load_examples(str(dolly_like)), valid_size=0.05, test_size=8, seed=1234)["test"]
    got = load_eval_examples(_cfg(tiny_dir, dolly_like, split="test", test_size=8, limit=None))
    assert [e.instruction for e in got] == [e.instruction for e in want] and len(got) == 8


def test_greedy_is_the_same_for_every_seed(tiny_dir, dolly_like, tmp_path):
    run_evaluate(_cfg(tiny_dir, dolly_like, greedy=True, seeds=2, limit=3, metrics=["dist4"],
                      predictions=str(tmp_path / "g.jsonl")))
    rows = [json.loads(line) for line in open(tmp_path / "g.jsonl")]
    assert [r["prediction"] for r in rows if r["seed"] == 0] == [r["prediction"] for r in rows if r["seed"] == 1]


@pytest.mark.parametrize("kw, needle", [
    (dict(metrics=["bleu"]), "unknown metric 'bleu'"),
    (dict(metrics=["reverse-kl"]), "needs --teacher"),
    (dict(metrics=["validity"]), "oracle"),
    (dict(seeds=0), "--seeds"),
    (dict(top_p=0.0), "--top-p"),
    (dict(split="dev"), "--split"),
    (dict(max_prompt_length=600), "--max-length"),
])
def test_bad_config_is_input_error(tiny_dir, dolly_like, kw, needle):
    with pytest.raises(InputError, match=re.escape(needle)):
        _cfg(tiny_dir, dolly_like, **kw)


def test_comma_separated_metrics_and_aliases(tiny_dir, dolly_like):
    assert _cfg(tiny_dir, dolly_like, metrics=["rouge-l,dist-4", "em"]).metrics == ["rougeL", "dist4", "exact-match"]


def test_teacher_with_another_tokenizer_and_missing_model(tiny_dir, dolly_like, tmp_path, monkeypatch):
    from minillm_cli.toy.tiny import make_gpt2, train_bpe_tokenizer

    tok = train_bpe_tokenizer(["completely different words here"] * 3, tmp_path / "tok", vocab_size=280)
    make_gpt2(tok, tmp_path / "other", n_layer=1, n_embd=16, n_head=2)
    with pytest.raises(InputError, match="tokenizers differ"):
        run_evaluate(_cfg(tiny_dir, dolly_like, teacher=str(tmp_path / "other"), metrics=["reverse-kl"]))
    with pytest.raises(InputError, match="not a local folder"):
        run_evaluate(_cfg(tiny_dir, dolly_like, model="nobody/no-such-model"))
    # a path that is there no more is no Hub id: said so, with no probe of the Hub
    from minillm_cli import hub

    probes = []
    monkeypatch.setattr(hub, "check_reachable", lambda: probes.append(1))
    for missing in (str(tmp_path / "gone"), "./gone", "~/gone-model"):
        with pytest.raises(InputError, match=rf"^model {re.escape(repr(missing))}: no such folder$"):
            run_evaluate(_cfg(tiny_dir, dolly_like, model=missing))
    assert probes == []


def test_lm_loss_alone_samples_nothing(tiny_dir, dolly_like, tmp_path):
    res = run_evaluate(_cfg(tiny_dir, dolly_like, metrics=["lm-loss"], out=str(tmp_path / "l.json")))
    assert "predictions" not in res and not (tmp_path / "l.jsonl").exists()
    assert json.loads((tmp_path / "l.json").read_text())["metrics"]["lm-loss"]["per_seed"] == res["metrics"]["lm-loss"]["per_seed"]


def test_result_files_get_the_usual_file_mode(tmp_path):
    """Written through a private temporary file and renamed, a result must not stay 0600: CI
    artefacts and other users read it."""
    import os
    import stat

    from minillm_cli.eval.results import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.json", "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644


def test_trained_template_reads_the_run_config_as_resume_does(tmp_path, monkeypatch):
    """`evaluate` without --template takes a run folder's recorded template (config.saved_config,
    the reader --resume uses: `~` expanded, malformed records ignored); dolly for anything else."""
    import json

    from minillm_cli.eval.evaluate import trained_template

    monkeypatch.setenv("HOME", str(tmp_path))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"command": "sft", "config": {"data": {"template": "chat"}}}))
    assert trained_template(str(run)) == trained_template("~/run") == ("chat", "its run_config.json")
    for body in ("[1]", "{", json.dumps({"config": {"data": "chat"}}), json.dumps({"config": {"data": {"template": "x"}}})):
        (run / "run_config.json").write_text(body)
        assert trained_template(str(run)) == ("dolly", None)
    assert trained_template(str(tmp_path / "none")) == ("dolly", None)
    # --turns likewise (a record from before --turns: last, what that run did)
    from minillm_cli.eval.evaluate import EvaluateConfig, trained_turns

    (run / "run_config.json").write_text(json.dumps({"command": "sft", "config": {"data": {"turns": "all"}}}))
    assert trained_turns("~/run") == ("all", "its run_config.json") and EvaluateConfig("~/run", "d").turns == "all"
    assert EvaluateConfig("~/run", "d", turns="last").turns == "last"
    (run / "run_config.json").write_text(json.dumps({"command": "sft", "config": {"data": {"template": "chat"}}}))
    assert trained_turns(str(run)) == trained_turns(str(tmp_path / "none")) == ("last", None)


def test_split_settings_not_given_are_the_runs_on_its_data(tmp_path, dolly_like, monkeypatch):
    """evaluate --split valid/test on the DATA a run folder's model was trained on cuts it as that
    run did (its --valid-size, --test-size, --split-seed, --limit), so that the part is the one it
    held out; given flags win; other data, another model or --split all: the defaults."""
    import json

    from minillm_cli.eval.evaluate import EvaluateConfig, load_eval_examples

    run = tmp_path / "run"
    run.mkdir()
    data = {"data": dolly_like.name, "valid_size": 6, "test_size": 0.25, "split_seed": 7, "limit": 40,
            "valid_data": None}
    (run / "run_config.json").write_text(json.dumps({"command": "sft", "config": {"data": data},
                                                     "cwd": str(dolly_like.parent)}))  # (a relative --data)
    split = lambda c: (c.valid_size, c.test_size, c.split_seed, c.limit)  # noqa: E731
    cfg = EvaluateConfig(str(run), str(dolly_like), split="valid")
    assert split(cfg) == (6, 0.25, 7, 40)
    assert cfg.split_source == "--valid-size 6 --test-size 0.25 --split-seed 7 --limit 40"
    from minillm_cli.config import DataOptions
    from minillm_cli.data.prepare import load_splits

    held = load_splits(DataOptions(data=str(dolly_like), valid_size=6, test_size=0.25, split_seed=7, limit=40))
    for part in ("valid", "test"):
        got = load_eval_examples(EvaluateConfig(str(run), str(dolly_like), split=part))
        assert [e.meta["where"] for e in got] == [e.meta["where"] for e in held[part]] and got
    assert split(EvaluateConfig(str(run), str(dolly_like), split="test", test_size=3, split_seed=1)) == (6, 3, 1, 40)
    other = tmp_path / "other.jsonl"
    other.write_text(dolly_like.read_text())
    for model, d, part in ((str(run), str(other), "valid"), (str(tmp_path / "none"), str(dolly_like), "valid"),
                           (str(run), str(dolly_like), "all")):
        cfg = EvaluateConfig(model, d, split=part)
        assert split(cfg) == (0.05, 0.0, 1234, None) and cfg.split_source is None
    # a run validated on another file: its valid part is that file, not a part of DATA
    (run / "run_config.json").write_text(json.dumps({"command": "sft", "config": {"data": {**data, "valid_data": "v.jsonl"}},
                                                     "cwd": str(dolly_like.parent)}))
    with pytest.raises(InputError, match=r"--split valid: .* was validated on --valid-data v\.jsonl, not on a part of "):
        EvaluateConfig(str(run), str(dolly_like), split="valid")
    assert split(EvaluateConfig(str(run), str(dolly_like), split="test")) == (0, 0.25, 7, 40)

"""The pairwise LLM judge against a local OpenAI-compatible server started in the test."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from minillm_cli.errors import InputError, RunError
from minillm_cli.eval import judge as J


class FakeJudge:
    """Answers chat completions from a script: `reply(body) -> (status, text)`; records requests."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                       "body": body})
                status, text = outer.reply(body)
                if status == 200:
                    payload = {"choices": [{"message": {"role": "assistant", "content": text}}]}
                else:
                    payload = {"error": {"message": text}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _answers(body) -> tuple[str, str]:
    text = body["messages"][1]["content"]
    a1 = text.split("[The Start of Assistant 1's Answer]\n")[1].split("\n\n[The End")[0]
    a2 = text.split("[The Start of Assistant 2's Answer]\n")[1].split("\n\n[The End")[0]
    return a1, a2


def _by_length(body):
    """Scores each answer by its length (capped at 10): deterministic and order-sensitive."""
    a1, a2 = _answers(body)
    return 200, f"{min(10, len(a1))} {min(10, len(a2))}\nThe longer answer is more detailed."


PAIRS = [("q1", "aaaa", "aa"), ("q2", "aaaa", "aaaaaa")]  # (question, reference, candidate)


def test_ratio_of_summed_scores_and_request_shape():
    with FakeJudge(_by_length) as srv:
        res = J.judge_pairs(PAIRS, url=srv.url, model="judge-m", key="sk-test", backoff=0)
    # reference 4 + 4 = 8, candidate 2 + 6 = 8 -> 100; then check with uneven totals below
    assert (res.reference_total, res.candidate_total, res.score) == (8.0, 8.0, 100.0)
    assert res.n_scored == 2 and res.n_unparsed == 0
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-m" and req["body"]["temperature"] == 0
    assert "[Question]\nq1" in req["body"]["messages"][1]["content"]
    with FakeJudge(_by_length) as srv:
        res = J.judge_pairs([("q", "aaaaaaaa", "aa")], url=srv.url + "/chat/completions", model="m")
    assert res.score == pytest.approx(25.0) and srv.requests[0]["auth"] is None


def test_unparsed_replies_are_dropped_and_counted():
    replies = iter([(200, "8 6\nok"), (200, "I cannot decide."), (200, "Scores: 5, 10")])
    with FakeJudge(lambda body: next(replies)) as srv:
        res = J.judge_pairs(PAIRS + [("q3", "x", "y")], url=srv.url, model="m", backoff=0)
    assert (res.reference_total, res.candidate_total, res.n_scored, res.n_unparsed) == (13.0, 16.0, 2, 1)
    assert res.score == pytest.approx(100 * 16 / 13)
    with FakeJudge(lambda body: (200, "no numbers here")) as srv:
        with pytest.raises(RunError, match="no usable scores"):
            J.judge_pairs(PAIRS, url=srv.url, model="m", backoff=0)


@pytest.mark.parametrize("text, scores", [
    ("8 6\nbecause", (8.0, 6.0)), ("\n 7.5, 9 \n", (7.5, 9.0)), ("Assistant 1: 3 Assistant 2: 4", None),
    ("10 10 10", None), ("42 7", None), ("", None),
])
def test_parse_scores(text, scores):
    assert J.parse_scores(text) == scores


def test_http_errors_become_clear_errors():
    with FakeJudge(lambda body: (401, "Incorrect API key provided")) as srv:
        with pytest.raises(InputError, match=r"refused the key \(HTTP 401\): Incorrect API key"):
            J.judge_pairs(PAIRS, url=srv.url, model="m", backoff=0)
    with FakeJudge(lambda body: (400, "model 'gtp-4' does not exist")) as srv:
        with pytest.raises(InputError, match="HTTP 400.*gtp-4"):
            J.judge_pairs(PAIRS, url=srv.url, model="gtp-4", backoff=0)
    with FakeJudge(lambda body: (503, "overloaded")) as srv:
        with pytest.raises(RunError, match="HTTP 503: overloaded after 3 tries"):
            J.judge_pairs(PAIRS, url=srv.url, model="m", backoff=0)
    assert len(srv.requests) == 3  # server errors are retried
    flaky = iter([(429, "slow down"), (200, "5 5")] * 2)
    with FakeJudge(lambda body: next(flaky)) as srv:
        assert J.judge_pairs(PAIRS, url=srv.url, model="m", backoff=0).score == 100.0
    with FakeJudge(_by_length) as srv:
        dead = srv.url
    with pytest.raises(RunError, match="cannot reach"):
        J.judge_pairs(PAIRS, url=dead, model="m", retries=0, timeout=2)
    with pytest.raises(InputError, match="http"):
        J.endpoint("localhost:8000")


def test_pair_predictions_uses_lowest_seed_and_shared_prompts():
    ref = [{"prompt": "P1", "prediction": "r1-seed2", "seed": 2}, {"prompt": "P1", "prediction": "r1-seed1", "seed": 1},
           {"prompt": "P2", "prediction": "r2", "seed": 1, "instruction": "Say hi", "input": "politely"}]
    cand = [{"prompt": "P2", "prediction": "c2", "seed": 1}, {"prompt": "P1", "prediction": "c1", "seed": 1},
            {"prompt": "P3", "prediction": "c3", "seed": 1}]
    assert J.pair_predictions(ref, cand) == [("P1", "r1-seed1", "c1"), ("Say hi\n\npolitely", "r2", "c2")]
    with pytest.raises(InputError, match="no prompt in common"):
        J.judge_pairs(J.pair_predictions(ref, cand[2:]), url="http://127.0.0.1:9", model="m")


def test_the_judge_sees_the_conversation_a_question_was_asked_in():
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}]
    ref = [{"prompt": "P", "prediction": "r", "seed": 1, "instruction": "Name a fruit.", "input": "", "history": history}]
    cand = [{"prompt": "P", "prediction": "c", "seed": 1}]
    assert J.pair_predictions(ref, cand) == [
        ("System: Be brief.\n\nUser: Hi\n\nAssistant: Hello.\n\nUser: Name a fruit.", "r", "c")]


def test_compare_command_with_judge(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from minillm_cli.cli.app import app
    from minillm_cli.eval.metrics import aggregate
    from minillm_cli.eval.results import make_result, write_predictions, write_result

    for name, answer in (("teacher", "aaaa"), ("student", "aa")):
        rows = [{"prompt": f"P{i}", "prediction": answer, "references": ["r"], "seed": 1} for i in range(3)]
        write_predictions(tmp_path / f"{name}.jsonl", rows)
        write_result(tmp_path / f"{name}.json", make_result(model=name, data="d", n=3, protocol={},
                                                              metrics={"rougeL": aggregate([10.0])}))
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-xyz")
    runner = CliRunner()
    with FakeJudge(_by_length) as srv:
        args = ["compare", str(tmp_path / "teacher.json"), str(tmp_path / "student.json"), "--format", "json",
                "--judge-url", srv.url, "--judge-model", "m", "--judge-reference", "teacher",
                "--judge-key-env", "MY_JUDGE_KEY", "--fail-if", "judge < 60", "-q"]
        out = runner.invoke(app, args)
    assert out.exit_code == 1, out.output  # student scores 2+2+2 vs 4+4+4 = 50 < 60
    data = json.loads(out.stdout)
    assert data["metrics"]["judge"]["values"] == {"student": {"mean": 50.0, "std": 0.0, "per_seed": [50.0]}}
    assert len(srv.requests) == 3 and srv.requests[0]["auth"] == "Bearer sk-xyz"
    monkeypatch.delenv("MY_JUDGE_KEY")
    out = runner.invoke(app, args)
    assert out.exit_code == 2 and "MY_JUDGE_KEY" in out.stderr and "Traceback" not in out.output
    (tmp_path / "student.jsonl").unlink()
    out = runner.invoke(app, args[:-5] + ["-q"])
    assert out.exit_code == 2 and "no predictions file" in out.stderr

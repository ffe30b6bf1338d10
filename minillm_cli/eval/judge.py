"""Pairwise LLM judge: the paper's GPT-4 score, through any OpenAI-compatible chat endpoint.

For each prompt the judge sees the reference model's answer (Assistant 1) and the candidate's
(Assistant 2) and scores each 1-10 for helpfulness, relevance, accuracy and level of detail (the
Vicuna/FastChat pairwise prompt the paper uses). The reported score is
100 x sum(candidate scores) / sum(reference scores) over the prompts both scores parsed for.
Standard library only (urllib): no client package to install for an optional feature.
"""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from minillm_cli.errors import InputError, RunError

SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
TEMPLATE = (
    "[Question]\n{question}\n\n"
    "[The Start of Assistant 1's Answer]\n{answer_1}\n\n[The End of Assistant 1's Answer]\n\n"
    "[The Start of Assistant 2's Answer]\n{answer_2}\n\n[The End of Assistant 2's Answer]\n\n"
    "[System]\nWe would like to request your feedback on the performance of two AI assistants in "
    "response to the user question displayed above.\nPlease rate the helpfulness, relevance, "
    "accuracy, level of details of their responses. Each assistant receives an overall score on a "
    "scale of 1 to 10, where a higher score indicates better overall performance.\nPlease first "
    "output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. The two scores are separated by a space. In the subsequent line, please provide "
    "a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that "
    "the order in which the responses were presented does not affect your judgment."
)


@dataclass
class JudgeResult:
    score: float  # 100 x candidate total / reference total
    candidate_total: float
    reference_total: float
    n_scored: int
    n_unparsed: int


def endpoint(url: str) -> str:
    """Accept a base URL (http://host:8000/v1) or the full chat-completions URL."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise InputError(f"--judge-url {url!r}: expected an http:// or https:// URL")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


_NUM = re.compile(r"\d+(?:\.\d+)?")


def parse_scores(text: str) -> Optional[tuple[float, float]]:
    """The two scores from the first non-empty line ('8 6', '8, 6', 'Scores: 8 6'); None when that
    line does not hold exactly two numbers in 1..10 (the prompt asks for exactly that)."""
    for line in text.strip().splitlines():
        if line.strip():
            nums = [float(x) for x in _NUM.findall(line)]
            if len(nums) == 2 and all(0 <= x <= 10 for x in nums):
                return nums[0], nums[1]
            return None
    return None


def chat(url: str, model: str, messages: list[dict], *, key: Optional[str] = None,
         timeout: float = 60.0, retries: int = 2, backoff: float = 2.0, max_tokens: int = 512) -> str:
    """One chat-completions call; the reply's text. Rate limits and server errors are retried
    `retries` times; a refused key, a missing endpoint or a bad model name is the user's to fix
    (InputError); an unreachable or failing server is a RunError."""
    body = json.dumps({"model": model, "messages": messages, "temperature": 0,
                       "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    last = ""
    for attempt in range(retries + 1):
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload = resp.read().decode("utf-8", errors="replace")
            break
        except urllib.error.HTTPError as e:
            detail = _error_detail(e)
            if e.code in (401, 403):
                raise InputError(f"judge at {url} refused the key (HTTP {e.code}){detail}") from None
            if e.code == 404:
                raise InputError(f"judge at {url}: not found (HTTP 404; wrong URL or model?){detail}") from None
            if 400 <= e.code < 500 and e.code != 429:
                raise InputError(f"judge at {url} rejected the request (HTTP {e.code}){detail}") from None
            last = f"HTTP {e.code}{detail}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            last = f"cannot reach it ({reason})"
        if attempt < retries:
            time.sleep(backoff * (2 ** attempt))
    else:
        raise RunError(f"judge at {url}: {last} after {retries + 1} tries")
    try:
        return json.loads(payload)["choices"][0]["message"]["content"] or ""
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise RunError(f"judge at {url} answered something that is not a chat completion: "
                       f"{payload[:120]!r}") from None


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        text = e.read().decode("utf-8", errors="replace")
        msg = json.loads(text).get("error", text)
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
    except Exception:
        return ""
    msg = " ".join(str(msg).split())[:160]
    return f": {msg}" if msg else ""


def pair_predictions(reference_rows: Sequence[dict], candidate_rows: Sequence[dict]) -> list[tuple[str, str, str]]:
    """(question, reference answer, candidate answer) for each prompt both files answered, one
    generation per prompt (the lowest seed), in the reference file's order."""
    def first_by_prompt(rows):
        out: dict[str, dict] = {}
        for r in rows:
            p = r["prompt"]
            if p not in out or _seed(r) < _seed(out[p]):
                out[p] = r
        return out

    ref, cand = first_by_prompt(reference_rows), first_by_prompt(candidate_rows)
    pairs = []
    for prompt, r in ref.items():
        if prompt in cand:
            pairs.append((_question(r), r["prediction"], cand[prompt]["prediction"]))
    return pairs


def _seed(row: dict) -> float:
    s = row.get("seed")
    return float(s) if isinstance(s, (int, float)) else float("inf")


def _question(row: dict) -> str:
    """The instruction (and input) when the predictions file kept them, after the conversation
    that came before it where there was one (`history`: "System: ...", "User: ...", "Assistant:
    ..." lines); the rendered prompt else."""
    inst = row.get("instruction")
    if isinstance(inst, str) and inst.strip():
        extra = row.get("input")
        question = inst + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
        history = row.get("history")
        if isinstance(history, list) and history and all(isinstance(m, dict) for m in history):
            lines = [f"{str(m.get('role', '')).capitalize()}: {m.get('content', '')}" for m in history]
            question = "\n\n".join([*lines, f"User: {question}"])
        return question
    return row["prompt"]


def judge_pairs(pairs: Sequence[tuple[str, str, str]], *, url: str, model: str,
                key: Optional[str] = None, timeout: float = 60.0, retries: int = 2,
                backoff: float = 2.0, on_step: Optional[Callable[[int], None]] = None) -> JudgeResult:
    if not pairs:
        raise InputError("judge: the reference and the candidate answered no prompt in common")
    url = endpoint(url)
    cand_total = ref_total = 0.0
    scored = unparsed = 0
    for i, (question, ref_answer, cand_answer) in enumerate(pairs):
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": TEMPLATE.format(question=question, answer_1=ref_answer,
                                                                answer_2=cand_answer)}]
        scores = parse_scores(chat(url, model, messages, key=key, timeout=timeout, retries=retries,
                                   backoff=backoff))
        if scores is None:
            unparsed += 1  # FastChat drops such verdicts too; they are counted and reported
        else:
            ref_total += scores[0]
            cand_total += scores[1]
            scored += 1
        if on_step:
            on_step(i + 1)
    if scored == 0 or ref_total == 0:
        raise RunError(f"judge: no usable scores from {model} ({unparsed} of {len(pairs)} replies "
                       "did not start with two scores)")
    return JudgeResult(score=100.0 * cand_total / ref_total, candidate_total=cand_total,
                       reference_total=ref_total, n_scored=scored, n_unparsed=unparsed)

"""Reverse KL (MiniLLM) is mode-seeking, forward KL (KD) mass-covering, with the engine's losses.

Teacher: after the prompt, a bimodal answer distribution over 6 answers (then EOS).
Student: capacity-limited, a discretised Gaussian over the answer index (2 parameters: mu,
log sigma), so it cannot copy the teacher and must choose how to be wrong. Trained from the same
start with the full MiniLLM pipeline (teacher-mixed `sample` -> `score_rollouts` ->
`minillm_loss`) and with KD (`kd_loss` on teacher-sampled responses): the MiniLLM student must put
more mass on the teacher's major mode and less on the teacher's low-probability answers.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from minillm_cli.engine.losses import kd_loss
from minillm_cli.engine.minillm import MiniLLMOptions, minillm_loss, response_logits, score_rollouts
from minillm_cli.engine.runtime import example_generator
from minillm_cli.engine.sampler import SamplingParams, sample

N_ANS, EOS, BOS, PAD = 6, 6, 7, 8
V = 8  # answers, EOS, BOS; logits are one wider (the pad row)
NEG = -1e4
TEACHER = torch.tensor([0.45, 0.30, 0.02, 0.03, 0.05, 0.15], dtype=torch.float64)




class TabularLM(torch.nn.Module):
    """A causal LM whose next-token logits depend only on the current token (no cache needed),
    with the keyword interface of a Hugging Face model."""

    def answer_logits(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kw):
        B, L = input_ids.shape
        after_bos = torch.full((N_ANS + 3,), NEG, dtype=torch.float64)
        after_bos = torch.cat([self.answer_logits(), after_bos[N_ANS:]])
        after_answer = torch.full((N_ANS + 3,), NEG, dtype=torch.float64)
        after_answer[EOS] = 0.0
        other = torch.zeros(N_ANS + 3, dtype=torch.float64)  # after EOS / pad: never scored
        table = torch.stack([after_answer] * N_ANS + [other, after_bos, other])  # by input token
        return SimpleNamespace(logits=table[input_ids], cache=None)


class Teacher(TabularLM):
    def answer_logits(self):
        return TEACHER.log()


class GaussianStudent(TabularLM):
    def __init__(self):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(2.5, dtype=torch.float64))
        self.log_sigma = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def answer_logits(self):
        i = torch.arange(N_ANS, dtype=torch.float64)
        return -0.5 * ((i - self.mu) / self.log_sigma.exp()) ** 2

    def answer_probs(self):
        return torch.softmax(self.answer_logits(), 0).detach()


def _prompts(n):
    return torch.full((n, 1), BOS), torch.ones(n, 1, dtype=torch.long)


def train_minillm(steps=150, batch=64, alpha=0.2):
    student, teacher = GaussianStudent(), Teacher()
    opt = torch.optim.Adam(student.parameters(), lr=0.1)
    opts = MiniLLMOptions()  # the paper's defaults: single step, length norm, token weights
    ids, mask = _prompts(batch)
    for step in range(steps):
        gens = [example_generator(0, step, i) for i in range(batch)]
        rollout = sample(student, teacher, ids, mask, params=SamplingParams(4), alpha=alpha,
                         eos_id=EOS, pad_id=PAD, generators=gens, vocab_size=V)
        scored = score_rollouts(student, teacher, rollout, opts, vocab_size=V)
        loss, _ = minillm_loss(student, teacher, scored, opts, float(scored.num_tokens()), V)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student


def train_kd(steps=150, batch=64, kd_ratio=0.5):
    student, teacher = GaussianStudent(), Teacher()
    opt = torch.optim.Adam(student.parameters(), lr=0.1)
    ids, mask = _prompts(batch)
    for step in range(steps):
        gens = [example_generator(1, step, i) for i in range(batch)]
        data = sample(None, teacher, ids, mask, params=SamplingParams(4), alpha=1.0,
                      eos_id=EOS, pad_id=PAD, generators=gens, vocab_size=V)  # "gold" answers
        full = torch.cat([ids, data.response_ids], 1)
        att = torch.cat([mask, data.response_mask.long()], 1)
        T = data.response_ids.shape[1]
        s_logits = response_logits(student, full, att, T)
        with torch.no_grad():
            t_logits = response_logits(teacher, full, att, T)
        loss = kd_loss(s_logits, t_logits, data.response_ids, data.response_mask,
                       float(data.response_mask.sum()), V, kd_ratio=kd_ratio)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student


def _kl(a, b):
    return float((a * (a.clamp_min(1e-300).log() - b.log())).sum())


def test_reverse_kl_seeks_the_major_mode_forward_kl_covers():
    rkl_student, kd_student = train_minillm(), train_kd()
    q_r, q_f = rkl_student.answer_probs(), kd_student.answer_probs()
    top = TEACHER.argsort(descending=True)[:2]     # the major mode: answers 0 and 1
    low = TEACHER < 0.1                             # answers the teacher rarely gives
    ent = lambda q: float(-(q * q.clamp_min(1e-300).log()).sum())
    print(f"\nminillm q={q_r.numpy().round(3)}  kd q={q_f.numpy().round(3)}")
    print(f"mass on major mode {float(q_r[top].sum()):.3f} vs {float(q_f[top].sum()):.3f}; "
          f"entropy {ent(q_r):.3f} vs {ent(q_f):.3f}")
    assert float(q_r[top].sum()) > float(q_f[top].sum()) + 0.2
    assert float(q_r[low].sum()) < float(q_f[low].sum()) - 0.15
    assert ent(q_r) < ent(q_f) - 0.3
    # and each engine minimised its own divergence better than the other one did
    assert _kl(q_r, TEACHER) < _kl(q_f, TEACHER)        # reverse KL(q || p)
    assert _kl(TEACHER, q_f) < _kl(TEACHER, q_r)        # forward KL(p || q)

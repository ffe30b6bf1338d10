"""engine/captured_step.py on the CPU: the bookkeeping around the CUDA graph -- static inputs,
the device normaliser, gradients accumulated in place across `zero_grad(set_to_none=True)`, one
graph per shape, the eager fallback -- with the two CUDA-only pieces (the side-stream warm-up and
the capture) replaced by what a replay computes: the step function run again on the static
tensors. The real capture is tests/gpu/test_gpu_update.py's. Also `select(bucket=True)` and
`forward_mask`'s unmasked forward, which the captured MiniLLM micro-step relies on."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

from minillm_cli.engine.captured_step import CapturedSteps


@dataclass
class Toy:
    x: torch.Tensor  # [n, 3]
    y: torch.Tensor  # [n]
    tag: int = 0


class _FakeGraph:
    def __init__(self, fn, static, norm, outputs):
        self.fn, self.static, self.norm, self.outputs = fn, static, norm, outputs

    def replay(self):  # a replay: the recorded step over whatever the static tensors hold now
        out = self.fn(self.static, self.norm)
        for k in self.outputs:
            self.outputs[k].copy_(out[k])


class Replayed(CapturedSteps):
    """CapturedSteps with the CUDA-only pieces replaced (see the module docstring)."""

    def __init__(self, *a, fail: bool = False, synced: str = "", **kw):
        super().__init__(*a, **kw)
        self.enabled, self.fail, self.synced, self.warm_ups = True, fail, synced, 0

    def _warm_up(self, static, norm):
        self.warm_ups += 1
        self._last = self.fn(static, norm)
        return self._last, self.synced

    def _capture(self, static, norm):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        outputs = {k: torch.empty_like(v) for k, v in self._last.items()}  # (capture runs nothing)
        return _FakeGraph(self.fn, static, norm, outputs), outputs


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()


def _step_fn(model):
    def fn(batch: Toy, norm: torch.Tensor) -> dict:
        err = model(batch.x).squeeze(-1) - batch.y
        loss = (err ** 2).sum() / norm
        loss.backward()
        return {"loss": loss.detach(), "n": torch.tensor(float(len(batch.y)), dtype=torch.float64)}
    return fn


def _batches(seed: int) -> list[tuple[list[Toy], float]]:
    """Optimizer steps of micro-batches in two shapes (4 and 2 rows), interleaved, each step
    with its own normaliser."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for s in range(5):
        micro = [Toy(torch.randn(n, 3, generator=g, dtype=torch.float64),
                     torch.randn(n, generator=g, dtype=torch.float64)) for n in (4, 2, 4)]
        steps.append((micro, 10.0 + s))
    return steps


def _train(steps, make) -> tuple[list[torch.Tensor], list[float], CapturedSteps]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    runner = make(_step_fn(model), list(model.parameters()))
    losses = []
    for micro, norm in steps:
        opt.zero_grad(set_to_none=True)  # (as clip_and_step: the graphs' gradients must come back)
        for b in micro:
            losses.append(float(runner(b, norm)["loss"]))  # read before the next call
        opt.step()
    return [p.detach().clone() for p in model.parameters()], losses, runner


def test_replays_give_the_eager_training():
    steps = _batches(1)
    want_p, want_l, eager = _train(steps, lambda fn, ps: CapturedSteps(fn, ps, torch.device("cpu")))
    assert not eager.enabled  # on a CPU: the plain step
    got_p, got_l, rep = _train(steps, lambda fn, ps: Replayed(fn, ps, torch.device("cpu")))
    assert rep.captures == 2 and rep.warm_ups == 2  # one graph per shape
    assert rep.replays == len(want_l) - 2
    assert got_l == want_l
    for a, b in zip(got_p, want_p):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_a_replay_reads_the_new_inputs_and_normaliser():
    """What the test above would also catch, spelled out: a replay of the same shape computes the
    new batch's loss with the new normaliser (not the static copy of the first one)."""
    model = _model()
    rep = Replayed(_step_fn(model), list(model.parameters()), torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    a = Toy(torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64))
    b = Toy(a.x + 1.0, a.y - 2.0)
    first = float(rep(a, 2.0)["loss"])
    out = rep(b, 5.0)
    with torch.no_grad():
        want = float(((model(b.x).squeeze(-1) - b.y) ** 2).sum() / 5.0)
    assert rep.replays == 1 and float(out["loss"]) == pytest.approx(want, rel=1e-14)
    assert float(out["loss"]) != pytest.approx(first)
    assert rep(b, 5.0) is out  # a replay hands back the graph's own outputs (read them first)


def test_gradients_stay_the_tensors_the_graph_accumulates_into():
    model = _model()
    params = list(model.parameters())
    rep = Replayed(_step_fn(model), params, torch.device("cpu"))
    batch = Toy(torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    rep(batch, 1.0)
    owned = [p.grad for p in params]
    model.zero_grad(set_to_none=True)
    params[0].grad = torch.full_like(params[0], 7.0)  # someone else's tensor: its value is kept
    rep(batch, 1.0)
    assert all(p.grad is g for p, g in zip(params, owned))
    model.zero_grad(set_to_none=True)
    rep(batch, 1.0)
    once = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    rep(batch, 1.0)
    rep(batch, 1.0)
    for p, o in zip(params, once):
        torch.testing.assert_close(p.grad, 2 * o)  # zeroed, then accumulated twice
    model.zero_grad(set_to_none=True)
    params[0].grad = torch.full_like(params[0], 7.0)
    rep(batch, 1.0)
    torch.testing.assert_close(params[0].grad, once[0] + 7.0)


def test_a_failed_capture_warns_and_runs_eagerly_from_then_on():
    steps = _batches(3)
    want_p, want_l, _ = _train(steps, lambda fn, ps: CapturedSteps(fn, ps, torch.device("cpu")))
    with pytest.warns(UserWarning, match="running it eagerly"):
        got_p, got_l, rep = _train(steps, lambda fn, ps: Replayed(fn, ps, torch.device("cpu"), fail=True))
    assert not rep.enabled and rep.captures == 0 and rep.warm_ups == 1 and "not captured" in rep.summary
    assert got_l == want_l
    for a, b in zip(got_p, want_p):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_a_step_that_synchronises_is_not_captured():
    """A warm-up during which torch saw a host synchronisation (a capture would fail on it) is the
    last graph attempt: no capture, a warning, eager steps with the same results."""
    steps = _batches(4)
    want_p, want_l, _ = _train(steps, lambda fn, ps: CapturedSteps(fn, ps, torch.device("cpu")))
    with pytest.warns(UserWarning, match="synchronises with the host"):
        got_p, got_l, rep = _train(steps, lambda fn, ps: Replayed(fn, ps, torch.device("cpu"), synced="item()"))
    assert not rep.enabled and rep.captures == 0 and rep.warm_ups == 1 and rep.grads is None
    assert got_l == want_l
    for a, b in zip(got_p, want_p):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_a_parameter_without_a_gradient_keeps_none_and_release_lets_go():
    """As eagerly: a parameter the step never reaches keeps `.grad` None (AdamW then leaves it
    alone, weight decay included); `release()` drops our hold on the gradient tensors."""
    model = _model()
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    params = list(model.parameters()) + [unused]
    rep = Replayed(_step_fn(model), params, torch.device("cpu"))
    batch = Toy(torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    for _ in range(3):
        for p in params:
            p.grad = None
        rep(batch, 1.0)
    assert rep.replays == 2 and unused.grad is None and all(p.grad is not None for p in params[:-1])
    rep.release()
    assert rep.grads is None and not rep.graphs


def test_the_shape_key_separates_plain_fields_and_rejects_others():
    from minillm_cli.engine.captured_step import _shape_key

    x, y = torch.zeros(2, 3), torch.zeros(2)
    assert _shape_key(Toy(x, y, 0)) == _shape_key(Toy(x + 1, y, 0))
    assert _shape_key(Toy(x, y, 0)) != _shape_key(Toy(x, y, 1))
    assert _shape_key(Toy(x, y)) != _shape_key(Toy(torch.zeros(3, 3), torch.zeros(3)))
    with pytest.raises(TypeError, match="not a tensor"):
        _shape_key(Toy(x, y, [1]))


# -- what the MiniLLM micro-step needs of the batch and the mask --------------------------------
def _gpt2(seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=7, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).double().eval()


def _buffer(P=5, T=7, N=4, seed=0):
    from minillm_cli.engine.minillm import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    first = [0, 0, 2, 1][:N]  # rows 0, 1: no left padding
    lengths = [7, 3, 5, 2][:N]
    att = torch.zeros(N, P + T, dtype=torch.long)
    for i in range(N):
        att[i, first[i] : P] = 1
        att[i, P : P + lengths[i]] = 1
    mask = att[:, P:].bool()
    f = lambda: torch.randn(N, T, generator=g, dtype=torch.float64) * mask  # noqa: E731
    return RolloutBatch(input_ids=torch.randint(0, 7, (N, P + T), generator=g), attention_mask=att, prompt_len=P,
                        response_mask=mask, old_logp=-f().abs() - 1, teacher_logp=-f().abs(), rewards=f(),
                        advantages=f(), pg_weights=f().abs() + mask, ss_weights=f().abs() + mask, w=mask.double())


def _loss_and_grads(student, teacher, micro):
    from minillm_cli.engine.minillm import MiniLLMOptions, minillm_loss

    student.zero_grad(set_to_none=True)
    loss, _ = minillm_loss(student, teacher, micro, MiniLLMOptions(), 9.0, 7)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in student.parameters()]


def test_unpadded_rows_run_sdpas_causal_kernel_and_lose_nothing(monkeypatch):
    """Rows known to have no left padding run SDPA's causal kernel, no mask (and nothing for
    transformers to read on the host): the loss and gradients of the 2-D mask, whose only zeros
    are trailing."""
    import transformers.integrations.sdpa_attention as sdpa_mod

    from minillm_cli.engine import minillm

    student, teacher = _gpt2(1), _gpt2(2)
    micro = _buffer().select([0, 1])
    assert micro.left_padded is False and not bool(micro.attention_mask.all())
    calls = []
    real_sdpa = sdpa_mod.torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is None, bool(is_causal)))
        return real_sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(sdpa_mod.torch.nn.functional, "scaled_dot_product_attention", spy)
    got = _loss_and_grads(student, teacher, micro)
    assert calls and all(c == (True, True) for c in calls)
    calls.clear()
    orig = minillm._causal_only
    monkeypatch.setattr(minillm, "_causal_only", lambda active: orig(False))
    want = _loss_and_grads(student, teacher, micro)
    assert calls and all(c == (False, False) for c in calls)  # transformers' own mask: the check can fail
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rows", [[1, 3], [0, 2], [2, 3, 1]])
def test_bucketed_selections_come_in_few_shapes_and_give_the_same_loss(monkeypatch, rows):
    from minillm_cli.engine import minillm

    monkeypatch.setattr(minillm, "WIDTH_BUCKET", 4)
    student, teacher = _gpt2(1), _gpt2(2)
    buf = _buffer()
    exact, bucketed = buf.select(rows), buf.select(rows, bucket=True)
    T = bucketed.response_mask.shape[1]
    assert T in (4, 7) and T >= exact.response_mask.shape[1]  # a multiple of 4, or all of T (7)
    W = bucketed.input_ids.shape[1]
    assert W % 4 == 0 or W == buf.prompt_len + T  # (or from column 0: all the prompt columns there are)
    assert int(bucketed.response_mask.sum()) == int(exact.response_mask.sum())
    got, want = _loss_and_grads(student, teacher, bucketed), _loss_and_grads(student, teacher, exact)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_no_grad_forwards_of_a_model_in_autocasts_dtype_run_without_autocast(monkeypatch):
    """`_autocast_off_for`: off only for a forward without gradients of a model whose weights are
    all in autocast's dtype and with no composed activation left; the logits are autocast's."""
    from minillm_cli.engine import minillm
    from minillm_cli.engine.fused import fused_activations

    model = _gpt2(1).to(torch.bfloat16)
    micro = _buffer().select([2, 3])
    T = micro.response_mask.shape[1]

    def off(m):
        return isinstance(minillm._autocast_off_for(m), torch.autocast)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not off(model)  # gelu_new composed: pow runs in float32 under autocast
        with fused_activations([model]):
            with torch.no_grad():
                assert off(model)
                got = minillm.response_logits(model, micro.input_ids, micro.attention_mask, T, micro.left_padded)
            assert not off(model)  # gradients on: the backward's arithmetic would change
            with torch.no_grad():
                assert not off(_gpt2(1))  # float32 weights: autocast is what makes the matmuls bf16
                monkeypatch.setattr(minillm, "_autocast_off_for", lambda m: contextlib.nullcontext())
                want = minillm.response_logits(model, micro.input_ids, micro.attention_mask, T, micro.left_padded)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)


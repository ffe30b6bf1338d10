"""engine/decode_matmul.py: the split-K matmul against float64 brute force (run by Triton's
interpreter on this CPU; tests/gpu runs it compiled), the torch-function mode that hands it the
decode step's addmm / linear calls, and the fast sampler drawing the reference's tokens with every
decode matmul through it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TOY_EOS, TOY_PAD, TOY_V, gpt2_numbers, llama_numbers, toy_sample_args
from minillm_cli.engine import decode_matmul as dm
from minillm_cli.engine import fast_sampler
from minillm_cli.engine.fast_sampler import fast_sample
from minillm_cli.engine.sampler import sample

pytestmark = pytest.mark.skipif(not dm.available("cpu"), reason="needs Triton (interpreter mode)")


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    """A kernel failure in one test (recorded process-wide) must not switch it off for the next."""
    monkeypatch.setattr(dm, "_BROKEN", [])


def brute(x, w, bias, k_major):
    w = w.double() if k_major else w.double().t()
    out = x.double() @ w
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("M,K,N,config,k_major,has_bias", [
    (4, 64, 96, (32, 32, 1), True, True),      # no split: the bias in the matmul kernel
    (20, 130, 70, (64, 32, 4), True, True),    # ragged everywhere; split, the bias in the reduce
    (64, 256, 48, (32, 64, 3), False, False),  # nn.Linear's layout, no bias; a split of 3
    (3, 96, 40, (16, 32, 8), False, True),     # more splits asked than inner blocks: no empty slice
    (70, 48, 33, (32, 16, 2), True, False),    # rows past one tile of 64
])
def test_kernel_matches_brute_force(M, K, N, config, k_major, has_bias):
    g = torch.Generator().manual_seed(M + K + N)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(*((K, N) if k_major else (N, K)), generator=g)
    bias = torch.randn(N, generator=g) if has_bias else None
    out = dm.splitk_matmul(x, w, bias, config, k_major=k_major)
    assert out.shape == (M, N) and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), brute(x, w, bias, k_major), rtol=0, atol=1e-4)


@pytest.mark.parametrize("split", [1, 2])
def test_kernel_reads_strided_inputs_and_rounds_a_half_precision_result_once(split):
    """A non-contiguous x (a slice of a wider activation) and a transposed weight view; in half
    precision the result is the float32 sum (with the bias) rounded once. (float16: Triton 3.9's
    interpreter multiplies bfloat16 operands wrongly in tl.dot -- 1e10 off for a plain 16x16
    product -- so bf16 is checked compiled, in tests/gpu.)"""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(8, 2 * 64, generator=g).to(torch.float16)
    x = wide[:, ::2]  # strides (128, 2)
    w = torch.randn(40, 64, generator=g).to(torch.float16).t()  # [K, N] with strides (1, 64)
    bias = torch.randn(40, generator=g).to(torch.float16)
    out = dm.splitk_matmul(x, w, bias, (32, 32, split))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, brute(x, w, bias, True).to(torch.float16), rtol=0, atol=8e-3)


def test_splits_give_every_sm_a_program_within_bounds(monkeypatch):
    monkeypatch.setattr(dm, "_sm_count", lambda device: 132)
    # gpt2-xl's attention projection at batch 64: 25 tiles of 64 columns, so 8 splits fill 132 SMs
    assert dm.splits_for(64, 1600, 1600, 64, 64, "cuda") == (4, 8, 12)
    # a short inner dimension caps the split at two blocks per slice
    assert dm.splits_for(64, 768, 256, 64, 64, "cuda") == (1, 2)
    # enough tiles already: no split
    assert dm.splits_for(256, 50304, 1600, 64, 64, "cuda") == (1, 2)
    for M, N, K in ((64, 4800, 1600), (256, 768, 3072), (8, 64, 64), (64, 64, 8192)):
        for split in dm.splits_for(M, N, K, 64, 64, "cuda"):
            assert 1 <= split <= min(dm.MAX_SPLIT, max(1, K // 128))


def test_mode_takes_only_the_calls_in_its_table(monkeypatch):
    """Inside active(table): an addmm (Conv1D) or linear (nn.Linear, 3-d input) whose signature is in
    the table runs the kernel; another shape, a call with extra arguments, or no table goes to the
    original op; results equal the original's."""
    calls = []
    kernel = dm.splitk_matmul
    monkeypatch.setattr(dm, "splitk_matmul", lambda *a, **kw: calls.append(kw["k_major"]) or kernel(*a, **kw))
    g = torch.Generator().manual_seed(2)
    x3 = torch.randn(4, 1, 32, generator=g)
    w_lin = torch.randn(48, 32, generator=g)
    w_conv, b_conv = torch.randn(32, 64, generator=g), torch.randn(64, generator=g)
    table = {dm.signature(4, 32, 48, False, False, torch.float32, "cpu"): (16, 16, 2),
             dm.signature(4, 32, 64, True, True, torch.float32, "cpu"): (32, 16, 1)}
    with dm.active(table):
        lin = F.linear(x3, w_lin)
        conv = torch.addmm(b_conv, x3.view(-1, 32), w_conv)
        assert calls == [False, True]
        other = torch.addmm(b_conv[:48], x3.view(-1, 32), w_lin.t())  # (not in the table)
        scaled = torch.addmm(b_conv, x3.view(-1, 32), w_conv, beta=0.5)  # (extra arguments)
        wider = F.linear(torch.randn(8, 32), w_lin)  # (8 rows, not 4)
        assert calls == [False, True]
    with dm.active({}):
        F.linear(x3, w_lin)
    assert calls == [False, True]
    assert lin.shape == (4, 1, 48)
    torch.testing.assert_close(lin, F.linear(x3, w_lin), rtol=0, atol=1e-5)
    torch.testing.assert_close(conv, torch.addmm(b_conv, x3.view(-1, 32), w_conv), rtol=0, atol=1e-5)
    torch.testing.assert_close(scaled, torch.addmm(b_conv, x3.view(-1, 32), w_conv, beta=0.5))
    assert other.shape == (4, 48) and wider.shape == (8, 48)


def test_mode_under_autocast_casts_the_input_and_leaves_a_float32_weight_to_the_original(monkeypatch):
    """Under autocast the kernel computes in autocast's dtype (x and bias cast as autocast casts
    them) where the weight is in it already; a float32 weight goes to the original op. (float16:
    see the rounding test on the interpreter's bfloat16.)"""
    calls = []
    kernel = dm.splitk_matmul
    monkeypatch.setattr(dm, "splitk_matmul", lambda x, *a, **kw: calls.append(x.dtype) or kernel(x, *a, **kw))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, generator=g)
    w16 = torch.randn(32, 48, generator=g).to(torch.float16)
    b32 = torch.randn(48, generator=g)
    w32 = w16.float()
    table = {dm.signature(4, 32, 48, True, True, torch.float16, "cpu"): (16, 16, 2),
             dm.signature(4, 32, 48, True, True, torch.float32, "cpu"): (16, 16, 2)}
    with torch.autocast("cpu", dtype=torch.float16), dm.active(table):
        got = torch.addmm(b32, x, w16)
        plain = torch.addmm(b32, x, w32)
    assert calls == [torch.float16]
    assert got.dtype == torch.float16 and plain.dtype == torch.float16
    with torch.autocast("cpu", dtype=torch.float16):
        want = torch.addmm(b32, x, w16)
    torch.testing.assert_close(got, want, rtol=0, atol=8e-3)


def test_a_failing_kernel_warns_once_and_the_original_op_answers(monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("cannot build")

    monkeypatch.setattr(dm, "splitk_matmul", broken)
    x, w = torch.randn(4, 32), torch.randn(48, 32)
    table = {dm.signature(4, 32, 48, False, False, torch.float32, "cpu"): (16, 16, 1)}
    with pytest.warns(UserWarning, match="cannot build"), dm.active(table):
        out = F.linear(x, w)
    torch.testing.assert_close(out, F.linear(x, w))
    assert dm._BROKEN and dm._BROKEN[0].startswith("RuntimeError: cannot build")
    assert dm.plan(torch.nn.Linear(2, 2), 4, torch.float32, "cpu") == ({}, "needs CUDA and Triton")


def test_model_shapes_and_the_forced_table():
    """A GPT-2's Conv1D layers ([in, out], with bias) and its head (nn.Linear, tied, no bias), once
    per distinct shape; a weight not in the asked dtype is left out."""
    model = gpt2_numbers(1, n_layer=2)
    shapes = dm.model_shapes(model, torch.float32)
    assert shapes == [(16, 48, True, True), (16, 16, True, True), (16, 64, True, True),
                      (64, 16, True, True), (16, 12, False, False)]
    assert dm.model_shapes(model, torch.bfloat16) == []
    table = dm.forced(model, 4, torch.float32, "cpu")
    assert set(table) == {dm.signature(4, K, N, km, b, torch.float32, "cpu") for K, N, km, b in shapes}


V, PAD, EOS = TOY_V, TOY_PAD, TOY_EOS
_args = toy_sample_args


def test_sampler_with_every_decode_matmul_through_the_kernel_draws_the_reference_tokens(monkeypatch):
    """DECODE_MATMUL = "kernel": each decode step's matmuls (both models' layers and heads) run the
    split-K kernel, some split; the prefill's do not; tokens and log-probs are the reference's."""
    monkeypatch.setattr(fast_sampler, "DECODE_MATMUL", "kernel")
    monkeypatch.setattr(dm, "CONFIGS", ((16, 16),))  # (the toy's 64-wide c_proj then splits in 2)
    student = gpt2_numbers(1, vocab=V, pad=PAD, eos=EOS, n_layer=2)
    teacher = gpt2_numbers(2, vocab=V, pad=PAD, eos=EOS)
    seen = []
    kernel = dm.splitk_matmul

    def counted(x, w, bias, config, **kw):
        seen.append((x.shape[0], config[2]))
        return kernel(x, w, bias, config, **kw)

    monkeypatch.setattr(dm, "splitk_matmul", counted)
    forced = dm.forced  # (also tabled: the prefill's rows, 4 prompts x 6 positions; never served)
    monkeypatch.setattr(dm, "forced", lambda model, M, *a: {**forced(model, M, *a), **forced(model, 6 * M, *a)})
    kw = dict(max_new_tokens=16, no_repeat_ngram_size=3)
    ref = sample(student, teacher, **_args(range(4), 0.3, **kw))
    for call in range(2):  # (the second call's prefill runs on the kept decoder, tables set)
        got = fast_sample(student, teacher, engine="static", check=False, keep=True, **_args(range(4), 0.3, **kw))
        assert torch.equal(ref.response_ids, got.response_ids)
        torch.testing.assert_close(got.mix_logp, ref.mix_logp, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.student_logp, ref.student_logp, rtol=0, atol=1e-5)
    fast_sampler.release()
    steps = got.response_ids.shape[1] - 1
    per_step = (2 + 1) * 4 + 2  # four matmuls a layer, a head per model
    assert steps > 3 and len(seen) == 2 * per_step * steps
    assert {rows for rows, _ in seen} == {4} and any(split > 1 for _, split in seen)
    assert fast_sampler.MATMUL_NOTES == {"student": (True, "forced (DECODE_MATMUL)"),
                                         "teacher": (True, "forced (DECODE_MATMUL)")}
    assert fast_sampler.matmul_summary().startswith("decode matmuls: student forced")
    monkeypatch.setattr(fast_sampler, "DECODE_MATMUL", "cublas")
    seen.clear()
    fast_sample(student, teacher, engine="static", check=False, **_args(range(4), 0.3, **kw))
    fast_sampler.release()
    assert seen == [] and fast_sampler.MATMUL_NOTES == {} and fast_sampler.matmul_summary() is None


def test_a_llama_through_the_kernel_draws_the_reference_tokens(monkeypatch):
    """nn.Linear's layout without biases: a Llama student (grouped key/value heads, a gated MLP:
    seven matmuls a layer, the head) teacher-mixed with a GPT-2 (Conv1D's layout, biases), every
    decode matmul of both through the kernel."""
    monkeypatch.setattr(fast_sampler, "DECODE_MATMUL", "kernel")
    monkeypatch.setattr(dm, "CONFIGS", ((16, 16),))
    llama = llama_numbers(3, vocab=V, pad=PAD, eos=EOS)
    teacher = gpt2_numbers(2, vocab=V, pad=PAD, eos=EOS)
    seen = []
    kernel = dm.splitk_matmul

    def counted(x, w, bias, config, *, k_major=True, **kw):
        seen.append((tuple(w.shape), k_major, bias is not None))
        return kernel(x, w, bias, config, k_major=k_major, **kw)

    monkeypatch.setattr(dm, "splitk_matmul", counted)
    kw = dict(max_new_tokens=12)
    ref = sample(llama, teacher, **_args(range(4), 0.3, **kw))
    got = fast_sample(llama, teacher, engine="static", check=False, **_args(range(4), 0.3, **kw))
    fast_sampler.release()
    assert torch.equal(ref.response_ids, got.response_ids)
    torch.testing.assert_close(got.student_logp, ref.student_logp, rtol=0, atol=1e-5)
    steps = got.response_ids.shape[1] - 1
    assert steps > 3 and len(seen) == (2 * 7 + 1 + 4 + 1) * steps
    linear = [s for s in seen if not s[1]]  # the Llama's, and GPT-2's head (a tied nn.Linear)
    assert len(linear) == 16 * steps and not any(has_bias for *_, has_bias in linear)
    assert all(has_bias for _, k_major, has_bias in seen if k_major)  # GPT-2's Conv1D
    assert {(16, 32), (48, 32), (32, 48), (V + 1, 32)} <= {shape for shape, *_ in linear}  # k / v: 2 heads of 8


def test_auto_measures_nothing_off_cuda(monkeypatch):
    """"auto" (the default) plans only a captured CUDA decoder: on the CPU no table, no note."""
    assert fast_sampler.DECODE_MATMUL == "auto"
    monkeypatch.setattr(dm, "splitk_matmul", lambda *a, **kw: pytest.fail("the kernel ran"))
    student = gpt2_numbers(1, vocab=V, pad=PAD, eos=EOS, n_layer=2)
    fast_sample(student, None, engine="static", check=False, **_args(range(4), 0.0, max_new_tokens=6))
    fast_sampler.release()
    assert fast_sampler.MATMUL_NOTES == {}


# -- plan: the choice per shape (the timer is a CUDA-graph replay on a GPU: faked here) ----------

def _fake_timer(times: dict):
    """_time(fn, copies, reps) -> seconds by which side `fn` runs: the kernel's config (read from
    the splitk_matmul call it makes) or "original"."""
    def timer(fn, copies, reps=24):
        used = []
        real = dm.splitk_matmul
        dm.splitk_matmul = lambda x, w, b, config, **kw: used.append(config) or real(x, w, b, config, **kw)
        try:
            fn(0)
        finally:
            dm.splitk_matmul = real
        return times.get(used[0] if used else "original", 20.0)  # (configs not named: slow)
    return timer


def test_measure_picks_the_fastest_config_only_within_the_margin(monkeypatch):
    monkeypatch.setattr(dm, "CONFIGS", ((16, 16), (32, 16)))
    monkeypatch.setattr(dm, "splits_for", lambda *a: (1, 2))
    monkeypatch.setattr(dm, "_time", _fake_timer({(16, 16, 1): 9.5, (16, 16, 2): 8.0, (32, 16, 2): 8.5, "original": 10.0}))
    config, t_ours, t_orig, why = dm._measure(4, 64, 48, True, True, torch.float32, torch.device("cpu"))
    assert (config, t_ours, t_orig, why) == ((16, 16, 2), 8.0, 10.0, "")
    monkeypatch.setattr(dm, "_time", _fake_timer({(16, 16, 2): 9.1, "original": 10.0}))  # not <= 90%
    assert dm._measure(4, 64, 48, False, False, torch.float32, torch.device("cpu"))[:3] == (None, 9.1, 10.0)
    monkeypatch.setattr(dm, "_time", _fake_timer({(32, 16, 1): 9.0, "original": 10.0}))  # 90% exactly
    assert dm._measure(4, 64, 48, False, False, torch.float32, torch.device("cpu"))[0] == (32, 16, 1)


def test_measure_refuses_a_shape_where_a_config_gives_a_wrong_result_and_skips_one_that_fails(monkeypatch):
    monkeypatch.setattr(dm, "CONFIGS", ((16, 16), (32, 16)))
    monkeypatch.setattr(dm, "splits_for", lambda *a: (2,))
    monkeypatch.setattr(dm, "_time", _fake_timer({(32, 16, 2): 1.0, "original": 10.0}))
    real = dm.splitk_matmul

    def build_fails(x, w, b, config, **kw):
        if config[0] == 16:
            raise RuntimeError("out of shared memory")
        return real(x, w, b, config, **kw)

    monkeypatch.setattr(dm, "splitk_matmul", build_fails)
    assert dm._measure(4, 64, 48, True, True, torch.float32, torch.device("cpu"))[0] == (32, 16, 2)
    monkeypatch.setattr(dm, "splitk_matmul", lambda x, w, b, config, **kw: real(x, w, b, config, **kw) * 1.01)
    config, _, _, why = dm._measure(4, 64, 48, True, True, torch.float32, torch.device("cpu"))
    assert config is None and why.startswith("config (16, 16, 2) differs from cuBLAS")


def test_plan_tables_the_shapes_measured_faster_once_per_shape(monkeypatch):
    monkeypatch.setattr(dm, "_measurable", lambda device: True)
    monkeypatch.setattr(dm, "_CHOICES", {})
    measured = []

    def measure(M, K, N, k_major, has_bias, dtype, device):
        measured.append((K, N))
        faster = k_major and N > K  # (the toy's c_attn and c_fc)
        return ((16, 16, 2) if faster else None), 1e-6, 3e-6, ""

    monkeypatch.setattr(dm, "_measure", measure)
    model = gpt2_numbers(1, n_layer=2).half()
    table, why = dm.plan(model, 4, torch.float16, "cpu")
    assert table == {dm.signature(4, 16, 48, True, True, torch.float16, "cpu"): (16, 16, 2),
                     dm.signature(4, 16, 64, True, True, torch.float16, "cpu"): (16, 16, 2)}
    assert why == "split-K for 2 of 5 matmul shapes, 4.0 of 15.0 us per pass over them saved by their timing"
    assert dm.plan(model, 4, torch.float16, "cpu") == (table, why) and len(measured) == 5  # (cached)
    dm.plan(model, 8, torch.float16, "cpu")  # another batch: measured again
    assert len(measured) == 10
    # float32 weights are left to cuBLAS unmeasured
    assert dm.plan(gpt2_numbers(1, n_layer=2), 4, torch.float32, "cpu") == (
        {}, "cuBLAS: torch.float32 is not planned (the kernel is for half-precision weights)")
    assert len(measured) == 10


def test_plan_keeps_cublas_for_a_shape_whose_measurement_fails(monkeypatch):
    """An error while measuring (the timer's graph capture, say) is noted and cached; the other
    shapes still get their verdicts."""
    monkeypatch.setattr(dm, "_measurable", lambda device: True)
    monkeypatch.setattr(dm, "_CHOICES", {})

    def measure(M, K, N, k_major, has_bias, dtype, device):
        if N == 48:
            raise RuntimeError("operation not permitted when stream is capturing")
        return (16, 16, 1), 1e-6, 2e-6, ""

    monkeypatch.setattr(dm, "_measure", measure)
    table, why = dm.plan(gpt2_numbers(1, n_layer=2).half(), 4, torch.float16, "cpu")
    assert len(table) == 4 and dm.signature(4, 16, 48, True, True, torch.float16, "cpu") not in table
    assert why.endswith("; 16x48: RuntimeError: operation not permitted when stream is capturing")


def test_signatures_key_the_device_type_only():
    """A table belongs to one model on one device: "cuda" and "cuda:0" (a parameter's device) are
    the same key."""
    a = dm.signature(64, 1600, 4800, True, True, torch.bfloat16, "cuda")
    assert a == dm.signature(64, 1600, 4800, True, True, torch.bfloat16, torch.device("cuda", 0))
    assert a != dm.signature(64, 1600, 4800, True, True, torch.bfloat16, "cpu")


def test_mode_leaves_a_bias_of_another_length_and_mixed_dtypes_without_autocast_to_the_original(monkeypatch):
    monkeypatch.setattr(dm, "splitk_matmul", lambda *a, **kw: pytest.fail("the kernel ran"))
    x, w = torch.randn(4, 32), torch.randn(32, 48)
    table = {dm.signature(4, 32, 48, True, True, torch.float32, "cpu"): (16, 16, 1)}
    with dm.active(table):
        torch.addmm(torch.randn(1), x, w)  # (broadcast bias: the original's business)
        with pytest.raises(RuntimeError):  # (the original refuses mixed dtypes: so must we)
            torch.addmm(torch.randn(48, dtype=torch.float64), x, w)
    table16 = {dm.signature(4, 32, 48, True, True, torch.float16, "cpu"): (16, 16, 1)}
    with torch.autocast("cpu", dtype=torch.float16), dm.active(table16):
        with pytest.raises(RuntimeError):  # (autocast never casts float64: nor may we)
            torch.addmm(torch.randn(48), x.double(), w.half())


def test_under_autocast_the_bias_is_rounded_to_autocasts_dtype_before_the_sum(monkeypatch):
    """Bit for bit what autocast's addmm gives where it matters: x @ W = 1 exactly and the float32
    bias 2^-11 (1 + 2^-12). Rounded to float16 first (as autocast does), the bias is 2^-11 and
    1 + 2^-11 rounds to even, 1.0; added unrounded it would tip the sum to 1 + 2^-10."""
    x = torch.zeros(4, 16)
    x[:, 0] = 1.0
    w = torch.zeros(16, 16, dtype=torch.float16)
    w[0, :] = 1.0
    bias = torch.full((16,), 2.0 ** -11 * (1 + 2.0 ** -12))
    table = {dm.signature(4, 16, 16, True, True, torch.float16, "cpu"): (16, 16, 1)}
    with torch.autocast("cpu", dtype=torch.float16):
        want = torch.addmm(bias, x, w)
        with dm.active(table):
            got = torch.addmm(bias, x, w)
    assert torch.equal(want, torch.ones(4, 16, dtype=torch.float16))
    assert torch.equal(got, want)


class _FakeMatmul:
    """Stands for torch.backends.cuda.matmul after something set the newer fp32_precision API."""
    def __init__(self, precision):
        self.fp32_precision = precision

    @property
    def allow_tf32(self):
        raise RuntimeError("you have used mix of the legacy and new APIs to set the TF32 status")


@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_the_kernel_multiplies_float32_in_full_precision_unless_tf32_is_allowed(monkeypatch, precision):
    """The launch's IEEE flag follows torch's float32 matmul setting, through the legacy flag or
    (where torch refuses to read that once the new API was used) the new one; half precision
    never asks for it. The interpreter ignores the flag: the launch is spied on."""
    launches = []
    mm, red = dm._kernels()

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                launches.append(kw["IEEE"])
                return mm[grid](*a, **kw)
            return launch

    monkeypatch.setattr(dm, "_KERNELS", [Spy(), red])
    x, w = torch.randn(4, 32), torch.randn(32, 16)
    dm.splitk_matmul(x, w, None, (16, 16, 1))
    dm.splitk_matmul(x.half(), w.half(), None, (16, 16, 1))
    assert launches == [True, False]
    monkeypatch.setattr(torch.backends.cuda, "matmul", _FakeMatmul(precision))
    dm.splitk_matmul(x, w, None, (16, 16, 1))
    assert launches[-1] == (precision == "ieee")
    assert dm.tolerance(torch.float32, 1.0) == (5e-3 if precision == "tf32" else 1e-4)


@pytest.mark.parametrize("engine_mode,dropped", [("auto", True), ("kernel", False)])
def test_a_failed_capture_drops_the_measured_tables_under_auto(monkeypatch, engine_mode, dropped):
    """"auto" chose the kernel for replayed steps; eagerly the mode and Triton's launcher cost more
    than they save, so a decoder that cannot capture goes back to cuBLAS (and says so). Forced
    ("kernel") tables stay."""
    from minillm_cli.engine.sampler import SamplingParams

    monkeypatch.setattr(fast_sampler, "DECODE_MATMUL", engine_mode)
    models = {name: fast_sampler.make_model(gpt2_numbers(seed, n_layer=1), TOY_V, 4, 16, "cpu")
              for seed, name in enumerate(("student", "teacher"))}
    dec = fast_sampler.make_decoder(models, B=4, P=6, T=8, L=16, alpha=0.5, params=SamplingParams(8),
                                    eos_id=TOY_EOS, pad_id=TOY_PAD, vocab_size=TOY_V, device="cpu")
    for m in models.values():
        m.matmul_table = {"sig": (64, 64, 2)}
    dec.matmul_notes = {"student": (True, "planned")}
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        dec._give_up_capture(RuntimeError("not capturable"))
    assert all((m.matmul_table is None) is dropped for m in models.values())
    if dropped:
        assert dec.matmul_notes == {name: (False, "cuBLAS: the step is not captured") for name in models}
    else:
        assert dec.matmul_notes == {"student": (True, "planned")}

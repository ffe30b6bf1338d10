"""Resuming across optimizer implementations: `distill` and `sft` build the fused AdamW on CUDA
(one process, no FSDP) and the per-tensor one elsewhere, and a checkpoint of either must resume
into the other (engine/checkpoint.py keeps the run's implementation)."""
from __future__ import annotations

import pytest
import torch


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()


@pytest.mark.parametrize("saved_fused,run_fused", [(False, True), (True, False)])
def test_a_resumed_optimizer_keeps_this_runs_implementation(tmp_path, saved_fused, run_fused):
    """`distill` builds the fused AdamW on CUDA and the per-tensor one elsewhere (and under FSDP);
    a checkpoint of either resumes into the other: the run's implementation stays, the moments
    and step counts come from the checkpoint, and the next step is the one the saved optimizer
    would have taken."""
    from minillm_cli.engine import checkpoint as ckpt
    from minillm_cli.engine.train_utils import make_optimizer

    def model_and_opt(fused):
        model = _model()
        return model, make_optimizer(model, 1e-2, 0.1, fused=fused)

    def step(model, opt, seed):
        x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
        opt.step()

    saved_model, saved_opt = model_and_opt(saved_fused)
    for s in range(3):
        step(saved_model, saved_opt, s)
    ckpt.save_checkpoint(tmp_path, 3, model=saved_model, optimizer=saved_opt, scheduler=None)
    model, opt = model_and_opt(run_fused)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), model=model, optimizer=opt, scheduler=None)
    assert all(bool(g.get("fused")) == run_fused for g in opt.param_groups)
    assert all(g.get("foreach") is (None if run_fused else False) for g in opt.param_groups)
    step(saved_model, saved_opt, 3)
    step(model, opt, 3)
    for a, b in zip(model.parameters(), saved_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)

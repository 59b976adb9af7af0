"""The DPO loss against an independent computation on fixed numbers."""

import math

import pytest
import torch

from trainer.dpo import dpo_loss, response_logprobs


def test_loss_matches_the_formula_computed_by_hand():
    pc, pr = torch.tensor([-10.0, -4.0, -7.5]), torch.tensor([-12.0, -3.0, -7.5])
    rc, rr = torch.tensor([-11.0, -4.5, -6.0]), torch.tensor([-11.5, -2.0, -9.0])
    beta = 0.1
    losses, margins = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(3):
        z = beta * ((pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item()))
        assert losses[i].item() == pytest.approx(math.log1p(math.exp(-z)), rel=1e-6)
        assert margins[i].item() == pytest.approx(z, rel=1e-6)
    # no preference learnt yet (policy == reference): log 2
    assert dpo_loss(rc, rr, rc, rr, 0.5)[0].tolist() == pytest.approx([math.log(2)] * 3)


def test_response_logprobs_score_only_response_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 5, 4, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])  # prompt 2 / 1 tokens; row 2 padded
    got = response_logprobs(logits, ids, mask)
    lp = torch.log_softmax(logits, -1)
    expected = [lp[0, 1, 3] + lp[0, 2, 4] + lp[0, 3, 5], lp[1, 0, 5] + lp[1, 1, 4]]
    assert got.tolist() == pytest.approx([e.item() for e in expected], rel=1e-5)


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    losses, _ = dpo_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.2)
    losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.1) and pr.grad.item() == pytest.approx(0.1)

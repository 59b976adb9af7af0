"""The DPO objective (Rafailov et al., arXiv 2305.18290), sigmoid form, on response tokens only.

    loss = -logsigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r)))

``logp_*`` are the summed log-probs of the chosen / rejected response tokens under the policy
(the ``train`` adapter), ``ref_*`` the same under the reference (adapter disabled), computed once
per pair. trl has no standalone loss function; its ``selective_log_softmax`` gathers the token
log-probs without materialising the full log-softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trl.trainer.utils import selective_log_softmax


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of the response tokens of each row.

    logits (B, T, V) from a forward over ``input_ids`` (B, T); ``response_mask`` (B, T) is 1 on
    response tokens (the ones scored), 0 on prompt and padding. Token t is predicted at t - 1.
    """
    token_lp = selective_log_softmax(logits[:, :-1].float(), input_ids[:, 1:])  # (B, T - 1)
    return (token_lp * response_mask[:, 1:]).sum(-1)  # (B,)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and implicit reward margins (B,) (``beta * (chosen - rejected)``
    log-ratio difference, detached)."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin.detach()

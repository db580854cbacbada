"""Direct Preference Optimization (Rafailov et al., 2023) as the training loop's objective: for a prompt x with a
chosen reply y_w and a rejected one y_l,

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

where log p(y|x) sums the reply's token log-probabilities (its target tokens) and ref is the frozen starting point:
a copy of the base model, or with LoRA the same weights with the adapters off (no second copy in memory).
The implicit rewards beta * (log pi - log ref) of chosen and rejected give the logged reward accuracy (how often
the chosen one scores higher) and margin. A batch holds the chosen sequences first, then the rejected ones in the
same order (data.get_pair_batch on a preferences dataset).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import LoRALinear, adapters_disabled


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability of its target tokens (where loss_mask is 1): (B, T, V) -> (B,). The
    target's logit less the logsumexp, so no second (B, T, V) tensor (a log-softmax) is kept for backward."""
    logits = logits.float()
    logp = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (logp * loss_mask.to(logp.dtype)).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean DPO loss over the rows, and the rewards' statistics (each a 0-dim tensor)."""
    chosen, rejected = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, {"reward_accuracy": (chosen > rejected).float().mean(), "reward_margin": (chosen - rejected).mean(),
                  "reward_chosen": chosen.mean(), "reward_rejected": rejected.mean()}


class DPOObjective(nn.Module):
    """policy(x, y, attention_mask, loss_mask) -> (statistics, DPO loss): called where the loop calls the model.
    policy may be the DDP- or compile-wrapped model; model is the raw one (its adapters, its reference copy)."""

    def __init__(self, policy: nn.Module, model: nn.Module, beta: float, reference: nn.Module | None = None):
        """reference: the starting model (default: a copy of model as it is now); unused with LoRA adapters."""
        super().__init__()
        self.policy, self.beta = policy, beta
        self.uses_lora = any(isinstance(m, LoRALinear) for m in model.modules())
        self._model = [model]  # not a submodule: its parameters are the policy's, counted once
        self._reference = [None]  # not a submodule either: train() and eval() of the objective never reach it
        if not self.uses_lora:  # the starting weights, frozen, always in eval mode (no dropout)
            self._reference[0] = (reference if reference is not None else copy.deepcopy(model)).eval()
            self._reference[0].requires_grad_(False)

    @property
    def reference(self) -> nn.Module | None:
        """The frozen copy of the starting model; None under LoRA (the adapters switch off instead)."""
        return self._reference[0]

    def no_sync(self):
        """DDP's no_sync of the policy, for gradient accumulation."""
        return self.policy.no_sync()

    @torch.no_grad()
    def reference_logprobs(self, x, y, attention_mask, loss_mask) -> torch.Tensor:
        model = self.reference
        if model is None:
            model = self._model[0]
            was_training = model.training
            model.eval()
            try:
                with adapters_disabled(model):
                    logits, _ = model(x, attention_mask=attention_mask)
            finally:
                model.train(was_training)
        else:
            logits, _ = model(x, attention_mask=attention_mask)
        return sequence_logprobs(logits, y, loss_mask)

    def forward(self, x, y, attention_mask=None, loss_mask=None):
        ref = self.reference_logprobs(x, y, attention_mask, loss_mask)
        logits, _ = self.policy(x, attention_mask=attention_mask)
        policy = sequence_logprobs(logits, y, loss_mask)
        n = x.shape[0] // 2
        loss, stats = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.beta)
        return stats, loss

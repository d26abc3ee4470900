"""Recovery losses, as pure functions of logits [batch, seq, vocab] and token ids [batch, seq].

- next-token cross-entropy: position t predicts token t + 1 (the last position predicts nothing);
- distillation: KL(teacher || student) between the two softmaxes at temperature T, scaled by T**2 so
  that its gradients keep their size as T changes (Hinton et al., 2015), over the same positions;
- the recovery loss mixes them: alpha * distillation + (1 - alpha) * cross-entropy.
All are means over predicted positions, computed in fp32 whatever the logits' dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    predicted = logits[:, :-1].float()
    return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), ids[:, 1:].reshape(-1))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """T**2 * mean over positions of sum_v p_teacher(v) (log p_teacher(v) - log p_student(v))."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1).reshape(-1, vocab)
    teacher = F.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1).reshape(-1, vocab)
    # log_target: exp(teacher) * (teacher - student), exactly 0 where the two are the same tensor
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum") / student.shape[0]
    return kl * temperature ** 2


def recovery_loss(student_logits: torch.Tensor, ids: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                  temperature: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """Cross-entropy alone without a teacher; with one, alpha * KL + (1 - alpha) * cross-entropy."""
    if teacher_logits is None:
        return next_token_loss(student_logits, ids)
    kl = distillation_loss(student_logits, teacher_logits, temperature)
    if alpha == 1.0:
        return kl
    return alpha * kl + (1.0 - alpha) * next_token_loss(student_logits, ids)

"""distill.py's loss against TRL 1.16's, loss and gradient, to float precision. Runs inside TRL's virtualenv:

    python benchmarks/vs_trl.py --setup                                              # once
    benchmarks/.venvs/trl-1.16/bin/python benchmarks/vs_trl_distill_loss.py

TRL has two implementations of the generalized JSD, and both are checked for beta in {0, 0.3, 0.5, 0.9, 1} and
temperatures 1 and 2, on masked batches over a 32k vocabulary:
  * GKDTrainer.generalized_jsd_loss (trl/experimental/gkd), logits in, the mean over unmasked tokens, against
    distill.generalized_jsd_loss: the loss, and its gradient with respect to the student's logits;
  * DistillationTrainer's loss, _chunked_divergence_loss (trl/trainer/distillation_trainer.py over
    trl/kernels/chunked_divergence.py), hidden states and output-layer weights in, against distill.py's training path,
    ChunkedDistillationLoss (chunk_size 64, so several chunks): the loss (summed over tokens, divided by the token
    count, as the script's num_items_in_batch division does), the per-token entropies' mean (TRL's "entropy"
    metric), and the gradients with respect to the student's hidden states and output-layer weight.
It prints the largest absolute differences, fails if one exceeds 1e-5 (losses and gradients are O(1e-1..1e-4)), and
then prints the values of GKDTrainer.generalized_jsd_loss on a small fixed input, which tests/test_distill_unit.py
holds as frozen numbers (TRL is not a dependency of the project, so the tests cannot call it).
"""

import itertools
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trl  # noqa: E402
from trl.experimental.gkd import GKDTrainer  # noqa: E402
from trl.trainer.distillation_trainer import _chunked_divergence_loss  # noqa: E402

from distill import ChunkedDistillationLoss, generalized_jsd_loss, token_losses  # noqa: E402

BETAS = [0.0, 0.3, 0.5, 0.9, 1.0]
TEMPERATURES = [1.0, 2.0]
TOLERANCE = 1e-5


class Head(torch.nn.Module):
    """A stand-in model for ChunkedDistillationLoss: only the output layer (and an empty config) is read."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.lm_head.weight = torch.nn.Parameter(weight)
        self.config = SimpleNamespace(get_text_config=lambda: SimpleNamespace())

    def get_output_embeddings(self):
        return self.lm_head


def small_fixed_input() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1, 3, 5) student and teacher logits from sines (no RNG, so any torch version builds the same), mask 1 1 0."""
    position = torch.arange(15, dtype=torch.float32).view(1, 3, 5)
    return 2 * torch.sin(1.3 * position), 1.5 * torch.cos(0.7 * position + 0.5), torch.tensor([[True, True, False]])


def main() -> None:
    print(f"TRL {trl.__version__}, torch {torch.__version__}")
    torch.manual_seed(0)
    batch, length, vocab, hidden_student, hidden_teacher = 4, 24, 32000, 64, 96
    mask = torch.rand(batch, length) < 0.7
    worst = {}
    for beta, temperature in itertools.product(BETAS, TEMPERATURES):
        # 1. GKD's generalized_jsd_loss on logits (labels -100 where masked out).
        student = (3 * torch.randn(batch, length, vocab)).requires_grad_()
        teacher = 3 * torch.randn(batch, length, vocab)
        labels = torch.where(mask, 1, -100)
        theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
        (their_grad,) = torch.autograd.grad(theirs, student)
        ours = generalized_jsd_loss(student, teacher, mask, beta=beta, temperature=temperature)
        (our_grad,) = torch.autograd.grad(ours, student)
        differences = {"GKD loss": (ours - theirs).abs().item(), "GKD grad": (our_grad - their_grad).abs().max().item()}

        # 2. DistillationTrainer's chunked loss on hidden states and output-layer weights.
        student_hidden = torch.randn(batch, length, hidden_student).requires_grad_()
        teacher_hidden = torch.randn(batch, length, hidden_teacher)
        student_weight = (torch.randn(vocab, hidden_student) / 4).requires_grad_()
        teacher_weight = torch.randn(vocab, hidden_teacher) / 4
        loss, entropy_sum, count = _chunked_divergence_loss(student_hidden, teacher_hidden, student_weight,
                                                            teacher_weight, mask, beta, temperature=temperature)
        their_grads = torch.autograd.grad(loss, [student_hidden, student_weight])
        token_loss = lambda s, t, y: token_losses(s, t, y, "jsd", beta, temperature)  # noqa: E731
        student_model, teacher_model = Head(student_weight), Head(teacher_weight)
        loss_sum, _, entropy = ChunkedDistillationLoss.apply(
            token_loss, student_model.lm_head, teacher_model.lm_head, 64, student_hidden[mask], teacher_hidden[mask],
            torch.zeros(int(mask.sum()), dtype=torch.long), student_model.lm_head.weight)
        ours = loss_sum / mask.sum()
        our_grads = torch.autograd.grad(ours, [student_hidden, student_model.lm_head.weight])
        differences.update({
            "chunked loss": (ours - loss).abs().item(),
            "chunked entropy": (entropy.mean() - entropy_sum / count).abs().item(),
            "chunked grad hidden": (our_grads[0] - their_grads[0]).abs().max().item(),
            "chunked grad weight": (our_grads[1] - their_grads[1]).abs().max().item()})
        print(f"beta {beta} temperature {temperature}: loss {theirs.item():.6f} (GKD) {loss.item():.6f} (chunked); "
              + ", ".join(f"{key} {value:.2e}" for key, value in differences.items()))
        for key, value in differences.items():
            worst[key] = max(worst.get(key, 0.0), value)
    print("largest absolute differences: " + ", ".join(f"{key} {value:.2e}" for key, value in worst.items()))

    student, teacher, mask = small_fixed_input()
    frozen = {(beta, temperature): GKDTrainer.generalized_jsd_loss(student, teacher, labels=torch.where(mask, 1, -100),
                                                                   beta=beta, temperature=temperature).item()
              for beta, temperature in itertools.product(BETAS, TEMPERATURES)}
    print("GKDTrainer.generalized_jsd_loss on small_fixed_input(), for tests/test_distill_unit.py:")
    print("{" + ", ".join(f"({beta}, {temperature}): {value!r}" for (beta, temperature), value in frozen.items()) + "}")
    if max(worst.values()) > TOLERANCE:
        raise SystemExit(f"vs_trl_distill_loss.py: error: a difference exceeds {TOLERANCE}")


if __name__ == "__main__":
    main()

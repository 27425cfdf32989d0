"""DINO CLS-token loss (reference: dinov2/loss/dino_clstoken_loss.py), centering by lagged EMA or Sinkhorn-Knopp."""
import torch
import torch.nn.functional as F

from celldino.kernels import sinkhorn_knopp

from .centering import LaggedCenter


def dino_cross_entropy(student_output_list, teacher_probs_list, student_temp):
    """-sum over (student chunk, teacher chunk) pairs of the row mean of sum_k t_k log softmax(s / T)_k (fp32)."""
    total_loss = 0
    for student_output in student_output_list:
        log_probs = F.log_softmax(student_output.float() / student_temp, dim=-1)
        for teacher_probs in teacher_probs_list:
            total_loss = total_loss - torch.sum(teacher_probs * log_probs, dim=-1).mean()
    return total_loss


class DINOLoss(LaggedCenter):
    cross_entropy = staticmethod(dino_cross_entropy)  # compile_cross_entropy() swaps in a compiled one

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9, group=None):
        super().__init__((1, out_dim), center_momentum, group)
        self.student_temp = student_temp

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output, teacher_temp):
        return self.centered_softmax(teacher_output, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        # global row count = rows per rank x world (the default of the kernel)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations, group=self.group)

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list):
        """Cross-entropy summed over every (student chunk, teacher chunk) pair, each pair averaged over rows."""
        return self.cross_entropy(list(student_output_list), list(teacher_out_softmaxed_centered_list),
                                  self.student_temp)

    @torch.no_grad()
    def update_center(self, teacher_output):
        self.reduce_center_update(teacher_output)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output):
        # center <- m * center + (1 - m) * (sum of all teacher rows over all ranks) / (rows x world)
        self.launch_center_update(torch.sum(teacher_output, dim=0, keepdim=True), len(teacher_output))

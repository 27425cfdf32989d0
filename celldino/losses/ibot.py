"""iBOT masked-patch loss (reference: dinov2/loss/ibot_patch_loss.py)."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from celldino.dist import several_ranks
from celldino.kernels import sinkhorn_knopp

from .centering import LaggedCenter


def patch_cross_entropy(teacher_probs, student_logits, student_temp):
    """sum_k t_k log softmax(s / T)_k per row (the reference's `lossfunc`, fp32)."""
    return torch.sum(teacher_probs.float() * F.log_softmax(student_logits.float() / student_temp, dim=-1), dim=-1)


class iBOTPatchLoss(LaggedCenter):  # noqa: N801 - reference name
    cross_entropy = staticmethod(patch_cross_entropy)  # compile_cross_entropy() swaps in a compiled one

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9, group=None):
        super().__init__((1, 1, patch_out_dim), center_momentum, group)
        self.student_temp = student_temp

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens, teacher_temp):
        return self.centered_softmax(teacher_patch_tokens, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        """Rows are the masked patches of this rank; B is the masked-patch count summed over ranks.

        Unlike the reference we all-reduce a copy (the reference reduces the batch's tensor in place) and skip the
        reduction when not distributed (the reference calls it unconditionally)."""
        n_rows = n_masked_patches_tensor.detach()
        if several_ranks(self.group):  # the collective runs on the group's device
            n_rows = n_rows.clone().to(teacher_output.device)
            dist.all_reduce(n_rows, group=self.group)
        # one process: the collated count stays on the host, so reading it does not wait for the GPU
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations,
                              n_rows=float(n_rows.sum().item()), group=self.group)

    def forward(self, student_patch_tokens, teacher_patch_tokens, student_masks_flat):
        """Dense variant: (B, N, K) tokens, (B, N) masks; mean over images of the per-image masked mean."""
        loss = self.cross_entropy(teacher_patch_tokens, student_patch_tokens, self.student_temp)
        mask = student_masks_flat.float()
        loss = torch.sum(loss * mask, dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
        return -loss.mean()

    def forward_masked(self, student_patch_tokens_masked, teacher_patch_tokens_masked, student_masks_flat,
                       n_masked_patches=None, masks_weight=None):
        """Packed variant: rows are the masked patches only; each weighted by 1/(masked count of its image),
        summed, and divided by the number of global crops (masked or not)."""
        loss = self.cross_entropy(teacher_patch_tokens_masked, student_patch_tokens_masked, self.student_temp)
        if masks_weight is None:
            per_image = 1 / student_masks_flat.sum(-1).clamp(min=1.0)
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        loss = loss * masks_weight
        return -loss.sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens):
        self.reduce_center_update(teacher_patch_tokens)

    @torch.no_grad()
    def reduce_center_update(self, teacher_patch_tokens):
        """teacher_patch_tokens: [n_masked, K] or the reference's [1, n_masked, K]; the batch center is the mean
        over this rank's masked patches, averaged over ranks (a mean of per-rank means, as the reference)."""
        if teacher_patch_tokens.dim() == 2:
            teacher_patch_tokens = teacher_patch_tokens.unsqueeze(0)
        self.launch_center_update(torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True),
                                  len(teacher_patch_tokens))

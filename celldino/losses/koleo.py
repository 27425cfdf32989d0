"""KoLeo regulariser (reference: dinov2/loss/koleo_loss.py) on top of `celldino.kernels.koleo_loss`."""
from torch import nn

from celldino import kernels


class KoLeoLoss(nn.Module):
    """-mean log distance of each L2-normalised row to its nearest neighbour in the batch.

    distributed=True compares this rank's rows with the all-gathered global batch (DINOv3's distributed KoLeo);
    the reference (and the default here) uses the per-rank batch only.
    """

    def __init__(self, distributed=False, group=None):
        super().__init__()
        self.distributed = distributed
        self.group = group

    def forward(self, student_output, eps=1e-8):
        if self.distributed:
            return kernels.koleo_loss_distributed(student_output, eps=eps, group=self.group)
        return kernels.koleo_loss(student_output, eps=eps)

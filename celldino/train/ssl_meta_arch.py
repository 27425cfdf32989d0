"""Student / teacher networks and the Cell-DINO / DINOv2 objective (reference: dinov2/train/ssl_meta_arch.py).

`compute_losses(batch, teacher_temp)` returns the loss to backpropagate and a dict of its terms; the trainer owns
backward, clipping (`clip_gradients`, per student submodule), the optimizer (`get_params_groups`) and the EMA
(`update_teacher`). Compared with the reference:
- the student heads run once on one concatenated [rows, D] buffer (no xFormers BlockDiagonalMask needed: a head is
  row-wise, so concatenation is exact);
- the logged `koleo_loss` and `ibot_loss` are the values actually optimised (the reference logs them halved); the
  DINO / iBOT terms are logged before dino.loss_weight / ibot.loss_weight (as the reference), so their sum is the
  optimised loss when those weights are 1;
- KoLeo runs in fp32 whatever the compute dtype (the reference: fp16, where its eps underflows);
- student.pretrained_weights loads strictly (the reference: strict=False).
"""
import logging

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from celldino.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from celldino.models import DINOHead, build_model_from_cfg

from .optim import clip_grad_norm, local_shard
from .param_groups import fuse_params_groups, get_params_groups_with_decay

logger = logging.getLogger("celldino")


def _at_least_fp32(x):
    return x if x.dtype == torch.float64 else x.float()


def _load_pretrained(backbone, path):
    """Initialise the student backbone from a checkpoint (any format celldino reads), strictly: the reference
    loads with strict=False, which silently keeps random weights for every key that does not match."""
    from celldino.models.checkpoint import load_backbone_state_dict, load_state_dict_strict
    state_dict, _ = load_backbone_state_dict(path)
    load_state_dict_strict(backbone, state_dict, source=str(path))
    logger.info("student backbone initialised from %s", path)


def _make_head(cfg_section, embed_dim):
    return DINOHead(in_dim=embed_dim, out_dim=cfg_section.head_n_prototypes, hidden_dim=cfg_section.head_hidden_dim,
                    bottleneck_dim=cfg_section.head_bottleneck_dim, nlayers=cfg_section.head_nlayers)


class SSLMetaArch(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        student_backbone, teacher_backbone, embed_dim = build_model_from_cfg(cfg)
        if cfg.student.pretrained_weights:
            _load_pretrained(student_backbone, cfg.student.pretrained_weights)
        self.embed_dim = embed_dim
        student, teacher = {"backbone": student_backbone}, {"backbone": teacher_backbone}

        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.ibot_separate_head = cfg.ibot.separate_head
        if self.do_dino or self.do_ibot:
            student["dino_head"] = _make_head(cfg.dino, embed_dim)
            teacher["dino_head"] = _make_head(cfg.dino, embed_dim)
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        self.koleo_loss = KoLeoLoss(distributed=bool(cfg.dino.get("koleo_distributed", False)))
        if self.do_ibot:
            if max(cfg.ibot.mask_ratio_min_max) <= 0 or cfg.ibot.mask_sample_probability <= 0:
                raise ValueError("ibot.loss_weight > 0 needs ibot.mask_ratio_min_max and "
                                 "ibot.mask_sample_probability > 0")
            out_dim = cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
            self.ibot_patch_loss = iBOTPatchLoss(out_dim)
            if self.ibot_separate_head:
                student["ibot_head"] = _make_head(cfg.ibot, embed_dim)
                teacher["ibot_head"] = _make_head(cfg.ibot, embed_dim)
        self.student = nn.ModuleDict(student)
        self.teacher = nn.ModuleDict(teacher)
        self._step_params_cache = None  # see _step_params
        self._teacher_fsdp_modules = None  # see reshard_teacher
        # the teacher starts as a copy of the student and is only ever updated by EMA
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        logger.info("student and teacher built: %s, embed dim %d", cfg.student.arch, embed_dim)

    def get_params_groups(self):
        """Optimizer groups of every student submodule, fused per submodule (as the reference)."""
        groups = []
        for module in self.student.values():
            groups += fuse_params_groups(get_params_groups_with_decay(
                module, lr_decay_rate=self.cfg.optim.layerwise_decay,
                patch_embed_lr_mult=self.cfg.optim.patch_embed_lr_mult))
        return groups

    def clip_gradients(self, max_norm):
        """Clip each student submodule (backbone, heads) separately to max_norm, as the reference;
        returns {submodule: total norm before clipping}."""
        return {name: clip_grad_norm(params, max_norm) for name, params in self._step_params()["student"].items()}

    def _step_params(self):
        """The parameter objects that clipping and the EMA walk, listed once: walking the module tree every step
        cost ~7 ms of host time per step at ViT-L depth (profiled on CPU), time the GPU waits for when the step is
        host-bound. Listed at the first clip / EMA, never mid-forward: FSDP2 registers unsharded tensors while a
        module runs and its sharded DTensors (the same objects every step, updated in place by the optimizer, the
        EMA and checkpoint loads) outside."""
        cache = self._step_params_cache
        if cache is None:
            cache = {role: {key: list(module.parameters()) for key, module in getattr(self, role).items()}
                     for role in ("student", "teacher")}
            for key in cache["student"]:
                if len(cache["student"][key]) != len(cache["teacher"][key]):
                    raise RuntimeError(f"student/teacher {key} have different parameter lists")
            cache["ema"] = ([p for key in cache["student"] for p in cache["student"][key]],
                            [p for key in cache["student"] for p in cache["teacher"][key]])
            cache["sharded"] = any(isinstance(p, DTensor) for p in cache["ema"][0])
            self._step_params_cache = cache
        return cache

    def set_process_group(self, group):
        """Process group for the loss reductions (centering / Sinkhorn all-reduces)."""
        self.dino_loss.group = group
        self.koleo_loss.group = group
        if self.do_ibot:
            self.ibot_patch_loss.group = group

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # the teacher never uses dropout / drop-path
        return self

    # ---- teacher ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_targets(self, global_crops, mask_indices_list, n_masked_patches, n_masked_patches_tensor,
                        upperbound, teacher_temp):
        n_global = 2
        out = self.teacher.backbone.forward_features(global_crops)
        cls_tokens = out["x_norm_clstoken"].chunk(n_global)
        # swap so that student crop A is matched with teacher crop B
        cls_tokens = torch.cat((cls_tokens[1], cls_tokens[0]))
        patch_tokens = out["x_norm_patchtokens"]
        n_cls = cls_tokens.shape[0]
        masked_patch_after_head = None
        if self.do_ibot:
            masked_patches = patch_tokens.flatten(0, 1).index_select(0, mask_indices_list)
            if not self.ibot_separate_head:
                after_head = self.teacher.dino_head(torch.cat((cls_tokens, masked_patches)))
                cls_after_head, masked_patch_after_head = after_head[:n_cls], after_head[n_cls:]
            else:
                cls_after_head = self.teacher.dino_head(cls_tokens)
                masked_patch_after_head = self.teacher.ibot_head(masked_patches)
        else:
            cls_after_head = self.teacher.dino_head(cls_tokens)

        centering = self.cfg.train.centering
        ibot_targets = None
        if centering == "centering":
            dino_targets = self.dino_loss.softmax_center_teacher(cls_after_head, teacher_temp)
            self.dino_loss.update_center(cls_after_head)
            if self.do_ibot:
                ibot_targets = self.ibot_patch_loss.softmax_center_teacher(
                    masked_patch_after_head.unsqueeze(0), teacher_temp).squeeze(0)
                self.ibot_patch_loss.update_center(masked_patch_after_head)
        elif centering == "sinkhorn_knopp":
            dino_targets = self.dino_loss.sinkhorn_knopp_teacher(cls_after_head, teacher_temp)
            if self.do_ibot:
                ibot_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                    masked_patch_after_head, teacher_temp, n_masked_patches_tensor)
        else:
            raise ValueError(f"train.centering: unknown {centering!r} (centering | sinkhorn_knopp)")
        return dino_targets.view(n_global, -1, *dino_targets.shape[1:]), ibot_targets

    # ---- student + losses --------------------------------------------------------------------------------------

    def compute_losses(self, batch, teacher_temp):
        """The reference objective on one collated batch; returns (loss to backprop, {term: detached value})."""
        device = next(self.student.parameters()).device
        n_global, n_local = 2, self.cfg.crops.local_crops_number
        global_crops = batch["collated_global_crops"].to(device, non_blocking=True)
        local_crops = batch["collated_local_crops"].to(device, non_blocking=True)
        masks = batch["collated_masks"].to(device, non_blocking=True)
        mask_indices_list = batch["mask_indices_list"].to(device, non_blocking=True)
        n_masked_patches_tensor = batch["n_masked_patches"]  # on the host (Sinkhorn-Knopp reads it, no device sync)
        masks_weight = batch["masks_weight"].to(device, non_blocking=True)
        n_masked_patches = mask_indices_list.shape[0]
        upperbound = int(batch["upperbound"])

        n_local_terms = max(n_local * n_global, 1)
        n_global_terms = (n_global - 1) * n_global
        n_terms = n_global_terms + n_local_terms

        dino_targets, ibot_targets = self.teacher_targets(
            global_crops, mask_indices_list, n_masked_patches, n_masked_patches_tensor, upperbound, teacher_temp)
        self.reshard_teacher()

        crops, crop_masks = [global_crops], [masks]
        if n_local > 0:
            crops.append(local_crops)
            crop_masks.append(None)
        outputs = self.student.backbone.forward_features_list(crops, crop_masks)
        global_out = outputs[0]
        local_cls = outputs[1]["x_norm_clstoken"] if n_local > 0 else None
        global_cls = global_out["x_norm_clstoken"]

        head_inputs = ([local_cls] if n_local > 0 else []) + [global_cls]
        masked_student_patches = None
        if self.do_ibot:
            masked_student_patches = global_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices_list)
            if not self.ibot_separate_head:
                head_inputs.append(masked_student_patches)
        sizes = [t.shape[0] for t in head_inputs]
        head_outputs = list(self.student.dino_head(torch.cat(head_inputs)).split(sizes))
        local_after_head = head_outputs.pop(0) if n_local > 0 else None
        global_after_head = head_outputs.pop(0)
        if self.do_ibot:
            if self.ibot_separate_head:
                masked_after_head = self.student.ibot_head(masked_student_patches)
            else:
                masked_after_head = head_outputs.pop(0)

        losses = {}
        total = global_cls.new_zeros(())
        if n_local > 0:
            losses["dino_local_crops_loss"] = self.dino_loss(
                local_after_head.chunk(n_local), dino_targets) / n_terms
            total = total + self.cfg.dino.loss_weight * losses["dino_local_crops_loss"]
        if self.do_dino:
            losses["dino_global_crops_loss"] = self.dino_loss(
                [global_after_head], [dino_targets.flatten(0, 1)]) * 2 / n_terms
            total = total + self.cfg.dino.loss_weight * losses["dino_global_crops_loss"]
            if self.do_koleo:
                # in fp32 whatever the compute dtype (the reference runs it in fp16, where eps=1e-8 underflows)
                losses["koleo_loss"] = self.cfg.dino.koleo_loss_weight * sum(
                    self.koleo_loss(_at_least_fp32(p)) for p in global_cls.chunk(n_global))
                total = total + losses["koleo_loss"]
        if self.do_ibot:
            # x2 (the two global crops are processed together) x 1/2 (ibot_loss_scale) = x1, as the reference
            losses["ibot_loss"] = self.ibot_patch_loss.forward_masked(
                masked_after_head, ibot_targets, student_masks_flat=masks, n_masked_patches=n_masked_patches,
                masks_weight=masks_weight)
            total = total + self.cfg.ibot.loss_weight * losses["ibot_loss"]
        return total, {k: v.detach() for k, v in losses.items()}

    def reshard_teacher(self):
        """Free the teacher's gathered parameters (FSDP2 keeps the root's gathered after forward, expecting a
        backward that never comes for the teacher); the EMA then runs on shards (the reference's
        reshard_fsdp_model)."""
        if self._teacher_fsdp_modules is None:
            self._teacher_fsdp_modules = [m for m in self.teacher.modules() if isinstance(m, FSDPModule)]
        for module in self._teacher_fsdp_modules:
            module.reshard()

    # ---- teacher EMA ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def update_teacher(self, momentum):
        """teacher <- m * teacher + (1 - m) * student, one foreach lerp over all parameters (one pass over the
        teacher instead of the reference's mul_ then add_; as accurate or better: tested against float64)."""
        cache = self._step_params()
        student_params, teacher_params = cache["ema"]
        if cache["sharded"]:  # FSDP2: both are sharded alike, so the update runs on the local shards
            student_params = [local_shard(p) for p in student_params]
            teacher_params = [local_shard(p) for p in teacher_params]
        torch._foreach_lerp_(teacher_params, student_params, 1 - momentum)

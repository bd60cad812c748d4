"""`dydit finetune`: the DyDiT training task plugged into the shared training loop."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from dydit.dynamic.context import DynamicContext
from dydit.dynamic.convert import router_parameters
from dydit.dynamic.flops import dynamic_ratio, flops_spec
from dydit.dynamic.loss import flops_loss, target_at


@dataclass
class FinetuneConfig:
    """DyDiT fine-tuning options; each comment doubles as CLI help."""

    target: float = 0.5  # λ: target FLOPs ratio of the routed blocks (1.0 = static)
    flops_weight: float = 2.0  # w in w·(mean r − λ_t)²
    flops_balance: float = 0.0  # share of the FLOPs loss applied per quarter of the trajectory (needs stratified)
    ramp_steps: int = 100  # λ_t ramps linearly from 1.0 to λ over these steps
    warmup_steps: int = 100  # add the complete-model loss (routers bypassed) during these steps
    router_lr: float | None = None  # learning rate of the routers (default: the main lr)
    tau: float = 5.0  # gumbel-sigmoid temperature
    stratified: bool = True  # batch split into 4 groups covering the 4 quarters of the trajectory
    width: bool = True  # TDW (ablation: off = SDT only)
    tokens: bool = True  # SDT (ablation: off = TDW only)
    block_skip: bool = False  # ablation: per-block timestep gates that skip whole blocks
    reorder: bool = True  # rank heads/channels by weight magnitude before fine-tuning
    noise_anneal: float = 0.3  # gumbel noise decays linearly to 0 over this final share of the steps
    total_steps: int | None = None  # length of the run (set by the CLI; needed for the noise anneal)
    feedback_every: int = 25  # after the ramp, every N steps: measure the inference ratio, correct the target (0: off)
    feedback_images: int = 20  # images per feedback measurement (class-balanced: a multiple of the classes)
    feedback_sampler: str | None = None  # sampler of the measurement (default: ddim, or euler for flow models)
    feedback_steps: int = 20  # its sampling steps
    feedback_cfg: float = 4.0  # its guidance scale
    feedback_gain: float = 1.0  # share of each measured gap applied to the correction (< 1: damped)
    freeze_routers: float = 0.0  # fix the plan for this final share of the steps: hard eval masks, routers unchanged
    freeze_time_embed: bool = False  # with freeze_routers: fix the timestep embedder too (live and EMA), the width routers' input
    calibrate_at_freeze: bool = False  # with freeze_routers: calibrate the plan to λ at the freeze, so the backbone trains on it
    calib_images: int = 100  # images per calibration measurement (calibrate_at_freeze)
    distill: float = 0.0  # weight of ‖f_dynamic − f_static‖², output distillation from the frozen static model
    data_weight: float = 1.0  # weight of the backbone's own diffusion or flow loss

    def to_dict(self):
        return asdict(self)


class FinetuneTask:
    """Loss = L(dynamic) + [warm-up] L(complete) + w·(mean_b r_b − λ_t)² [+ d·‖f_dynamic − f_static‖²].

    Distillation (``distill`` = d > 0, not in the paper; needs ``teacher``, the static model the fine-tune
    starts from, kept frozen): on the same x_t, t and labels (the same dropped ones too), the dynamic
    model also regresses the static model's output, a lower-variance target than the sampled noise.

    Inference-ratio feedback: the FLOPs loss sees training inputs (x_t from q(x_t | x_0)), but the
    engine runs the sampler's own trajectory through the EMA backbone, where the same routers keep more
    tokens (λ=0.5 on Fashion-MNIST: 0.49 in training, 0.57 at inference). After the λ ramp, every
    ``feedback_every`` steps the task samples a few images with the fast engine (EMA backbone, live
    routers, the sampler the model will serve), and sets the FLOPs-loss target to λ − (inference ratio
    − training ratio), so training itself converges to a model that realises λ where it is used.
    """

    find_unused_parameters = True

    def __init__(self, model, cfg: FinetuneConfig, teacher=None):
        from dydit.diffusion.flow import FlowMatching
        from dydit.diffusion.gaussian import GaussianDiffusion

        if cfg.freeze_time_embed and cfg.freeze_routers <= 0:
            raise ValueError("freeze_time_embed fixes the plan together with freeze_routers: set freeze_routers > 0")
        if cfg.calibrate_at_freeze and cfg.freeze_routers <= 0:
            raise ValueError("calibrate_at_freeze calibrates the plan that freeze_routers fixes: set freeze_routers > 0")
        if cfg.flops_balance and not cfg.stratified:
            raise ValueError("flops_balance needs stratified timesteps (the quarters are the batch's strata)")
        if not 0.0 <= cfg.flops_balance <= 1.0:
            raise ValueError(f"flops_balance is a share in [0, 1], got {cfg.flops_balance}")
        if cfg.distill < 0 or cfg.data_weight < 0:
            raise ValueError(f"loss weights must be ≥ 0, got distill={cfg.distill}, data_weight={cfg.data_weight}")
        if cfg.distill > 0 and teacher is None:
            raise ValueError("distill > 0 needs the static model as teacher (FinetuneTask(model, cfg, teacher=...))")
        if cfg.distill == 0 and cfg.data_weight == 0:
            raise ValueError("data_weight=0 leaves only the FLOPs loss: set distill > 0, or keep data_weight")
        self.cfg = cfg
        self.teacher = None
        if cfg.distill > 0:
            self.teacher = teacher.eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        obj = model.config.objective
        self.process = GaussianDiffusion(learn_sigma=model.config.learn_sigma) if obj == "diffusion" else FlowMatching()
        self.spec = flops_spec(model)
        self.offset = 0.0  # inference ratio − training ratio, last measured
        self.inference_ratio = None
        self._acc = [0.0, 0]  # training ratios since the last feedback (sum, count)

    def configure_optimizer(self, model, train_cfg):
        routers = {id(p) for p in router_parameters(model)}
        base = [p for p in model.parameters() if p.requires_grad and id(p) not in routers]
        rparams = [p for p in model.parameters() if p.requires_grad and id(p) in routers]
        scale = (self.cfg.router_lr / train_cfg.lr) if self.cfg.router_lr else 1.0
        inner = getattr(model, "module", model)
        temb = {id(p) for p in inner.t_embedder.parameters()} if self.cfg.freeze_time_embed else set()
        groups = [{"params": [p for p in base if id(p) not in temb], "lr_scale": 1.0},
                  {"params": [p for p in base if id(p) in temb], "lr_scale": 1.0, "name": "time_embed"},
                  {"params": rparams, "lr_scale": scale}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
        self._opt = opt  # its groups are replaced when a resume loads the optimizer state
        return opt

    def loss(self, model, x, y, step, gen):
        B = len(x)
        t = self.process.sample_t(B, x.device, generator=gen, stratified=self.cfg.stratified)
        noise = torch.randn(x.shape, generator=gen).to(x.device)
        frozen = self.frozen(step)
        # frozen plan: the eval masks (no gradient reaches the routers), the backbone adapts to them
        ctx = DynamicContext("masked") if frozen else DynamicContext("train", tau=self.cfg.tau, noise=self.noise_at(step))
        seen, drop = {}, None
        if self.teacher is not None:  # draw the label dropout here, so that the teacher sees the same labels
            p = getattr(model, "module", model).y_embedder.dropout_prob
            drop = (torch.rand(B, device=y.device) < p).long() if p > 0 else None

        def student(xt, mt):
            seen.update(xt=xt, mt=mt)
            seen["out"] = model(xt, mt, y, dyn=ctx, force_drop_ids=drop) if drop is not None else model(xt, mt, y, dyn=ctx)
            return seen["out"]

        terms = self.process.training_losses(student, x, t, noise)
        ratio = dynamic_ratio(self.spec, ctx.records).to(x.device)  # (B,)
        lam = self.target_at(step)
        f_loss = flops_loss(ratio, lam, 0.0 if frozen else self.cfg.flops_weight, self.cfg.flops_balance)
        if step >= self.cfg.ramp_steps and not frozen:
            self._acc[0] += ratio.mean().item()
            self._acc[1] += 1
        loss = self.cfg.data_weight * terms["loss"].mean() + f_loss
        logs = {"diff_loss": terms["loss"].mean().item(), "flops_loss": f_loss.item(),
                "flops_ratio": ratio.mean().item(), "target": lam, "noise": ctx.noise}
        if self.teacher is not None:
            kd = self.distill_loss(seen["xt"], seen["mt"], y, drop, seen["out"])
            loss = loss + self.cfg.distill * kd
            logs["distill_loss"] = kd.item()
        logs["loss"] = loss.item()
        if self.inference_ratio is not None:  # the latest feedback, on every logged step
            logs.update(inference_ratio=self.inference_ratio, target_offset=self.offset)
        if step < self.cfg.warmup_steps:
            inner = getattr(model, "module", model)  # one DDP forward per step; see docs/ARCHITECTURE.md
            full = DynamicContext("complete")
            complete = self.process.training_losses(lambda xt, mt: inner(xt, mt, y, dyn=full), x, t, noise)
            loss = loss + complete["loss"].mean()
            logs["complete_loss"] = complete["loss"].mean().item()
        return loss, logs

    def distill_loss(self, xt, mt, y, drop, out):
        """Mean squared distance of the dynamic output to the frozen static model's, on every output channel."""
        if next(self.teacher.parameters()).device != xt.device:
            self.teacher.to(xt.device)
        with torch.no_grad():
            ref = self.teacher(xt, mt, y, force_drop_ids=drop) if drop is not None else self.teacher(xt, mt, y)
        return ((out.float() - ref.float()) ** 2).mean()

    def target_at(self, step: int) -> float:
        """λ_t of the FLOPs loss: the ramp, corrected by the inference-ratio feedback."""
        return min(1.0, max(0.02, target_at(step, self.cfg.target, self.cfg.ramp_steps) - self.offset))

    @torch.no_grad()
    def after_step(self, step: int, model, ema, logs: dict):
        """Feedback (see the class doc): measure the realised inference ratio, update the correction.

        With ``freeze_time_embed``, at the freeze the EMA takes the live timestep embedder and both stop
        (learning rate 0 from the next step): the width masks are a function of t_emb, so a training
        embedder would move the plan that the backbone trains on, and the EMA's plan with it.
        """
        opt = getattr(self, "_opt", None)
        group = next((g for g in opt.param_groups if g.get("name") == "time_embed"), None) if opt else None
        if group is not None and self.frozen(step):
            if group["lr_scale"] != 0.0:
                inner = getattr(model, "module", model)
                ema.t_embedder.load_state_dict(inner.t_embedder.state_dict())
            group["lr_scale"] = 0.0
        if self.cfg.calibrate_at_freeze and step == self.freeze_step():
            self.calibrate_plan(model, ema, logs)
        every = self.cfg.feedback_every
        if not every or step < self.cfg.ramp_steps or step % every or self._acc[1] == 0 or self.frozen(step):
            return
        import torch.distributed as dist

        from dydit.dynamic.calibrate import measure_ratio
        from dydit.dynamic.convert import copy_routers
        from dydit.sampling import default_sampler

        copy_routers(model, ema)  # the routers that will ship are the live ones
        acc = torch.tensor(self._acc, dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(acc)  # every rank holds the same correction
        train_ratio = float(acc[0] / acc[1])
        sampler = self.cfg.feedback_sampler or default_sampler(ema)
        self.inference_ratio = measure_ratio(ema, sampler, self.cfg.feedback_steps, self.cfg.feedback_cfg,
                                             self.cfg.feedback_images, seed=0, context_factory=self.feedback_context)
        gap, g = self.inference_ratio - train_ratio, self.cfg.feedback_gain
        self.offset = max(-0.25, min(0.25, (1.0 - g) * self.offset + g * gap))  # bounded
        self._acc = [0.0, 0]
        logs.update(inference_ratio=self.inference_ratio, train_ratio_window=train_ratio, target_offset=self.offset)

    @torch.no_grad()
    def calibrate_plan(self, model, ema, logs: dict):
        """At the freeze: shift the router thresholds until the plan realises λ on the inference sampler
        (``dydit calibrate`` on the EMA backbone with the live routers), in the live model and the EMA, so
        that the backbone's remaining steps train on the plan that ships, not on one that calibration
        after training would move."""
        import torch.distributed as dist

        from dydit.dynamic.calibrate import calibrate
        from dydit.dynamic.convert import copy_routers
        from dydit.sampling import default_sampler

        inner = getattr(model, "module", model)
        copy_routers(inner, ema)
        sampler = self.cfg.feedback_sampler or default_sampler(ema)
        try:
            result = calibrate(ema, self.cfg.target, sampler, self.cfg.feedback_steps, self.cfg.feedback_cfg,
                               self.cfg.calib_images, context_factory=self.feedback_context)
        except ValueError as e:  # λ out of the thresholds' reach: train on the plan as it is
            logging.getLogger(__name__).warning("calibration at the freeze skipped: %s", e)
            return
        if dist.is_available() and dist.is_initialized():  # every rank trains on rank 0's plan
            for p in router_parameters(ema):
                dist.broadcast(p.data, src=0)
        copy_routers(ema, inner)
        self.inference_ratio = result.ratio_after
        logs.update(calibrated_ratio=result.ratio_after, calibration_shift=result.shift)

    feedback_context = None  # TD-LoRA sets a context factory that merges its adapters

    def state_dict(self) -> dict:
        return {"offset": self.offset, "inference_ratio": self.inference_ratio, "acc": list(self._acc)}

    def load_state_dict(self, state: dict):
        self.offset = float(state["offset"])
        self.inference_ratio = state["inference_ratio"]
        self._acc = [float(state["acc"][0]), int(state["acc"][1])]

    def freeze_step(self) -> int | None:
        """First step of the frozen-plan phase (None: routers train to the end)."""
        total, share = self.cfg.total_steps, self.cfg.freeze_routers
        if not total or share <= 0:
            return None
        return max(self.cfg.ramp_steps, int(round(total * (1.0 - share))))

    def frozen(self, step: int) -> bool:
        start = self.freeze_step()
        return start is not None and step >= start

    def noise_at(self, step: int) -> float:
        """Gumbel-noise scale: 1 until the anneal starts, then linearly to 0 at the last router-training
        step (the last step, or the step before the plan freezes)."""
        total, share = self.cfg.total_steps, self.cfg.noise_anneal
        if not total or share <= 0:
            return 1.0
        stop = self.freeze_step() or total
        end, start = stop - 1, stop - total * share
        return float(min(1.0, max(0.0, (end - step) / max(end - start, 1e-9))))

    def progress_fields(self, logs):
        fields = {"loss": f"{logs['diff_loss']:.4f}", "flops": f"{logs['flops_ratio']:.3f}", "λ_t": f"{logs['target']:.2f}"}
        if self.inference_ratio is not None:
            fields["inference"] = f"{self.inference_ratio:.3f}"
        return fields

    def sampling_context(self, model):
        return DynamicContext("fast")

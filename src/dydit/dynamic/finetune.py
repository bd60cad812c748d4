"""`dydit finetune`: the DyDiT training task plugged into the shared training loop."""
from __future__ import annotations

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
    ramp_steps: int = 100  # λ_t ramps linearly from 1.0 to λ over these steps
    warmup_steps: int = 100  # add the complete-model loss (routers bypassed) during these steps
    router_lr: float | None = None  # learning rate of the routers (default: the main lr)
    tau: float = 5.0  # gumbel-sigmoid temperature
    stratified: bool = True  # batch split into 4 groups covering the 4 quarters of the trajectory
    width: bool = True  # TDW (ablation: off = SDT only)
    tokens: bool = True  # SDT (ablation: off = TDW only)
    reorder: bool = True  # rank heads/channels by weight magnitude before fine-tuning
    noise_anneal: float = 0.3  # gumbel noise decays linearly to 0 over this final share of the steps
    total_steps: int | None = None  # length of the run (set by the CLI; needed for the noise anneal)

    def to_dict(self):
        return asdict(self)


class FinetuneTask:
    """Loss = L(dynamic) + [warm-up] L(complete) + w·(mean_b r_b − λ_t)²."""

    find_unused_parameters = True

    def __init__(self, model, cfg: FinetuneConfig):
        from dydit.diffusion.flow import FlowMatching
        from dydit.diffusion.gaussian import GaussianDiffusion

        self.cfg = cfg
        obj = model.config.objective
        self.process = GaussianDiffusion(learn_sigma=model.config.learn_sigma) if obj == "diffusion" else FlowMatching()
        self.spec = flops_spec(model)

    def configure_optimizer(self, model, train_cfg):
        routers = {id(p) for p in router_parameters(model)}
        base = [p for p in model.parameters() if p.requires_grad and id(p) not in routers]
        rparams = [p for p in model.parameters() if p.requires_grad and id(p) in routers]
        scale = (self.cfg.router_lr / train_cfg.lr) if self.cfg.router_lr else 1.0
        groups = [{"params": base, "lr_scale": 1.0}, {"params": rparams, "lr_scale": scale}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)

    def loss(self, model, x, y, step, gen):
        B = len(x)
        t = self.process.sample_t(B, x.device, generator=gen, stratified=self.cfg.stratified)
        noise = torch.randn(x.shape, generator=gen).to(x.device)
        ctx = DynamicContext("train", tau=self.cfg.tau, noise=self.noise_at(step))
        terms = self.process.training_losses(lambda xt, mt: model(xt, mt, y, dyn=ctx), x, t, noise)
        ratio = dynamic_ratio(self.spec, ctx.records).to(x.device)  # (B,)
        lam = target_at(step, self.cfg.target, self.cfg.ramp_steps)
        f_loss = flops_loss(ratio, lam, self.cfg.flops_weight)
        loss = terms["loss"].mean() + f_loss
        logs = {"loss": loss.item(), "diff_loss": terms["loss"].mean().item(), "flops_loss": f_loss.item(),
                "flops_ratio": ratio.mean().item(), "target": lam, "noise": ctx.noise}
        if step < self.cfg.warmup_steps:
            inner = getattr(model, "module", model)  # one DDP forward per step; see docs/ARCHITECTURE.md
            full = DynamicContext("complete")
            complete = self.process.training_losses(lambda xt, mt: inner(xt, mt, y, dyn=full), x, t, noise)
            loss = loss + complete["loss"].mean()
            logs["complete_loss"] = complete["loss"].mean().item()
        return loss, logs

    def noise_at(self, step: int) -> float:
        """Gumbel-noise scale: 1 until the anneal starts, then linearly to 0 at the last step."""
        total, share = self.cfg.total_steps, self.cfg.noise_anneal
        if not total or share <= 0:
            return 1.0
        start = total * (1.0 - share)
        return float(min(1.0, max(0.0, (total - 1 - step) / max(total - 1 - start, 1e-9))))

    def progress_fields(self, logs):
        return {"loss": f"{logs['diff_loss']:.4f}", "flops": f"{logs['flops_ratio']:.3f}", "λ": f"{logs['target']:.2f}"}

    def sampling_context(self, model):
        return DynamicContext("fast")

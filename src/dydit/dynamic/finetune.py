"""DyDiT fine-tuning: the training task plugged into the shared loop, and :func:`finetune`, the whole run.

:func:`finetune` is what `dydit finetune` runs (the command only parses its options): a static
checkpoint and a :class:`~dydit.dynamic.recipe.Recipe` in, a DyDiT model folder (or adapters) out.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dydit.dynamic.context import DynamicContext
from dydit.dynamic.convert import router_parameters
from dydit.dynamic.flops import dynamic_ratio, flops_spec
from dydit.dynamic.loss import flops_loss, target_at
from dydit.train import process_layout


log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """What :class:`FinetuneTask` reads, flat; :func:`finetune_config` builds it from a recipe (whose fields
    hold the help text and the command's defaults; the defaults here serve direct use in Python)."""

    target: float = 0.5  # λ: target FLOPs ratio of the routed blocks (1.0 = static)
    flops_weight: float = 2.0  # w in w·(mean r − λ_t)²
    flops_balance: float = 0.0  # share of the FLOPs loss applied per quarter of the trajectory (needs stratified)
    ramp_steps: int = 100  # λ_t ramps linearly from 1.0 to λ over these steps
    warmup_steps: int = 100  # add the complete-model loss (routers bypassed) during these steps
    router_lr: float | None = None  # learning rate of the routers (default: the main lr)
    tau: float = 5.0  # gumbel-sigmoid temperature
    flops_width_target: float | None = None  # a second FLOPs term on the width-only ratio (tokens carry the rest)
    stratified: bool = True  # batch split into 4 groups covering the 4 quarters of the trajectory
    width: bool = True  # TDW (ablation: off = SDT only)
    tokens: bool = True  # SDT (ablation: off = TDW only)
    block_skip: bool = False  # ablation: per-block timestep gates that skip whole blocks
    reorder: bool = True  # rank heads/channels by weight magnitude before fine-tuning
    token_noise: float = 1.0  # token routers' gumbel-noise scale relative to the width routers' (0: deterministic)
    noise_anneal: float = 0.3  # gumbel noise decays linearly to 0 over this final share of the steps
    total_steps: int | None = None  # length of the run (set by finetune(); needed for the noise anneal)
    feedback_every: int = 25  # after the ramp, every N steps: measure the inference ratio, correct the target (0: off)
    feedback_images: int = 20  # images per feedback measurement (class-balanced: a multiple of the classes)
    feedback_sampler: str | None = None  # sampler of the measurement (default: ddim, or euler for flow models)
    feedback_steps: int = 20  # its sampling steps
    feedback_cfg: float = 4.0  # its guidance scale
    feedback_gain: float = 1.0  # share of each measured gap applied to the correction (< 1: damped)
    freeze_routers: float = 0.0  # fix the plan for this final share of the steps: hard eval masks, routers unchanged
    freeze_time_embed: bool = False  # with freeze_routers: fix the timestep embedder too (live and EMA), the width routers' input
    calibrate_at_freeze: bool = False  # with freeze_routers: calibrate the plan to λ at the freeze, so the backbone trains on it
    width_target: float | None = None  # with calibrate_at_freeze: width thresholds to this ratio, then tokens to λ
    ema_restart: bool = False  # with freeze_routers: the EMA restarts from the live weights at the freeze
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
        if cfg.width_target is not None and not cfg.calibrate_at_freeze:
            raise ValueError("width_target splits the calibration at the freeze: set calibrate_at_freeze")
        if cfg.ema_restart and cfg.freeze_routers <= 0:
            raise ValueError("ema_restart restarts the EMA when freeze_routers fixes the plan: set freeze_routers > 0")
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
        from dydit.t2i import TextFlowObjective, is_text_to_image

        # text-to-image (FLUX): the objective owns the conditioning (caption embeddings, caption dropout) and
        # diffusers' flow-matching convention; the class-conditional backbones call model(x_t, t, y)
        self.text = TextFlowObjective(model) if is_text_to_image(model) else None
        if self.text is not None:
            if cfg.distill > 0:
                raise ValueError("distill is not supported for text-to-image models yet; set the distill weight to 0")
            self.process = self.text
            self.text.set_token_geometry(model)  # the FLOPs counter's token counts: this canvas and caption length
        else:
            obj = model.config.objective
            self.process = GaussianDiffusion(learn_sigma=model.config.learn_sigma) if obj == "diffusion" else FlowMatching()
        self.spec = flops_spec(model)
        self.video = getattr(model.config, "num_frames", None) is not None  # x: (B, F, C, H, W)
        self.offset = 0.0  # inference ratio − training ratio, last measured
        self.inference_ratio = None
        self._acc = [0.0, 0]  # training ratios since the last feedback (sum, count)

    def configure_optimizer(self, model, train_cfg):
        routers = {id(p) for p in router_parameters(model)}
        base = [p for p in model.parameters() if p.requires_grad and id(p) not in routers]
        rparams = [p for p in model.parameters() if p.requires_grad and id(p) in routers]
        scale = (self.cfg.router_lr / train_cfg.lr) if self.cfg.router_lr else 1.0
        inner = getattr(model, "module", model)
        temb = {id(p) for m in _router_input_modules(inner) for p in m.parameters()} if self.cfg.freeze_time_embed else set()
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
        ctx = DynamicContext("masked") if frozen else DynamicContext("train", tau=self.cfg.tau, noise=self.noise_at(step),
                                                                       token_noise=self.noise_at(step) * self.cfg.token_noise)
        if self.text is not None:
            return self._text_loss(model, x, y, t, noise, ctx, step, frozen)
        seen, drop = {}, None
        if self.teacher is not None:  # draw the label dropout here, so that the teacher sees the same labels
            p = getattr(model, "module", model).y_embedder.dropout_prob
            drop = (torch.rand(B, device=y.device) < p).long() if p > 0 else None

        def student(xt, mt):  # xt in the model's layout (videos: (B, F, C, H, W))
            seen.update(xt=xt, mt=mt)
            seen["out"] = model(xt, mt, y, dyn=ctx, force_drop_ids=drop) if drop is not None else model(xt, mt, y, dyn=ctx)
            return seen["out"]

        fn, xp = process_layout(student, x, self.video)
        noise = noise if not self.video else noise.transpose(1, 2)
        terms = self.process.training_losses(fn, xp, t, noise)
        ratio, lam, f_loss = self._flops_term(ctx, x, step, frozen)
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
            fn, xp = process_layout(lambda xt, mt: inner(xt, mt, y, dyn=full), x, self.video)
            complete = self.process.training_losses(fn, xp, t, noise)
            loss = loss + complete["loss"].mean()
            logs["complete_loss"] = complete["loss"].mean().item()
        return loss, logs

    def _flops_term(self, ctx, x, step, frozen):
        """The batch's realised FLOPs ratios (B,), the step's target λ_t and the FLOPs loss; after the ramp
        the ratios also feed the inference-gap feedback's running mean."""
        ratio = dynamic_ratio(self.spec, ctx.records).to(x.device)  # (B,)
        lam = self.target_at(step)
        f_loss = flops_loss(ratio, lam, 0.0 if frozen else self.cfg.flops_weight, self.cfg.flops_balance)
        if self.cfg.flops_width_target is not None and not frozen:
            # the width-only ratio (every token counted): held at λ_w, so the tokens carry λ_w − λ of the budget
            wide = dynamic_ratio(self.spec, ctx.records, count_tokens=False)
            lam_w = min(1.0, max(0.02, target_at(step, self.cfg.flops_width_target, self.cfg.ramp_steps) - self.offset))
            f_loss = f_loss + flops_loss(wide.to(x.device), lam_w, self.cfg.flops_weight, self.cfg.flops_balance)
        if step >= self.cfg.ramp_steps and not frozen:
            self._acc[0] += ratio.mean().item()
            self._acc[1] += 1
        return ratio, lam, f_loss

    def _text_loss(self, model, x, y, t, noise, ctx, step, frozen):
        """The same loss terms for a text-to-image model (caption dropout drawn here, in the step's seeded RNG)."""
        y = self.text.drop_captions(y)
        terms = self.text.losses(model, x, y, t, noise, dyn=ctx)
        ratio, lam, f_loss = self._flops_term(ctx, x, step, frozen)
        loss = self.cfg.data_weight * terms["loss"].mean() + f_loss
        logs = {"diff_loss": terms["loss"].mean().item(), "flops_loss": f_loss.item(),
                "flops_ratio": ratio.mean().item(), "target": lam, "noise": ctx.noise, "loss": loss.item()}
        if self.inference_ratio is not None:
            logs.update(inference_ratio=self.inference_ratio, target_offset=self.offset)
        if step < self.cfg.warmup_steps:
            inner = getattr(model, "module", model)
            complete = self.text.losses(inner, x, y, t, noise, dyn=DynamicContext("complete"))
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

    def make_dataset(self, cfg):
        """Text-to-image models train on their captioned set; None: the loop's default for the model."""
        return self.text.make_dataset(cfg) if self.text is not None else None

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
                from dydit.fsdp import full_state_dict

                for live, averaged in zip(_router_input_modules(inner), _router_input_modules(ema)):
                    averaged.load_state_dict(full_state_dict(live))
            group["lr_scale"] = 0.0
        if self.cfg.ema_restart and step == self.freeze_step():
            from dydit.train import update_ema

            update_ema(ema, model, 0.0)  # decay 0: the EMA becomes the live backbone (FSDP: gathered)
            logs.update(ema_restart=1.0)
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
        after training would move. With ``width_target``: the width thresholds go to that ratio first,
        then the token thresholds to λ, so the frozen plan skips tokens for about (width_target − λ) of the budget."""
        import torch.distributed as dist

        from dydit.dynamic.calibrate import calibrate
        from dydit.dynamic.convert import copy_routers
        from dydit.sampling import default_sampler

        inner = getattr(model, "module", model)
        copy_routers(inner, ema)
        sampler = self.cfg.feedback_sampler or default_sampler(ema)
        run = dict(sampler=sampler, steps=self.cfg.feedback_steps, cfg_scale=self.cfg.feedback_cfg,
                   num_images=self.cfg.calib_images, context_factory=self.feedback_context)
        try:
            if self.cfg.width_target is not None:
                width = calibrate(ema, self.cfg.width_target, knob="width", **run)
                logs.update(width_calibrated_ratio=width.ratio_after, width_calibration_shift=width.shift)
                result = calibrate(ema, self.cfg.target, knob="tokens", **run)
            else:
                result = calibrate(ema, self.cfg.target, **run)
        except ValueError as e:  # λ out of the thresholds' reach: train on the plan as it is
            log.warning("calibration at the freeze skipped: %s", e)
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


def _router_input_modules(model) -> list:
    """The modules that compute the width routers' input (DiT and Latte: ``t_embedder``; diffusers Latte: the
    timestep part of ``adaln_single``), from the backbone's model adapter."""
    from dydit.dynamic.adapters import model_adapter

    return list(model_adapter(model).router_input_modules(model))


# ---------------------------------------------------------------------------------------------
# the whole run: a static checkpoint and a recipe in, a DyDiT out
# ---------------------------------------------------------------------------------------------


def finetune_config(recipe) -> FinetuneConfig:
    """The task's view of a recipe (static pruning: no warm-up, FLOPs loss or feedback; the plan is fixed)."""
    r = recipe
    cfg = FinetuneConfig(
        target=r.target, flops_weight=r.flops.weight, flops_width_target=r.flops.width_target,
        flops_balance=r.flops.balance, ramp_steps=r.flops.ramp_steps,
        warmup_steps=r.warmup.steps, router_lr=r.optim.router_lr, tau=r.routing.tau, stratified=r.flops.stratified,
        width=r.routing.width, tokens=r.routing.tokens, block_skip=r.routing.block_skip, reorder=r.router_init.reorder,
        token_noise=r.routing.token_noise, noise_anneal=r.routing.noise_anneal, total_steps=r.optim.steps,
        feedback_every=r.feedback.every,
        feedback_images=r.feedback.images, feedback_sampler=r.feedback.sampler, feedback_steps=r.feedback.steps,
        feedback_cfg=r.feedback.cfg, feedback_gain=r.feedback.gain, freeze_routers=r.freeze.routers,
        freeze_time_embed=r.freeze.time_embed, calibrate_at_freeze=r.freeze.calibrate,
        width_target=r.freeze.width_target if r.freeze.width_target is not None else
        (r.flops.width_target if r.freeze.calibrate else None), ema_restart=r.freeze.ema_restart,
        calib_images=r.calibration.images, distill=r.distill.weight, data_weight=r.distill.data_weight)
    if r.prune_static:
        cfg.warmup_steps, cfg.flops_weight, cfg.ramp_steps, cfg.feedback_every = 0, 0.0, 0, 0
    return cfg


@dataclass
class FinetuneResult:
    """What :func:`finetune` made: the EMA model (live routers, calibrated), where it is, and the summary
    written to ``out/finetune.json``."""

    model: torch.nn.Module
    out: Path
    finished: bool  # the run reached its last step (False after stop_after)
    summary: dict = field(default_factory=dict)
    calibration: object | None = None  # CalibrationResult of the final calibration, if it ran

    @property
    def weights(self) -> Path:
        """The output folder: ``out/ema`` (``dydit.load``), or ``out/adapters`` with peft."""
        return self.out / ("adapters" if "td_lora" in self.summary else "ema")


def finetune(init, out, recipe=None, *, data=None, resume: bool = False, stop_after: int | None = None,
             ckpt_every: int = 100, sample_every: int = 0, limit_data: int | None = None,
             threads: int | None = None, bf16: bool = False, progress: bool = True,
             resume_with_changes: bool = False, parallel: str = "ddp", log_every: int = 25) -> FinetuneResult:
    """Fine-tunes the static checkpoint ``init`` into a DyDiT under ``recipe`` (a Recipe, a name of
    :data:`~dydit.dynamic.recipe.RECIPES`, a recipe JSON file; None: ``default``); runs under torchrun for DDP,
    or FSDP with ``parallel="fsdp"`` (:mod:`dydit.fsdp`: sharded training state and ``checkpoint.dcp/``).

    Writes into ``out``: ``checkpoint.pt`` (resumable), ``log.jsonl``, ``finetune.json`` (recipe, task
    config, calibration) and ``ema/`` (the model: EMA backbone, live routers, calibrated, its config.json
    carrying the recipe) or, with ``recipe.peft``, ``adapters/`` for the static base ``init``. The other
    arguments say where the data is and how this machine runs the recipe, not what it trains.
    """
    import dydit
    from dydit.dynamic.config import DynamicConfig
    from dydit.dynamic.convert import copy_routers, dynamize
    from dydit.dynamic.recipe import Recipe, get_recipe
    from dydit.train import TrainConfig, maybe_init_distributed, train

    recipe = (recipe if isinstance(recipe, Recipe) else get_recipe(recipe)).validate()
    out = Path(out)
    _check_run_options(out, resume, stop_after, ckpt_every, sample_every, limit_data, threads, parallel)
    # The routers that start random (the token routers' hidden layer) and the LoRA experts draw from torch's
    # global generator, which a fresh process seeds at random: seed it, so a run depends on the recipe only.
    torch.manual_seed(recipe.optim.seed)
    model = dydit.load(init)
    if getattr(model, "dynamic_config", None) is not None:
        raise ValueError(f"{init} is already a dynamic model; pass its static base")
    _check_recipe_fits(recipe, model, init)
    prune_info = None
    if recipe.prune_static:
        from dydit.dynamic.prune import static_width_prune

        model, prune_info = static_width_prune(model, recipe.target, reorder=recipe.router_init.reorder)
        log.info("static pruning: %d heads and %d MLP groups kept per block (FLOPs ratio %.3f); no complete-model "
                 "warm-up, no FLOPs loss", prune_info["heads_kept"], prune_info["groups_kept"],
                 prune_info["flops_ratio"])
    else:
        ro, ri = recipe.routing, recipe.router_init
        model = dynamize(model, DynamicConfig(width=ro.width, tokens=ro.tokens, block_skip=ro.block_skip, tau=ro.tau,
                                              width_bias_init=ri.width_bias, token_bias_init=ri.token_bias,
                                              token_center=ro.token_center, token_count=ro.token_count),
                         reorder=ri.reorder)
    lora_cfg = None
    peft = recipe.peft
    if peft.method != "none":
        from dydit.peft import TDLoRAConfig, apply_td_lora, trainable_report

        model = apply_td_lora(model, TDLoRAConfig(r=peft.rank, num_experts=1 if peft.method == "lora" else peft.experts,
                                                  lora_alpha=peft.alpha, target_modules=list(peft.targets)))
        lora_cfg = model.td_lora_config["default"]
        n, total, share = trainable_report(model)
        log.info("%s: %s trainable parameters (%.2f%% of the %s-parameter backbone)", peft.method, f"{n:,}",
                 100 * share, f"{total:,}")
    ft = finetune_config(recipe)
    o = recipe.optim
    tc = TrainConfig(out=str(out), data=data, steps=o.steps, batch_size=o.batch_size, lr=o.lr,
                     warmup_steps=0,  # no LR warm-up: recipe.warmup is the complete-model warm-up of the task
                     lr_schedule=o.lr_schedule, weight_decay=o.weight_decay, ema_decay=o.ema_decay,
                     grad_clip=o.grad_clip, grad_skip=o.grad_skip, bf16=bf16, seed=o.seed, ckpt_every=ckpt_every,
                     sample_every=sample_every, resume=resume, limit_data=limit_data, stop_after=stop_after,
                     threads=threads, resume_with_changes=resume_with_changes, parallel=parallel,
                     log_every=log_every,
                     extra={"finetune": ft.to_dict(), "init": str(init), "recipe": recipe.to_dict()})
    teacher = dydit.load(init) if recipe.distill.weight > 0 else None  # the static function, before pruning or routing
    task = FinetuneTask(model, ft, teacher=teacher)
    if lora_cfg is not None:
        from dydit.peft import td_lora_fast_context

        task.sampling_context = td_lora_fast_context  # sample grids with the adapters merged per timestep
        task.feedback_context = td_lora_fast_context
    summary = {"recipe": recipe.to_dict(), "finetune": ft.to_dict(), "init": str(init)}
    if lora_cfg is not None:
        summary.update(peft=peft.method, td_lora=lora_cfg.to_dict())
    if prune_info is not None:
        summary["prune_static"] = prune_info
    rank = maybe_init_distributed()[0]  # under torchrun: join the group now, so only rank 0 writes below
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_summary(out, summary)

    ema = train(tc, model=model, task=task, progress=progress)
    copy_routers(model, ema)  # backbone averaged, routers live
    finished = rank == 0 and _reached_last_step(out)
    result = FinetuneResult(model=ema, out=out, finished=finished, summary=summary)
    if not finished:  # an interrupted run (stop_after) or another DDP rank: the checkpoint is what it leaves
        return result
    cal = recipe.calibration
    if cal.enabled and not recipe.prune_static and recipe.target < 1.0:
        from dydit.dynamic.calibrate import calibrate
        from dydit.sampling import default_sampler

        ema.eval()
        try:
            result.calibration = calibrate(ema, recipe.target, recipe.feedback.sampler or default_sampler(ema),
                                           recipe.feedback.steps, recipe.feedback.cfg, cal.images, tol=cal.tol,
                                           context_factory=task.feedback_context, log=log.info)
        except ValueError as e:  # keep the trained model; say why it is not calibrated
            log.warning("calibration skipped: %s", e)
            summary["calibration_skipped"] = str(e)
        else:
            summary["calibration"] = result.calibration.to_dict()
        _write_summary(out, summary)
    if lora_cfg is not None:
        from dydit.peft import save_adapters

        save_adapters(ema, out / "adapters", base_reordered=recipe.router_init.reorder)
    elif not hasattr(ema.config, "to_dict"):  # a diffusers model (DyFLUX): its own folder, routers included
        from dydit.io.atomic import atomic_write_text

        ema.save_pretrained(out / "ema")
        atomic_write_text(json.dumps({"recipe": recipe.to_dict()}, indent=2), out / "ema" / "recipe.json")
    else:
        dydit.save(ema, out / "ema", extra_config={"recipe": recipe.to_dict()})
    return result


def _check_run_options(out, resume, stop_after, ckpt_every, sample_every, limit_data, threads, parallel="ddp"):
    """The options of how this machine runs the recipe, and the output folder, before anything is loaded."""
    from dydit.errors import UserError, check_count
    from dydit.io.runs import prepare_run_folder
    from dydit.train import dist_info

    check_count("--ckpt-every", ckpt_every, allow_none=False)
    for option, value in (("--stop-after", stop_after), ("--limit-data", limit_data), ("--threads", threads)):
        check_count(option, value)
    if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 0:
        raise UserError(f"--sample-every must be a whole number >= 0, got {sample_every!r}")
    if parallel not in ("ddp", "fsdp"):
        raise UserError(f"--parallel must be ddp or fsdp, got {parallel!r}")
    if dist_info()[0] == 0:
        prepare_run_folder(out, resume, checkpoint="checkpoint.dcp" if parallel == "fsdp" else "checkpoint.pt")


def _check_recipe_fits(recipe, model, init):
    """What the recipe asks of this model, checked before training (not after it, at calibration)."""
    from dydit.errors import UserError
    from dydit.sampling import SAMPLERS

    from dydit.t2i import is_text_to_image

    if is_text_to_image(model):  # sample_captions: Euler over σ only
        if recipe.feedback.sampler not in (None, "euler"):
            raise UserError(f"feedback.sampler {recipe.feedback.sampler!r} cannot sample {init}, a text-to-image "
                            "model (Euler only); drop --set feedback.sampler or set it to euler")
        return
    sampler, objective = recipe.feedback.sampler, model.config.objective
    if sampler is not None and sampler not in SAMPLERS.get(objective, (sampler,)):
        raise UserError(f"feedback.sampler {sampler!r} cannot sample {init}, a {objective} model; choose one of "
                        f"{', '.join(SAMPLERS[objective])} (--set feedback.sampler=...)")


def _write_summary(out: Path, summary: dict):
    from dydit.io.atomic import atomic_write_text

    atomic_write_text(json.dumps(summary, indent=2), out / "finetune.json")


def _reached_last_step(out: Path) -> bool:
    """Whether the training loop ended at its last step (train() writes ema/ and the summary then)."""
    try:
        s = json.loads((out / "train_summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return s.get("step") == s.get("steps") and (out / "ema").exists()

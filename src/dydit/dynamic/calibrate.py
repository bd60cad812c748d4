"""Router threshold calibration: make a fine-tuned DyDiT realise its FLOPs target at inference.

The FLOPs loss constrains the ratio on *training* inputs (x_t drawn from q(x_t | x_0), live backbone
weights). Inference differs in two ways: the EMA backbone feeds the token routers slightly different
features, and the sampler's own trajectory is not q(x_t | x_0). On the Fashion-MNIST λ=0.5 fine-tune
the two together moved the realised ratio from 0.49 (training log) to 0.57 at inference.

Calibration closes that gap directly where it is measured: it samples with the model's own fast
engine on the sampler the user will run, and shifts one scalar, added to the output bias of every
token router (or, for a TDW-only model, of every width router), by bisection until the realised
ratio is within ``tol`` of λ. The shift is folded into the router biases, so the calibrated model
is an ordinary checkpoint. It moves every threshold by the same logit amount and keeps each router's
ranking of tokens (or timesteps).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from dydit.dynamic.routers import TextAwareTokenRouter


@dataclass
class CalibrationResult:
    target: float
    knob: str  # "tokens" or "width"
    shift: float  # logit shift added to the routers' output bias
    ratio_before: float
    ratio_after: float
    evaluations: int
    sampler: str
    steps: int
    cfg_scale: float
    num_images: int

    def to_dict(self):
        return asdict(self)


def _bias_params(model, knob: str):
    from dydit.dynamic.plan import routed_blocks

    out = []
    for block in routed_blocks(model):
        if knob == "tokens" and getattr(block, "token_selection", None) is not None:
            ts = block.token_selection  # DyDiT's MLP router, or DyFLUX's text-aware one (a single Linear)
            out.append(ts.router.bias if isinstance(ts, TextAwareTokenRouter) else ts.mlp_head[2].bias)
        elif knob == "width":
            rates = (block.attn_rate, block.mlp_rate, getattr(block, "mlp_context_rate", None), block.block_gate)
            out += [r.router.bias for r in rates if r is not None]  # mlp_context_rate: DyFLUX's optional text MLP
    return out


def measure_ratio(model, sampler: str = "ddim", steps: int = 20, cfg_scale: float = 4.0, num_images: int = 100,
                  seed: int = 0, context_factory=None) -> float:
    """Realised FLOPs ratio of the routed blocks over one fast-engine sampling run."""
    from dydit.dynamic.context import DynamicContext
    from dydit.dynamic.flops import flops_spec
    from dydit.dynamic.report import summarize
    from dydit.sampling import sample

    ctx = context_factory(model) if context_factory else DynamicContext("fast", record_usage=True)
    ctx.record_usage = True
    from dydit.t2i import is_text_to_image

    with torch.no_grad():
        if is_text_to_image(model):  # captions balanced over class, position and brightness; Euler over σ
            from dydit.data.captioned_fmnist import balanced_caption_ids
            from dydit.t2i import sample_captions

            sample_captions(model, balanced_caption_ids(num_images, seed), steps, cfg_scale=cfg_scale, seed=seed, dyn=ctx)
        else:
            labels = torch.arange(num_images) % model.config.num_classes
            sample(model, labels, sampler, steps, cfg_scale=cfg_scale, seed=seed, dyn=ctx)
    return summarize(ctx.usage, flops_spec(model), 2 if cfg_scale != 1.0 else 1)["flops_ratio"]


@torch.no_grad()
def calibrate(model, target: float, sampler: str = "ddim", steps: int = 20, cfg_scale: float = 4.0,
              num_images: int = 100, tol: float = 0.005, max_evals: int = 16, seed: int = 0,
              knob: str | None = None, context_factory=None, log=None) -> CalibrationResult:
    """Shifts the router thresholds of ``model`` in place until its realised ratio is within ``tol``
    of ``target``; returns what it did. Raises ValueError for a target the knob cannot reach."""
    if getattr(model, "dynamic_config", None) is None:
        raise ValueError("calibration needs a dynamic (DyDiT) model; dynamize and fine-tune it first")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be in (0, 1], got {target}")
    log = log or (lambda msg: None)
    if knob is None:  # tokens first (the finer knob); width when the tokens cannot reach λ
        knobs = [k for k in ("tokens", "width") if _bias_params(model, k)]
        for i, k in enumerate(knobs):
            try:
                return calibrate(model, target, sampler, steps, cfg_scale, num_images, tol, max_evals, seed, k,
                                 context_factory, log)
            except ValueError:
                if i == len(knobs) - 1:
                    raise
                log(f"calibration: the {k} thresholds cannot reach {target:.3f}; trying the {knobs[i + 1]} ones")
        raise ValueError("the model has no routers to calibrate")
    if knob not in ("tokens", "width"):
        raise ValueError(f"knob must be 'tokens' or 'width', got {knob!r}")
    biases = _bias_params(model, knob)
    if not biases:
        raise ValueError(f"the model has no {knob} routers to calibrate; use knob='width' or 'tokens'")
    originals = [b.detach().clone() for b in biases]
    evals = 0

    def ratio_at(shift: float) -> float:
        nonlocal evals
        for b, o in zip(biases, originals):
            b.copy_(o + shift)
        evals += 1
        r = measure_ratio(model, sampler, steps, cfg_scale, num_images, seed, context_factory)
        log(f"calibration: shift {shift:+.3f} -> ratio {r:.4f} (target {target:.3f})")
        return r

    seen = {0.0: ratio_at(0.0)}
    before = seen[0.0]
    if abs(before - target) > tol:
        # bracket: the ratio grows with the shift (more logits above 0)
        sign = -1.0 if before > target else 1.0
        near, far, width = 0.0, None, 0.5  # near: still on the starting side of λ; far: crossed it
        while evals < max_evals and width <= 64.0:
            seen[sign * width] = r = ratio_at(sign * width)
            if (r - target) * sign >= -tol:  # crossed (or reached) the target
                far = sign * width
                break
            near, width = sign * width, width * 2
        if far is None:
            for b, o in zip(biases, originals):
                b.copy_(o)
            reach = "lowest" if sign < 0 else "highest"
            raise ValueError(
                f"calibration cannot reach FLOPs ratio {target:.3f} by moving the {knob} thresholds: the {reach} "
                f"ratio found is {seen[near]:.3f}. Fine-tune at this target (dydit finetune --target {target}) "
                f"or calibrate the other knob")
        while abs(seen[far] - target) > tol and evals < max_evals and abs(far - near) > 0.05:  # narrower: a jump
            mid = 0.5 * (near + far)
            seen[mid] = r = ratio_at(mid)
            if (r - target) * sign >= -tol:
                far = mid
            else:
                near = mid
    within = [(abs(k), k) for k, r in seen.items() if abs(r - target) <= tol]
    if within:  # the smallest threshold move that meets λ
        shift = min(within)[1]
    else:
        # λ sits in a jump of the ratio (routers that switch a whole block's tokens at once): stay on the
        # starting side, at the closest ratio reached with the smallest move, rather than jump across
        side = [(abs(r - target), abs(k), k) for k, r in seen.items() if (r - target) * (before - target) > 0]
        shift = min(side)[2]
    after = seen[shift]
    for b, o in zip(biases, originals):
        b.copy_(o + shift)
    return CalibrationResult(target, knob, float(shift), float(before), float(after), evals, sampler, steps,
                             cfg_scale, num_images)

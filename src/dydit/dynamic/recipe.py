"""Fine-tune recipes: every setting of a DyDiT fine-tune in one object, and the named recipes.

A :class:`Recipe` is a tree of small dataclasses (``optim``, ``flops``, ``routing``, ...). Each field's
metadata holds its help text and its default is the ``default`` recipe, so this file is the one place
that says what a setting means and what it starts at. A recipe is addressed by dotted keys
(``flops.weight``, ``feedback.every``); ``dydit finetune --recipe NAME|FILE --set key=value`` resolves
one, and the resolved recipe is saved with the model (``config.json`` under ``"recipe"``) and in
``finetune.json``. Experiments that did not help are fields here, reachable by ``--set`` or a recipe
file, not options of the command.

Named recipes (:data:`RECIPES`): ``default`` (what ``dydit finetune`` runs without ``--recipe``),
``paper`` (the authors' DiT-XL/2 λ=0.5 settings), and ``fmnist-0.7`` / ``fmnist-0.5`` (exactly the
recipes of the shipped Fashion-MNIST models, whose ``config.json`` carries them).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from dydit.peft.td_lora.config import DEFAULT_TARGETS, TDLoRAConfig

from dydit.train import LR_SCHEDULES

PEFT_METHODS = ("none", "lora", "td-lora")


def _opt(default, help: str):
    """A recipe field: its default and its help text (the one source of both)."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _section(cls, help: str):
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class Optim:
    steps: int = _opt(300, "optimizer steps")
    batch_size: int = _opt(128, "global batch size (split across processes)")
    lr: float = _opt(1e-4, "AdamW learning rate of the backbone")
    lr_schedule: str = _opt("constant", "learning rate over the run: constant, or cosine (decays to ~0 at the last step)")
    router_lr: float | None = _opt(3e-2, "learning rate of the routers (None: lr); they start from zero weights and "
                                         "must move within a short fine-tune")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0: off)")
    grad_skip: float = _opt(100.0, "skip updates whose gradient norm exceeds this (0: off)")
    ema_decay: float = _opt(0.99, "EMA decay of the backbone (the routers that ship are the live ones)")
    seed: int = _opt(0, "seed of the data order, timesteps, noise, label dropout and gumbel noise")


@dataclass
class FlopsLoss:
    weight: float = _opt(2.0, "w in w·(mean_b r_b − λ_t)²")
    ramp_steps: int = _opt(100, "λ_t ramps linearly from 1.0 to λ over these steps")
    balance: float = _opt(0.0, "share of the FLOPs loss applied to each quarter of the trajectory (1: every quarter "
                               "of t averages λ; 0: the paper's batch mean, which can starve the high-noise steps in "
                               "short fine-tunes); needs stratified")
    width_target: float | None = _opt(None, "TDW + SDT: a second FLOPs term w·(r_width − λ_w,t)² holds the width-only "
                                            "ratio (every token counted) at this target, ramped like λ, so token "
                                            "skipping must carry the rest of the budget while the routers learn (None: "
                                            "the paper's one joint term, which may spend it all on width); the "
                                            "freeze calibration then splits the plan the same way")
    stratified: bool = _opt(True, "each batch takes its timesteps from the 4 quarters of the trajectory, so the "
                                  "batch-mean FLOPs covers all of it")


@dataclass
class Routing:
    width: bool = _opt(True, "TDW: dynamic attention heads and MLP channel groups, per timestep")
    tokens: bool = _opt(True, "SDT: dynamic tokens through the MLP")
    block_skip: bool = _opt(False, "ablation: a timestep gate per block that skips the whole block (with width=false "
                                   "tokens=false: the block-skip baseline)")
    token_center: bool = _opt(False, "token logits centred over each image's tokens: the token routers' weights learn "
                                     "which tokens run from the denoising loss alone, their output bias how many "
                                     "(the FLOPs loss); off: the authors' router, whose FLOPs gradient switches whole "
                                     "MLPs per timestep")
    token_count: bool = _opt(False, "DiT/SiT: the token routers add a per-sample term on the block conditioning "
                                    "(timestep + class), so how many tokens run can vary with the step")
    tau: float = _opt(5.0, "gumbel-sigmoid temperature")
    token_noise: float = _opt(1.0, "scale of the token routers' gumbel noise relative to the width routers' (0: "
                                   "deterministic token masks in training, so the backbone never trains under random "
                                   "token dropout; the token routers still learn through the soft sigmoid)")
    noise_anneal: float = _opt(0.3, "gumbel noise decays to 0 over this final share of the router-training steps, so "
                                    "the trained masks are the ones inference uses (0: noise to the end)")


@dataclass
class RouterInit:
    width_bias: float = _opt(2.0, "initial width-router bias (> 0: every head and group on, the static function; the "
                                  "authors' 15 suits their long fine-tunes)")
    token_bias: float = _opt(2.0, "initial token-router output bias (> 0: every token on; the authors use 35)")
    reorder: bool = _opt(True, "rank heads and MLP channels by weight magnitude first, so the always-on slot is "
                               "the most important one")


@dataclass
class Warmup:
    steps: int = _opt(100, "first steps with the complete-model loss added (the same weights, routers bypassed; "
                           "not distillation)")


@dataclass
class Feedback:
    every: int = _opt(25, "after the λ ramp, every N steps: sample a few images on the fast engine and correct the "
                          "FLOPs target by the (inference − training) ratio gap; 0: off")
    images: int = _opt(20, "images per feedback measurement (labels cycle through the classes: use a multiple of "
                           "the class count)")
    gain: float = _opt(1.0, "share of each measured gap applied to the target correction (< 1 damps it)")
    sampler: str | None = _opt(None, "sampler of the feedback and calibration runs, the one you will serve (None: "
                                     "ddim, or euler for flow models)")
    steps: int = _opt(20, "sampling steps of the feedback and calibration runs")
    cfg: float = _opt(4.0, "guidance scale of the feedback and calibration runs")


@dataclass
class Freeze:
    routers: float = _opt(0.0, "fix the plan for this final share of the steps: the routers stop, the masks are "
                               "the inference ones and the backbone adapts to them")
    time_embed: bool = _opt(False, "with routers > 0: fix the timestep embedder too (live and EMA), so the width "
                                   "plan cannot drift while frozen")
    calibrate: bool = _opt(False, "with routers > 0: calibrate the plan to λ at the freeze (as the final "
                                  "calibration does), so the backbone trains on the plan that ships")
    width_target: float | None = _opt(None, "with calibrate (TDW + SDT): at the freeze, calibrate the width thresholds "
                                            "until the realised ratio (the token masks as they are) reaches this, then "
                                            "the token thresholds to λ, so token skipping carries about "
                                            "(width_target − λ) of the budget in the frozen plan (None: flops.width_target "
                                            "if set, else the token thresholds alone, the split the FLOPs loss learnt)")
    ema_restart: bool = _opt(False, "with routers > 0: restart the backbone's EMA from the live weights at the "
                                    "freeze, so the model that ships averages only steps trained on its own plan")


@dataclass
class Calibration:
    enabled: bool = _opt(True, "after training, shift the router thresholds of the output until the realised "
                               "inference FLOPs ratio is within tol of λ, on the feedback sampler (dydit calibrate)")
    images: int = _opt(100, "images sampled per calibration measurement (class-balanced; also freeze.calibrate)")
    tol: float = _opt(0.005, "stop when |realised ratio − λ| ≤ tol")


@dataclass
class Distill:
    weight: float = _opt(0.0, "weight of an output-distillation loss toward the frozen static INIT (not in the "
                              "paper; one extra forward of the static model per step)")
    data_weight: float = _opt(1.0, "weight of the backbone's own diffusion or flow loss (0 with weight > 0: learn "
                                   "from the static model only)")


@dataclass
class Peft:
    method: str = _opt("none", "none: train all weights; td-lora: frozen backbone, routers + timestep-mixed LoRA "
                               "experts train; lora: the same with one expert")
    rank: int | None = _opt(None, TDLoRAConfig.help("r"))
    experts: int = _opt(4, TDLoRAConfig.help("num_experts") + " (td-lora)")
    alpha: float | None = _opt(None, TDLoRAConfig.help("lora_alpha"))
    targets: list[str] = _opt(DEFAULT_TARGETS, TDLoRAConfig.help("target_modules") + " (comma-separated)")


@dataclass
class Recipe:
    """Everything a DyDiT fine-tune does, apart from where its files are and how the machine runs it."""

    target: float = _opt(0.5, "λ: target FLOPs ratio of the routed blocks (1.0: static)")
    prune_static: bool = _opt(False, "baseline instead of DyDiT: magnitude-prune every block to the same width at "
                                     "every timestep (FLOPs ≈ λ), then fine-tune it the same way (no warm-up, FLOPs "
                                     "loss, feedback or calibration)")
    optim: Optim = _section(Optim, "optimisation schedule")
    flops: FlopsLoss = _section(FlopsLoss, "the FLOPs loss and its λ ramp")
    routing: Routing = _section(Routing, "what is routed, and the router binarisation in training")
    router_init: RouterInit = _section(RouterInit, "router initialisation")
    warmup: Warmup = _section(Warmup, "complete-model warm-up")
    feedback: Feedback = _section(Feedback, "inference-ratio feedback, and the sampler it measures on")
    freeze: Freeze = _section(Freeze, "frozen-plan phase at the end")
    calibration: Calibration = _section(Calibration, "final router-threshold calibration")
    distill: Distill = _section(Distill, "output distillation from the static model")
    peft: Peft = _section(Peft, "parameter-efficient fine-tuning (frozen backbone)")

    # ---- dotted keys ----
    @classmethod
    def keys(cls) -> list[str]:
        """Every settable key, dotted (``target``, ``optim.lr``, ...), in declaration order."""
        return [k for k, _, _ in _leaves(cls)]

    @classmethod
    def help(cls, key: str) -> str:
        return _leaf(cls, key)[1].metadata["help"]

    @classmethod
    def field_type(cls, key: str):
        return _leaf(cls, key)[2]

    def get(self, key: str):
        obj = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def replace(self, **changes) -> "Recipe":
        """A copy with dotted keys set to already-typed values: ``r.replace(**{"flops.weight": 1.0})``."""
        new = Recipe.from_dict(self.to_dict())
        for key, value in changes.items():
            _leaf(Recipe, key)  # unknown keys fail here, with suggestions
            *path, name = key.split(".")
            obj = new
            for part in path:
                obj = getattr(obj, part)
            setattr(obj, name, list(value) if isinstance(value, tuple) else value)
        return new

    def with_sets(self, assignments) -> "Recipe":
        """A copy with ``key=value`` strings applied in order (the CLI's ``--set``); values are parsed to the
        field's type."""
        changes = {}
        for text in assignments:
            key, sep, value = text.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"--set {text!r}: expected key=value, e.g. flops.weight=2")
            changes[key] = parse_value(key, value.strip())
        return self.replace(**changes)

    # ---- serialisation ----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """A recipe from a (possibly partial) nested dict; missing fields take the defaults, unknown ones fail."""
        return _build(cls, d, prefix="")

    @classmethod
    def from_file(cls, path) -> "Recipe":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a recipe file holds one JSON object")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    # ---- checks ----
    def validate(self) -> "Recipe":
        """Raises ValueError naming the key when a setting is out of range or settings contradict each other."""
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)

        o, f, r = self.optim, self.flops, self.routing
        need(0.0 < self.target <= 1.0, f"target must be in (0, 1], got {self.target}; it is a share of the static FLOPs")
        need(o.steps >= 1 and o.batch_size >= 1, f"optim.steps and optim.batch_size must be ≥ 1, got {o.steps}, "
                                                  f"{o.batch_size}")
        need(o.lr > 0 and (o.router_lr is None or o.router_lr > 0), "optim.lr and optim.router_lr must be > 0")
        need(o.lr_schedule in LR_SCHEDULES, f"optim.lr_schedule must be one of {LR_SCHEDULES}, got {o.lr_schedule!r}")
        need(0.0 <= o.ema_decay < 1.0, f"optim.ema_decay must be in [0, 1), got {o.ema_decay}")
        need(0.0 <= f.balance <= 1.0, f"flops.balance is a share in [0, 1], got {f.balance}")
        need(not f.balance or f.stratified, "flops.balance needs flops.stratified=true (the quarters are the strata)")
        need(f.weight >= 0 and f.ramp_steps >= 0 and self.warmup.steps >= 0,
             "flops.weight, flops.ramp_steps and warmup.steps must be ≥ 0")
        need(0.0 <= r.noise_anneal <= 1.0, f"routing.noise_anneal is a share in [0, 1], got {r.noise_anneal}")
        fw = f.width_target
        need(fw is None or (r.width and r.tokens and self.target < fw <= 1.0),
             f"flops.width_target={fw} leaves part of the budget to the tokens: it needs routing.width and "
             f"routing.tokens on, and λ={self.target} < width_target ≤ 1")
        wt = self.freeze.width_target
        need(wt is None or (self.freeze.calibrate and r.width and r.tokens and self.target < wt <= 1.0),
             f"freeze.width_target={wt} splits the budget between width and tokens at the freeze: it needs "
             f"freeze.calibrate=true, routing.width and routing.tokens on, and λ={self.target} < width_target ≤ 1")
        need(r.token_noise >= 0.0, f"routing.token_noise is a scale >= 0, got {r.token_noise}")
        need(r.tau > 0, f"routing.tau must be > 0, got {r.tau}")
        need(self.prune_static or r.width or r.tokens or r.block_skip,
             "nothing to route: keep routing.width or routing.tokens, or set routing.block_skip=true")
        fb, fr = self.feedback, self.freeze
        need(fb.every >= 0 and fb.images >= 1 and fb.steps >= 1,
             "feedback.every must be ≥ 0, feedback.images and feedback.steps ≥ 1")
        need(0.0 <= fb.gain <= 1.0, f"feedback.gain is a share in [0, 1], got {fb.gain}")
        from dydit.sampling import SAMPLERS

        known = [m for methods in SAMPLERS.values() for m in methods]
        need(fb.sampler is None or fb.sampler in known, f"feedback.sampler {fb.sampler!r} is not a sampler; choose "
                                                        f"one of {', '.join(known)} (or leave it unset)")
        need(math.isfinite(fb.cfg) and fb.cfg >= 1.0, f"feedback.cfg must be a finite guidance scale >= 1, got {fb.cfg}")
        need(0.0 <= fr.routers <= 1.0, f"freeze.routers is a share of the steps in [0, 1], got {fr.routers}")
        need(not fr.time_embed or fr.routers > 0, "freeze.time_embed fixes the plan together with freeze.routers: "
                                                 "set freeze.routers > 0")
        need(not fr.calibrate or fr.routers > 0, "freeze.calibrate calibrates the plan that freeze.routers fixes: "
                                                "set freeze.routers > 0")
        need(not fr.ema_restart or fr.routers > 0, "freeze.ema_restart restarts the EMA when freeze.routers fixes the "
                                                  "plan: set freeze.routers > 0")
        need(self.calibration.images >= 1 and self.calibration.tol > 0,
             "calibration.images must be ≥ 1 and calibration.tol > 0")
        d = self.distill
        need(d.weight >= 0 and d.data_weight >= 0, f"loss weights must be ≥ 0, got distill.weight={d.weight}, "
                                                   f"distill.data_weight={d.data_weight}")
        need(d.weight > 0 or d.data_weight > 0, "distill.data_weight=0 leaves only the FLOPs loss: set "
                                                "distill.weight > 0, or keep distill.data_weight")
        p = self.peft
        need(p.method in PEFT_METHODS, f"peft.method must be one of {PEFT_METHODS}, got {p.method!r}")
        need(not (self.prune_static and p.method != "none"), "prune_static fine-tunes all weights: set peft.method=none")
        if p.method != "none":
            TDLoRAConfig(r=p.rank, num_experts=p.experts, lora_alpha=p.alpha, target_modules=p.targets)  # its checks
        return self


# ---------------------------------------------------------------------------------------------
# keys, types and values
# ---------------------------------------------------------------------------------------------


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _leaves(cls, prefix=""):
    """(dotted key, field, type) of every leaf field."""
    hints = _hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, prefix + f.name + ".")
        else:
            yield prefix + f.name, f, tp


def _leaf(cls, key: str):
    for k, f, tp in _leaves(cls):
        if k == key:
            return k, f, tp
    raise ValueError(unknown_key_message(key))


def unknown_key_message(key: str) -> str:
    keys = Recipe.keys()
    section = [k for k in keys if k.startswith(key + ".")]
    if section:
        return f"{key!r} is a section of the recipe, not a key; its keys: {', '.join(section)}"
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    if not close:  # e.g. the old flag's spelling (ramp-steps -> flops.ramp_steps)
        tail = key.split(".")[-1].replace("-", "_")
        close = [k for k in keys if k.endswith("." + tail) or tail in k][:5]
    hint = f"; closest: {', '.join(close)}" if close else ""
    return f"unknown recipe key {key!r}{hint} (all keys: dydit recipes --keys)"


_TRUE, _FALSE, _NONE = ("true", "1", "yes", "on"), ("false", "0", "no", "off"), ("none", "null")


def parse_value(key: str, text: str):
    """``text`` as a value of the field ``key`` (bool, int, float, str, list of str; None where allowed)."""
    tp = Recipe.field_type(key)
    args = typing.get_args(tp)
    optional = type(None) in args
    if optional:
        tp = next(a for a in args if a is not type(None))
    if optional and text.lower() in _NONE:
        return None
    try:
        if tp is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if typing.get_origin(tp) is list:
            items = json.loads(text) if text.startswith("[") else text.split(",")
            return [str(t).strip() for t in items if str(t).strip()]
        return text
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(tp, str(tp))
        raise ValueError(f"{key}={text!r}: expected {kind}{' or none' if optional else ''}") from None


def _check_type(key: str, value, tp):
    """A JSON value for field ``key``: ints pass as floats, lists as lists of str; anything else must match."""
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{key}: null is not allowed")
    if type(None) in args:
        tp = next(a for a in args if a is not type(None))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(tp) is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'recipe'}: expected an object, got {d!r}")
    hints = _hints(cls)
    names = {f.name for f in fields(cls)}
    for k in d:
        if k not in names:
            raise ValueError(unknown_key_message(prefix + k))
    kwargs = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, d[f.name], prefix + f.name + ".")
        else:
            kwargs[f.name] = _check_type(prefix + f.name, d[f.name], tp)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# named recipes
# ---------------------------------------------------------------------------------------------


def _default() -> Recipe:
    return Recipe()


def _paper() -> Recipe:
    # The authors' DiT-XL/2 λ=0.5 settings (as the DyDiT paper and its released code give them). Our short CPU fine-tunes differ: there,
    # routers starting at bias 15/35 cannot move in a few hundred steps (hence our 2.0), the routers need
    # their own larger LR, and the measured inference ratio drifts from the training one (hence our
    # feedback, noise anneal and calibration, all off here). Scale steps, warm-up and ramp together with
    # --steps / --set for smaller runs.
    return Recipe(
        target=0.5,
        optim=Optim(steps=200_000, batch_size=256, lr=1e-4, router_lr=None, weight_decay=0.0, ema_decay=0.9999),
        # grad_skip / grad_clip: the paper skips updates with a "huge" gradient norm; the threshold is ours
        flops=FlopsLoss(weight=2.0, ramp_steps=5_000, balance=0.0, stratified=True),  # λ_t ramp: "~1k–5k steps"
        routing=Routing(width=True, tokens=True, tau=5.0, noise_anneal=0.0),  # gumbel noise to the end
        router_init=RouterInit(width_bias=15.0, token_bias=35.0, reorder=True),  # the released code does not reorder
        warmup=Warmup(steps=30_000),  # complete-model loss for the first 30k of 200k steps
        feedback=Feedback(every=0),
        calibration=Calibration(enabled=False),
    )


def _fmnist_07() -> Recipe:
    # scripts/fmnist_results.sh, $FT: the original recipe, a 100-step λ ramp after a 50-step warm-up
    return Recipe(target=0.7, optim=Optim(steps=300, batch_size=128, lr=3e-4, seed=0),
                  flops=FlopsLoss(ramp_steps=100), warmup=Warmup(steps=50))


def _fmnist_05() -> Recipe:
    # scripts/fmnist_results.sh, e17 (session 11): a 30-step ramp, no warm-up, router LR 0.01, TDW only,
    # the plan frozen for the second half; seed 1 of three
    return Recipe(target=0.5, optim=Optim(steps=300, batch_size=128, lr=3e-4, seed=1, router_lr=0.01),
                  flops=FlopsLoss(ramp_steps=30), warmup=Warmup(steps=0), routing=Routing(tokens=False),
                  freeze=Freeze(routers=0.5))


def _fmnist_05_sdt() -> Recipe:
    # scripts/fmnist_results.sh step 12 (session 27): fmnist-0.5 with centred token routers on (TDW + SDT), the
    # timestep embedder frozen with the plan, the plan calibrated to λ at the freeze, the EMA restarted there, and
    # output distillation toward the static init (run v1 of docs/RESULTS.md "TDW + SDT closer to width only")
    r = _fmnist_05()
    r.routing.tokens, r.routing.token_center = True, True
    r.freeze.time_embed, r.freeze.calibrate, r.freeze.ema_restart = True, True, True
    r.distill.weight = 1.0
    return r


RECIPES = {
    "default": ("what `dydit finetune` runs without --recipe", _default),
    "paper": ("the authors' DiT-XL/2 λ=0.5 settings (200k steps at batch 256; router bias 15/35)", _paper),
    "fmnist-0.7": ("the shipped Fashion-MNIST λ=0.7 model (src/dydit/assets/fmnist_dydit_0.7)", _fmnist_07),
    "fmnist-0.5": ("the shipped Fashion-MNIST λ=0.5 model, session-11 e17 (src/dydit/assets/fmnist_dydit_0.5)",
                   _fmnist_05),
    "fmnist-0.5-sdt": ("fmnist-0.5 with centred token routers (TDW + SDT), the plan and timestep embedder frozen and "
                       "calibrated for the second half, the EMA restarted there, distillation from the static init (session "
                       "27: FID 19.84 / 19.93 over two seeds at 5k; not shipped)",
                       _fmnist_05_sdt),
}


def get_recipe(name_or_path=None) -> Recipe:
    """A named recipe (:data:`RECIPES`), a recipe JSON file, or a model folder saved with a recipe."""
    if name_or_path is None:
        return _default()
    if isinstance(name_or_path, Recipe):
        return Recipe.from_dict(name_or_path.to_dict())
    text = str(name_or_path)
    if text in RECIPES:
        return RECIPES[text][1]()
    path = Path(text)
    if path.is_dir():
        return recipe_of_model(path)
    if path.is_file():
        return Recipe.from_file(path)
    close = difflib.get_close_matches(text, list(RECIPES), n=2)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ValueError(f"unknown recipe {text!r}: not one of {', '.join(RECIPES)} and no such file{hint}")


def recipe_of_model(folder) -> Recipe:
    """The recipe a model folder was fine-tuned with (its config.json's ``"recipe"``)."""
    from dydit.io.native import CONFIG_NAME, read_native_config

    folder = Path(folder)
    if not (folder / CONFIG_NAME).exists():
        raise ValueError(f"{folder}: no {CONFIG_NAME}; pass a recipe name, a recipe file or a model folder")
    cfg = read_native_config(folder)
    if "recipe" not in cfg:
        raise ValueError(f"{folder}: the model was saved without a recipe")
    return Recipe.from_dict(cfg["recipe"])


def resolve_recipe(name_or_path=None, sets=(), **flags) -> Recipe:
    """``--recipe``, then ``--set key=value`` in order, then the command's own flags (dotted keys, None: not
    given); a key set by both a flag and ``--set`` is an error. Returns the validated recipe."""
    recipe = get_recipe(name_or_path).with_sets(sets)
    given = {k: v for k, v in flags.items() if v is not None}
    set_keys = {s.partition("=")[0].strip() for s in sets}
    both = sorted(set_keys & set(given))
    if both:
        raise ValueError(f"{both[0]} is given both as an option and by --set; keep one")
    return recipe.replace(**given).validate()

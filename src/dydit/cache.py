"""Training-free feature caching across sampling steps: First-Block-Cache (ParaAttention / TeaCache family).

Every step runs the first block. If its residual (output - input) has moved less than ``rdt`` (relative
L1) from the residual at the last fully computed step, the remaining blocks are skipped and their
residual from that step is reused::

    tokens_out = block0(tokens) + cached_rest_residual

otherwise every block runs and the cache is refreshed. Comparing against the last *full* step (as
ParaAttention does) rather than the previous step means slow drift still triggers a refresh.

The cached residual is taken between the *input of block 1* and the output of the last block, and a
skipped step adds it at block 1 (blocks 2..L-1 are then the identity). For a plain block list (DiT) that
is exactly ``block0(tokens) + cached_rest_residual``. It is what makes the cache work on backbones whose
forward does more between blocks than pass tokens on: Latte alternates spatial blocks on (B·F, N, D)
with temporal blocks on (B·N, F, D), rearranging between them, and adds its temporal embedding after
block 0 (diffusers' own First-Block-Cache, which adds the residual at block 0 in block 0's layout, fails
there). Block 1 and the last block must see the same token layout (Latte: both temporal); rearranges
between blocks are permutations and commute with adding a residual.

Two-stream blocks (diffusers' FLUX: ``block(hidden_states=image, encoder_hidden_states=text, ...)`` returning
``(text, image)``, double- and single-stream alike) are cached stream by stream: the skip decision reads
block 0's image residual (as diffusers' cache does), and a skipped step adds the rest's image and text
residuals at block 1.

The cache hooks the block list the model's adapter names (:mod:`dydit.dynamic.adapters`), so a
backbone needs no cache argument. Dynamic models work unchanged: their blocks run their dynamic
forward under the hook, and a skipped step skips their dynamic compute too. Any sampler uses it
through :func:`cached`, which hooks the blocks for the duration of a ``with`` block::

    cache = FirstBlockCache(rdt=0.1, warmup=1, num_steps=50)
    with cached(model, cache):
        images = sample(model, labels, "ddim", 50, cfg_scale=4.0)
    cache.block_share(); cached_macs(flops_spec(model), cache, cfg_batches=2)

One skip decision is made per forward for the whole batch (both CFG halves together), so the batch
size must stay constant within a sampling run.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dydit.dynamic.flops import FlopsSpec, realised_macs


@dataclass
class CacheStep:
    """What one forward did under the cache."""

    run: int  # sampling run (a new one starts after num_steps forwards, or at start())
    step: int  # step within the run
    batch: int  # forward batch size (2B with guidance)
    depth: int  # blocks in the model
    distance: float | None  # relative L1 of block 0's residual to the reference; None without a reference
    skipped: bool

    @property
    def blocks_run(self) -> int:
        return 1 if self.skipped else self.depth


def relative_l1(a: torch.Tensor, ref: torch.Tensor) -> float:
    """mean|a - ref| / mean|ref|, computed in float32."""
    a, ref = a.float(), ref.float()
    return ((a - ref).abs().mean() / ref.abs().mean().clamp(min=1e-12)).item()


class FirstBlockCache:
    """Skips blocks 1..L-1 while block 0's residual stays within ``rdt`` of the last full step's."""

    def __init__(self, rdt: float = 0.1, warmup: int = 1, max_consecutive: int | None = None,
                 num_steps: int | None = None):
        """``warmup``: first/last steps always computed in full (the last ones need ``num_steps``);
        ``max_consecutive``: most skips in a row (None: unlimited); ``num_steps``: forwards per sampling
        run, after which the next forward starts a new run (None: call :meth:`start` between runs)."""
        if rdt < 0:
            raise ValueError(f"rdt must be >= 0, got {rdt}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if max_consecutive is not None and max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0 or None, got {max_consecutive}")
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be >= 1 or None, got {num_steps}")
        self.rdt = rdt
        self.warmup = warmup
        self.max_consecutive = max_consecutive
        self.num_steps = num_steps
        self.reset()

    def reset(self):
        """Forgets cached tensors and statistics."""
        self.history: list[CacheStep] = []
        self._run = -1
        self.start()

    def start(self):
        """Begins a new sampling run: drops cached tensors, keeps statistics."""
        self._step = None  # None: the next forward opens a run
        self._shape = None
        self._ref_residual = None  # (B, N, D) block 0 residual (first stream) at the last full step
        self._rest_residual = None  # per stream: residual of blocks 1..L-1 at the last full step, block 1's layout
        self._rest_input = None  # block 1's input streams at the current full step
        self._consecutive = 0
        self._skipping = False

    # ---- statistics ----
    @property
    def steps(self) -> int:
        return len(self.history)

    @property
    def full_steps(self) -> int:
        return sum(not s.skipped for s in self.history)

    @property
    def skipped_steps(self) -> int:
        return sum(s.skipped for s in self.history)

    @property
    def blocks_run(self) -> int:
        return sum(s.blocks_run for s in self.history)

    @property
    def blocks_total(self) -> int:
        return sum(s.depth for s in self.history)

    @property
    def runs(self) -> int:
        return len({s.run for s in self.history})

    def block_share(self) -> float:
        """Share of block forwards actually run (1.0 = no caching); blocks of equal cost make it the MACs share."""
        return self.blocks_run / self.blocks_total if self.history else 1.0

    # ---- the hook backbones call ----
    def _may_skip(self, step: int) -> bool:
        if self._rest_residual is None or step < self.warmup:
            return False
        if self.num_steps is not None and step >= self.num_steps - self.warmup:
            return False
        return self.max_consecutive is None or self._consecutive < self.max_consecutive

    def _first(self, block, depth: int, streams: tuple, call) -> tuple:
        """Block 0 under the cache: runs it, decides whether blocks 1..L-1 are skipped at this step.
        ``streams``: the block's token streams (DiT/Latte: the tokens; FLUX: image tokens, text tokens);
        ``call(streams)`` runs the block's own forward and returns its streams in the same order."""
        shape = tuple(tuple(t.shape) for t in streams)
        if self._step is None or (self.num_steps is not None and self._step >= self.num_steps):
            self.start()
            self._step, self._shape, self._run = 0, shape, self._run + 1
        elif shape != self._shape:
            raise ValueError(
                f"FirstBlockCache holds tensors of shape {self._shape[0]} but this forward has tokens of shape "
                f"{shape[0]}; the batch size must stay constant within a sampling run "
                "(call cache.start() between runs, or give num_steps)"
            )
        first = call(streams)
        residual = tuple(o - i for o, i in zip(first, streams))
        # the skip decision reads the first stream (FLUX: the image tokens, as diffusers' cache does)
        distance = relative_l1(residual[0], self._ref_residual) if self._ref_residual is not None else None
        self._skipping = depth > 1 and self._may_skip(self._step) and distance < self.rdt
        self._depth, self._distance = depth, distance
        if self._skipping:
            self._consecutive += 1
            self._end_step()
            return first
        self._first_residual = residual
        if depth == 1:  # nothing to cache beyond block 0
            self._rest_input = first
            return self._finish_full(first)
        return first

    def _rest(self, block, position: int, last: bool, streams: tuple, call) -> tuple:
        """Blocks 1..L-1: while skipping, block 1 adds the cached residual and the others are the identity;
        otherwise they run (block 1 notes its input, the last block refreshes the cache)."""
        if self._skipping:
            return tuple(t + r for t, r in zip(streams, self._rest_residual)) if position == 1 else streams
        if position == 1:
            self._rest_input = streams
        out = call(streams)
        return self._finish_full(out) if last else out

    def _finish_full(self, out: tuple) -> tuple:
        if [t.shape for t in out] != [t.shape for t in self._rest_input]:
            raise ValueError(
                f"First-Block-Cache: block 1 sees tokens of shape {tuple(self._rest_input[0].shape)} but the last "
                f"block returns {tuple(out[0].shape)}; the cached residual needs both in one layout (an odd number "
                "of alternating spatial/temporal blocks?)")
        self._ref_residual = self._first_residual[0].detach()
        self._rest_residual = tuple((o - i).detach() for o, i in zip(out, self._rest_input))
        self._rest_input = self._first_residual = None
        self._consecutive = 0
        self._end_step()
        return out

    def _end_step(self):
        self.history.append(CacheStep(self._run, self._step, self._shape[0][0], self._depth, self._distance,
                                      self._skipping))
        self._step += 1


class _CachedForward:
    """Instance ``forward`` of one block while a cache is applied (the block's class forward underneath)."""

    def __init__(self, cache, block, position: int, depth: int):
        self.cache, self.block, self.position, self.depth = cache, block, position, depth

    def __call__(self, *args, **kwargs):
        forward = type(self.block).forward
        if args and torch.is_tensor(args[0]):  # DiT / Latte: block(tokens, ...) -> tokens
            def call(streams):
                return (forward(self.block, streams[0], *args[1:], **kwargs),)
            streams, to_output = (args[0],), (lambda s: s[0])
        elif not args and torch.is_tensor(kwargs.get("hidden_states")) and torch.is_tensor(
                kwargs.get("encoder_hidden_states")):
            # FLUX (diffusers): block(hidden_states=image, encoder_hidden_states=text, ...) -> (text, image);
            # double and single-stream blocks alike, so every block keeps both streams in one layout
            def call(streams):
                text, image = forward(self.block, **{**kwargs, "hidden_states": streams[0],
                                                     "encoder_hidden_states": streams[1]})
                return image, text
            streams, to_output = (kwargs["hidden_states"], kwargs["encoder_hidden_states"]), (lambda s: (s[1], s[0]))
        else:
            raise TypeError(f"First-Block-Cache caches blocks called as block(tokens, ...) or, as diffusers' FLUX "
                            f"blocks, block(hidden_states=..., encoder_hidden_states=...); "
                            f"{type(self.block).__name__} is called otherwise and is not supported")
        if self.position == 0:
            return to_output(self.cache._first(self.block, self.depth, streams, call))
        return to_output(self.cache._rest(self.block, self.position, self.position == self.depth - 1, streams, call))


def cache_blocks(model) -> list:
    """The blocks a cache applies to, in execution order: the model adapter's blocks (Latte: spatial and
    temporal interleaved), or ``model.blocks``."""
    from dydit.dynamic.adapters import model_adapter

    adapter = model_adapter(model, required=False)
    if adapter is not None:
        return adapter.blocks(model)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks):
        raise TypeError(f"{type(model).__name__} has no registered adapter and no `blocks` list: "
                        "First-Block-Cache cannot find the blocks to cache")
    return list(blocks)


@contextmanager
def cached(model, cache: FirstBlockCache):
    """Within the block, every forward of ``model`` runs its blocks under ``cache``.

    The cache hooks the model's blocks (diffusers-hook style: an instance ``forward`` on each block that
    wraps the class's own), so the backbone needs no cache argument and samplers need no change; the
    cache starts a new run on entry. Yields the cache.
    """
    blocks = cache_blocks(model)
    for i, block in enumerate(blocks):
        if "forward" in block.__dict__:
            raise ValueError("this model's blocks already carry a cache; nest no second `cached(...)`")
        block.forward = _CachedForward(cache, block, i, len(blocks))
    cache.start()
    try:
        yield cache
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def cached_macs(spec: FlopsSpec, cache: FirstBlockCache, usage=None, cfg_batches: int = 1) -> dict:
    """Realised MACs per image of the forwards the cache recorded (paper convention, see dydit.dynamic.flops).

    A skipped step costs the embedders, block 0 and the final layer; a full step the whole network.
    ``usage`` (a fast DynamicContext's ``usage``, one entry per recorded forward) supplies the widths and
    kept tokens of a dynamic model; None assumes full blocks. ``cfg_batches`` = 2 when guidance runs
    every image twice per step. Returns per_image, per_forward (per sample), static_per_image (the same
    forwards uncached and static), block_ratio (realised / static block MACs) and macs_ratio.
    """
    steps = cache.history
    if not steps:
        raise ValueError("the cache has recorded no forward")
    if usage is not None and len(usage) != len(steps):
        raise ValueError(f"usage has {len(usage)} forwards but the cache recorded {len(steps)}; "
                         "record both over the same sampling runs")
    total = blocks = samples = 0.0
    run_batch = {}
    for i, s in enumerate(steps):
        n = s.blocks_run
        sub = FlopsSpec(blocks=spec.blocks[:n], embed=spec.embed, final=spec.final)
        if usage is not None:
            u = usage[i]
            m = realised_macs(sub, u.heads[:n], u.groups[:n], [k / u.batch for k in u.tokens_kept[:n]],
                                  u.units[:n] or None)
        else:
            m = realised_macs(sub, [b.num_heads for b in sub.blocks], [b.num_groups for b in sub.blocks],
                              [b.num_tokens for b in sub.blocks])
        total += s.batch * m["total"]
        blocks += s.batch * m["blocks"]
        samples += s.batch
        run_batch.setdefault(s.run, s.batch)
    images = sum(run_batch.values()) / cfg_batches
    static_total = samples * spec.static_macs
    return {
        "per_image": total / images,
        "per_forward": total / samples,
        "static_per_image": static_total / images,
        "block_ratio": blocks / (samples * spec.block_total),
        "macs_ratio": total / static_total,
    }

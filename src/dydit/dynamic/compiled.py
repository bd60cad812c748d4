"""The fast path under ``torch.compile``: the Python bookkeeping outside, the block's tensors inside.

``DynamicContext("fast", compile=True)`` (or ``sample(..., compile=True)``) runs each routed block in
two parts:

1. eager, once per (block, step): the plan's widths, the index tables and the weight restriction
   (:class:`~dydit.dynamic.plan.SlicedWeights`: contiguous active sets as views, others gathered) of
   every Linear a routed unit spans, into a :class:`FastRun` holding plain ``(weight, bias)`` tensors
   and the active head counts;
2. compiled: the adapter's own dynamic forward against that :class:`FastRun` — the same code as the
   eager fast path, but ``run.linear(path, x)`` is a dict read and ``F.linear``, and token routing
   always gathers the kept tokens (their count M is a data-dependent size: an unbacked symbolic int,
   ``capture_dynamic_output_shape_ops``), with no ``bool(keep.all())`` shortcut that would need a sync.

The compiled region is one whole block (``fullgraph=True``: a graph break fails loudly). With
``dynamic=True`` the weight, token and batch sizes are symbolic; what specialises are the Python values
the adapter branches on (e.g. no active head at all) and the adapters' block classes, so the number of
graphs is bounded by the distinct block kinds and width configurations, never by steps × blocks.
:func:`compiled_blocks` compiles a static model's blocks the same way (one block per compiled call),
for a like-for-like comparison.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from dydit.dynamic.adapters import block_adapter, model_adapter
from dydit.dynamic.ops import gather_tokens, scatter_add_tokens

DEFAULTS = {"backend": "inductor", "dynamic": True, "fullgraph": True}
# Dynamo settings of the compiled calls (patched around each call, so nothing global changes):
# data-dependent token counts traced as unbacked sizes, and enough cache entries per code object for
# every block kind × width layout (torch's default is 8 per code object).
DYNAMO_CONFIG = {"capture_dynamic_output_shape_ops": True, "capture_scalar_outputs": True,
                 "recompile_limit": 256, "accumulated_recompile_limit": 4096}


def compile_options(compile) -> dict | None:
    """``compile``: False/None (eager), True (the defaults) or a dict of ``torch.compile`` keyword
    arguments over :data:`DEFAULTS` (e.g. ``{"backend": "aot_eager"}``)."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return dict(DEFAULTS)
    if isinstance(compile, str):
        return {**DEFAULTS, "backend": compile}
    if isinstance(compile, dict):
        return {**DEFAULTS, **compile}
    raise TypeError(f"compile must be a bool, a backend name or a dict of torch.compile options, got {compile!r}")


def _key(options: dict):
    return tuple(sorted((k, repr(v)) for k, v in options.items()))


_COMPILED: dict = {}


def _compiled(fn, options: dict):
    key = (fn, _key(options))
    c = _COMPILED.get(key)
    if c is None:
        c = _COMPILED[key] = torch.compile(fn, **options)
    return c


def _dynamic_block(adapter, block, run, args, kwargs):  # the compiled region of a routed block
    return adapter.forward(block, run, *args, **kwargs)


def _static_block(forward, block, args, kwargs):  # the compiled region of a static block
    return forward(block, *args, **kwargs)


class FastRun:
    """The :class:`~dydit.dynamic.engine.BlockRun` API over prepared tensors (the compiled fast path).

    ``weights``: Linear path -> (weight, bias) restricted to the step's active rows/columns (only the
    Linears a routed unit spans; any other ``run.linear`` call runs the block's module itself, as the
    eager fast path does at full width); ``heads``: head unit name -> active head count.
    """

    def __init__(self, block, weights: dict, heads: dict, token_routers: dict, samples: int, skipped: bool):
        self.block = block
        self.weights = weights
        self.heads = heads
        self.token_routers = token_routers  # unit name -> block attribute of its token router
        self.samples = samples
        self.skipped = skipped
        self.keep = None  # per-sample token mask (B, repeat·N) of the last token update
        self.kept = None  # tokens that ran the routed branch (a 0-d tensor; read only by usage reports)

    def num_heads(self, unit: str) -> int:
        return self.heads[unit]

    def linear(self, path: str, x: torch.Tensor) -> torch.Tensor:
        wb = self.weights.get(path)
        if wb is None:
            return self.block.get_submodule(path)(x)
        return F.linear(x, wb[0], wb[1])

    def mask_heads(self, unit: str, out: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        return out

    def mask_groups(self, unit: str, a: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        return a

    def gate_update(self, update: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        return update

    def token_update(self, unit: str, x: torch.Tensor, update_fn, repeat: int = 1, route: tuple = ()) -> torch.Tensor:
        from dydit.dynamic.engine import _picker, _pick_rows

        name = self.token_routers.get(unit)
        router = getattr(self.block, name, None) if name is not None else None
        if router is None:
            self.kept = torch.full((), x.shape[0] * x.shape[1], dtype=torch.long)
            return x + update_fn(x, _pick_rows)
        keep = router.keep(x, *route)  # (B·repeat, N)
        self.keep = keep.reshape(x.shape[0] // repeat, -1)
        xs, flat_idx, sample_idx = gather_tokens(x, keep)  # (M, D), M data-dependent
        self.kept = keep.sum()
        pick = _picker(x.shape[0], x.shape[1], flat_idx, sample_idx)
        return scatter_add_tokens(x, flat_idx, update_fn(xs, pick))


def prepare(ctx, block, index: int) -> FastRun | None:
    """The eager half: block ``index``'s restricted weights at the step's widths (None: a spanned Linear
    is wrapped by an unmerged adapter, which the compiled region does not run; the block runs eagerly)."""
    from dydit.dynamic.engine import _plain_linear

    binding = ctx.binding
    spec = binding.specs[index]
    width = ctx.step_width[index]
    heads = {u.name: len(width.slots[u.name]) for u in spec.heads}
    token_routers = {u.name: getattr(u, "token_router", None) for u in spec.units}
    weights = {}
    if not width.skipped:
        for path in dict.fromkeys(s.linear for u in spec.units for s in u.spans):
            module = binding.module(index, path)
            plain = _plain_linear(module)
            if plain is None:
                return None
            rows, cols = binding.indices(index, width, path, module)
            w, b = ctx.weights.restricted(plain, rows, cols, (width.key, path))
            weights[path] = (w.detach(), b.detach() if b is not None else None)
    return FastRun(block, weights, heads, token_routers, ctx.t_emb.shape[0], width.skipped)


def run_block(ctx, block, index: int, args, kwargs):
    """Block ``index`` of a compiled fast forward: prepare eagerly, run the adapter's forward compiled,
    record what the eager fast path records. None when the block must run eagerly."""
    run = prepare(ctx, block, index)
    if run is None:
        return None
    if run.skipped:  # a skipped block computes nothing: its input, returned by the adapter, eagerly
        out = block_adapter(block).forward(block, run, *args, **kwargs)
    else:
        # one input layout (the patch embedding's tokens arrive transposed): one graph per width pattern
        args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with torch._dynamo.config.patch(**DYNAMO_CONFIG):
            out = _compiled(_dynamic_block, ctx.compile)(block_adapter(block), block, run, args, kwargs)
    if run.keep is not None:
        ctx.record_token_mask(index, run.keep)
    if ctx.record_usage:
        w = ctx.step_width[index]
        ctx.record_fast(index, len(w.heads) if w.heads is not None else 0,
                        len(w.groups) if w.groups is not None else 0,
                        int(run.kept) if run.kept is not None else 0,
                        {name: len(s) for name, s in w.slots.items()})
    return out


@contextlib.contextmanager
def compiled_blocks(model, compile=True):
    """Within the block, ``model``'s blocks (those its model adapter lists) run their static forward
    compiled, one block per compiled call: the static side of a compiled comparison (also a dynamic
    model's ``dyn="complete"``)."""
    options = compile_options(compile)
    blocks = model_adapter(model).blocks(model) if options is not None else []
    fn = _compiled(_static_block, options) if options is not None else None

    def make(block):
        base = getattr(type(block), "_dydit_base", None) or type(block)
        forward = base.forward

        def call(*args, **kwargs):
            with torch._dynamo.config.patch(**DYNAMO_CONFIG):
                return fn(forward, block, args, kwargs)

        return call

    try:
        for b in blocks:
            b.forward = make(b)
        yield model
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)

"""TDLoRALinear: a frozen nn.Linear plus K low-rank experts mixed by the timestep embedding.

For input x of sample b at timestep t_b:
    y = W0 x + b0 + Σ_adapters (α/r) · Σ_k a_k(E_{t_b}) · B_k A_k x,      a(E_t) = softmax(router(E_t))
Experts are packed: ``lora_A[name]`` is one (K·r, in) Linear and ``lora_B[name]`` one (out, K·r)
Linear; expert k owns rows/columns [k·r, (k+1)·r). With K = 1 this is exactly peft's LoRA layout and
the mixing weight is the constant 1 (no router).

The layer reads E_t from a :class:`TimestepState` that a forward hook on the backbone's ``t_embedder``
fills at every forward pass, so the backbone code is unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class TimestepState:
    """Holds the E_t (B, D) of the current forward pass, shared by every TD-LoRA layer of a model."""

    def __init__(self):
        self.t_emb: torch.Tensor | None = None

    def __deepcopy__(self, memo):
        return TimestepState()  # a copy (e.g. the EMA model) captures its own E_t; never copy a graph

    def __getstate__(self):
        return {"t_emb": None}


def capture_t_emb(module, args, output):
    """Forward hook on ``t_embedder``: records E_t for the TD-LoRA layers."""
    module.td_lora_state.t_emb = output


class TDLoRALinear(nn.Module):
    """Wraps a frozen ``base_layer`` (nn.Linear) with timestep-mixed low-rank experts."""

    def __init__(self, base_layer: nn.Linear, state: TimestepState):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"TD-LoRA adapts nn.Linear layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_router = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.num_experts: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.td_lora_state = state

    # ---- the base layer's interface, so code that reads e.g. ``attn.qkv.weight`` keeps working ----
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    # ---- adapters ----
    def add_adapter(self, name: str, r: int, num_experts: int, lora_alpha: float, cond_dim: int,
                    router: str = "linear", router_hidden: int = 64, lora_dropout: float = 0.0):
        """Adds (and activates) adapter ``name``: B zero-initialised, so the layer is unchanged."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        dev, dtype = self.base_layer.weight.device, self.base_layer.weight.dtype
        K = num_experts
        A = nn.Linear(self.in_features, K * r, bias=False, device=dev, dtype=dtype)
        B = nn.Linear(K * r, self.out_features, bias=False, device=dev, dtype=dtype)
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))  # peft's LoRA init for A (fan-in = in_features)
        nn.init.zeros_(B.weight)
        self.lora_A[name], self.lora_B[name] = A, B
        if K > 1:
            if router == "linear":
                mix = nn.Linear(cond_dim, K, device=dev, dtype=dtype)
            else:
                mix = nn.Sequential(nn.Linear(cond_dim, router_hidden, device=dev, dtype=dtype), nn.SiLU(),
                                    nn.Linear(router_hidden, K, device=dev, dtype=dtype))
            last = mix if isinstance(mix, nn.Linear) else mix[-1]
            nn.init.zeros_(last.weight)  # uniform 1/K mixing at start
            nn.init.zeros_(last.bias)
            self.lora_router[name] = mix
        self.lora_dropout[name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.r[name], self.num_experts[name], self.scaling[name] = r, K, lora_alpha / r
        self.active_adapters.append(name)

    @property
    def needs_merged_weights(self) -> bool:
        """True while an active adapter is unmerged: the fast path must fold it in (TDLoRAWeights)."""
        return any(n not in self.merged_adapters for n in self.active_adapters)

    def set_adapter(self, names: str | list[str]):
        names = [names] if isinstance(names, str) else list(names)
        missing = [n for n in names if n not in self.lora_A]
        if missing:
            raise ValueError(f"unknown adapters {missing}; this layer has {list(self.lora_A)}")
        self.active_adapters = names

    def mixing_weights(self, name: str, t_emb: torch.Tensor) -> torch.Tensor:
        """a(E_t): (B, D) -> (B, K) softmax weights; the constant 1 for K = 1."""
        if self.num_experts[name] == 1:
            return torch.ones(t_emb.shape[0], 1, device=t_emb.device, dtype=self.lora_A[name].weight.dtype)
        return torch.softmax(self.lora_router[name](t_emb).float(), dim=-1).to(self.lora_A[name].weight.dtype)

    def _current_t_emb(self, batch: int) -> torch.Tensor:
        t_emb = self.td_lora_state.t_emb
        if t_emb is None:
            raise RuntimeError("TD-LoRA layer has no timestep embedding: call the whole model (its t_embedder "
                               "hook records E_t), not the layer on its own")
        if t_emb.shape[0] != batch:
            if t_emb.shape[0] == 1 or bool((t_emb == t_emb[:1]).all()):
                return t_emb[:1].expand(batch, -1)  # one timestep for the whole batch (fast-mode sampling)
            if batch % t_emb.shape[0] == 0:
                # video backbones fold frames or positions into the batch, sample-major ((b f) or (b n) rows,
                # as Latte does): each sample's rows take its E_t
                return t_emb.repeat_interleave(batch // t_emb.shape[0], dim=0)
            raise RuntimeError(f"TD-LoRA layer got a batch of {batch} but E_t has {t_emb.shape[0]} rows; "
                               "inputs must keep the batch dimension first")
        return t_emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, ..., in) -> (B, ..., out); sample b mixes its experts with a(E_t of sample b)."""
        out = self.base_layer(x)
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not pending:
            return out
        t_emb = None
        lead = (x.shape[0],) + (1,) * (x.ndim - 2)
        for name in pending:
            K, r = self.num_experts[name], self.r[name]
            u = self.lora_A[name](self.lora_dropout[name](x))  # (B, ..., K·r)
            if K == 1:  # plain LoRA: no timestep dependence
                out = out + self.lora_B[name](u) * self.scaling[name]
                continue
            if t_emb is None:
                t_emb = self._current_t_emb(x.shape[0])
            coef = self.mixing_weights(name, t_emb).to(u.dtype) * self.scaling[name]  # (B, K)
            u = (u.unflatten(-1, (K, r)) * coef.view(*lead, K, 1)).flatten(-2)
            out = out + self.lora_B[name](u)
        return out

    # ---- merged weights ----
    def delta_weight(self, t_emb: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                     cols: torch.Tensor | None = None) -> torch.Tensor | None:
        """Σ (α/r)·Σ_k a_k(E_t) B_k A_k of the active, unmerged adapters at one timestep; (out', in').

        ``t_emb`` is one row (D,) or (1, D) (not needed for K = 1); ``rows``/``cols`` restrict the result
        to output rows / input columns before the product, so a narrowed layer costs only its share.
        """
        delta = None
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            K, r = self.num_experts[name], self.r[name]
            A = self.lora_A[name].weight  # (K·r, in)
            B = self.lora_B[name].weight  # (out, K·r)
            if rows is not None:
                B = B.index_select(0, rows.to(B.device))
            if cols is not None:
                A = A.index_select(1, cols.to(A.device))
            if K == 1:
                coef = torch.ones(1, device=A.device, dtype=A.dtype)
            else:
                if t_emb is None:
                    raise ValueError(f"adapter {name!r} has {K} timestep-mixed experts: pass the E_t row")
                coef = self.mixing_weights(name, t_emb.reshape(1, -1).to(A.dtype))[0]  # (K,)
            coef = (coef * self.scaling[name]).repeat_interleave(r)  # (K·r,)
            d = (B * coef) @ A
            delta = d if delta is None else delta + d
        return delta

    def merged_weight(self, t_emb: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                      cols: torch.Tensor | None = None) -> torch.Tensor:
        """W0 + ΔW(E_t) for one timestep, optionally restricted to ``rows`` / ``cols``; (out', in')."""
        w = self.weight
        if rows is not None:
            w = w.index_select(0, rows.to(w.device))
        if cols is not None:
            w = w.index_select(1, cols.to(w.device))
        delta = self.delta_weight(t_emb, rows, cols)
        return w.contiguous() if delta is None else w + delta.to(w.dtype)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None):
        """Adds single-expert adapters into the base weight (as peft does); K > 1 depends on t."""
        names = [n for n in (adapter_names or self.active_adapters) if n not in self.merged_adapters]
        for name in names:
            if self.num_experts[name] != 1:
                raise ValueError(f"adapter {name!r} has {self.num_experts[name]} timestep-mixed experts and "
                                 "cannot be merged statically; use merged_weight(t_emb) per timestep "
                                 "(dydit.peft.td_lora_fast_context does this for sampling)")
        for name in names:
            self.base_layer.weight += self._static_delta(name)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self):
        """Subtracts every merged adapter from the base weight again."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.base_layer.weight -= self._static_delta(name)

    def _static_delta(self, name: str) -> torch.Tensor:
        return (self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]).to(self.weight.dtype)

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.r[n]}, experts={self.num_experts[n]}, scaling={self.scaling[n]:g}" for n in self.lora_A]
        return f"in={self.in_features}, out={self.out_features}; " + "; ".join(parts)

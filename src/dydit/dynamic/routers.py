"""DyDiT routers: timestep width routers and spatial token routers.

Module and parameter names match the authors' checkpoints: ``attn_rate.router``, ``mlp_rate.router``,
``token_selection.mlp_head.{0,2}``.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def is_on(logits: torch.Tensor) -> torch.Tensor:
    """The one inference threshold of every router: a slot, token or block runs where its logit > 0."""
    return logits > 0


def gumbel_sigmoid_ste(logits: torch.Tensor, tau: float, training: bool, noise: float = 1.0) -> torch.Tensor:
    """Hard 0/1 mask. Train: gumbel-sigmoid forward as a step, backward through the soft sigmoid.
    Eval: plain threshold at logit 0, no noise.

    ``noise`` scales the gumbel noise; annealing it to 0 at the end of fine-tuning makes the training
    masks the eval masks, so the FLOPs loss constrains the ratio the inference engine will realise.
    """
    if not training:
        return is_on(logits).to(logits.dtype)
    u1 = torch.rand_like(logits).clamp_(1e-10, 1 - 1e-10)
    u2 = torch.rand_like(logits).clamp_(1e-10, 1 - 1e-10)
    g1, g2 = -torch.log(-torch.log(u1)), -torch.log(-torch.log(u2))
    soft = torch.sigmoid((logits + noise * (g1 - g2)) / tau)
    hard = (soft > 0.5).to(logits.dtype)
    return hard + (soft - soft.detach())  # exactly 0/1 forward, soft gradient


class WidthRouter(nn.Module):
    """E_t (B, D) -> mask over ``num_slots`` heads or MLP channel groups (B, num_slots).

    With ``always_on`` the router predicts slots 1..H-1 and slot 0 is constant 1, so a block never
    reaches zero width (the released layout); without it, it predicts all H (an early release).
    """

    def __init__(self, dim: int, num_slots: int, always_on: bool = True, bias_init: float = 15.0):
        super().__init__()
        self.num_slots = num_slots
        self.always_on = always_on
        self.router = nn.Linear(dim, num_slots - 1 if always_on else num_slots)
        nn.init.zeros_(self.router.weight)
        nn.init.constant_(self.router.bias, bias_init)

    def logits(self, t_emb: torch.Tensor) -> torch.Tensor:
        return self.router(t_emb)

    def forward(self, t_emb: torch.Tensor, tau: float = 5.0, training: bool = False, noise: float = 1.0) -> torch.Tensor:
        mask = gumbel_sigmoid_ste(self.logits(t_emb).float(), tau, training, noise)
        if self.always_on:
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        return mask  # (B, num_slots)

    @torch.no_grad()
    def active(self, t_emb: torch.Tensor) -> torch.Tensor:
        """Boolean inference mask (B, num_slots): the plan's active slots."""
        on = is_on(self.logits(t_emb))
        if self.always_on:
            on = torch.cat([torch.ones_like(on[:, :1]), on], dim=1)
        return on


class TokenRouter(nn.Module):
    """Per-token gate for the MLP branch: (B, N, D) -> (B, N) 0/1 mask.

    ``center``: the logit is the head's output minus its mean over the row's tokens, plus the output
    bias, so the head decides only *which* tokens of an image run and the output bias alone *how many*
    (``logit_i = f(x_i) − mean_j f(x_j) + b``). Uncentred (the authors' layout), the FLOPs loss pushes
    every token's logit down through the head's weights, and its gradient on them (Σ_i h_i, the same
    sign for every token) drowns the per-token signal of the denoising loss: the routers learn
    per-(block, timestep) switches of the whole MLP instead of spatial routing. Centred, the FLOPs
    gradient on the head's weights is Σ_i (h_i − h̄) = 0; it moves the bias only, and the weights learn
    from the denoising loss which tokens matter. The parameters are the same either way.
    """

    per_sample_modules = ("count",)  # run once per sample, not per token (the FLOPs counter)

    def __init__(self, dim: int, hidden_ratio: int = 16, bias_init: float = 35.0, center: bool = False,
                 count_dim: int | None = None):
        super().__init__()
        self.center = center
        hidden = max(dim // hidden_ratio, 1)
        self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp_head[2].weight)
        nn.init.constant_(self.mlp_head[2].bias, bias_init)
        # ``count_dim``: a per-sample term count(c) on the block's conditioning c (timestep + class), added to
        # every token's logit, so how many tokens run can depend on the step (with ``center``: b + count(c))
        self.count = None
        if count_dim is not None:
            self.count = nn.Linear(count_dim, 1)
            nn.init.zeros_(self.count.weight)
            nn.init.zeros_(self.count.bias)

    def logits(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        z = self.mlp_head(x).squeeze(-1)  # (B, N)
        if self.center:
            z = z - z.mean(-1, keepdim=True) + self.mlp_head[2].bias
        if self.count is not None:
            if c is None:
                raise ValueError("this token router's count term needs the block conditioning c; this backbone's "
                                 "adapter does not pass it (token_count is for DiT/SiT blocks)")
            z = z + self.count(c)  # (B, 1): one shift per sample
        return z

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None, tau: float = 5.0, training: bool = False,
                noise: float = 1.0) -> torch.Tensor:
        return gumbel_sigmoid_ste(self.logits(x, c).float(), tau, training, noise)

    def keep(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean inference mask (B, N): the tokens the fast path runs."""
        return is_on(self.logits(x, c))


class TextAwareTokenRouter(nn.Module):
    """DyFLUX's token router (the authors' ``TokenSelect_baesd_on_x_t_text``; parameter names theirs).

    An image token's logit is ``router(m(x) + mean_text m_t(text))``, where m and m_t modulate the shared
    ``norm`` (LayerNorm, affine) with shift/scale from ``linear_t(SiLU(temb))``: the token itself, the
    step and prompt (temb) and the prompt's tokens decide together. x (B, N, D) image tokens,
    temb (B, C) the block's conditioning, text (B, L, D) text tokens -> (B, N).

    ``center`` (dydit's option, as :class:`TokenRouter`'s): ``logit_i = r(h_i) − mean_j r(h_j) + b``. The text
    term and the modulation's shift are the same for every image token of a sample, so uncentred they are a
    common-mode shift that the FLOPs loss drives; trained so, the routers' logits reached ±10³ on
    Captioned Fashion-MNIST (the shift through the router weights) and every block ran all or none of its
    tokens. Centred, the text term cancels from the decision (which tokens run is decided by each token's
    modulated features, how many by ``b``). Same parameters either way.
    """

    per_sample_modules = ("linear_t",)  # run once per sample on temb, not per token (the FLOPs counter)

    def __init__(self, dim: int, cond_dim: int, bias_init: float = 5.0, center: bool = False):
        super().__init__()
        self.center = center
        self.linear_t = nn.Linear(cond_dim, 4 * dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.router = nn.Linear(dim, 1)
        nn.init.zeros_(self.router.weight)  # every token on: the converted model is the static function
        nn.init.constant_(self.router.bias, bias_init)

    def logits(self, x: torch.Tensor, temb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        shift, scale, shift_t, scale_t = self.linear_t(nn.functional.silu(temb)).chunk(4, dim=1)  # (B, D) each
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]  # (B, N, D)
        if self.center:  # the text term is common to every token of a sample: it cancels
            z = self.router(h).squeeze(-1)
            return z - z.mean(-1, keepdim=True) + self.router.bias
        ht = (self.norm(text) * (1 + scale_t[:, None]) + shift_t[:, None]).mean(1, keepdim=True)  # (B, 1, D)
        return self.router(h + ht).squeeze(-1)  # (B, N)

    def forward(self, x, temb, text, tau: float = 5.0, training: bool = False, noise: float = 1.0) -> torch.Tensor:
        return gumbel_sigmoid_ste(self.logits(x, temb, text).float(), tau, training, noise)

    def keep(self, x, temb, text) -> torch.Tensor:
        """Boolean inference mask (B, N); the authors keep a token where sigmoid(logit) > 0.5, i.e. logit > 0."""
        return is_on(self.logits(x, temb, text))

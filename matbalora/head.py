"""Band-gap readout head: pooled crystal features -> non-negative band gap (eV)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from matbalora.config import HeadConfig


#: clamp of the aleatoric log-variance (eV^2): sigma in [0.018, 7.4] eV. The floor keeps the Gaussian NLL
#: bounded: a head that learns ~0 variance on the exact zeros of metals otherwise gives batch losses of
#: 10^3-10^4 eV when one such crystal is missed (seen in training at log var -12).
LOG_VAR_RANGE = (-8.0, 4.0)


def member_log_var(member: nn.Module, z: Tensor) -> Tensor:
    """One variance member's log-variance [...] (eV^2) of its standardised input z [..., in_dim]."""
    return member(z)[..., 0].clamp(*LOG_VAR_RANGE)


def _mlp(in_dim: int, config: HeadConfig) -> tuple[nn.Sequential, int]:
    """The hidden layers of a head MLP and their output width."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(config.layers):
        layers += [nn.Linear(width, config.hidden), nn.SiLU()]
        if config.dropout > 0:
            layers.append(nn.Dropout(config.dropout))
        width = config.hidden
    return nn.Sequential(*layers), width


def _variance_member(in_dim: int, config: HeadConfig) -> nn.Sequential:
    """One MLP of a separate variance head: ``variance_hidden`` x ``variance_layers`` (0 / -1: the gap
    MLP's size) -> one log-variance."""
    size = replace(config, hidden=config.variance_hidden or config.hidden,
                   layers=config.layers if config.variance_layers < 0 else config.variance_layers)
    body, width = _mlp(in_dim, size)
    return nn.Sequential(body, nn.Linear(width, 1))


def gap_only_config(config: HeadConfig) -> HeadConfig:
    """The config of one gap member of a head, and of each gap head a rehead fits: its gap MLP alone
    (L1, no variance, no members)."""
    return replace(config, loss="l1", variance="shared", variance_members=1, variance_hidden=0, variance_layers=-1, gap_members=1)


class BandGapHead(nn.Module):
    """MLP on mean-pooled atom features. Output is never negative.

    ``softplus``: gap = softplus(z).
    ``gated``: gap = (1 - p_metal) * softplus(z), p_metal = sigmoid(logit); trained with an extra
    binary cross-entropy on ``gap == 0``.
    ``censored``: gap = max(z, 0), a metal's zero being any z <= 0; the loss compares z itself with a
    positive target and max(z, 0) with a zero one (a Tobit-like censored regression). Under softplus the
    L1 gradient of a crystal is sigmoid(z): the metals push a region of feature space to z << 0, and a
    non-metal there cannot pull it back. The shipped 512 x 3 L1 head put all five diamond-like carbons
    of its own training crystals (PBE 4.1-4.6 eV) at z = -15.5 to -16.5, gradient ~1e-7, predicted 0,
    though their pooled features lie ~8 standardised units from every metallic carbon's.
    With ``loss="nll"`` or ``"l1_nll"`` one more output is a log-variance (heteroscedastic aleatoric
    noise, eV^2). ``nll`` trains gap and variance jointly by the Gaussian NLL (which down-weights the
    hard crystals in the gap's gradient); ``l1_nll`` trains the gap by L1, as ``l1`` does, and the
    variance by the Gaussian NLL of the gap's residual with the gap detached. ``variance="separate"``
    computes the log-variance with ``variance_members`` MLPs of their own (the log of their mean
    variance) instead of one more output of the gap MLP.
    """

    def __init__(self, in_dim: int, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.in_dim = in_dim
        if config.standardize:  # feats -> (feats - mean) / std, set by set_input_statistics (trainable after that)
            self.input_shift = nn.Parameter(torch.zeros(in_dim))
            self.input_scale = nn.Parameter(torch.ones(in_dim))
        self.body, width = _mlp(in_dim, config)
        n_out = 1 + (config.output == "gated") + (self.has_variance and config.variance == "shared")
        self.out = nn.Linear(width, n_out)
        with torch.no_grad():  # start near the MP mean gap (~1.2 eV) rather than softplus(0)=0.69
            self.out.bias.zero_()
            self.out.bias[0] = 0.7
        if self.has_variance and config.variance == "separate":  # members: MLP -> log-variance (eV^2)
            # on standardised features (set by training.refit_variance): raw pooled features trained them
            # to a ranking of non-metal errors of 0.22 where standardised ones reached 0.34 (validation)
            self.variance_shift = nn.Parameter(torch.zeros(in_dim))
            self.variance_scale = nn.Parameter(torch.ones(in_dim))
            self.variance_members = nn.ModuleList(_variance_member(in_dim, config) for _ in range(config.variance_members))
        if config.gap_members > 1:  # the other gap MLPs: whole gap-only heads, fitted apart (with_gap_members)
            self.gap_members = nn.ModuleList(BandGapHead(in_dim, gap_only_config(config)) for _ in range(config.gap_members - 1))

    @property
    def has_variance(self) -> bool:
        """True when the head predicts a heteroscedastic (aleatoric) variance."""
        return self.config.loss in ("nll", "l1_nll")

    @torch.no_grad()
    def set_input_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Standardise inputs with these per-feature statistics (of the training crystals)."""
        if not self.config.standardize:
            raise ValueError("this head was built without standardize=True")
        self.input_shift.copy_(-mean)
        self.input_scale.copy_(1.0 / std.clamp_min(1e-8))

    def forward(self, feats: Tensor) -> dict[str, Tensor]:
        """feats [..., in_dim] -> dict of tensors [...]: ``gap`` (eV) and optional
        ``metal_logit`` and ``log_var`` (eV^2)."""
        raw_feats, feats = feats, self.standardized(feats)
        z = self._outputs(feats)
        out: dict[str, Tensor] = {}
        col = 1
        if self.config.output == "censored":
            out["raw"] = z[..., 0]
            positive = z[..., 0].clamp_min(0.0)
        else:
            positive = F.softplus(z[..., 0])
        if self.config.output == "gated":
            out["metal_logit"] = z[..., col]
            col += 1
            positive = positive * torch.sigmoid(-out["metal_logit"])
        out["gap"] = positive
        if self.config.gap_members > 1:  # [members, ...]: their mean is the gap, their spread epistemic
            out["gap_members"] = torch.stack([positive, *(m(raw_feats)["gap"] for m in self.gap_members)])
            out["gap"] = out["gap_members"].mean(0)
        if self.has_variance and self.config.variance == "separate":  # log of the members' mean variance
            out["log_var"] = torch.logsumexp(self._member_log_vars_of(feats), 0) - math.log(len(self.variance_members))
        elif self.has_variance:
            out["log_var"] = z[..., col].clamp(*LOG_VAR_RANGE)
        return out

    def _outputs(self, standardized: Tensor) -> Tensor:
        return self.out(self.body(standardized))

    def gap_preactivation(self, feats: Tensor) -> Tensor:
        """z [...] of the gap output before softplus / max(z, 0), for the head's input [..., in_dim]."""
        return self._outputs(self.standardized(feats))[..., 0]

    def standardized(self, feats: Tensor) -> Tensor:
        """The head's input [..., in_dim] as its MLPs see it: z-scored with ``standardize``, else as is."""
        return (feats + self.input_shift) * self.input_scale if self.config.standardize else feats

    def variance_input(self, feats: Tensor) -> Tensor:
        """What a separate variance head's members see: the head's input [..., in_dim] standardised."""
        return self._variance_z(self.standardized(feats))

    def _variance_z(self, standardized: Tensor) -> Tensor:
        return (standardized + self.variance_shift) * self.variance_scale

    def member_log_vars(self, feats: Tensor) -> Tensor:
        """Log-variances [members, ...] (eV^2) of a separate variance head's members; ``feats``: the
        head's input [..., in_dim]."""
        return self._member_log_vars_of(self.standardized(feats))

    def _member_log_vars_of(self, standardized: Tensor) -> Tensor:
        z = self._variance_z(standardized)
        return torch.stack([member_log_var(m, z) for m in self.variance_members])

    def with_separate_variance(self, members: int, *, hidden: int | None = None, layers: int | None = None) -> BandGapHead:
        """A copy whose log-variance comes from ``members`` fresh MLPs (``variance="separate"``) of
        ``hidden`` x ``layers`` (None: this head's ``variance_hidden`` / ``variance_layers``; 0 / -1: the
        gap MLP's size), the gap (and metal gate) kept exactly: train
        them with :func:`~matbalora.training.refit_variance`. A head trained by L1 alone becomes an
        ``l1_nll`` head (its gap by L1, its variance by the NLL around the detached gap)."""
        if self.config.loss not in ("nll", "l1_nll", "l1"):
            raise ValueError(f"a head trained with loss={self.config.loss!r} cannot take a separate variance (nll, l1_nll or l1)")
        loss = "l1_nll" if self.config.loss == "l1" else self.config.loss
        head = BandGapHead(self.in_dim, replace(self.config, loss=loss, variance="separate", variance_members=members,
                                                variance_hidden=self.config.variance_hidden if hidden is None else hidden,
                                                variance_layers=self.config.variance_layers if layers is None else layers))
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("variance_members.")}
        keep = head.out.out_features  # the gap (and gate) rows; a shared head's last row was its log-variance
        state["out.weight"], state["out.bias"] = state["out.weight"][:keep], state["out.bias"][:keep]
        missing, unexpected = head.load_state_dict(state, strict=False)
        lost = [k for k in missing if not k.startswith(("variance_members.", "variance_shift", "variance_scale"))]
        if lost or unexpected:
            raise RuntimeError(f"separate-variance copy lost {lost} / could not place {unexpected}")
        return head.train(self.training)

    def with_gap_members(self, others: list[BandGapHead]) -> BandGapHead:
        """A copy whose gap is the mean of this head's and ``others``' (gap-only heads of the same
        config, say fitted from other seeds on the same features), their spread an epistemic part:
        a head ensemble on frozen features. This head's variance (if any) is kept as it is."""
        if self.config.gap_members > 1:
            raise ValueError(f"this head has {self.config.gap_members} gap members already")
        wanted = gap_only_config(self.config)
        for i, other in enumerate(others):
            if other.in_dim != self.in_dim or gap_only_config(other.config) != wanted:
                raise ValueError(f"gap member {i}: in_dim={other.in_dim}, config={other.config} does not match this head's gap ({self.in_dim}, {wanted})")
        head = BandGapHead(self.in_dim, replace(self.config, gap_members=1 + len(others)))
        state = dict(self.state_dict())
        for i, other in enumerate(others):
            state |= {f"gap_members.{i}.{k}": v for k, v in other.state_dict().items()}
        head.load_state_dict(state)
        return head.train(self.training)

    def loss(self, out: dict[str, Tensor], target: Tensor) -> Tensor:
        """Mean task loss over the batch; ``target`` [n] band gaps in eV."""
        if self.config.gap_members > 1:
            raise ValueError("a head with gap_members > 1 is not trained as one: fit its gap heads apart and join them (with_gap_members)")
        gap = out["gap"]
        # censored: a positive target is compared with z itself, so its gradient never vanishes
        fit = torch.where(target > 0, out["raw"], gap) if "raw" in out else gap
        kind = self.config.loss
        if kind == "l1":
            loss = F.l1_loss(fit, target)
        elif kind == "mse":
            loss = F.mse_loss(fit, target)
        elif kind == "nll":
            loss = F.gaussian_nll_loss(fit, target, out["log_var"].exp(), full=True)
        else:  # l1_nll
            loss = F.l1_loss(fit, target) + F.gaussian_nll_loss(gap.detach(), target, out["log_var"].exp(), full=True)
        if "metal_logit" in out:
            loss = loss + F.binary_cross_entropy_with_logits(out["metal_logit"], (target <= 0).to(gap.dtype))
        return loss

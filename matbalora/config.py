"""Small frozen configs for adapters, the band-gap head and fine-tuning.

Every field is validated in ``__post_init__`` with an error that names the field and the bad value.
The CLI derives its options from these dataclasses (see ``matbalora.cli``), so defaults live here only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Method = Literal["head", "lora", "balora", "full"]
NoiseMode = Literal["per_crystal", "per_row"]
HeadOutput = Literal["softplus", "gated", "censored"]
TaskLoss = Literal["l1", "mse", "nll", "l1_nll"]
VarianceHead = Literal["shared", "separate"]
Pooling = Literal["mean", "mean_max"]
ComputeDtype = Literal["float32", "bfloat16"]

#: CHGNet's message-passing linears: GatedMLP / MLP linears in the atom, bond and angle conv layers.
CHGNET_MESSAGE_PASSING = (
    r"^(atom_conv_layers|bond_conv_layers|angle_layers)\.\d+\.(twoBody_atom|twoBody_bond|mlp_out)\b.*",
)


def _choice(name: str, value: Any, literal: Any) -> None:
    allowed = get_args(literal)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ValueError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass(frozen=True)
class AdapterConfig:
    """Where and how low-rank adapters are injected."""

    rank: int = field(default=8, metadata={"help": "rank r of the low-rank update"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator: s = alpha / r"})
    targets: tuple[str, ...] = field(
        default=CHGNET_MESSAGE_PASSING,
        metadata={"help": "regexes on module paths (re.fullmatch) selecting nn.Linear layers"},
    )
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "regexes of paths to skip"})
    last_blocks: int = field(
        default=1,
        metadata={"help": "adapt only the matched layers of the last N blocks (block = first index in the path); 0 = all"},
    )
    bayesian: bool = field(default=False, metadata={"help": "BaLoRA (True) or LoRA (False)"})
    noise: NoiseMode = field(
        default="per_crystal",
        metadata={"help": "per_crystal: one weight draw per crystal; per_row: local reparameterisation"},
    )
    log_a_init: float = field(default=-6.0, metadata={"help": "initial log noise ratio (BaLoRA)"})
    log_a_min: float = field(default=-10.0, metadata={"help": "clamp floor of log a"})
    log_a_max: float = field(default=2.0, metadata={"help": "clamp ceiling of log a"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input (MC dropout)"})

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be a positive integer")
        _positive("alpha", self.alpha)
        _choice("noise", self.noise, NoiseMode)
        if not isinstance(self.last_blocks, int) or self.last_blocks < 0:
            raise ValueError(f"last_blocks={self.last_blocks!r} must be an integer >= 0 (0 = every block)")
        if not self.targets:
            raise ValueError("targets=() selects nothing; give at least one regex")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not self.log_a_min < self.log_a_max:
            raise ValueError(f"log_a_min={self.log_a_min} must be < log_a_max={self.log_a_max}")
        if not self.log_a_min <= self.log_a_init <= self.log_a_max:
            raise ValueError(f"log_a_init={self.log_a_init} must lie in [log_a_min, log_a_max]")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class HeadConfig:
    """The band-gap readout: mean-pool atom features, MLP, non-negative output."""

    hidden: int = field(default=64, metadata={"help": "hidden width of the head MLP"})
    layers: int = field(default=2, metadata={"help": "number of hidden layers"})
    output: HeadOutput = field(
        default="softplus",
        metadata={"help": "softplus(z); gated: (1 - p_metal) * softplus(z); or censored: max(z, 0), trained on z itself where the gap is positive (a non-metal predicted below zero still feels its error: softplus does not, see BandGapHead)"},
    )
    loss: TaskLoss = field(default="l1", metadata={"help": "task loss on the gap: l1, mse, nll (Gaussian NLL of gap and learned variance), l1_nll (L1 on the gap + Gaussian NLL of the learned variance around the detached gap)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout inside the head"})
    pooling: Pooling = field(default="mean", metadata={"help": "pooling of the final atom features: mean, or mean and max concatenated"})
    standardize: bool = field(default=False, metadata={"help": "z-score the pooled features with training-set statistics of the pretrained backbone (set once before training; for features that vary little across crystals, e.g. MOFs)"})
    variance: VarianceHead = field(default="shared", metadata={"help": "with loss nll / l1_nll: shared (the log-variance is one more output of the gap MLP) or separate (variance_members MLPs on the pooled features, of the gap MLP's size unless variance_hidden / variance_layers say otherwise, their variances averaged; see training.refit_variance)"})
    variance_members: int = field(default=1, metadata={"help": "MLPs of a separate variance head"})
    variance_hidden: int = field(default=0, metadata={"help": "hidden width of each separate variance MLP (0: the gap MLP's hidden)"})
    variance_layers: int = field(default=-1, metadata={"help": "hidden layers of each separate variance MLP (-1: the gap MLP's layers)"})
    gap_members: int = field(default=1, metadata={"help": "gap MLPs of the head, each with its own input standardisation, fitted apart from different seeds (finetune.rehead_of); the gap is their mean and their spread counts as epistemic, beside the adapter draws"})

    def __post_init__(self) -> None:
        _choice("output", self.output, HeadOutput)
        _choice("loss", self.loss, TaskLoss)
        _choice("pooling", self.pooling, Pooling)
        _choice("variance", self.variance, VarianceHead)
        if not isinstance(self.variance_members, int) or self.variance_members < 1:
            raise ValueError(f"variance_members={self.variance_members!r} must be an integer >= 1")
        if not isinstance(self.gap_members, int) or self.gap_members < 1:
            raise ValueError(f"gap_members={self.gap_members!r} must be an integer >= 1")
        if self.variance == "separate" and self.loss not in ("nll", "l1_nll"):
            raise ValueError(f"variance='separate' needs a loss that learns a variance (nll, l1_nll), not loss={self.loss!r}")
        if self.hidden < 1 or self.layers < 0:
            raise ValueError(f"hidden={self.hidden}, layers={self.layers}: need hidden >= 1, layers >= 0")
        if self.variance_hidden < 0 or self.variance_layers < -1:
            raise ValueError(f"variance_hidden={self.variance_hidden}, variance_layers={self.variance_layers}: need variance_hidden >= 0 "
                             "(0: hidden), variance_layers >= -1 (-1: layers)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning hyper-parameters."""

    method: Method = field(default="balora", metadata={"help": "head, lora, balora or full"})
    epochs: int = field(default=5, metadata={"help": "maximum number of epochs"})
    batch_size: int = field(default=32, metadata={"help": "crystals per optimiser step"})
    lr: float = field(default=2e-3, metadata={"help": "peak AdamW learning rate"})
    backbone_lr: float = field(default=2e-4, metadata={"help": "learning rate of backbone weights (full)"})
    noise_lr: float = field(default=5e-2, metadata={"help": "learning rate of BaLoRA's log noise ratios (log a)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (not on log a)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps before cosine decay"})
    beta: float = field(default=1.0, metadata={"help": "KL weight in the ELBO (0: noise without prior)"})
    kl_warmup_steps: int = field(default=0, metadata={"help": "KL warm-up: the KL weight rises linearly from 0 to beta over this many steps"})
    head_refit_epochs: int = field(default=0, metadata={"help": "after fine-tuning, train the head alone for up to this many epochs on the training crystals' pooled features (computed once, posterior mean), keeping the epoch with the lowest validation MAE; the members of a separate variance head are then trained on the refitted gap's residuals"})
    patience: int = field(default=3, metadata={"help": "early stopping: epochs without validation gain"})
    grad_clip: float = field(default=5.0, metadata={"help": "gradient norm clip"})
    seed: int = field(default=0, metadata={"help": "random seed (init, shuffling, noise)"})
    max_loss: float = field(default=1e4, metadata={"help": "stop the run if the loss exceeds this or is NaN"})
    compute_dtype: ComputeDtype = field(
        default="float32",
        metadata={"help": "dtype of the adapted blocks during training steps on cached frozen features (bfloat16: ~2x faster on CPUs with AMX/AVX512-BF16, several times slower where bf16 is emulated, e.g. AVX2 only; adapters keep float32 weights, validation and prediction run in float32)"},
    )

    def __post_init__(self) -> None:
        _choice("method", self.method, Method)
        _choice("compute_dtype", self.compute_dtype, ComputeDtype)
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        _positive("lr", self.lr)
        _positive("backbone_lr", self.backbone_lr)
        _positive("noise_lr", self.noise_lr)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _positive("beta", self.beta, allow_zero=True)
        _positive("grad_clip", self.grad_clip)
        if not isinstance(self.head_refit_epochs, int) or self.head_refit_epochs < 0:
            raise ValueError(f"head_refit_epochs={self.head_refit_epochs!r} must be an integer >= 0")
        if not isinstance(self.kl_warmup_steps, int) or self.kl_warmup_steps < 0:
            raise ValueError(f"kl_warmup_steps={self.kl_warmup_steps!r} must be an integer >= 0")
        if self.patience < 1:
            raise ValueError(f"patience={self.patience!r} must be >= 1")


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (tuples become lists)."""
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build ``cls`` from a dict, refusing unknown keys with their names."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known: {sorted(names)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)

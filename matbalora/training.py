"""Fine-tuning loop: AdamW, warm-up + cosine schedule, ELBO for BaLoRA, early stopping,
an atomic checkpoint every epoch, and exact resume at epoch boundaries.

Inputs are pre-converted CHGNet graphs (converted once, cached by ``matbalora.data``); the loop
never converts a structure.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from matbalora.atomic import atomic_write, write_json
from matbalora.checkpoint import trained_state
from matbalora.config import HeadConfig, TrainConfig, to_dict
from matbalora.head import BandGapHead, member_log_var
from matbalora.model import BandGapModel

log = logging.getLogger(__name__)

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
BEST = "best.safetensors"


class ListBatches:
    """Training batches from in-memory graphs (or cached prefixes) and their targets: each epoch a
    seeded permutation, cut into batches. The out-of-core counterpart is
    :class:`matbalora.backbones.prefix_store.StoreBatches`; :func:`fit` takes either."""

    def __init__(self, graphs: Sequence, targets: np.ndarray) -> None:
        if len(graphs) != len(targets):
            raise ValueError(f"{len(graphs)} graphs but {len(targets)} targets")
        self.graphs = graphs
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.graphs)

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of which crystals this source holds (their targets, in order)."""
        return hashlib.sha256(self.targets.numpy().astype(np.float32).tobytes()).hexdigest()[:16]

    def n_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)

    def epoch(self, batch_size: int, generator: torch.Generator, skip: int = 0):
        """(graphs, targets [n] eV) per batch; the first ``skip`` batches are left out (a resumed epoch)."""
        order = torch.randperm(len(self), generator=generator)
        for i in range(skip, self.n_batches(batch_size)):
            idx = order[i * batch_size : (i + 1) * batch_size]
            yield [self.graphs[j] for j in idx.tolist()], self.targets[idx]


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf or exceeded ``max_loss``; the last good checkpoint is kept."""


def _param_groups(model: BandGapModel, cfg: TrainConfig) -> list[dict]:
    decay, no_decay, backbone = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("log_a"):
            no_decay.append(p)
        elif name.startswith("backbone.") and ".lora_" not in name:
            backbone.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": no_decay, "lr": cfg.noise_lr, "weight_decay": 0.0, "base_lr": cfg.noise_lr},
        {"params": backbone, "lr": cfg.backbone_lr, "weight_decay": cfg.weight_decay, "base_lr": cfg.backbone_lr},
    ]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.05 at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _save_state(folder: Path, model: BandGapModel, opt: torch.optim.Optimizer, meta: dict, rng: dict[str, torch.Tensor] | None = None) -> None:
    tensors = {f"model.{k}": v for k, v in trained_state(model).items()}
    tensors.update({f"rng.{k}": v for k, v in (rng or {}).items()})
    opt_state = opt.state_dict()
    for idx, st in opt_state["state"].items():
        for key, val in st.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(val).detach().cpu().contiguous()
    meta = dict(meta, param_groups=[{k: v for k, v in g.items() if k != "params"} for g in opt_state["param_groups"]])
    atomic_write(folder / STATE_TENSORS, lambda tmp: save_file(tensors, tmp))
    write_json(folder / STATE_JSON, meta)  # written last: its presence marks a complete checkpoint


def _load_state(folder: Path, model: BandGapModel, opt: torch.optim.Optimizer) -> dict:
    meta = json.loads((folder / STATE_JSON).read_text())
    tensors = load_file(str(folder / STATE_TENSORS))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, val in tensors.items():
            if key.startswith("model."):
                params[key[len("model.") :]].copy_(val)
    meta["_rng"] = {key[len("rng.") :]: val for key, val in tensors.items() if key.startswith("rng.")}
    state: dict[int, dict] = {}
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = val
    groups = opt.state_dict()["param_groups"]
    for g, saved in zip(groups, meta["param_groups"], strict=True):
        g.update({k: v for k, v in saved.items() if k != "params"})
    opt.load_state_dict({"state": state, "param_groups": groups})
    return meta


@torch.no_grad()
def validation_mae(model: BandGapModel, graphs: Sequence, targets: np.ndarray, batch_size: int = 64) -> float:
    """MAE (eV) of the deterministic (posterior-mean) prediction."""
    if len(graphs) == 0:
        return float("nan")
    pred = model.sample_gaps(graphs, samples=0, batch_size=batch_size).gaps.mean(0)  # a head ensemble: its members' mean
    return float(np.mean(np.abs(pred - targets)))


def set_head_statistics(model: BandGapModel, graphs: Sequence) -> None:
    """Standardise the head's input with the mean and std over ``graphs`` (the training crystals) of
    the pooled features, computed deterministically (posterior mean, no dropout) before training."""
    feats = model.pooled_features(graphs)
    model.head.set_input_statistics(feats.mean(0), feats.std(0))


def fit(
    model: BandGapModel,
    train: tuple[Sequence, np.ndarray] | ListBatches,
    val: tuple[Sequence, np.ndarray],
    config: TrainConfig,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    checkpoint_seconds: float = 300.0,
) -> dict:
    """Train ``model`` in place; returns the history. ``train``/``val`` = (graphs, gaps in eV);
    ``train`` may also be a batch source (:class:`ListBatches`, or ``StoreBatches`` over an on-disk
    prefix store).

    With ``out_dir``, a checkpoint is written after every epoch and every ``checkpoint_seconds``
    within an epoch (with the random-number states), and ``resume=True`` continues from it, also in
    the middle of an epoch (same seed -> same result as an uninterrupted run). The best validation
    weights are loaded into ``model`` at the end.
    """
    if config.method != model.method:
        raise ValueError(f"config.method={config.method!r} but the model was built for {model.method!r}")
    batches = train if hasattr(train, "epoch") else ListBatches(*train)
    val_graphs, val_y = val
    n_train = len(batches)
    if n_train == 0:
        raise ValueError("no training structures")
    torch.manual_seed(config.seed)
    opt = torch.optim.AdamW(_param_groups(model, config))
    steps_per_epoch = batches.n_batches(config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    folder = Path(out_dir) if out_dir is not None else None
    meta = {"epoch": 0, "step": 0, "best_val_mae": float("inf"), "bad_epochs": 0, "history": [], "config": to_dict(config)}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        if resume and (folder / STATE_JSON).is_file():
            meta = _load_state(folder, model, opt)
            log.info("resumed from %s at epoch %d", folder, meta["epoch"])
        elif (folder / STATE_JSON).is_file() and not resume:
            raise FileExistsError(f"{folder} already holds a training checkpoint; pass resume=True or use a new folder")
    if model.head_config.standardize and meta["epoch"] == 0:  # a resumed run restores them from its checkpoint
        if not isinstance(batches, ListBatches):
            raise ValueError("head standardisation needs in-memory training graphs")
        set_head_statistics(model, batches.graphs)
    dtype = getattr(torch, config.compute_dtype)
    if dtype == torch.bfloat16 and native_bf16() is False:
        log.warning("compute_dtype='bfloat16' on a CPU without native bf16 (%s): bf16 steps are emulated (a full-pool BaLoRA step "
                    "took 9.9 s against 1.8 s in float32 on an AVX2-only EPYC); use compute_dtype='float32'", torch.backends.cpu.get_cpu_capability())
    bayes_mode = "sample" if model.is_bayesian else "mean"
    while meta["epoch"] < config.epochs and meta["bad_epochs"] < config.patience:
        epoch = meta["epoch"]
        torch.manual_seed(config.seed * 1000 + epoch)  # dropout
        noise = torch.Generator().manual_seed(config.seed * 7919 + epoch + 1)
        partial = meta.pop("in_epoch", None)  # a checkpoint written inside this epoch
        rng = meta.pop("_rng", {})
        done, losses, kls, seconds_before = 0, [], [], 0.0
        if partial is not None:
            done, losses, kls, seconds_before = partial["batches_done"], partial["losses"], partial["kls"], partial["seconds"]
            noise.set_state(rng["noise"])
            torch.set_rng_state(rng["torch"])
        epoch_batches = batches.epoch(config.batch_size, torch.Generator().manual_seed(config.seed * 1000 + epoch), skip=done)
        model.train()
        t0 = last_save = time.perf_counter()
        bar = tqdm(epoch_batches, total=steps_per_epoch, initial=done, desc=f"{config.method} epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        with model.context.sampling(bayes_mode, generator=noise), model.compute_in(dtype):
            for i, (batch, batch_y) in enumerate(bar, start=done):
                factor = lr_factor(meta["step"], total_steps, config.warmup_steps)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * factor
                out = model(batch, samples=1)
                out = {k: v[0] for k, v in out.items()}
                task = model.head.loss(out, batch_y)
                kl = model.kl() if model.is_bayesian else torch.zeros(())
                warm = min(1.0, (meta["step"] + 1) / config.kl_warmup_steps) if config.kl_warmup_steps else 1.0
                loss = task + warm * config.beta * kl / n_train
                if not torch.isfinite(loss) or loss.item() > config.max_loss:
                    raise TrainingDiverged(
                        f"epoch {epoch + 1} step {i + 1}: loss {loss.item():.4g} is not finite or above max_loss={config.max_loss}; "
                        f"last good checkpoint: {folder / STATE_JSON if folder else 'none (no out_dir)'}"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], config.grad_clip)
                opt.step()
                meta["step"] += 1
                losses.append(task.item())
                kls.append(kl.item())
                bar.set_postfix(loss=f"{np.mean(losses):.3f}")
                if folder is not None and time.perf_counter() - last_save > checkpoint_seconds and i + 1 < steps_per_epoch:
                    partial = {"batches_done": i + 1, "losses": losses, "kls": kls, "seconds": seconds_before + time.perf_counter() - t0}
                    _save_state(folder, model, opt, dict(meta, in_epoch=partial), rng={"noise": noise.get_state(), "torch": torch.get_rng_state()})
                    last_save = time.perf_counter()
        train_seconds = seconds_before + time.perf_counter() - t0
        val_mae = validation_mae(model, val_graphs, np.asarray(val_y, dtype=np.float64))
        improved = val_mae < meta["best_val_mae"] - 1e-6 or not np.isfinite(meta["best_val_mae"])
        meta["history"].append(
            {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)),
                "kl": float(np.mean(kls)),
                "val_mae": val_mae,
                "train_seconds": train_seconds,
                "seconds_per_structure": train_seconds / n_train,
            }
        )
        meta["epoch"] = epoch + 1
        meta["bad_epochs"] = 0 if improved else meta["bad_epochs"] + 1
        if improved:
            meta["best_val_mae"] = val_mae
        if folder is not None:
            if improved:
                atomic_write(folder / BEST, lambda tmp: save_file(trained_state(model), tmp))
            _save_state(folder, model, opt, meta)
        elif improved:
            meta["_best_state"] = {k: v.clone() for k, v in trained_state(model).items()}
        log.info("epoch %d: train loss %.4f, val MAE %.4f eV (%.1fs)", epoch + 1, np.mean(losses), val_mae, train_seconds)
    best = load_file(str(folder / BEST)) if folder is not None and (folder / BEST).is_file() else meta.pop("_best_state", None)
    if best:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in best.items():
                params[k].copy_(v)
    model.eval()
    return {k: v for k, v in meta.items() if not k.startswith("_")}


def native_bf16() -> bool | None:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX, as oneDNN sees it);
    None when this torch build cannot tell."""
    probe = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else None
    except RuntimeError:
        return None


@torch.no_grad()
def pooled_features_of(model: BandGapModel, batches, *, batch_size: int = 128, limit: int | None = None,
                       checkpoint: str | os.PathLike | None = None, key: str = "", save_every_s: float = 300.0,
                       keep: bool = False, draws: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's inputs [n, d] (deterministic: posterior mean, no dropout) and targets [n] eV of the
    crystals of a batch source (:class:`ListBatches` or ``StoreBatches``), in one pass; ``limit``: stop
    after about this many (a seeded random choice of batches).

    ``draws`` > 0 (BaLoRA only): the features of ``draws`` adapter draws per crystal instead of the
    posterior mean, ``draws`` rows per crystal (draw-major within each batch) with its target repeated;
    each batch's draws come from a generator seeded by ``seed`` and the batch's position, so a resumed
    pass gives the same features as an unbroken one.

    ``checkpoint``: a file that the features computed so far are written to (atomically, every
    ``save_every_s`` seconds) and resumed from, so that a killed pass over the whole pool (~1 h on one
    core) continues where it stopped; it is used only if its ``key`` (say, the weights' sha256) and
    ``batch_size`` match, and deleted once the pass is done; with ``keep`` it is kept, complete, and a
    later call with the same key returns its features without a pass (a cache shared by the refits of
    one model)."""
    if draws < 0 or (draws and not model.is_bayesian):
        raise ValueError(f"draws={draws}: adapter draws need a BaLoRA model (method={model.method!r}) and draws >= 0")
    feats, ys, n = [], [], 0
    meta = {"key": key, "batch_size": batch_size, "limit": limit} | ({"draws": draws, "seed": seed} if draws else {})
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("meta") == meta and saved.get("complete"):
            log.info("pooled features: all %d rows from %s", sum(len(v) for v in saved["ys"]), path)
            return torch.cat(list(saved["feats"])), torch.cat(list(saved["ys"]))
        if saved.get("meta") == meta:
            feats, ys = list(saved["feats"]), list(saved["ys"])
            n = sum(len(v) for v in ys) // max(draws, 1)  # crystals, not rows
            log.info("pooled features: resuming after %d batches from %s", len(feats), path)
    last_save = time.perf_counter()
    was_training = model.training
    model.train(False)
    try:
        for batch, y in batches.epoch(batch_size, torch.Generator().manual_seed(0), skip=len(feats)):
            if limit is not None and n >= limit:
                break
            gen = torch.Generator().manual_seed(seed * 1_000_003 + len(feats))  # this batch's draws, resumed or not
            with model.context.sampling("sample" if draws else "mean", generator=gen):
                f = model.family.crystal_features(model.backbone, batch, samples=max(draws, 1), context=model.context, pooling=model.head_config.pooling)
            feats.append(f.reshape(-1, f.shape[-1]))
            ys.append(y.repeat(max(draws, 1)))
            n += len(y)
            if path is not None and time.perf_counter() - last_save > save_every_s:
                atomic_write(path, lambda tmp: torch.save({"meta": meta, "feats": feats, "ys": ys}, tmp))
                last_save = time.perf_counter()
    finally:
        model.train(was_training)
    if path is not None and keep:
        atomic_write(path, lambda tmp: torch.save({"meta": meta, "feats": feats, "ys": ys, "complete": True}, tmp))
    elif path is not None:
        path.unlink(missing_ok=True)
    return torch.cat(feats), torch.cat(ys)


def refit_variance(head: BandGapHead, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], *, epochs: int,
                   lr: float = 1e-3, batch_size: int = 512, weight_decay: float = 1e-4, seed: int = 0) -> dict:
    """Train the members of a separate variance head (``HeadConfig(variance="separate")``) on fixed
    pooled features [n, d] and gaps [n] eV: each member from a fresh seeded initialisation (a warm-started
    fine-tune can leave them diverged: a tenth full-pool epoch from a model with separate members sat
    at a training loss of ~2.4 instead of ~0.7), on its own shuffles, by the Gaussian NLL of the head's
    gap residuals on ``train``, for ``epochs`` epochs; the gap is left as it is.

    In-sample residuals: the full-pool models with 64 x 2 heads trained along with the adapters fit
    training and unseen crystals about equally (head MAE 0.256 vs 0.267 eV), and out-of-fold residuals
    ranked no better; a 512 x 3 head refitted on frozen features does not (0.155 vs 0.217 out of fold),
    and for it out-of-fold residuals ranked better (``benchmarks/oof_variance_probe.py``). No early stop: the epoch of
    lowest validation NLL ranks errors worse than later ones, and averaging members steadies the
    ranking (``benchmarks/variance_study.py``). Returns the validation NLL of each member and of the
    head's mean variance (nats per crystal, constant dropped)."""
    if head.config.variance != "separate":
        raise ValueError(f"refit_variance needs a head with variance='separate', not {head.config.variance!r} (see BandGapHead.with_separate_variance)")
    x, y = train
    xv, yv = val
    head.eval()
    with torch.no_grad():
        r, rv = y - head(x)["gap"], yv - head(xv)["gap"]
        raw = head.standardized(x)
        head.variance_shift.copy_(-raw.mean(0))
        head.variance_scale.copy_(1.0 / raw.std(0).clamp_min(1e-6))
        z, zv = head.variance_input(x), head.variance_input(xv)

    def nll(log_var: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        return 0.5 * (log_var + res**2 * torch.exp(-log_var)).mean()

    val_nll = []
    for k, member in enumerate(head.variance_members):
        with torch.random.fork_rng(devices=[]):  # fresh members: what earlier training did to them does not carry over
            torch.manual_seed(seed + k)
            for layer in member.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.reset_parameters()
        opt = torch.optim.AdamW(member.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed + k)
        member.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                loss = nll(member_log_var(member, z[idx]), r[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        member.eval()
        with torch.no_grad():
            val_nll.append(float(nll(member_log_var(member, zv), rv)))
    head.eval()
    with torch.no_grad():
        combined = float(nll(head(xv)["log_var"], rv))
    log.info("variance refit: %d members x %d epochs, validation NLL %.4f (members %s)", len(val_nll), epochs, combined,
             ", ".join(f"{v:.3f}" for v in val_nll))
    return {"epochs": epochs, "members": len(val_nll), "val_nll_members": val_nll, "val_nll": combined, "n_train": len(x)}


def _head_epoch(head: BandGapHead, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *, gen: torch.Generator, lr: float,
                epoch: int, epochs: int, batch_size: int) -> float:
    """One epoch of ``head`` alone by its own loss on fixed features (one epoch of warm-up, then cosine
    over ``epochs``); the mean batch loss."""
    head.train()
    steps = math.ceil(len(x) / batch_size)
    order = torch.randperm(len(x), generator=gen)
    losses = []
    for i in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(epoch * steps + i, epochs * steps, steps)
        idx = order[i * batch_size : (i + 1) * batch_size]
        loss = head.loss(head(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def fit_head(head: BandGapHead, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, seed: int = 0, batch_size: int = 256,
             weight_decay: float = 1e-4) -> BandGapHead:
    """Train ``head`` by its own loss on fixed pooled features [n, d] and gaps [n] eV for ``epochs``
    epochs (AdamW, one epoch of warm-up then cosine; no early stop, unlike :func:`refit_head`) and
    return it in eval mode."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        _head_epoch(head, opt, x, y, gen=gen, lr=lr, epoch=epoch, epochs=epochs, batch_size=batch_size)
    return head.eval()


def out_of_fold_gaps(config: HeadConfig, x: torch.Tensor, y: torch.Tensor, *, folds: int, epochs: int, lr: float, seed: int = 1) -> torch.Tensor:
    """Gaps [n] of each crystal from a head of ``config`` (trained by its loss, :func:`fit_head`, inputs
    standardised on its own folds when ``config.standardize``) that did not see it: ``folds`` heads, each
    on the other folds of a seeded random split. Residuals ``y - gaps`` are what the model errs on
    crystals it has not fitted, for variance MLPs of a head that fits its training crystals closely."""
    if folds < 2:
        raise ValueError(f"folds={folds} must be >= 2")
    fold = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) % folds
    gaps = torch.empty_like(y)
    for k in range(folds):
        train = fold != k
        torch.manual_seed(k)
        head = BandGapHead(x.shape[1], config)
        if config.standardize:
            head.set_input_statistics(x[train].mean(0), x[train].std(0))
        fit_head(head, x[train], y[train], epochs=epochs, lr=lr, seed=k)
        with torch.no_grad():
            gaps[~train] = head(x[~train])["gap"]
        log.info("out-of-fold gaps: fold %d of %d, held-out MAE %.4f eV", k + 1, folds, float((gaps[~train] - y[~train]).abs().mean()))
    return gaps


def refit_head(model: BandGapModel, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], *,
               epochs: int, lr: float = 1e-3, batch_size: int = 256, weight_decay: float = 1e-4, patience: int = 15, seed: int = 0) -> dict:
    """Train ``model.head`` alone on fixed pooled features (``pooled_features_of``): AdamW with a cosine
    schedule, the epoch with the lowest validation MAE kept (early stop after ``patience`` epochs
    without gain). Cheap: a head epoch on 80,000 crystals takes about a second. Returns the history."""
    head = model.head
    x, y = train
    xv, yv = val
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def val_mae() -> float:
        head.eval()
        return float((head(xv)["gap"] - yv).abs().mean())

    best, best_state, history, bad = val_mae(), {k: v.clone() for k, v in head.state_dict().items()}, [], 0
    start = best
    for epoch in range(epochs):
        train_loss = _head_epoch(head, opt, x, y, gen=gen, lr=lr, epoch=epoch, epochs=epochs, batch_size=batch_size)
        mae = val_mae()
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_mae": mae})
        if mae < best - 1e-6:
            best, best_state, bad = mae, {k: v.clone() for k, v in head.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    log.info("head refit: validation MAE %.4f -> %.4f eV in %d epochs", start, best, len(history))
    return {"val_mae_before": start, "val_mae_after": best, "epochs_run": len(history), "history": history}

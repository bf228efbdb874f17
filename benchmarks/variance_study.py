"""Where should the aleatoric variance be learned? (issue 14, the non-metal ranking target)

    python benchmarks/variance_study.py features MODEL_FOLDER   # pooled features, resumable (runs/full_pool/features/, keyed by the weights)
    python benchmarks/variance_study.py study MODEL_FOLDER      # benchmarks/results/full_pool/variance_study_<folder>.json

The shipped heads learn their variance from the residuals of *training* crystals, which the adapted
backbone and the head have fitted for several epochs; a crystal's training residual then says less
about its error on unseen crystals. This study keeps a model's gap head and adapters fixed and asks,
on the pooled features of all training crystals (posterior mean) and 16 BaLoRA feature draws of
validation and test, which variance ranks the test errors best:

* ``shipped``: the head's own log-variance (what ``predict`` returns);
* ``refit_train``: a separate variance MLP trained on the training residuals of the gap head
  (Gaussian NLL; early stop on validation NLL);
* ``refit_train_laplace``: the same with a Laplace likelihood (the gap is trained by L1: its
  residuals are Laplace-like; std = sqrt(2) b);
* ``refit_crossfit``: K gap heads trained on K-1 folds of the training features give out-of-fold
  residuals; the variance MLP learns those (held out at the head, not at the backbone);
* ``separate_5_members``: what ``matbalora`` ships as ``HeadConfig(variance="separate")``: five such
  MLPs (standardised inputs, Gaussian NLL of the training residuals, 100 epochs each, no early stop),
  their variances averaged (``training.refit_variance``);
* ``refit_val_cv``: the variance MLP on validation residuals only (held out at the backbone too, but
  1,000 crystals), 5-fold, each fold early-stopped on its own held-out fifth;
* ``crossfit_spread``: the spread of those K gap heads (a bootstrap-like epistemic term) with the
  shipped aleatoric term.

The in-sample refits are also traced past their NLL optimum (every 5 epochs up to 60, no early stop),
since the epoch of lowest validation NLL need not be the one that ranks errors best. ``study`` uses the
training chunks that ``features`` has written (``--max-train``: the first N training crystals).

Every std combines the draws' spread with the variance part as ``predict`` does,
sqrt(epistemic^2 + aleatoric^2), and is scored with Spearman(|error|, std) on all test crystals and
on the non-metals apart (recalibration by scale and floor does not change a ranking).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_pool import RESULTS, RUNS, eval_data  # noqa: E402
from full_pool_data import full_pool, open_store  # noqa: E402

from matbalora.atomic import atomic_write, sha256_file, write_json  # noqa: E402
from matbalora.checkpoint import WEIGHTS  # noqa: E402
from matbalora.backbones.prefix_store import StoreBatches  # noqa: E402
from matbalora.head import LOG_VAR_RANGE  # noqa: E402
from matbalora.metrics import evaluate  # noqa: E402
from matbalora.model import DEFAULT_MAX_ROWS, plan_passes  # noqa: E402
from matbalora.predict import Predictor  # noqa: E402
from matbalora.training import pooled_features_of  # noqa: E402

CHUNK, DRAWS, FOLDS = 8192, 16, 5


def feature_dir(model: str) -> Path:
    """Where ``features`` writes a model folder's features: keyed by its path and its weights (a folder
    such as models/balora is replaced when a new model ships; its old features must not be reused)."""
    weights = sha256_file(Path(model) / WEIGHTS)[:12]
    return RUNS / "features" / f"{model.strip('/').replace('/', '_')}_{weights}"


def _store_of(predictor: Predictor):
    model = predictor.model
    # verify=False: the build checked every shard; a study need not re-read the 49 GB store to open it
    return open_store(verify=False, allow_missing=True, backbone=model.backbone_name, block=model.family.prefix_block(model.backbone, model.method))


def features(model: str, max_train: int | None = None) -> Path:
    """DRAWS feature draws of validation and test, then pooled features of the first ``max_train``
    training crystals (all by default; posterior mean, chunks of 8,192, each saved once); a killed run
    continues at the next chunk."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    predictor = Predictor.load(model)
    net = predictor.model
    store = _store_of(predictor)
    out = feature_dir(model)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "eval.npz"
    if not path.is_file():
        data = eval_data(store)
        _save_npz(path, draws=feature_draws(net, data.graphs).numpy(), y=data.targets, val=data.split.val, test=data.split.test, ids=np.array(data.ids))
    train = [i for i in full_pool().train if i in store.kept][:max_train]
    for c in range(0, len(train), CHUNK):
        path = out / f"train_{c // CHUNK:03d}.npz"
        if path.is_file():
            continue
        t0 = time.perf_counter()
        x, y = pooled_features_of(net, StoreBatches(store, train[c : c + CHUNK]))
        _save_npz(path, x=x.numpy(), y=y.numpy())
        print(f"{path.name}: {len(y)} crystals in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


@torch.no_grad()
def feature_draws(net, graphs) -> torch.Tensor:
    """[DRAWS, n, d] pooled features of BaLoRA weight draws, in the forward passes ``sample_gaps`` plans
    (bounded rows per pass: 32 crystals x 16 draws in one pass is several times slower)."""
    passes = plan_passes([net.family.graph_rows(g) for g in graphs], draws=DRAWS, max_rows=DEFAULT_MAX_ROWS, max_crystals=64)
    parts: dict[tuple[int, int], list[torch.Tensor]] = {}
    net.eval()
    with net.context.sampling("sample", generator=torch.Generator().manual_seed(0)):
        for step in passes:
            feats = net.family.crystal_features(net.backbone, graphs[step.start : step.stop], samples=step.draws, context=net.context,
                                                pooling=net.head_config.pooling)
            parts.setdefault((step.start, step.stop), []).append(feats)
    return torch.cat([torch.cat(p, 0) for p in parts.values()], 1)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(path, write)


def load_features(model: str) -> dict:
    out = feature_dir(model)
    chunks = sorted(out.glob("train_*.npz"))
    x = np.concatenate([np.load(p)["x"] for p in chunks])
    y = np.concatenate([np.load(p)["y"] for p in chunks])
    ev = np.load(out / "eval.npz")
    return {"train_x": torch.as_tensor(x), "train_y": torch.as_tensor(y), "draws": torch.as_tensor(ev["draws"]),
            "y": ev["y"], "val": ev["val"], "test": ev["test"]}


class VarianceMLP(nn.Module):
    """Standardised pooled features -> log-variance (eV^2) or log Laplace scale (eV)."""

    def __init__(self, x: torch.Tensor, hidden: int = 64) -> None:
        super().__init__()
        self.register_buffer("mu", x.mean(0))
        self.register_buffer("sd", x.std(0).clamp_min(1e-6))
        self.net = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mu) / self.sd)[..., 0].clamp(*LOG_VAR_RANGE)


def _nll(out: torch.Tensor, r: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "laplace":  # out = log b
        return (out + r.abs() * torch.exp(-out)).mean()
    return 0.5 * (out + r**2 * torch.exp(-out)).mean()  # out = log var


def fit_variance(x: torch.Tensor, r: torch.Tensor, xv: torch.Tensor, rv: torch.Tensor, *, kind: str = "gauss", epochs: int = 200,
                 patience: int = 20, seed: int = 0, trace=None, every: int = 5) -> tuple[VarianceMLP, dict]:
    """A variance MLP on residuals ``r`` of features ``x``, the epoch of lowest validation NLL kept;
    ``trace(mlp) -> dict`` is recorded every ``every`` epochs (``info["trace"]``)."""
    torch.manual_seed(seed)
    mlp = VarianceMLP(x)
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    best, state, bad, n, history = float("inf"), None, 0, 0, []
    for n in range(epochs):
        mlp.train()
        for idx in torch.randperm(len(x), generator=gen).split(512):
            loss = _nll(mlp(x[idx]), r[idx], kind)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        mlp.eval()
        with torch.no_grad():
            v = float(_nll(mlp(xv), rv, kind))
        if trace is not None and (n + 1) % every == 0:
            history.append({"epoch": n + 1, "val_nll": v, **trace(mlp)})
        if v < best - 1e-5:
            best, state, bad = v, {k: t.clone() for k, t in mlp.state_dict().items()}, 0
        elif (bad := bad + 1) >= patience:
            break
    mlp.load_state_dict(state)
    mlp.eval()
    return mlp, {"val_nll": best, "epochs": n + 1, **({"trace": history} if trace is not None else {})}


def std_of(mlp: VarianceMLP, draws: torch.Tensor, kind: str) -> np.ndarray:
    """Aleatoric std [n] eV: the mean over draws of each draw's variance, as ``predict`` averages it."""
    with torch.no_grad():
        out = mlp(draws)
    var = torch.exp(out) if kind == "gauss" else 2 * torch.exp(2 * out)
    return np.sqrt(var.double().mean(0).numpy())


def fit_gap_head(template: nn.Module, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, *, epochs: int = 100,
                 patience: int = 10, seed: int = 0) -> nn.Module:
    """A copy of ``template`` (the model's head) trained by L1 on (x, y), the epoch of lowest validation MAE kept."""
    import copy

    torch.manual_seed(seed)
    head = copy.deepcopy(template)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    best, state, bad = float("inf"), None, 0
    for _ in range(epochs):
        head.train()
        for idx in torch.randperm(len(x), generator=gen).split(256):
            loss = F.l1_loss(head(x[idx])["gap"], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            mae = float((head(xv)["gap"] - yv).abs().mean())
        if mae < best - 1e-6:
            best, state, bad = mae, {k: t.clone() for k, t in head.state_dict().items()}, 0
        elif (bad := bad + 1) >= patience:
            break
    head.load_state_dict(state)
    head.eval()
    return head


def _scores(mean: np.ndarray, std: np.ndarray, y: np.ndarray) -> dict:
    m = evaluate(mean, np.maximum(std, 1e-9), y)
    return {k: round(float(m[k]), 4) for k in ("mae", "spearman", "nonmetal_mae", "nonmetal_spearman")}


def study(model: str) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    predictor = Predictor.load(model)
    head = predictor.model.head.eval()
    f = load_features(model)
    x, y, draws = f["train_x"], f["train_y"], f["draws"]
    val, test, yall = f["val"], f["test"], f["y"]
    with torch.no_grad():
        train_gap = head(x)["gap"]
        out = head(draws)  # [S, n] each
    gaps = out["gap"].double().numpy()
    mean, epi = gaps.mean(0), gaps.std(0, ddof=1)
    alea = np.sqrt(out["log_var"].double().exp().mean(0).numpy())
    xv_mean = draws[:, val].mean(0)  # validation features for early stopping (mean of the draws)
    rv = torch.as_tensor(yall[val] - mean[val], dtype=torch.float32)
    report = {"model": model, "features": feature_dir(model).name, "n_train": len(y), "draws": DRAWS,
              "train_mae_of_head": float((train_gap - y).abs().mean()), "val_mae": float(np.abs(mean[val] - yall[val]).mean()),
              "variants": {}}

    def add(name: str, alea_std: np.ndarray, extra: dict | None = None, epistemic: np.ndarray = epi) -> None:
        total = np.hypot(epistemic, alea_std)
        report["variants"][name] = {"val": _scores(mean[val], total[val], yall[val]), "test": _scores(mean[test], total[test], yall[test]),
                                    "test_aleatoric_only": _scores(mean[test], alea_std[test], yall[test]), **(extra or {})}
        print(name, json.dumps(report["variants"][name]), flush=True)

    add("shipped", alea)
    r = y - train_gap
    for kind in ("gauss", "laplace"):
        mlp, info = fit_variance(x, r, xv_mean, rv, kind=kind)
        add("refit_train" + ("" if kind == "gauss" else "_laplace"), std_of(mlp, draws, kind), info)
    # what the package ships (matbalora.training.refit_variance): 5 members x 100 epochs, no early stop
    from matbalora.finetune import VARIANCE_REFIT_EPOCHS
    from matbalora.training import refit_variance

    torch.manual_seed(0)
    separate = head.with_separate_variance(5)
    info = refit_variance(separate, (x, y), (xv_mean, torch.as_tensor(yall[val], dtype=torch.float32)), epochs=VARIANCE_REFIT_EPOCHS)
    with torch.no_grad():
        add("separate_5_members", np.sqrt(separate(draws)["log_var"].double().exp().mean(0).numpy()), {k: info[k] for k in ("epochs", "members", "val_nll")})
    # past the NLL optimum: the ranking of the in-sample refits, every 5 epochs up to 60 (no early stop)
    for kind in ("gauss", "laplace"):
        def ranks(mlp, kind=kind) -> dict:
            total = np.hypot(epi, std_of(mlp, draws, kind))
            return {part: _scores(mean[idx], total[idx], yall[idx]) for part, idx in (("val", val), ("test", test))}

        _, info = fit_variance(x, r, xv_mean, rv, kind=kind, epochs=60, patience=60, trace=ranks)
        report[f"trace_refit_train_{kind}"] = info["trace"]
        for t in info["trace"]:
            print(kind, t["epoch"], "non-metal Spearman val / test", t["val"]["nonmetal_spearman"], t["test"]["nonmetal_spearman"], flush=True)
    # K-fold: out-of-fold residuals of gap heads trained on the other folds
    folds = torch.randperm(len(x), generator=torch.Generator().manual_seed(1)) % FOLDS
    oof = torch.empty_like(y)
    fold_gaps = []
    yv = torch.as_tensor(yall[val], dtype=torch.float32)
    for k in range(FOLDS):
        t0 = time.perf_counter()
        h = fit_gap_head(head, x[folds != k], y[folds != k], xv_mean, yv, seed=k)
        with torch.no_grad():
            oof[folds == k] = y[folds == k] - h(x[folds == k])["gap"]
            fold_gaps.append(h(draws)["gap"].double().mean(0).numpy())
        print(f"fold {k}: {time.perf_counter() - t0:.0f} s", flush=True)
    report["oof_mae"] = float(oof.abs().mean())
    for kind in ("gauss", "laplace"):
        mlp, info = fit_variance(x, oof, xv_mean, rv, kind=kind)
        add("refit_crossfit" + ("" if kind == "gauss" else "_laplace"), std_of(mlp, draws, kind), info)
    # held-out residuals of the backbone too, but few: 5-fold on the validation crystals, each fold's MLP
    # early-stopped on its held-out fifth, test std from the mean of the five fold variances
    vfold = np.arange(len(val)) % FOLDS
    var_test = []
    for k in range(FOLDS):
        fit, hold = val[vfold != k], val[vfold == k]
        mlp, _ = fit_variance(draws[:, fit].mean(0), rv[vfold != k], draws[:, hold].mean(0), rv[vfold == k], epochs=300, patience=30, seed=k)
        var_test.append(std_of(mlp, draws, "gauss") ** 2)
    add("refit_val_cv", np.sqrt(np.mean(var_test, axis=0)), {"note": "validation scores are in-sample for 4/5 of the folds"})
    spread = np.std(fold_gaps, axis=0, ddof=1)
    add("crossfit_spread", alea, {"note": "epistemic = hypot(draws, spread of the K fold heads)"}, epistemic=np.hypot(epi, spread))
    write_json(RESULTS / f"variance_study_{model.strip('/').replace('/', '_')}.json", report)
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=("features", "study"))
    ap.add_argument("model", help="a model folder (models/balora or runs/full_pool/NAME)")
    ap.add_argument("--max-train", type=int, default=None, help="features: only the first N training crystals")
    args = ap.parse_args(argv)
    features(args.model, args.max_train) if args.cmd == "features" else study(args.model)


if __name__ == "__main__":
    main()

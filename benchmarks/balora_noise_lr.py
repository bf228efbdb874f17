"""BaLoRA noise learning rate and initialisation at the last-block placement (the probe behind TrainConfig.noise_lr).

    OMP_NUM_THREADS=1 python benchmarks/balora_noise_lr.py lora_last,balora_last_nlr5e-2,balora_last_init-2_nlr2e-2,balora_last_nlr2e-3 6

Same 2,000 / 500 split as benchmarks/mp_gap.py; each configuration trained for the given epochs (6), seed 0,
scored on the validation split (16 draws for BaLoRA). Prints one JSON line per configuration; the lines of the
run are kept in benchmarks/results/balora_noise_lr.jsonl.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mp_gap_data import SplitSizes, load_benchmark_data  # noqa: E402

from matbalora.config import AdapterConfig, TrainConfig  # noqa: E402
from matbalora.finetune import with_frozen_prefix  # noqa: E402
from matbalora.metrics import mae, spearman  # noqa: E402
from matbalora.model import BandGapModel  # noqa: E402
from matbalora.training import fit  # noqa: E402

#: name -> (method, AdapterConfig overrides, TrainConfig overrides); adapters at the default placement (last block)
CONFIGS = {
    "lora_last": ("lora", {}, {}),
    "balora_last_nlr2e-3": ("balora", {}, {"noise_lr": 2e-3}),  # log a at the adapters' learning rate
    "balora_last_nlr5e-2": ("balora", {}, {"noise_lr": 5e-2}),
    "balora_last_init-2_nlr2e-2": ("balora", {"log_a_init": -2.0}, {"noise_lr": 2e-2}),
}


def main() -> None:
    only = sys.argv[1].split(",") if len(sys.argv) > 1 else list(CONFIGS)
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    torch.set_num_threads(1)
    probe = BandGapModel.from_pretrained("lora")
    data = load_benchmark_data(SplitSizes(n_train=2000, n_val=500, n_test=1000, seed=0), probe, progress=False)
    data = with_frozen_prefix(data, probe, parts=("train", "val"), progress=False)  # shared by every run
    train = ([data.graphs[i] for i in data.split.train], data.targets[data.split.train])
    val_graphs, y_val = [data.graphs[i] for i in data.split.val], data.targets[data.split.val]
    for name in only:
        method, adapter_kw, train_kw = CONFIGS[name]
        torch.manual_seed(0)
        model = BandGapModel.from_pretrained(method, adapter=AdapterConfig(bayesian=method == "balora", **adapter_kw))
        history = fit(model, train, (val_graphs, y_val), TrainConfig(method=method, epochs=epochs, seed=0, patience=99, **train_kw), progress=False)
        out = {"name": name, "val_mae": history["best_val_mae"], "epoch_s": [round(e["train_seconds"], 1) for e in history["history"]],
               "val_curve": [round(e["val_mae"], 3) for e in history["history"]], "trainable": model.parameter_counts()["trainable"]}
        if method == "balora":
            out["log_a"] = [round(float(p.detach().mean()), 2) for n, p in model.named_parameters() if n.endswith("log_a")]
            draws = model.sample_gaps(val_graphs, samples=16, seed=0).gaps
            mean, std = draws.mean(0), draws.std(0, ddof=1)
            nonmetal = y_val > 0
            out.update(mc_mae=mae(mean, std, y_val), spearman=spearman(mean, std, y_val),
                       spearman_nm=spearman(mean[nonmetal], std[nonmetal], y_val[nonmetal]),
                       median_std=float(np.median(std)), median_err=float(np.median(np.abs(mean - y_val))))
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

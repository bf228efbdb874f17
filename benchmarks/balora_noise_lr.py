"""BaLoRA noise learning rate and initialisation at the last-block placement (the probe behind TrainConfig.noise_lr).

    OMP_NUM_THREADS=1 python benchmarks/balora_noise_lr.py lora_last,balora_last_nlr5e-2,balora_last_init-2_nlr2e-2,balora_last_nlr2e-3 6

Same 2,000 / 500 split as benchmarks/mp_gap.py; each configuration trained for the given epochs (6), seed 0,
scored on the validation split (16 draws for BaLoRA). Prints one JSON line per configuration; the lines of the
run are kept in benchmarks/results/balora_noise_lr.jsonl.
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np, torch
from scipy.stats import spearmanr
torch.set_num_threads(1)
from mp_gap_data import SplitSizes, load_benchmark_data
from matbalora.config import AdapterConfig, HeadConfig, TrainConfig
from matbalora.model import BandGapModel
from matbalora.finetune import with_frozen_prefix
from matbalora.training import fit

LAST = (r"^atom_conv_layers\.3\.(twoBody_atom|mlp_out)\b.*",)
probe = BandGapModel.from_pretrained("lora", adapter=AdapterConfig(targets=LAST))
data = load_benchmark_data(SplitSizes(n_train=2000, n_val=500, n_test=1000, seed=0), probe, workers=1, progress=False)
t0 = time.perf_counter(); data = with_frozen_prefix(data, probe, progress=False); print("prefix s", time.perf_counter() - t0, flush=True)
tr = ([data.graphs[i] for i in data.split.train], data.targets[data.split.train])
va = ([data.graphs[i] for i in data.split.val], data.targets[data.split.val])
configs = {
  "lora_last": ("lora", dict(), dict()),
  "balora_last_nlr2e-3": ("balora", dict(), dict(noise_lr=2e-3)),  # log a at the adapters' learning rate
  "balora_last_nlr5e-2": ("balora", dict(), dict(noise_lr=5e-2)),
  "balora_last_init-2_nlr2e-2": ("balora", dict(log_a_init=-2.0), dict(noise_lr=2e-2)),
}
only = sys.argv[1].split(",") if len(sys.argv) > 1 else list(configs)
for name in only:
    method, akw, tkw = configs[name]
    torch.manual_seed(0)
    m = BandGapModel.from_pretrained(method, adapter=AdapterConfig(bayesian=method == "balora", targets=LAST, **akw))
    cfg = TrainConfig(method=method, epochs=int(sys.argv[2]) if len(sys.argv) > 2 else 6, seed=0, patience=99, **tkw)
    t0 = time.perf_counter()
    h = fit(m, tr, va, cfg, progress=False)
    secs = time.perf_counter() - t0
    out = {"name": name, "val_mae": h["best_val_mae"], "epoch_s": [round(e["train_seconds"], 1) for e in h["history"]], "val_curve": [round(e["val_mae"], 3) for e in h["history"]], "trainable": m.parameter_counts()["trainable"]}
    if method == "balora":
        la = [p.detach() for n, p in m.named_parameters() if n.endswith("log_a")]
        out["log_a"] = [round(float(x.mean()), 2) for x in la]
        s = m.sample_gaps(va[0], samples=16, seed=0).gaps
        mean, std = s.mean(0), s.std(0, ddof=1)
        err = np.abs(mean - va[1])
        nm = va[1] > 0
        out.update(mc_mae=float(err.mean()), spearman=float(spearmanr(err, std)[0]), spearman_nm=float(spearmanr(err[nm], std[nm])[0]), median_std=float(np.median(std)), median_err=float(np.median(err)))
    print(json.dumps(out), flush=True)

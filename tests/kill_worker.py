"""Worker process for tests/test_kill_resume.py: a tiny training run or a screen, to be SIGKILLed.

    python tests/kill_worker.py train OUT_DIR CHECKPOINT [--resume] [--step-delay S]
    python tests/kill_worker.py screen OUT_CSV MODEL_DIR INPUTS [--chunk-delay S]

``--step-delay``/``--chunk-delay`` only slow the run down (a sleep in a forward pre-hook), so that
the test can kill it mid-epoch or between chunks; they do not change any number. Progress goes
to ``OUT_DIR/heartbeat`` (training steps this process ran) and ``OUT_CSV`` with suffix
``.passes`` (model passes this process ran), so the test can poll instead of sleeping and can
tell a resumed run from one that started over.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

N_STRUCTURES, N_TRAIN, BATCH, EPOCHS, SEED = 40, 32, 4, 3, 5  # 8 steps per epoch


def train(out: Path, checkpoint: Path, *, resume: bool, step_delay: float) -> None:
    from safetensors.torch import save_file

    from conftest import tiny_model, toy_set
    from matbalora.checkpoint import trained_state
    from matbalora.config import TrainConfig
    from matbalora.training import fit

    model = tiny_model("balora", checkpoint, seed=11 if resume else 0)  # resumed weights must come from disk
    structs, gaps = toy_set(N_STRUCTURES, seed=1)
    graphs = [model.structure_to_graph(s) for s in structs]
    steps = {"n": 0}
    heartbeat = out / "heartbeat"
    out.mkdir(parents=True, exist_ok=True)

    def slow_step(module, args):
        if module.training:  # training steps only, not the validation passes
            steps["n"] += 1
            heartbeat.write_text(str(steps["n"]))
            time.sleep(step_delay)

    model.register_forward_pre_hook(slow_step)
    cfg = TrainConfig(
        method="balora", epochs=EPOCHS, batch_size=BATCH, lr=5e-3, warmup_steps=2, patience=EPOCHS, seed=SEED
    )
    history = fit(model, (graphs[:N_TRAIN], gaps[:N_TRAIN]), (graphs[N_TRAIN:], gaps[N_TRAIN:]), cfg,
                  out_dir=out, resume=resume, progress=False)  # fmt: skip
    save_file(trained_state(model), str(out / "final.safetensors"))
    (out / "final.json").write_text(json.dumps(history))


def screen(out_csv: Path, model_dir: Path, inputs: Path, *, chunk_delay: float) -> None:
    import matbalora

    predictor = matbalora.load_model(model_dir)
    passes = {"n": 0}
    counter = out_csv.with_suffix(".passes")

    def slow_pass(module, args):
        passes["n"] += 1
        counter.write_text(str(passes["n"]))
        time.sleep(chunk_delay)

    predictor.model.register_forward_pre_hook(slow_pass)
    matbalora.screen([inputs], model=predictor, samples=2, batch_size=3, out=out_csv, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "screen"])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    args = parser.parse_args()
    if args.mode == "train":
        train(Path(args.paths[0]), Path(args.paths[1]), resume=args.resume, step_delay=args.step_delay)
    else:
        screen(Path(args.paths[0]), Path(args.paths[1]), Path(args.paths[2]), chunk_delay=args.chunk_delay)


if __name__ == "__main__":
    main()

"""What the solved expert bias costs: one compiled MLX training step (forward, backward, AdamW,
bias update) with `bias_update: "solve"` against the same step with the "sign" rule, which
computes no balancing bias. Timed round-robin, median of --repeats, same weights and batch.

    python benchmarks/bench_balance.py --preset tiny
    python benchmarks/bench_balance.py --preset small --batch-size 8 --seq-len 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common  # noqa: E402, F401  (sets up MLX's CPU BLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from customllm.config import ModelConfig  # noqa: E402
from customllm.training import TrainConfig  # noqa: E402
from customllm_mlx.model import CustomLLM  # noqa: E402
from customllm_mlx.train import make_optimizer, make_train_step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    opts = p.parse_args()
    systems = {}
    for rule in ("solve", "sign"):
        mx.random.seed(0)
        rate = ModelConfig.from_preset(opts.preset).bias_update_rate if rule == "solve" else 1e-3
        config = ModelConfig.from_preset(opts.preset, bias_update=rule, bias_update_rate=rate)
        model = CustomLLM(config)
        cfg = TrainConfig(preset=opts.preset)
        optimizer = make_optimizer(cfg, model)
        step = make_train_step(model, optimizer, cfg, mx.distributed.init(), compiled=True)
        ids = mx.random.randint(0, config.vocab_size, (opts.batch_size, opts.seq_len + 1))
        systems[rule] = (step, ids, model, optimizer)
    times: dict[str, list[float]] = {rule: [] for rule in systems}
    for i in range(opts.repeats + 2):
        for rule, (step, ids, model, optimizer) in systems.items():
            tic = time.perf_counter()
            mx.eval(step(ids, None, True), model.state, optimizer.state)
            if i >= 2:  # the first two trace and compile
                times[rule].append(time.perf_counter() - tic)
    ms = {rule: statistics.median(t) * 1e3 for rule, t in times.items()}
    print(
        f"{opts.preset}, {opts.batch_size} x {opts.seq_len} tokens: solve {ms['solve']:.1f} ms, "
        f"sign {ms['sign']:.1f} ms per step; solve / sign = {ms['solve'] / ms['sign']:.3f}"
    )


if __name__ == "__main__":
    main()

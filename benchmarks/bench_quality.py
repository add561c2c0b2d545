"""Quality: the MoE against its dense baseline at equal active parameters, data, seed and tokens.

For each seed, trains the preset (the MoE) and its dense baseline (`n_routed_experts: 0`, the
shared SwiGLU (1 + top-k) x as wide: the MoE's active parameters) with the same command line,
then evaluates both on --eval-data with the `eval` command, and on the first batches of the
training text itself. Prints a table (held-out loss, perplexity, the loss on training text and
its gap to held-out, MaxVio over training, tokens/s), the paired difference per seed
(dense - MoE: > 0 means the MoE wins), and writes OUT/quality.json, OUT/quality.png (both loss
curves per seed) and a greedy sample of each model. Runs already finished in OUT are reused.

    python benchmarks/bench_quality.py --preset small --steps 400 --seeds 0,1,2 \
        --data ../shared/data/tinystories/train.txt \
        --eval-data ../shared/data/tinystories/heldout.txt \
        --tokenizer ../shared/tokenizers/cosmo2 --out runs/quality
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from customllm.config import ModelConfig
from customllm.metrics import read_metrics

SAMPLE_PROMPT = "Once upon a time"


def dense_baseline(config: ModelConfig) -> ModelConfig:
    """The dense model with `config`'s active parameters: no router, one SwiGLU as wide as the
    shared expert and the top-k routed experts together."""
    width = (config.n_shared_experts + config.num_experts_per_tok) * config.intermediate_size
    values = {**config.to_dict(), "n_routed_experts": 0, "n_shared_experts": 1}
    values["intermediate_size"] = width
    return ModelConfig.from_dict(values)


def command(framework: str) -> list[str]:
    name = "customllm-mlx" if framework == "mlx" else "customllm-torch"
    exe = shutil.which(name)
    if exe is None:
        sys.exit(f"Error: {name} not found on PATH; install the package (pip install -e .[all])")
    return [exe]


def run(args: list[str], log: Path) -> str:
    """Run a CLI command, its output to `log`; exit with the log's tail if it fails."""
    result = subprocess.run(args, capture_output=True, text=True)
    log.write_text(result.stdout + result.stderr)
    if result.returncode:
        sys.exit(f"Error: {' '.join(args[:3])} ... failed; see {log}:\n{result.stderr[-2000:]}")
    return result.stdout


def train_and_eval(opts, kind: str, config_path: Path, seed: int) -> dict:
    out = opts.out / f"seed{seed}" / kind
    checkpoint = out / f"checkpoint-{opts.steps}"
    cli = command(opts.framework)
    if not checkpoint.is_dir():
        if out.exists():
            shutil.rmtree(out)  # an unfinished run: start it again, the same way
        train = cli + ["train", "--config", str(config_path), "--data", opts.data,
                       "--steps", str(opts.steps), "--batch-size", str(opts.batch_size),
                       "--seq-len", str(opts.seq_len), "--seed", str(seed), "--out", str(out),
                       "--eval-every", "0", "--sample-every", "0", "--save-every", "0",
                       "--log-every", "50"]  # fmt: skip
        if opts.tokenizer:
            train += ["--tokenizer", opts.tokenizer]
        if opts.framework == "torch":
            train += ["--device", opts.device]
        print(f"training {kind}, seed {seed}: {out}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        run(train, opts.out / f"seed{seed}-{kind}-train.log")

    def evaluate(data: str, name: str, max_batches: int | None) -> dict:
        """The `eval` command's results on `data`, from OUT/.../NAME.json once it ran."""
        path = out / f"{name}.json"
        if not path.is_file():
            args = cli + ["eval", "--model", str(checkpoint), "--data", data,
                          "--seq-len", str(opts.seq_len), "--json", str(path)]  # fmt: skip
            if max_batches:
                args += ["--max-batches", str(max_batches)]
            run(args, opts.out / f"seed{seed}-{kind}-{name}.log")
        return json.loads(path.read_text())

    result = evaluate(opts.eval_data, "eval", opts.max_eval_batches)
    fit = None
    if opts.train_eval_batches and opts.data != "builtin":  # eval's builtin: held-out only
        fit = evaluate(opts.data, "eval-train", opts.train_eval_batches)["loss"]
    sample = run(
        cli + ["generate", "--model", str(checkpoint), "-p", SAMPLE_PROMPT, "-m", "60"],
        opts.out / f"seed{seed}-{kind}-generate.log",
    ).strip()
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    vios = [r["max_vio"] for r in records if r.get("max_vio") is not None]
    late = vios[len(vios) // 2 :]
    return {
        "kind": kind,
        "seed": seed,
        "heldout_loss": result["loss"],
        "train_text_loss": fit,
        "gap": None if fit is None else result["loss"] - fit,
        "perplexity": result["perplexity"],
        "heldout_max_vio": result["max_vio"],
        "train_max_vio_mean": statistics.fmean(vios) if vios else None,
        "train_max_vio_late": statistics.fmean(late) if late else None,
        "share_balanced": sum(v <= 0.3 for v in late) / len(late) if late else None,
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in records[1:]),
        "curve": [(r["step"], r["loss"]) for r in records],
        "sample": sample,
    }


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small", help="The MoE's preset (default: small).")
    p.add_argument("--framework", choices=["mlx", "torch"], default="mlx")
    p.add_argument("--device", default="cpu", help="torch only: cpu, cuda or mps.")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--data", default="builtin", help="Training text (as --data of train).")
    p.add_argument("--eval-data", required=True, help="Held-out text (any file eval reads).")
    p.add_argument("--max-eval-batches", type=int, default=None)
    p.add_argument("--train-eval-batches", type=int, default=40,
                   help="Also evaluate on the first N batches of --data, the text trained on "
                   "(the gap to held-out shows memorisation); 0: skip (default: 40).")  # fmt: skip
    p.add_argument("--tokenizer", default=None, help="Tokenizer folder or hub id.")
    p.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds (paired runs).")
    p.add_argument("--out", type=Path, default=Path("runs/quality"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="A field of the MoE's config (a JSON value), e.g. "
                   "--set routed_scaling_factor=1.0; repeatable.")  # fmt: skip
    opts = p.parse_args()
    seeds = [int(s) for s in opts.seeds.split(",") if s.strip()]
    if not Path(opts.eval_data).exists() and opts.eval_data != "builtin":
        sys.exit(f"Error: --eval-data {opts.eval_data} not found")
    opts.out.mkdir(parents=True, exist_ok=True)
    try:
        fields = {k: json.loads(v) for k, _, v in (item.partition("=") for item in opts.set)}
    except json.JSONDecodeError:
        sys.exit(f"Error: --set {' '.join(opts.set)}: each takes KEY=VALUE, VALUE in JSON (1.0)")
    try:
        moe = ModelConfig.from_preset(opts.preset, **fields)
    except (ValueError, TypeError) as err:
        sys.exit(f"Error: --set {' '.join(opts.set)}: {err}")
    configs = {"moe": moe, "dense": dense_baseline(moe)}
    paths = {}
    for kind, config in configs.items():
        paths[kind] = opts.out / f"{kind}.json"
        config.to_json(paths[kind])
    rows = []
    for seed in seeds:
        for kind in configs:
            rows.append(train_and_eval(opts, kind, paths[kind], seed))

    headers = ["model", "seed", "held-out loss", "ppl", "training-text loss", "gap",
               "MaxVio (train, 2nd half)", "<= 0.3", "MaxVio (held-out)", "tokens/s"]  # fmt: skip
    table = [
        [r["kind"], str(r["seed"]), f"{r['heldout_loss']:.4f}", f"{r['perplexity']:.2f}",
         fmt(r["train_text_loss"], ".4f"), fmt(r["gap"], ".4f"),
         fmt(r["train_max_vio_late"], ".3f"), fmt(r["share_balanced"], ".0%"),
         fmt(r["heldout_max_vio"], ".3f"), f"{r['tokens_per_sec']:,.0f}"]
        for r in rows
    ]  # fmt: skip
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for row in table:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    by = {(r["kind"], r["seed"]): r for r in rows}
    diffs = [by["dense", s]["heldout_loss"] - by["moe", s]["heldout_loss"] for s in seeds]
    summary = {}
    for kind in configs:
        losses = [by[kind, s]["heldout_loss"] for s in seeds]
        summary[kind] = {
            "mean": statistics.fmean(losses),
            "stdev": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "active_parameters": active_parameters(configs[kind]),
        }
        print(f"{kind}: held-out loss {summary[kind]['mean']:.4f} +- {summary[kind]['stdev']:.4f} "
              f"over seeds {seeds}; {summary[kind]['active_parameters'] / 1e6:.2f}M active "
              "parameters")  # fmt: skip
    print("paired difference dense - MoE per seed (> 0: the MoE is better): "
          + ", ".join(f"{d:+.4f}" for d in diffs)
          + f"; mean {statistics.fmean(diffs):+.4f}")  # fmt: skip
    tokens = opts.steps * opts.batch_size * opts.seq_len
    report = {
        "preset": opts.preset, "framework": opts.framework, "steps": opts.steps,
        "batch_size": opts.batch_size, "seq_len": opts.seq_len, "tokens_per_model": tokens,
        "data": opts.data, "eval_data": opts.eval_data, "seeds": seeds, "summary": summary,
        "paired_difference": diffs, "runs": rows,
    }  # fmt: skip
    (opts.out / "quality.json").write_text(json.dumps(report, indent=2))
    plot(rows, seeds, opts.out / "quality.png")
    print(f"wrote {opts.out / 'quality.json'} and {opts.out / 'quality.png'}")


def active_parameters(config: ModelConfig) -> int:
    """Parameters a token passes through: all but the routed experts it is not sent to."""
    d, inter = config.hidden_size, config.intermediate_size
    idle = config.n_routed_experts - min(config.num_experts_per_tok, config.n_routed_experts)
    return config.num_parameters() - config.num_hidden_layers * idle * 3 * d * inter


def plot(rows: list[dict], seeds: list[int], png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no PNG)")
        return
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = {"moe": "tab:blue", "dense": "tab:orange"}
    for r in rows:
        steps, losses = zip(*r["curve"], strict=True)
        smooth = [statistics.fmean(losses[max(0, i - 9) : i + 1]) for i in range(len(losses))]
        label = r["kind"] if r["seed"] == seeds[0] else None
        ax.plot(steps, smooth, color=colors[r["kind"]], alpha=0.8, linewidth=1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (10-step mean)")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("MoE against its dense baseline (equal active parameters), one line per seed")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

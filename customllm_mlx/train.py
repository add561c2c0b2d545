"""`customllm-mlx train`: a plain MLX training loop under the conventions of customllm.training.

One optimizer step: `grad_accum` micro-batches through ONE `mx.compile`d step (its state is the
model, the optimizer and the RNG), which sums their gradients, expert loads and losses; the last
micro-step averages the gradients (over micro-batches and data-parallel ranks), clips their global
norm, applies AdamW and then the aux-loss-free expert-bias update from the summed loads. Around
it: log, evaluate on held-out text, sample, checkpoint (`OUT/checkpoint-STEP/`: canonical model
folder + optimizer.safetensors + training_state.json with the step, data stream and RNG state),
all written through `atomic_folder`. Data parallel over several Macs with `mlx.launch`: each rank
streams its own shard, rank 0 logs and writes checkpoints (with every rank's data and RNG state);
to resume, every host needs the checkpoint folder at the same path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from customllm.checkpoint import atomic_folder
from customllm.data import StreamDataset, eval_batches
from customllm.evaluate import eval_options, heldout_batches, report
from customllm.metrics import METRICS_NAME, MetricsLogger, plot_metrics, require_matplotlib
from customllm.runs import (
    CheckpointError,
    TrainingError,
    check_new_run,
    checkpoint_dir,
    checkpoint_writing,
    latest_checkpoint,
    read_training_state,
    removed_if_empty,
    resolve_resume,
    rotate_checkpoints,
    run_lock,
    write_training_state,
)
from customllm.tokenizer import load_tokenizer
from customllm.training import (
    ADAMW_BETAS,
    ADAMW_EPS,
    StopSignal,
    TrainConfig,
    check_batch_fits,
    check_finite,
    check_finite_state,
    check_model_fits,
    check_resume,
    config_differences,
    decays,
    is_router,
    lr_at,
    memory_bytes,
    new_model_config,
    tokenizer_source,
    train_options,
)
from customllm_mlx.allocator import use_full_cpu_cache
from customllm_mlx.cpu_streams import (
    blas_threads_per_part,
    depth_first_for_checkpointing,
    on_streams,
    sliced_value_and_grad,
    stream_parts,
)
from customllm_mlx.generate import generate
from customllm_mlx.io import load, save
from customllm_mlx.loss import cross_entropy, linear_nll_sum
from customllm_mlx.model import CustomLLM

OPTIMIZER_NAME = "optimizer.safetensors"


def next_token_loss(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean cross entropy (float32) of logits (B, T, V) against the already shifted targets (B, T)."""
    return cross_entropy(logits.astype(mx.float32), targets).mean()


def training_loss(model: CustomLLM, inputs: mx.array, targets: mx.array):
    """LM loss + the model's aux loss (what the gradient sees); also the LM loss and expert loads."""
    lm_loss, aux_loss, routing = model.training_loss(inputs, targets)
    return lm_loss + aux_loss, (lm_loss, routing)


def sum_of_squares(g: mx.array) -> mx.array:
    """float32 sum of g**2 as a tree of 32-wide sums: MLX's CPU sums a long array in one running
    float32 total, off by ~1e-4 (relative) when a few large terms meet many tiny ones."""
    v = g.astype(mx.float32).square().reshape(-1)
    while v.size > 32:
        v = mx.pad(v, (0, -v.size % 32)).reshape(-1, 32).sum(-1)
    return v.sum()


def clip_grad_norm(grads: dict, max_norm: float) -> tuple[dict, mx.array]:
    """Scale the gradients to global norm <= max_norm (torch's formula; 0: no clipping).
    Returns them and the PRE-clip norm (float32 whatever the gradient dtype)."""
    norm = mx.sqrt(sum(sum_of_squares(g) for _, g in tree_flatten(grads)))
    if max_norm <= 0:
        return grads, norm
    scale = mx.minimum(max_norm / (norm + 1e-6), 1.0)
    return tree_map(lambda g: (g * scale).astype(g.dtype), grads), norm


class ScaledMultiOptimizer(optim.MultiOptimizer):
    """A MultiOptimizer whose learning rate reaches each optimizer times its own scale."""

    def __init__(self, optimizers, filters, scales):
        super().__init__(optimizers, filters)
        self.scales = scales

    @property
    def learning_rate(self):
        return self.optimizers[0].learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        for o, scale in zip(self.optimizers, self.scales, strict=True):
            o.learning_rate = learning_rate * scale if scale != 1 else learning_rate


def make_optimizer(cfg: TrainConfig, model: CustomLLM) -> optim.MultiOptimizer:
    """AdamW as torch's (bias-corrected, decoupled decay): decay where `decays(name, ndim)`;
    the routers at `router_lr_scale` times the learning rate, in a third AdamW (last, so that
    the first two keep the layout of checkpoints written with scale 1)."""

    def adamw(weight_decay: float) -> optim.AdamW:
        return optim.AdamW(
            cfg.lr,
            betas=list(ADAMW_BETAS),
            eps=ADAMW_EPS,
            weight_decay=weight_decay,
            bias_correction=True,
        )

    scale = model.model_config.router_lr_scale
    if scale == 1:
        optimizer = optim.MultiOptimizer(
            [adamw(cfg.weight_decay), adamw(0.0)], [lambda name, p: decays(name, p.ndim)]
        )
    else:
        optimizer = ScaledMultiOptimizer(
            [adamw(cfg.weight_decay), adamw(0.0), adamw(cfg.weight_decay)],
            [
                lambda name, p: decays(name, p.ndim) and not is_router(name),
                lambda name, p: not decays(name, p.ndim) and not is_router(name),
            ],
            [1, 1, scale],
        )
    optimizer.init(model.trainable_parameters())
    return optimizer


def make_train_step(
    model: CustomLLM, optimizer, cfg: TrainConfig, world, compiled: bool = True, parts: int = 1
):
    """`step(ids, acc, update) -> acc`: one micro-batch's forward/backward, summed into `acc`
    (None before the first). With `update`, the optimizer step: returns {"loss", "grad_norm",
    "routing"} of the whole global batch. Set `optimizer.learning_rate` before the last micro-step.
    `parts` > 1: each micro-batch in that many slices, each on its own CPU stream and compiled
    on its own (cpu_streams.py; run the step inside `blas_threads_per_part(parts)`)."""
    loss_and_grad = nn.value_and_grad(model, training_loss)
    grads_of = sliced_value_and_grad(model, loss_and_grad, parts, compiled)

    def all_sum(x: mx.array) -> mx.array:
        return mx.distributed.all_sum(x, group=world) if world.size() > 1 else x

    def accumulate(lm_loss, routing, grads, acc: dict | None, update: bool) -> dict:
        acc_new = {"grads": grads, "routing": routing, "loss": lm_loss}
        if acc is not None:
            acc_new = tree_map(mx.add, acc, acc_new)
        if not update:
            return acc_new
        grads = tree_map(lambda g: g / cfg.grad_accum, acc_new["grads"])  # mean over micro-batches
        grads = nn.average_gradients(grads, group=world)  # ... and over ranks
        grads, grad_norm = clip_grad_norm(grads, cfg.max_grad_norm)
        optimizer.update(model, grads)
        routing = all_sum(acc_new["routing"])  # (layers, 2, experts) of the whole global batch
        model.update_expert_bias(routing)  # aux-loss-free balancing, outside the gradient
        loss = all_sum(acc_new["loss"]) / (cfg.grad_accum * world.size())
        return {"loss": loss, "grad_norm": grad_norm, "routing": routing}

    state = [model.state, optimizer.state, mx.random.state]
    if compiled and parts > 1:  # the slices are compiled apart (cpu_streams.py): the rest too
        accumulate = mx.compile(accumulate, inputs=state, outputs=state)

    def step(ids: mx.array, acc: dict | None, update: bool) -> dict:
        (_, (lm_loss, routing)), grads = grads_of(ids[:, :-1], ids[:, 1:])
        return accumulate(lm_loss, routing, grads, acc, update)

    if not compiled or parts > 1:
        return step
    return mx.compile(step, inputs=state, outputs=state)


# Evaluation and samples -------------------------------------------------------------------------
def heldout_slices(model: CustomLLM, parts: int, compiled: bool = True) -> list:
    """The held-out loss of a batch slice, `(inputs, targets) -> (loss sum, tokens, expert
    loads)`, once per CPU stream and compiled, as the training step's slices
    (`cpu_streams.on_streams`); lm_head and the loss fused per chunk of rows
    (`linear_nll_sum`). Built once per run."""

    def sums(inputs, targets):
        x, _, routing = model.hidden_states(inputs)
        return (*linear_nll_sum(x, *model.lm_head_params(), targets), routing[:, 0])

    return on_streams(sums, parts, [model.state], compiled)


def evaluate_loss(
    model: CustomLLM, batches: list[np.ndarray], world, slices=None
) -> tuple[float, np.ndarray]:
    """(token-weighted mean next-token loss, expert loads (layers, experts) summed) over the
    fixed eval batches (all ranks together), each batch in `len(slices)` slices
    (`heldout_slices`; default: one, uncompiled)."""
    slices = slices or heldout_slices(model, 1, compiled=False)
    model.eval()
    loss_sum, tokens, load = 0.0, 0, 0
    try:
        for batch in batches:
            ids = mx.array(batch)
            parts = len(slices) if len(batch) % len(slices) == 0 else 1  # a short last batch
            pieces = zip(
                slices, mx.split(ids[:, :-1], parts), mx.split(ids[:, 1:], parts), strict=False
            )
            with blas_threads_per_part(parts):
                sums = [fn(inputs, targets) for fn, inputs, targets in pieces]
                mx.eval(sums)
                loss_sum += sum(total.item() for total, _, _ in sums)
                tokens += sum(count.item() for _, count, _ in sums)
                load = load + sum(np.array(routed) for _, _, routed in sums)
    finally:
        model.train()
    if world.size() > 1:
        total = mx.distributed.all_sum(mx.array([loss_sum, tokens]), group=world, stream=mx.cpu)
        loss_sum, tokens = total.tolist()
        load = np.array(mx.distributed.all_sum(mx.array(load), group=world, stream=mx.cpu))
    return loss_sum / max(tokens, 1), np.asarray(load, dtype=np.float64)


def sample_text(model: CustomLLM, tokenizer, prompt: str, max_tokens: int) -> str:
    """Greedy continuation of `prompt` (draws no random numbers, so training RNG is untouched)."""
    model.eval()
    try:
        return generate(model, tokenizer, prompt, max_tokens=max_tokens)
    finally:
        model.train()


# Checkpoints ------------------------------------------------------------------------------------
def rng_key() -> list[int]:
    return mx.random.state[0].tolist()


def set_rng_key(key: list[int]) -> None:
    """Restore `mx.random.state` to `key`: `mx.random.seed(s)` sets the key (s >> 32, s & 2**32-1)."""
    mx.random.seed((int(key[0]) << 32) | int(key[1]))


def all_gather_json(obj: Any, world) -> list[Any]:
    """Every rank's `obj` (JSON-serializable), in rank order."""
    if world.size() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
    size = mx.distributed.all_max(mx.array([data.size]), group=world, stream=mx.cpu).item()
    padded = np.pad(data, (0, size - data.size), constant_values=ord(" "))  # JSON ignores spaces
    rows = mx.distributed.all_gather(mx.array(padded)[None], group=world, stream=mx.cpu)
    return [json.loads(bytes(np.array(row))) for row in rows]


def save_checkpoint(
    out: Path, step: int, model: CustomLLM, optimizer, tokenizer, training_state: dict[str, Any]
) -> Path:
    """`out/checkpoint-STEP/`, written under a temporary name and renamed when complete;
    never from a model or optimizer state holding NaN/inf."""
    tensors = tree_flatten(model.parameters()) + tree_flatten(optimizer.state)
    finite = mx.stack([mx.isfinite(v).all() for _, v in tensors]).tolist()
    check_finite_state([k for (k, _), ok in zip(tensors, finite, strict=True) if not ok], step, out)
    needed = int(sum(v.nbytes for _, v in tensors) * 1.05) + (1 << 20)
    with checkpoint_writing(out, step, needed), atomic_folder(checkpoint_dir(out, step)) as tmp:
        # The canonical model folder first: io.save replaces the (empty) tmp atomically.
        save(model, tmp, tokenizer=tokenizer)
        mx.save_safetensors(str(tmp / OPTIMIZER_NAME), dict(tree_flatten(optimizer.state)))
        write_training_state(tmp, training_state)
    return checkpoint_dir(out, step)


def load_optimizer_state(optimizer, folder: Path) -> None:
    """Put the saved AdamW state (moments, step) in place of the freshly initialised one."""
    path = folder / OPTIMIZER_NAME
    try:
        saved = mx.load(str(path))
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {folder} is corrupt: {OPTIMIZER_NAME} cannot be read ({err})"
        ) from err
    current = dict(tree_flatten(optimizer.state))
    wrong = sorted(set(saved) ^ set(current)) or [
        k for k in current if saved[k].shape != current[k].shape
    ]
    if wrong:
        raise CheckpointError(
            f"checkpoint {folder}: {OPTIMIZER_NAME} does not fit this model "
            f"(first mismatched entry {wrong[0]!r})"
        )
    optimizer.state = tree_unflatten(list(saved.items()))


# Setting up a run -------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, resume: Path | None, tokenizer) -> CustomLLM:
    """A new model (preset or --config), the --init weights, or the resumed checkpoint's."""
    if resume or cfg.init:
        model, _ = load(resume or cfg.init, dtype=cfg.dtype)
        return model.train()
    model = CustomLLM(new_model_config(cfg, tokenizer))
    if cfg.dtype == "bfloat16":
        model.set_dtype(mx.bfloat16)
        for layer in model.layers:  # small bias steps would vanish in bfloat16
            if layer.mlp.num_experts:
                layer.mlp.expert_bias = layer.mlp.expert_bias.astype(mx.float32)
    mx.eval(model.parameters())
    return model.train()


def run_training(cfg: TrainConfig, stream=None, cpu_streams: int | None = None) -> Path | None:
    """Train (or resume) per `cfg`, each micro-batch over `cpu_streams` CPU streams (default:
    cpu_streams.stream_parts's choice); returns the last checkpoint folder."""
    if cfg.plot:
        require_matplotlib()  # before training, not after it
    use_full_cpu_cache()
    world = mx.distributed.init()
    rank, world_size = world.rank(), world.size()
    out = Path(cfg.out)
    resume = resolve_resume(cfg.resume, out, required=(OPTIMIZER_NAME,), framework="mlx")
    state = read_training_state(resume) if resume else None
    if state:
        check_resume(state, resume, cfg, world_size, ("data_state", "rng_state", "train_config"))
    with removed_if_empty(out), run_lock(out, rank == 0), StopSignal() as stop:
        check_new_run(out, resume)
        tokenizer = load_tokenizer(tokenizer_source(cfg, resume))
        mx.random.seed(cfg.seed)  # the same initial weights on every rank
        model = build_model(cfg, resume, tokenizer)
        model.checkpoint_layers = cfg.gradient_checkpointing
        check_model_fits(model.model_config, tokenizer, cfg.seq_len)
        check_batch_fits(model.model_config, cfg.batch_size, cfg.seq_len, memory_bytes())
        if rank:  # its own dropout masks: key (rank, seed), which no plain seed gives
            mx.random.seed((rank << 32) | cfg.seed)
        train_stream = StreamDataset(
            cfg.train_data(),
            tokenizer,
            cfg.seq_len,
            text_column=cfg.text_column,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed,
            split="train",
            rank=rank,
            world_size=world_size,
            loop=True,
        )
        eval_set = []
        if cfg.eval_every:
            eval_set = eval_batches(
                cfg.eval_data,
                None if cfg.eval_data else cfg.train_data(),
                tokenizer,
                cfg.seq_len,
                cfg.batch_size,
                max_batches=cfg.eval_steps,
                text_column=cfg.text_column,
                rank=rank,
                world_size=world_size,
            )
        optimizer = make_optimizer(cfg, model)
        step, tokens_seen = 0, 0
        if state:
            load_optimizer_state(optimizer, resume)
            optimizer.init(model.trainable_parameters())  # settle the state tree before compiling
            train_stream.load_state_dict(state["data_state"][rank])
            set_rng_key(state["rng_state"][rank])
            step, tokens_seen = state["step"], state.get("tokens_seen", 0)
        parts = stream_parts(cfg.batch_size, world_size, cpu_streams)
        train_step = make_train_step(model, optimizer, cfg, world, parts=parts)
        heldout = heldout_slices(model, parts) if eval_set else None
        # a new run (0) drops the records of one killed before its first checkpoint
        metrics = MetricsLogger(
            out,
            total_steps=cfg.steps,
            log_every=cfg.log_every,
            stream=stream,
            resume_step=step if state else 0,
            enabled=rank == 0,
        )
        _announce(metrics, cfg, model, world_size, resume, state, parts)

        last_loss = last_eval_loss = None
        tokens_per_step = cfg.tokens_per_step(world_size)
        try:
            while step < cfg.steps:
                tic = time.perf_counter()
                optimizer.learning_rate = lr = lr_at(step, cfg)
                acc = None
                for micro in range(cfg.grad_accum):
                    ids = mx.array(train_stream.next_batch(cfg.batch_size))
                    with blas_threads_per_part(parts):
                        acc = train_step(ids, acc, micro == cfg.grad_accum - 1)
                        mx.eval(acc, model.state, optimizer.state)
                step += 1
                tokens_seen += tokens_per_step
                last_loss, grad_norm = acc["loss"].item(), acc["grad_norm"].item()
                check_finite(last_loss, step, out)
                check_finite(grad_norm, step, out, what="grad_norm")
                seconds = time.perf_counter() - tic
                metrics.log_train(
                    step,
                    last_loss,
                    grad_norm,
                    lr,
                    tokens_per_step / max(seconds, 1e-9),
                    mx.get_peak_memory() / 1e9,
                    acc["routing"][:, 0].tolist(),
                )

                final = step >= cfg.steps
                evaluated = False
                if eval_set and cfg.eval_every and (step % cfg.eval_every == 0 or final):
                    last_eval_loss, eval_load = evaluate_loss(model, eval_set, world, heldout)
                    metrics.log_eval(step, last_eval_loss, eval_load)
                    evaluated = True
                every = cfg.sample_every
                if (
                    rank == 0
                    and cfg.prompt
                    and every != 0
                    and (final or (evaluated if every is None else step % every == 0))
                ):
                    text = sample_text(model, tokenizer, cfg.prompt, cfg.max_sample_tokens)
                    metrics.print(f"sample step {step} | {cfg.prompt + text!r}"[:2000])
                if stop.requested:
                    metrics.print(f"{stop.name}: saving checkpoint-{step} and stopping")
                if final or stop.requested or (cfg.save_every and step % cfg.save_every == 0):
                    ranks = all_gather_json(
                        {"data_state": train_stream.state_dict(), "rng_state": rng_key()}, world
                    )
                    if rank == 0:
                        save_checkpoint(
                            out,
                            step,
                            model,
                            optimizer,
                            tokenizer,
                            {
                                "step": step,
                                "framework": "mlx",
                                "tokens_seen": tokens_seen,
                                "world_size": world_size,
                                "data_state": [r["data_state"] for r in ranks],
                                "rng_state": [r["rng_state"] for r in ranks],
                                "train_config": cfg.to_dict(),
                                "loss": last_loss,
                                "eval_loss": last_eval_loss,
                                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            },
                        )
                        rotate_checkpoints(out, cfg.keep_last)
                if stop.requested:
                    break
        finally:
            metrics.close()
        last = latest_checkpoint(out)
        if stop.requested:
            metrics.print(f"stopped at step {step} by {stop.name}; resume with --resume {last}")
        else:
            metrics.print(f"done: {step} steps; model folder {last}")
    if cfg.plot and rank == 0:
        metrics.print(f"plot: {plot_metrics(out / METRICS_NAME, out / 'metrics.png')}")
    return last


def _announce(metrics, cfg, model, world_size, resume, state, parts) -> None:
    where = f"resuming from {resume} (step {state['step']})" if resume else "new run"
    streams = f" in {parts} slices on {parts} CPU streams" if parts > 1 else ""
    metrics.print(
        f"{where}: {model.model_config.num_parameters() / 1e6:.2f}M parameters on "
        f"{mx.default_device()}{streams} ({cfg.dtype}), {world_size} rank(s), "
        f"{cfg.tokens_per_step(world_size):,} tokens/step, data {cfg.train_data()}, out {cfg.out}"
    )
    if cfg.dtype == "bfloat16" and mx.default_device() == mx.cpu:
        metrics.print(
            "warning: bfloat16 on MLX's CPU backend: its bfloat16 matmuls use no BLAS and run "
            "far slower than float32 (docs/linux-cpu.md); --dtype float32 trains faster here"
        )
    if state:
        for line in config_differences(state["train_config"], cfg):
            metrics.print(f"warning: option changed since the checkpoint: {line}")


CPU_STREAMS_OPTION = click.option(
    "--cpu-streams",
    type=click.IntRange(min=1),
    default=None,
    help="Linux CPU: split each micro-batch over N MLX CPU streams (1: no split). Default: 2 "
    "where OpenBLAS has 2+ threads and the batch is even (docs/linux-cpu.md).",
)


@click.command("train")
@train_options
@CPU_STREAMS_OPTION
def train_command(cpu_streams: int | None, **options) -> None:
    """Train or resume a model with a compiled MLX step (checkpoints in OUT/checkpoint-N)."""
    if options["gradient_checkpointing"] and cpu_streams is None:
        depth_first_for_checkpointing()  # before this process's first evaluation
    try:
        run_training(TrainConfig.from_dict(options), cpu_streams=cpu_streams)
    except (TrainingError, ValueError, FileNotFoundError, ConnectionError, OSError) as err:
        raise click.ClickException(str(err)) from err


# `customllm-mlx eval` ----------------------------------------------------------------------------
@click.command("eval")
@eval_options
@CPU_STREAMS_OPTION
def eval_command(model_dir: str, cpu_streams: int | None, **options) -> None:
    """Held-out loss, perplexity and expert balance (MaxVio) of a model folder on a text."""
    use_full_cpu_cache()
    try:
        model, tokenizer = load(model_dir)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    batches = heldout_batches(model_dir, tokenizer, model.model_config, options)
    try:
        parts = stream_parts(options["batch_size"], wanted=cpu_streams)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    world = mx.distributed.init()
    loss, routed = evaluate_loss(model, batches, world, heldout_slices(model, parts))
    report(model_dir, batches, loss, routed, options)

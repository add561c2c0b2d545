"""`customllm-torch train`: the Hugging Face `Trainer` under the conventions of customllm.training.

The Trainer runs forward/backward, gradient accumulation, DDP and mixed precision; this module
supplies what the shared conventions fix: the loss (inputs ids[:, :-1], targets ids[:, 1:]), AdamW
with the `decays` rule, the `lr_at` schedule (a LambdaLR), clipping, the expert-bias update once per
optimizer step, evaluation on held-out text, samples, metrics, signal handling and checkpoints
(`OUT/checkpoint-STEP/`: canonical model folder + the Trainer's optimizer/scheduler/RNG/state files
+ training_state.json with the data stream position), all written through `atomic_folder`.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, IterableDataset
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments
from transformers import logging as hf_logging

from customllm.checkpoint import atomic_folder
from customllm.config import ModelConfig
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
from customllm_torch import io
from customllm_torch.balancing import ExpertBiasCallback
from customllm_torch.generate import generate, peak_memory_gb, resolve_device
from customllm_torch.model import CustomLLM

# The Trainer's own files in a checkpoint, beside the canonical model folder.
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json")
DEVICES = ("auto", "cuda", "mps", "cpu")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class StreamBatches(IterableDataset):
    """Endless micro-batches {"input_ids": ids[:, :-1], "targets": ids[:, 1:]} of a StreamDataset.
    `produced` counts them, so a checkpoint can tell the stream is exactly where training is."""

    def __init__(self, stream: StreamDataset, batch_size: int):
        self.stream, self.batch_size, self.produced = stream, batch_size, 0

    def __iter__(self):
        while True:
            ids = torch.from_numpy(self.stream.next_batch(self.batch_size).astype(np.int64))
            self.produced += 1
            yield {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}


# Data-parallel helpers (no-ops in a single process) ---------------------------------------------
def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        torch.distributed.all_reduce(tensor)
    return tensor


def _all_gather(obj: Any) -> list[Any]:
    if not _distributed():
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _broadcast(obj: Any) -> Any:
    if not _distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def _close_process_group() -> None:
    """Wait for the other ranks, then free the process group while Python still runs. Left to
    the interpreter's exit, a gloo worker thread could still be releasing the Trainer's last
    all-gather (its Python tensors) when finalization began, and the rank aborted after
    finishing ("terminate called without an active exception"; about one run in five of the
    two-rank test, seen in a core dump)."""
    _barrier()
    torch.distributed.destroy_process_group()
    gc.collect()  # the Trainer and its DDP model (which holds the group), if cycles keep them


# Evaluation and samples -------------------------------------------------------------------------
@torch.no_grad()
@torch.no_grad()
def evaluate_loss(
    model: CustomLLM, batches: list[np.ndarray], device, autocast
) -> tuple[float, np.ndarray]:
    """(token-weighted mean next-token loss, expert loads (layers, experts) summed) over the
    fixed eval batches (all ranks together)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, tokens)
    load = 0
    for batch in batches:
        ids = torch.from_numpy(batch.astype(np.int64)).to(device)
        targets = ids[:, 1:]
        with autocast():
            out = model(input_ids=ids[:, :-1], shift_labels=targets)
        total[0] += out.loss.double() * targets.numel()
        total[1] += targets.numel()
        load = load + out.expert_load.double()
    model.train(was_training)
    total = _all_reduce(total)
    if torch.is_tensor(load):
        load = _all_reduce(load)
    return (total[0] / total[1].clamp(min=1)).item(), np.asarray(torch.as_tensor(load).cpu())


def sample_text(model: CustomLLM, tokenizer, prompt: str, max_tokens: int) -> str:
    """Greedy continuation of `prompt` (draws no random numbers, so training RNG is untouched)."""
    was_training = model.training
    model.eval()
    try:
        return generate(model, tokenizer, prompt, max_tokens=max_tokens)
    finally:
        model.train(was_training)


# The Trainer ------------------------------------------------------------------------------------
class CustomLLMTrainer(Trainer):
    """Trainer with the shared loss, optimizer, schedule, data stream and checkpoint layout."""

    def __init__(
        self,
        model: CustomLLM,
        args: TrainingArguments,
        cfg: TrainConfig,
        tokenizer,
        batches: StreamBatches,
        eval_set: list[np.ndarray],
        metrics: MetricsLogger,
        stop: StopSignal,
        start_step: int = 0,
        tokens_seen: int = 0,
    ):
        super().__init__(model=model, args=args, train_dataset=batches)
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean
        self.cfg, self.tokenizer, self.batches, self.eval_set = cfg, tokenizer, batches, eval_set
        self.metrics, self.stop = metrics, stop
        self.start_step, self.tokens_seen = start_step, tokens_seen
        self.remove_callback(PrinterCallback)
        self.expert_bias = ExpertBiasCallback()  # first: StepCallback logs the loads it applied
        self.add_callback(self.expert_bias)
        self.add_callback(StepCallback(self))
        self._loss_sum = torch.zeros((), device=args.device)
        self._micro_batches = 0
        self._step_started = time.perf_counter()
        self.last_loss = self.last_eval_loss = None

    # -- what one optimizer step sees -------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        # Each rank streams its own shard (StreamDataset rank/world_size); no prefetch, so the
        # stream position at a step boundary is exactly what the steps so far consumed.
        # Its own generator: each `iter()` of a DataLoader draws a seed from its generator, and
        # from torch's global RNG without one. The Trainer restores the checkpoint's RNG state
        # and then starts the iterator, so that draw moved every dropout mask of a resumed run
        # (tests/test_train_torch.py, resume tests with dropout).
        return DataLoader(
            self.train_dataset, batch_size=None, num_workers=0, generator=torch.Generator()
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # In training the model fuses lm_head with the loss (no logits); loss includes aux_loss.
        out = model(input_ids=inputs["input_ids"], shift_labels=inputs["targets"])
        loss, lm_loss = out.loss, out.lm_loss
        if model.training:
            self._loss_sum += lm_loss.detach()
            self._micro_batches += 1
        return (loss, out) if return_outputs else loss

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            scale = model.model_config.router_lr_scale
            # scale 1: the routers with the other matrices, the layout of checkpoints written
            # before the scale existed; else in a group of their own, after the two
            routers = [p for n, p in params if is_router(n)] if scale != 1 else []
            params = [(n, p) for n, p in params if scale == 1 or not is_router(n)]
            groups = [
                {
                    "params": [p for n, p in params if decays(n, p.ndim)],
                    "weight_decay": self.cfg.weight_decay,
                },
                {"params": [p for n, p in params if not decays(n, p.ndim)], "weight_decay": 0.0},
            ]
            if routers:  # the LambdaLR schedule multiplies each group's own lr
                groups.append(
                    {
                        "params": routers,
                        "weight_decay": self.cfg.weight_decay,
                        "lr": self.cfg.lr * scale,
                    }
                )
            self.optimizer = torch.optim.AdamW(
                groups, lr=self.cfg.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS
            )
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            cfg = self.cfg
            self.lr_scheduler = LambdaLR(
                optimizer or self.optimizer, lambda s: lr_at(s, cfg) / cfg.lr
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def autocast(self):
        if self.args.bf16:
            return torch.autocast(self.args.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.args.device.type, enabled=False)

    # -- called by StepCallback --------------------------------------------------------------------
    def before_update(self, model: CustomLLM, optimizer) -> None:
        """Gradients are summed over the micro-batches (and ranks): check the loss, clip."""
        step = self.state.global_step + 1
        count = torch.full_like(self._loss_sum, self._micro_batches)
        loss_sum, count = _all_reduce(torch.stack([self._loss_sum, count]))
        self.step_loss = (loss_sum / count).item()
        check_finite(self.step_loss, step, self.args.output_dir)
        max_norm = self.cfg.max_grad_norm or float("inf")
        self.grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
        check_finite(self.grad_norm, step, self.args.output_dir, what="grad_norm")
        self.step_lr = optimizer.param_groups[0]["lr"]

    def after_update(self, model: CustomLLM, control) -> None:
        step, cfg = self.state.global_step, self.cfg
        # (layers, 2, experts) over the whole global batch, applied by ExpertBiasCallback
        routing = self.expert_bias.collector.last_routing
        self._loss_sum.zero_()
        self._micro_batches = 0
        tokens = cfg.tokens_per_step(self.args.world_size)
        self.tokens_seen += tokens
        seconds = time.perf_counter() - self._step_started
        self.last_loss = self.step_loss
        self.metrics.log_train(
            step,
            self.step_loss,
            self.grad_norm,
            self.step_lr,
            tokens / max(seconds, 1e-9),
            peak_memory_gb(self.args.device),
            routing[:, 0].tolist(),
        )
        final = step >= cfg.steps
        evaluated = False
        if self.eval_set and cfg.eval_every and (step % cfg.eval_every == 0 or final):
            self.last_eval_loss, eval_load = evaluate_loss(
                model, self.eval_set, self.args.device, self.autocast
            )
            self.metrics.log_eval(step, self.last_eval_loss, eval_load)
            evaluated = True
        every = cfg.sample_every
        if (
            cfg.prompt
            and every != 0
            and (final or (evaluated if every is None else step % every == 0))
        ):
            if self.args.should_save:  # rank 0
                text = sample_text(model, self.tokenizer, cfg.prompt, cfg.max_sample_tokens)
                self.metrics.print(f"sample step {step} | {cfg.prompt + text!r}")
        if self.stop.requested:
            self.metrics.print(f"{self.stop.name}: saving checkpoint-{step} and stopping")
            control.should_training_stop = True
        if final or self.stop.requested or (cfg.save_every and step % cfg.save_every == 0):
            control.should_save = True
        if self.args.device.type == "mps" and (evaluated or control.should_save):
            torch.mps.empty_cache()
        self._step_started = time.perf_counter()

    # -- checkpoints -------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """`OUT/checkpoint-STEP/`, written under a temporary name and renamed when complete."""
        step = self.state.global_step
        consumed = (step - self.start_step) * self.args.gradient_accumulation_steps
        if self.batches.produced != consumed:
            raise RuntimeError(
                f"data stream read {self.batches.produced} micro-batches but {consumed} were "
                "trained on; its saved position would be wrong (is the dataloader prefetching?)"
            )
        data_states = _all_gather(self.batches.stream.state_dict())
        if self.args.should_save:
            check_finite_state(self._non_finite_tensors(), step, self.args.output_dir)
            with (
                checkpoint_writing(self.args.output_dir, step, self._checkpoint_bytes()),
                atomic_folder(checkpoint_dir(self.args.output_dir, step)) as tmp,
            ):
                # The canonical model folder first: io.save replaces the (empty) tmp atomically.
                io.save(self.model, tmp, tokenizer=self.tokenizer)
                _broadcast(str(tmp))  # then the other ranks write their RNG states into it
                self._save_optimizer_and_scheduler(str(tmp))
                self._save_scaler(str(tmp))
                self._save_rng_state(str(tmp))
                self.state.save_to_json(str(tmp / "trainer_state.json"))
                torch.save(self.args, tmp / "training_args.bin")
                write_training_state(tmp, self._training_state(step, data_states))
                _barrier()  # every rank's rng_state_{rank}.pth is in
            rotate_checkpoints(self.args.output_dir, self.cfg.keep_last)
        else:
            self._save_rng_state(_broadcast(None))
            _barrier()
        self._step_started = time.perf_counter()

    def _checkpoint_bytes(self) -> int:
        """About what a checkpoint takes on disk: the model and the optimizer's state."""
        tensors = list(self.model.state_dict().values())
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        return int(sum(t.numel() * t.element_size() for t in tensors) * 1.05) + (1 << 20)

    @torch.no_grad()
    def _non_finite_tensors(self) -> list[str]:
        """Names of the model's and the optimizer's tensors that hold NaN or inf."""
        tensors = list(self.model.state_dict().items())
        names = {id(p): n for n, p in self.model.named_parameters()}
        for param, state in self.optimizer.state.items():
            tensors += [(f"{names.get(id(param), '?')} ({k})", v) for k, v in state.items()]
        return [
            name
            for name, t in tensors
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()
        ]

    def _training_state(self, step: int, data_states: list[dict]) -> dict[str, Any]:
        return {
            "step": step,
            "framework": "torch",
            "tokens_seen": self.tokens_seen,
            "world_size": self.args.world_size,
            "data_state": data_states,
            "train_config": self.cfg.to_dict(),
            "loss": self.last_loss,
            "eval_loss": self.last_eval_loss,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


class StepCallback(TrainerCallback):
    """Hands the Trainer's step events to CustomLLMTrainer.before_update / after_update."""

    def __init__(self, trainer: CustomLLMTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._step_started = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.trainer.before_update(model, optimizer)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.trainer.after_update(model, control)
        return control


# Setting up a run -------------------------------------------------------------------------------

# transformers 5.x renamed TrainingArguments' gradient_checkpointing (deprecated, warns)
CHECKPOINTING_ARG = (
    "activation_checkpointing"
    if "activation_checkpointing" in inspect.signature(TrainingArguments).parameters
    else "gradient_checkpointing"
)


def training_arguments(
    cfg: TrainConfig, device: str, compile_mode: str | None = None
) -> TrainingArguments:
    """The Trainer's arguments for `cfg`; `compile_mode` (a `torch.compile` mode, or None for
    eager) compiles the model's training forward and backward (evaluation and samples run
    eager)."""
    try:
        device = resolve_device(device).type
    except ValueError as err:
        raise TrainingError(str(err)) from err
    args = TrainingArguments(
        output_dir=cfg.out,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=ADAMW_BETAS[0],
        adam_beta2=ADAMW_BETAS[1],
        adam_epsilon=ADAMW_EPS,
        max_grad_norm=0.0,  # clipped in StepCallback, which logs the pre-clip norm
        lr_scheduler_type="constant",  # replaced by the LambdaLR over lr_at
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="no",  # StepCallback decides when to save
        report_to="none",
        disable_tqdm=True,
        ignore_data_skip=True,  # the data stream resumes from its saved position, not by replay
        seed=cfg.seed,
        bf16=cfg.dtype == "bfloat16",
        **{CHECKPOINTING_ARG: cfg.gradient_checkpointing},
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        logging_nan_inf_filter=False,
        log_level="warning",
        torch_compile=compile_mode is not None,
        torch_compile_mode=None if compile_mode in (None, "default") else compile_mode,
    )
    if args.device.type != device:
        raise TrainingError(f"--device {device}: the Trainer chose {args.device.type}")
    return args


def build_model(cfg: TrainConfig, resume: Path | None, tokenizer) -> CustomLLM:
    """A new model (preset or --config), the --init weights, or the resumed checkpoint's shape."""
    if cfg.init and not resume:
        model, _ = io.load(cfg.init)
        return model.train()
    config = ModelConfig.from_json(resume) if resume else new_model_config(cfg, tokenizer)
    return CustomLLM(config).train()


def run_training(
    cfg: TrainConfig, device: str = "auto", stream=None, compile_mode: str | None = None
) -> Path:
    """Train (or resume) per `cfg`; returns the last checkpoint folder. `compile_mode`: see
    `training_arguments`."""
    from transformers import set_seed

    hf_logging.set_verbosity_warning()
    if cfg.plot:
        require_matplotlib()
    out = Path(cfg.out)
    resume = resolve_resume(cfg.resume, out, required=TRAINER_FILES, framework="torch")
    state = None
    with removed_if_empty(out), contextlib.ExitStack() as hold, StopSignal() as stop:
        args = training_arguments(cfg, device, compile_mode)
        hold.enter_context(run_lock(out, args.process_index == 0))
        if resume:
            state = read_training_state(resume)
            check_resume(state, resume, cfg, args.world_size)
            check_trainer_files(resume, state["step"])
        check_new_run(out, resume)
        tokenizer = load_tokenizer(tokenizer_source(cfg, resume))
        set_seed(cfg.seed)
        model = build_model(cfg, resume, tokenizer)
        check_model_fits(model.model_config, tokenizer, cfg.seq_len)
        check_batch_fits(
            model.model_config, cfg.batch_size, cfg.seq_len, *device_memory(args.device)
        )
        train_stream = StreamDataset(
            cfg.train_data(),
            tokenizer,
            cfg.seq_len,
            text_column=cfg.text_column,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed,
            split="train",
            rank=args.process_index,
            world_size=args.world_size,
            loop=True,
        )
        if state:
            train_stream.load_state_dict(state["data_state"][args.process_index])
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
                rank=args.process_index,
                world_size=args.world_size,
            )
        # a new run (0) drops the records of one killed before its first checkpoint
        metrics = MetricsLogger(
            out,
            total_steps=cfg.steps,
            log_every=cfg.log_every,
            stream=stream,
            resume_step=state["step"] if state else 0,
            enabled=args.should_save,
        )
        _announce(metrics, cfg, model, args, resume, state)
        trainer = CustomLLMTrainer(
            model,
            args,
            cfg,
            tokenizer,
            StreamBatches(train_stream, cfg.batch_size),
            eval_set,
            metrics,
            stop,
            start_step=state["step"] if state else 0,
            tokens_seen=state.get("tokens_seen", 0) if state else 0,
        )
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        finally:
            metrics.close()
        last = latest_checkpoint(out)
        step = trainer.state.global_step
        if stop.requested:
            metrics.print(f"stopped at step {step} by {stop.name}; resume with --resume {last}")
        else:
            metrics.print(f"done: {step} steps; model folder {last}")
    if cfg.plot and args.should_save:
        metrics.print(f"plot: {plot_metrics(out / METRICS_NAME, out / 'metrics.png')}")
    return last


def device_memory(device: torch.device) -> tuple[int | None, str]:
    """The memory a micro-batch can take on `device`, and its name."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"{device} memory"
    return memory_bytes(), "memory"


def check_trainer_files(resume: Path, step: int) -> None:
    """The HF Trainer's own files in a checkpoint open: a damaged one is named here, not met as
    an unpickling traceback inside `Trainer.train`."""
    archives = ["optimizer.pt", "scheduler.pt", *(p.name for p in resume.glob("rng_state*.pth"))]
    for name in archives:  # torch.save writes zip archives
        if not zipfile.is_zipfile(resume / name):
            raise CheckpointError(f"checkpoint {resume} is corrupt: {name} is damaged")
    try:
        trainer_state = json.loads((resume / "trainer_state.json").read_text(encoding="utf-8"))
        global_step = trainer_state["global_step"]
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(
            f"checkpoint {resume} is corrupt: trainer_state.json is damaged ({err})"
        ) from err
    if global_step != step:
        raise CheckpointError(
            f"checkpoint {resume} is corrupt: trainer_state.json has global_step "
            f"{global_step!r}, training_state.json step {step}"
        )


def _announce(metrics, cfg, model, args, resume, state) -> None:
    where = f"resuming from {resume} (step {state['step']})" if resume else "new run"
    metrics.print(
        f"{where}: {model.num_parameters() / 1e6:.2f}M parameters on {args.device} "
        f"({cfg.dtype}), {args.world_size} rank(s), {cfg.tokens_per_step(args.world_size):,} "
        f"tokens/step, data {cfg.train_data()}, out {cfg.out}"
    )
    if state:
        for line in config_differences(state.get("train_config", {}), cfg):
            metrics.print(f"warning: option changed since the checkpoint: {line}")


@click.command("train")
@train_options
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="auto: cuda, else mps, else cpu.",
)
@click.option(
    "--compile",
    "compile_mode",
    type=click.Choice(COMPILE_MODES),
    is_flag=False,
    flag_value="default",
    default=None,
    help="torch.compile the training step (the Trainer's torch_compile); --compile alone: "
    "the default mode. reduce-overhead adds CUDA graphs. Off: eager.",
)
def train_command(device: str, compile_mode: str | None, **options) -> None:
    """Train or resume a model with the Hugging Face Trainer (checkpoints in OUT/checkpoint-N)."""
    try:
        run_training(TrainConfig.from_dict(options), device, compile_mode=compile_mode)
    except (TrainingError, ValueError, FileNotFoundError, ConnectionError, OSError) as err:
        raise click.ClickException(str(err)) from err
    if _distributed():  # under torchrun, every rank done (a failing one exits at once)
        _close_process_group()


# `customllm-torch eval` --------------------------------------------------------------------------
@click.command("eval")
@eval_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps.")
def eval_command(model_dir: str, device: str, **options) -> None:
    """Held-out loss, perplexity and expert balance (MaxVio) of a model folder on a text."""
    try:
        device = resolve_device(device)
        model, tokenizer = io.load(model_dir, device=device)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    batches = heldout_batches(model_dir, tokenizer, model.model_config, options)
    loss, routed = evaluate_loss(model, batches, device, contextlib.nullcontext)
    report(model_dir, batches, loss, routed, options)


if __name__ == "__main__":  # python -m customllm_torch.train
    sys.exit(train_command())

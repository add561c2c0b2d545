"""The expert-bias update for any torch training loop: `ExpertBiasCallback` for a transformers
`Trainer` (this package's trainer uses it too), or `RoutingCollector` for a loop of one's own.

The bias is state, not a parameter: no optimizer moves it. Once per optimizer step it moves
toward balance from the routing statistics of every training forward of that step (all
micro-batches, all ranks): `CustomLLM.update_expert_bias` (docs/architecture.md, "Balancing").

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[ExpertBiasCallback()])

    collector = RoutingCollector(model)          # a loop of one's own
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step(); optimizer.zero_grad()
        collector.update_bias()
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from customllm_torch.model import CustomLLM


class RoutingCollector:
    """Sums the routing statistics (num_layers, 2, E) of `model`'s training forwards (a forward
    hook: training mode, gradients on) until `update_bias` applies them."""

    def __init__(self, model: torch.nn.Module):
        self.model = unwrap(model)
        self.routing: torch.Tensor | None = None
        self.last_routing: torch.Tensor | None = None  # the sum the last update applied
        self._hook = self.model.register_forward_hook(self._collect)

    def _collect(self, module, args, output) -> None:
        if module.training and torch.is_grad_enabled() and output.routing is not None:
            routing = output.routing.detach().float()
            self.routing = routing if self.routing is None else self.routing + routing

    def update_bias(self) -> torch.Tensor | None:
        """Move the expert bias by what this step's forwards routed (summed over the ranks of
        a process group) and start the next sum. Returns that sum (None if nothing ran)."""
        routing, self.routing = self.routing, None
        if routing is None:
            return None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(routing)
        self.model.update_expert_bias(routing)
        self.last_routing = routing
        return routing

    def remove(self) -> None:
        self._hook.remove()


class ExpertBiasCallback(TrainerCallback):
    """A transformers `TrainerCallback` that keeps a CustomLLM's experts balanced: add it to
    any `Trainer` (the expert bias otherwise never moves)."""

    def __init__(self):
        self.collector: RoutingCollector | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.collector is None:
            self.collector = RoutingCollector(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.collector is not None:
            self.collector.update_bias()

    def on_train_end(self, args, state, control, **kwargs):
        if self.collector is not None:
            self.collector.remove()
            self.collector = None


def unwrap(model: torch.nn.Module) -> CustomLLM:
    """The CustomLLM inside DDP, torch.compile or PEFT wrappers."""
    seen = model
    while not isinstance(seen, CustomLLM):
        inner = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if inner is None and hasattr(seen, "get_base_model"):
            inner = seen.get_base_model()
        if inner is None:
            raise TypeError(f"no CustomLLM inside {type(model).__name__}")
        seen = inner
    return seen

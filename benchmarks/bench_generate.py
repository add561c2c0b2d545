"""Generation speed: prefill and greedy decode at two context lengths, and KV-cache size.

Four systems, batch 1, random weights: CustomLLM MLX (latent cache, absorbed 1-token decode),
CustomLLM torch (latent cache, absorbed decode), mlx_lm's DeepSeek-V3 (its KVCache) and
transformers' DeepseekV3ForCausalLM (its DynamicCache).

- prefill: a fresh cache, the prompt through the model, the next token's logits evaluated.
  MLX does as `mlx_lm.generate_step`: all but the last token fill the cache (logits never
  computed), then a 1-token step; torch passes `logits_to_keep=1`.
- decode: one greedy step (1 token in, argmax out) on a cache holding exactly `ctx` tokens;
  the cache is trimmed back after each step so every repeat sees the same context.
- With --e2e (default), our `stream_generate` (MLX and torch) and mlx_lm's `stream_generate`
  with the peer also run end to end (cosmo2 tokenizer), as a check on the step loop.
- `--device cuda|mps` runs the torch rows there, `--dtype bfloat16` in bfloat16 weights (as
  `customllm-torch generate --dtype bfloat16`); MLX is optional. On CUDA a "customllm (loop)"
  row has our routed experts one matmul chain each, for the same-process comparison with the
  grouped GEMMs (which our layer takes by default in bfloat16 on H100/H200/B200).

    python benchmarks/bench_generate.py --preset tiny --json bench_generate.json
    python benchmarks/bench_generate.py --preset 973m --frameworks torch --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as bc  # noqa: E402  (sets up MLX's CPU BLAS before mlx.core)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from customllm.config import ModelConfig  # noqa: E402

if bc.HAVE_MLX:
    import mlx.core as mx

OURS, MLX_PEER, TORCH_PEER = "customllm", "mlx_lm deepseek_v3", "hf DeepseekV3"
OURS_LOOP = "customllm (loop)"  # torch on CUDA: the routed experts as a per-expert loop
PEER = {(OURS, "mlx"): MLX_PEER, (OURS, "torch"): TORCH_PEER, (OURS_LOOP, "torch"): TORCH_PEER}
HEADERS = [
    "system",
    "framework",
    "context",
    "prefill tok/s",
    "decode tok/s",
    "KV B/token/layer",
    "KV B/token",
    "prefill vs peer",
    "decode vs peer",
]
COSMO2 = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "cosmo2"


class Runner:
    """One model with its cache: `prefill(prompt)` and `decode()` at a fixed context."""

    def __init__(
        self,
        system: str,
        framework: str,
        cfg: ModelConfig,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        self.system, self.framework = system, framework
        self.ours = system in (OURS, OURS_LOOP)
        self.device = torch.device(device)
        self.name = f"{system}/{framework}"
        if framework == "mlx":
            if system == OURS:
                from customllm_mlx.model import CustomLLM

                self.model = CustomLLM(cfg)
            else:
                self.model = bc.build_mlx_peer(cfg)
            self.model.eval()
            mx.eval(self.model.parameters())
        else:
            with self.device:  # drawn where it runs
                if self.ours:
                    from customllm_torch.model import CustomLLM

                    self.model = CustomLLM(cfg)
                else:
                    self.model = bc.build_torch_peer(cfg)
            if self.ours:  # the routing bias stays float32, as `customllm_torch.load` keeps it
                from customllm_torch.io import cast_model

                cast_model(self.model, getattr(torch, dtype))
            else:
                self.model.to(getattr(torch, dtype))
            self.model.to(self.device).eval()
            if system == OURS_LOOP:
                bc.per_expert_loop(self.model)
        self.cache, self.context = None, 0

    # -- cache ---------------------------------------------------------------------------------
    def new_cache(self):
        if self.framework == "mlx":
            if self.system == OURS:
                return self.model.make_cache()
            from mlx_lm.models.cache import make_prompt_cache

            return make_prompt_cache(self.model)
        if self.ours:
            from customllm_torch.model import LatentKVCache

            return LatentKVCache(len(self.model.decoder_layers))
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def cache_arrays(self) -> list:
        if self.framework == "mlx":
            return [a for c in self.cache for a in c.state if isinstance(a, mx.array)]
        if self.ours:
            return [a for layer in self.cache.layers for a in layer]
        return [a for layer in self.cache.layers for a in (layer.keys, layer.values)]

    def cache_bytes_per_token(self) -> float:
        """Every cache array is (..., S, width): bytes per position, capacity not counted."""
        return sum(a.nbytes / a.shape[-2] for a in self.cache_arrays())

    def trim_to(self, n: int) -> None:
        if self.framework == "mlx":
            for c in self.cache:
                c.trim(c.offset - n)
        elif self.ours:
            self.cache.layers = [(c[:, :n], k[:, :, :n]) for c, k in self.cache.layers]
        else:
            self.cache.crop(n - self.cache.get_seq_length())  # negative: tokens to drop

    # -- steps ---------------------------------------------------------------------------------
    def forward(self, ids: np.ndarray):
        """Next-token ids after `ids` (1, T), through the cache."""
        if self.framework == "mlx":
            logits = self.model(mx.array(ids), cache=self.cache)
            token = mx.argmax(logits[:, -1], axis=-1)
            mx.eval(token)
            return np.array(token)
        with torch.inference_mode():
            inputs = torch.from_numpy(ids).long().to(self.device)
            # transformers' models take `past_key_values` before 5.2x, `cache` since
            params = inspect.signature(self.model.forward).parameters
            name = "cache" if "cache" in params else "past_key_values"
            kwargs = {name: self.cache, "use_cache": True, "logits_to_keep": 1}
            logits = self.model(inputs, **kwargs).logits
            return logits[:, -1].argmax(-1).cpu().numpy()  # (waits for the device)

    def prefill(self, prompt: np.ndarray):
        self.cache = self.new_cache()
        if self.framework == "mlx" and prompt.shape[1] > 1:  # as mlx_lm.generate_step
            self.model(mx.array(prompt[:, :-1]), cache=self.cache)
            mx.eval([c.state for c in self.cache])
            prompt = prompt[:, -1:]
        self.next_token = self.forward(prompt)
        self.context = self.cache_offset()

    def cache_offset(self) -> int:
        if self.framework == "mlx":
            return self.cache[0].offset
        return self.cache.offset if self.ours else self.cache.get_seq_length()

    def decode(self):
        self.forward(self.next_token.reshape(1, 1))
        self.trim_to(self.context)


def e2e_rows(args, cfg: ModelConfig, runners: list[Runner], prompt: np.ndarray) -> list[dict]:
    """stream_generate end to end, interleaved: ours (both frameworks) and mlx_lm's with the peer."""
    if not (COSMO2 / "tokenizer.json").is_file():
        return []
    from customllm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(COSMO2))
    fns, results = {}, {}
    for r in runners:
        if r.framework == "mlx" and r.system != OURS:
            from mlx_lm.generate import stream_generate
        elif r.framework == "mlx" and importlib.util.find_spec("customllm_mlx.generate"):
            from customllm_mlx.generate import stream_generate
        elif (
            r.framework == "torch"
            and r.ours
            and importlib.util.find_spec("customllm_torch.generate")
        ):
            from customllm_torch.generate import stream_generate
        else:
            continue
        prompt_ids = prompt[0].tolist() if r.framework == "torch" else mx.array(prompt[0])
        results[r.name] = []

        def run(r=r, generate=stream_generate, prompt_ids=prompt_ids):
            *_, last = generate(r.model, tokenizer, prompt_ids, max_tokens=args.e2e_tokens)
            results[r.name].append((last.prompt_tps, last.generation_tps, last.generation_tokens))

        fns[r.name] = run
    bc.interleaved_times(fns, 1, args.e2e_repeats, group_of=bc.framework_of)
    rows = []
    for name, values in results.items():
        values = values[1:]  # drop the warm-up
        rows.append(
            {
                "name": f"{name}/stream_generate",
                "context": prompt.shape[1],
                "prefill_tokens_per_s": bc.median([v[0] for v in values]),
                "decode_tokens_per_s": bc.median([v[1] for v in values]),
                "generated_tokens": [v[2] for v in values],
            }
        )
    return rows


def measure(args, cfg: ModelConfig, frameworks: set[str]) -> dict:
    """Rows per system and context (prefill, decode, cache bytes) and the end-to-end rows, for
    the wanted systems in `frameworks`."""
    runners = []
    plan = [(OURS, "mlx"), (MLX_PEER, "mlx"), (OURS, "torch"), (TORCH_PEER, "torch")]
    if torch.device(args.device).type == "cuda":
        plan.insert(3, (OURS_LOOP, "torch"))
    for system, framework in plan:
        if framework in frameworks and bc.wants(f"{system}/{framework}", args.only):
            if framework == "mlx":
                mx.random.seed(0)
            torch.manual_seed(0)
            runners.append(Runner(system, framework, cfg, args.device, args.dtype))
    rng = np.random.default_rng(0)
    rows, e2e = [], []
    for ctx in (int(c) for c in args.contexts.split(",")):
        prompt = rng.integers(1, cfg.vocab_size, (1, ctx))
        prefill = bc.interleaved_times(
            {r.name: (lambda r=r, p=prompt: r.prefill(p)) for r in runners},
            args.warmup,
            args.prefill_repeats,
            group_of=bc.framework_of,
        )
        decode = bc.interleaved_times(
            {r.name: r.decode for r in runners},
            args.warmup,
            args.decode_repeats,
            group_of=bc.framework_of,
        )
        for r in runners:
            kv = r.cache_bytes_per_token()
            rows.append(
                {
                    "name": r.name,
                    "system": r.system,
                    "framework": r.framework,
                    "context": ctx,
                    "prefill_tokens_per_s": ctx / bc.median(prefill[r.name]),
                    "decode_tokens_per_s": 1 / bc.median(decode[r.name]),
                    "decode_ms": [round(1e3 * t, 3) for t in decode[r.name]],
                    "kv_bytes_per_token": kv,
                    "kv_bytes_per_token_per_layer": kv / cfg.num_hidden_layers,
                }
            )
        if args.e2e:
            e2e += e2e_rows(args, cfg, runners, prompt)
    return {"rows": rows, "e2e": e2e}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bc.add_model_args(parser)
    parser.add_argument("--contexts", default="128,1024", help="comma-separated context lengths")
    parser.add_argument("--prefill-repeats", type=int, default=10)
    parser.add_argument("--decode-repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--e2e-tokens", type=int, default=32)
    parser.add_argument("--e2e-repeats", type=int, default=3)
    parser.add_argument("--only", default=None, help="comma-separated name substrings")
    parser.add_argument("--device", default="cpu", help="torch rows: cpu | cuda | mps")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="torch rows' weights (customllm-torch generate --dtype); MLX rows: float32",
    )
    parser.add_argument("--json", default=None)
    bc.add_process_args(parser)
    args = parser.parse_args(argv)
    bc.check_device(args.device)

    contexts = [int(c) for c in args.contexts.split(",")]
    cfg = bc.make_config(args, max_position_embeddings=max(2048, 2 * max(contexts)))
    measured = bc.measure_per_process(args, argv, __file__, lambda fw: measure(args, cfg, fw))
    if measured is None:  # the torch child: the parent prints
        return {}
    rows, e2e = measured["rows"], measured["e2e"]
    rows.sort(key=lambda r: r["context"])  # stable: the systems in their order per context
    e2e.sort(key=lambda r: r["context"])
    for row in rows:
        peer = next(
            (
                p
                for p in rows
                if p["system"] == PEER.get((row["system"], row["framework"]))
                and p["framework"] == row["framework"]
                and p["context"] == row["context"]
            ),
            None,
        )
        for key in ("prefill", "decode"):
            row[f"{key}_ratio_to_peer"] = (
                peer and row[f"{key}_tokens_per_s"] / peer[f"{key}_tokens_per_s"]
            )

    table = bc.markdown_table(
        HEADERS,
        [
            [
                r["system"],
                r["framework"],
                r["context"],
                f"{r['prefill_tokens_per_s']:,.0f}",
                f"{r['decode_tokens_per_s']:,.1f}",
                f"{r['kv_bytes_per_token_per_layer']:.0f}",
                f"{r['kv_bytes_per_token']:.0f}",
                bc.fmt_ratio(r["prefill_ratio_to_peer"]),
                bc.fmt_ratio(r["decode_ratio_to_peer"]),
            ]
            for r in rows
        ],
    )
    print(
        f"\n## Generation: preset {args.preset}, batch 1, greedy, median of "
        f"{args.prefill_repeats} prefills / {args.decode_repeats} decode steps (interleaved)\n"
    )
    print(table)
    if e2e:
        print("\nstream_generate end to end (median of repeats):\n")
        print(
            bc.markdown_table(
                ["generator", "context", "prompt tok/s", "generation tok/s"],
                [
                    [
                        r["name"],
                        r["context"],
                        f"{r['prefill_tokens_per_s']:,.0f}",
                        f"{r['decode_tokens_per_s']:,.1f}",
                    ]
                    for r in e2e
                ],
            )
        )
    result = {
        "benchmark": "generate",
        "args": vars(args),
        "config": cfg.to_dict(),
        "machine": bc.machine_info(),
        "processes": measured["processes"],
        "rows": rows,
        "e2e": e2e,
        "table": table,
    }
    bc.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()

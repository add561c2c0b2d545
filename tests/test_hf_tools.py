"""Hugging Face users' own tools on CustomLLM model folders: padded batches and attention masks,
`pipeline`, PEFT adapters in cached decoding, gradient checkpointing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from customllm_torch import io
from customllm_torch.model import CustomLLM

PROMPTS = ["Once upon a time", "The cat", "A little girl named Lily went to the park with her"]


@pytest.fixture
def folder(tmp_path, sharp_config, builtin_tokenizer):
    """A saved random model (weights N(0, 0.3): greedy tokens far from ties) and a tokenizer."""
    torch.manual_seed(0)
    config = dataclasses.replace(sharp_config, vocab_size=512, initializer_range=0.1)
    io.save(CustomLLM(config).eval(), tmp_path / "model", tokenizer=builtin_tokenizer)
    return tmp_path / "model"


def greedy(model, tokenizer, texts, n=10):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=n, do_sample=False)
    return [row[batch.input_ids.shape[1] :].tolist() for row in out]


def test_model_folders_give_the_tokenizer_a_pad_token(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(folder):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (batch.attention_mask == 0).any()  # the batch is padded
    alone = [greedy(model, tokenizer, [p])[0] for p in PROMPTS]
    assert greedy(model, tokenizer, PROMPTS) == alone
    with torch.no_grad():  # and the full forward: each row's logits as its prompt's alone
        logits = model(**batch).logits
        for row, prompt in zip(logits, PROMPTS, strict=True):
            single = model(**tokenizer(prompt, return_tensors="pt")).logits[0]
            torch.testing.assert_close(row[-len(single) :], single, atol=1e-4, rtol=1e-4)


def test_a_right_padded_batch_leaves_padding_out_of_the_loss_and_the_expert_loads(folder):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="right")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, labels=batch.input_ids)
        losses, counts = [], []
        for prompt in PROMPTS:
            one = tokenizer(prompt, return_tensors="pt")
            single = model(**one, labels=one.input_ids)
            losses.append(single.lm_loss * (one.input_ids.shape[1] - 1))
            counts.append(one.input_ids.shape[1] - 1)
    torch.testing.assert_close(out.lm_loss, sum(losses) / sum(counts), atol=1e-5, rtol=1e-5)
    tokens = int(batch.attention_mask.sum())
    k = model.model_config.num_experts_per_tok
    assert out.expert_load.sum(-1).tolist() == [tokens * k] * model.model_config.num_hidden_layers


def test_generate_with_the_tokenizers_output_and_the_text_generation_pipeline(folder):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    alone = tokenizer.decode(greedy(model, tokenizer, [PROMPTS[0]], n=8)[0])
    generator = pipeline("text-generation", model=str(folder))
    results = generator(PROMPTS[:2], max_new_tokens=8, do_sample=False, batch_size=2)
    assert results[0][0]["generated_text"] == PROMPTS[0] + alone
    assert all(r[0]["generated_text"].startswith(p) for r, p in zip(results, PROMPTS, strict=False))


def test_peft_lora_holds_in_cached_decoding(folder):
    """LoRA on every linear layer, k_proj_u and v_proj_u included (which the absorbed decode
    would read as plain weights): cached greedy generation equals the merged model's, and the
    last step's logits equal the full forward's."""
    peft = pytest.importorskip("peft")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = peft.LoraConfig(target_modules="all-linear", r=4, init_lora_weights=False)
    adapted = peft.get_peft_model(model, config).eval()
    assert type(adapted.base_model.model.decoder_layers[0].self_attn.k_proj_u).__name__ == "Linear"
    batch = tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        out = adapted.generate(**batch, max_new_tokens=6, do_sample=False)
        cached = adapted(input_ids=out[:, :-1], use_cache=True)  # prefill, then one step
        step = adapted(input_ids=out[:, -1:], cache=cached.cache, use_cache=True).logits[0, -1]
        full = adapted(input_ids=out).logits[0, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
    merged = adapted.merge_and_unload().eval()  # plain Linears again: the absorbed decode
    with torch.no_grad():
        cached = merged(input_ids=out[:, :-1], use_cache=True)
        merged_step = merged(input_ids=out[:, -1:], cache=cached.cache, use_cache=True)
    torch.testing.assert_close(merged_step.logits[0, -1], step, atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(folder):
    model = AutoModelForCausalLM.from_pretrained(folder).train()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="right")
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)

    calls = []
    model.decoder_layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))

    def loss_and_grads():
        calls.clear()
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks (checkpointing replays them)
        loss = model(**batch, labels=batch.input_ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads()
    assert len(calls) == 1
    model.gradient_checkpointing_enable()
    checkpointed_loss, checkpointed = loss_and_grads()
    assert len(calls) == 2  # the layer ran again in the backward pass
    torch.testing.assert_close(checkpointed_loss, loss, atol=0, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_plain_trainer_balances_the_experts_with_the_callback(folder, tmp_path):
    """Without ExpertBiasCallback a plain Trainer never moves the expert bias; with it, each
    optimizer step moves the bias as this package's trainers do (`update_expert_bias` over the
    step's routing)."""
    from transformers import Trainer, TrainingArguments

    from customllm_torch import ExpertBiasCallback

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(" ".join(PROMPTS), return_tensors="pt").input_ids[0]
    data = [{"input_ids": ids, "labels": ids}]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=1,
        learning_rate=0.0, report_to="none", save_strategy="no", use_cpu=True,
    )  # fmt: skip

    def trained(callbacks):
        model = AutoModelForCausalLM.from_pretrained(folder)
        Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
        return torch.stack([layer.mlp.expert_bias for layer in model.decoder_layers])

    assert not trained([]).any()
    biased = trained([ExpertBiasCallback()])
    reference = AutoModelForCausalLM.from_pretrained(folder).train()
    reference.update_expert_bias(reference(input_ids=ids[None], labels=ids[None]).routing)
    expected = torch.stack([layer.mlp.expert_bias for layer in reference.decoder_layers])
    assert expected.abs().max() > 0
    torch.testing.assert_close(biased, expected)


BLOCKED_PACKAGE = """
import importlib.abc, json, sys
class Blocked(importlib.abc.MetaPathFinder):  # as if the package were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("customllm", "customllm_torch", "customllm_mlx"):
            raise ImportError(name)
sys.meta_path.insert(0, Blocked())
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
out = model.generate(**tokenizer(sys.argv[2], return_tensors="pt"), max_new_tokens=8)
print(json.dumps([type(model).__module__, out[0].tolist()]))
"""


def test_an_exported_folder_loads_and_generates_without_the_package(folder, tmp_path):
    import json
    import subprocess
    import sys

    from click.testing import CliRunner

    from customllm_torch.cli import main as torch_cli

    (folder / "optimizer.safetensors").write_bytes(b"")  # what a checkpoint holds beside
    (folder / "training_state.json").write_text('{"step": 7, "tokens_seen": 1234}')
    out = tmp_path / "hub"
    result = CliRunner().invoke(torch_cli, ["export", "--model", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"modeling_customllm.py", "generation_config.json", "README.md"} <= names
    assert not names & {"optimizer.safetensors", "training_state.json"}
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    assert "1,234 tokens in 7 steps" in (out / "README.md").read_text()

    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_PACKAGE, str(out), PROMPTS[0]],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    module, tokens = json.loads(done.stdout.splitlines()[-1])
    assert module.startswith("transformers_modules.")  # the folder's code, not the package's
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(PROMPTS[0], return_tensors="pt")
    assert tokens == model.generate(**batch, max_new_tokens=8, do_sample=False)[0].tolist()

    again = CliRunner().invoke(torch_cli, ["export", "--model", str(folder), "--out", str(out)])
    assert again.exit_code != 0 and "--force" in again.output

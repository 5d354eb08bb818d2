"""Run by tests/test_scaling.py under `torchrun --nproc_per_node 2` (gloo, CPU): the scripts' FSDP blocks on a tiny
model sharded with torch's FSDP2 `fully_shard`, checked against an unsharded copy. accelerate routes to FSDP only on
GPUs, so a stand-in accelerator says "FSDP" here; the sharding itself is torch's, as under accelerate.

Usage: torchrun --nproc_per_node 2 tests/fsdp_blocks_worker.py OUT_DIR SCRIPT [SCRIPT ...]"""

import copy
import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
TINY = REPO / "assets" / "tiny-gpt2"


def stand_in_accelerator(rank: int) -> SimpleNamespace:
    return SimpleNamespace(distributed_type=DistributedType.FSDP, is_main_process=rank == 0, process_index=rank,
                           num_processes=dist.get_world_size(), device=torch.device("cpu"),
                           wait_for_everyone=dist.barrier, unwrap_model=lambda model: model)


def shard(model, tail_group: bool = False):
    """What accelerate's FSDP2 preparation does with fsdp.yaml: each transformer block, then the root. tail_group: as
    accelerate 1.15 also does, the final norm and the output layer (with the input embeddings when tied) one more
    group that stays gathered after the forward, and the untied input embeddings a group of their own."""
    for module in model.modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module, reshard_after_forward=True)
    if tail_group:
        language_model = getattr(model, "pretrained_model", model)
        norm = language_model.get_decoder().norm if hasattr(language_model.get_decoder(), "norm") else \
            language_model.get_decoder().ln_f
        embeddings, head = language_model.get_input_embeddings(), language_model.get_output_embeddings()
        tied = embeddings.weight is head.weight
        if not tied:
            fully_shard(embeddings, reshard_after_forward=True)
        fully_shard([norm, embeddings, head] if tied else [norm, head], reshard_after_forward=False)
    fully_shard(model)
    return model


def outputs(model, batch) -> torch.Tensor:
    """Logits, and for ppo.py's value-head model the values too, side by side."""
    out = model(**batch)
    if isinstance(out, tuple):  # (logits, loss, values)
        return torch.cat([out[0], out[2].unsqueeze(-1)], dim=-1)
    return out.logits


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return outputs(model, batch)


def train_step(model, optimizer, batch) -> None:
    out = outputs(model, batch)
    out.float().pow(2).mean().backward()  # any loss that reaches every weight, logits and values alike
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def output_layer(model) -> torch.nn.Module:
    return next(module for name, module in model.named_modules() if name.endswith("lm_head"))


def fresh(module, name: str, path=TINY):
    """The tiny model as the script trains it: ppo.py wraps it with its value head."""
    torch.manual_seed(0)
    if name == "ppo":
        return module.AutoModelForCausalLMWithValueHead.from_pretrained(path).eval()  # eval: no value-head dropout
    return AutoModelForCausalLM.from_pretrained(path).eval()


def chunked_values_and_grads(module, model, batch, labels, chunk_size: int):
    """Per-token log-probs through the script's chunked_log_probs and every weight's (whole) gradient of a loss that
    is not linear in them; ppo.py's value-head model through its language model, its values in the loss too."""
    language_model = getattr(model, "pretrained_model", model)
    with module.chunked_log_probs(language_model, labels, chunk_size, extras=("entropy",)):
        out = model(**batch, use_cache=False)
    log_probs = (out[0] if isinstance(out, tuple) else out).log_probs
    sums = log_probs.sum(-1)
    loss = -torch.nn.functional.logsigmoid(sums[0] - sums[1]) + log_probs.pow(2).sum()
    if isinstance(out, tuple):
        loss = loss + out[2].float().pow(2).mean()
    loss.backward()
    grads = {}
    for key, parameter in model.named_parameters():
        if parameter.grad is not None:
            grad = parameter.grad
            grads[key] = grad.full_tensor() if isinstance(grad, DTensor) else grad
    return log_probs.detach(), grads


def check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def main(out: Path, scripts: list[str]) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    accelerator = stand_in_accelerator(rank)
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    batch = tokenizer(["the film was good and", "a dull story, badly told"], return_tensors="pt", padding=True)
    prompt = tokenizer(["the film was"], return_tensors="pt")
    for name in scripts:
        module = importlib.import_module(name)
        plain = fresh(module, name)
        sharded = shard(copy.deepcopy(plain))
        check(isinstance(output_layer(sharded).weight, DTensor), "the policy is sharded")
        plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2)
        optimizer = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
        train_step(plain, plain_optimizer, batch)
        train_step(sharded, optimizer, batch)  # both processes see the same batch: the averaged gradient is the same

        # 1. A checkpoint written from shards holds the full weights (plain save_pretrained) and optimizer state.
        path = out / name / "checkpoint-1"
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        if rank == 0:
            path.mkdir(parents=True)
        dist.barrier()
        module.save_checkpoint(path, accelerator, sharded, tokenizer, SimpleNamespace(optimizer=optimizer), scheduler,
                               {"step": 1})
        loaded = fresh(module, name, path)
        check(torch.allclose(logits(loaded, batch), logits(plain, batch), atol=1e-5),
              f"{name}: the checkpoint's weights are the trained ones")

        # 2. Resume: a fresh sharded model from the checkpoint, its optimizer state restored, takes the same next step.
        state = torch.load(path / "training_state.pt", weights_only=False)
        resumed = shard(fresh(module, name, path))
        resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
        torch.optim.lr_scheduler.LambdaLR(resumed_optimizer, lambda step: 1.0)  # as the scripts: schedule, then load
        module.load_optimizer_state(path, accelerator, resumed, SimpleNamespace(optimizer=resumed_optimizer),
                                    state["optimizer"])
        train_step(plain, plain_optimizer, batch)
        train_step(resumed, resumed_optimizer, batch)
        check(torch.allclose(logits(resumed, batch), logits(plain, batch), atol=1e-5),
              f"{name}: the resumed run takes the uninterrupted run's step")

        # 3. Final weights gathered for save_pretrained.
        weights = module.gathered_state_dict(accelerator, resumed)
        if rank == 0:
            resumed.save_pretrained(out / name / "final", state_dict=weights)
        dist.barrier()
        final = fresh(module, name, out / name / "final")
        check(torch.allclose(logits(final, batch), logits(plain, batch), atol=1e-5), f"{name}: the final save")

        # 4. Generation with gathered weights: each process decodes a different number of tokens, which would hang
        #    or fail if any forward still needed the other process; afterwards the weights are sharded again.
        if hasattr(module, "gathered_for_generation"):
            new_tokens = 6 if rank == 0 else 3
            with module.gathered_for_generation(accelerator, resumed) as generator:
                sampled = generator.generate(**prompt, max_new_tokens=new_tokens, do_sample=False,
                                             pad_token_id=tokenizer.eos_token_id)
            expected = plain.generate(**prompt, max_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=tokenizer.eos_token_id)
            check(torch.equal(sampled, expected), f"{name}: gathered generation is the unsharded model's")
            local = output_layer(resumed).weight.to_local()
            check(local.shape[0] < output_layer(plain).weight.shape[0], f"{name}: the weights are sharded again after")

        # 5. A frozen reference: sharded like the policy, eval mode, no gradients, the same outputs.
        if hasattr(module, "prepare_frozen"):
            reference = module.prepare_frozen(accelerator, fresh(module, name))
            check(isinstance(output_layer(reference).weight, DTensor), f"{name}: the reference is sharded")
            check(not reference.training and not any(p.requires_grad for p in reference.parameters()),
                  f"{name}: the reference is frozen and in eval mode")
            check(torch.allclose(logits(reference, batch), logits(fresh(module, name), batch), atol=1e-5),
                  f"{name}: the sharded reference computes the unsharded one's outputs")

        # 6. LoRA: the adapter saved from gathered weights reproduces the sharded model's outputs.
        if name in ("sft", "dpo"):
            from peft import LoraConfig, PeftModel, get_peft_model

            torch.manual_seed(0)
            peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY),
                                        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   init_lora_weights=False))
            expected = logits(peft_model, batch)
            peft_sharded = shard(peft_model)
            weights = module.gathered_state_dict(accelerator, peft_sharded)
            if rank == 0:
                peft_sharded.save_pretrained(out / name / "adapter", state_dict=weights)
            dist.barrier()
            reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), out / name / "adapter")
            check(torch.allclose(logits(reloaded, batch), expected, atol=1e-5), f"{name}: the LoRA adapter")
        # 7. The chunked log-probs (chunked_log_probs, chunks of 3 positions, recomputed in the backward) of a sharded
        #    model, sharded as accelerate shards it and as above: the unsharded model's values and gradients.
        if hasattr(module, "chunked_log_probs"):
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            labels[:, :2] = -100
            want, want_grads = chunked_values_and_grads(module, fresh(module, name), batch, labels, 0)
            for tail_group in [False, True]:
                got, got_grads = chunked_values_and_grads(module, shard(fresh(module, name), tail_group), batch,
                                                          labels, 3)
                check(torch.allclose(got, want, atol=1e-5), f"{name}: sharded chunked log-probs ({tail_group})")
                check(got_grads.keys() == want_grads.keys(), f"{name}: every weight has its gradient")
                for key, grad in want_grads.items():
                    check((got_grads[key] - grad).abs().max() <= 1e-4 * grad.abs().max(),
                          f"{name}: sharded chunked gradient of {key} ({tail_group})")
        if rank == 0:
            print(f"{name}: ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])

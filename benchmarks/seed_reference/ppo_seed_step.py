"""Make tests/data/seed_ppo_steps.json: what the REAL TRL v0.8.6 PPOTrainer.step computes on the tiny policy.

TRL 0.8.6 needs a transformers of its era, so this runs in its own virtualenv (not the project's):

    python3 -m venv /tmp/seedenv
    /tmp/seedenv/bin/pip install torch==2.13.0
    /tmp/seedenv/bin/pip install trl==0.8.6 transformers==4.40.2 accelerate==0.30.1 "datasets>=2.19,<2.20" \
        peft==0.10.0 "numpy<2" "pyarrow<17" "pandas<2.3" rich
    /tmp/seedenv/bin/python benchmarks/seed_reference/ppo_seed_step.py

For each configuration: the tiny policy with a value head (dropout 0) and create_reference_model, fixed
queries/responses/scores, two consecutive step() calls; recorded are the scalar stats, the KL coefficient and the norm
of every tensor's update. tests/test_ppo.py::test_step_matches_the_seed replays them with ppo.py.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import trl
from transformers import AutoTokenizer
from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, create_reference_model

REPO = Path(__file__).resolve().parents[2]
BASE = dict(batch_size=8, mini_batch_size=4, seed=0, learning_rate=1e-3)
CONFIGS = {
    "A": dict(BASE),  # the seed's defaults otherwise
    "B": dict(BASE, kl_penalty="full", gradient_accumulation_steps=2, mini_batch_size=2, whiten_rewards=True,
              use_score_scaling=True, use_score_norm=True, score_clip=1.0, max_grad_norm=0.5),
    "C": dict(BASE, kl_penalty="abs", adap_kl_ctrl=False, early_stopping=True, target_kl=0.0001, cliprange_value=0.05),
    "D": dict(BASE, kl_penalty="mse", ppo_epochs=2, gamma=0.9, lam=0.8, mini_batch_size=8),
    "E": dict(BASE, learning_rate=1e-5),  # no mini-batch reaches ratio_threshold
}
SCORES = [0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 1.0, -2.0]


def old_transformers_copy(source: Path, target: Path) -> Path:
    """The tiny policy as transformers 4.40 / tokenizers 0.19 read it; the weights are untouched."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype", "float32")
    (target / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((target / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config["additional_special_tokens"] = tokenizer_config.pop("extra_special_tokens", [])
    for key in ("backend", "is_local", "local_files_only"):
        tokenizer_config.pop(key, None)
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    tokenizer = json.loads((target / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    (target / "tokenizer.json").write_text(json.dumps(tokenizer))
    return target


def run(path: Path, overrides: dict) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(path), summary_dropout_prob=0.0)
    reference = create_reference_model(model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.pad_token = tokenizer.eos_token
    initial = {key: value.detach().clone() for key, value in model.state_dict().items()}
    v_head_init = {"weight": model.v_head.summary.weight.tolist(), "bias": model.v_head.summary.bias.tolist()}
    response = tokenizer.encode(" the plot was wonderful and the acting was dull")
    query_ids = [tokenizer.encode(f"Review of Film {i}:") for i in range(8)]
    response_ids = [response[: 3 + i] for i in range(8)]
    trainer = PPOTrainer(config=PPOConfig(**overrides), model=model, ref_model=reference, tokenizer=tokenizer)
    steps = []
    for _ in range(2):  # no other RNG use between the trainer's set_seed and step's permutations
        stats = trainer.step([torch.tensor(q) for q in query_ids], [torch.tensor(r) for r in response_ids],
                             [torch.tensor(s) for s in SCORES])
        scalars = {key: float(value) for key, value in stats.items()
                   if not key.startswith("time/") and np.ndim(value) == 0}
        norms = {key: float((value.double() - initial[key].double()).norm())
                 for key, value in model.state_dict().items()}
        steps.append({"stats": scalars, "kl_ctl_value": float(trainer.kl_ctl.value), "param_delta_norms": norms})
    return {"config": overrides, "query_ids": query_ids, "response_ids": response_ids, "scores": SCORES,
            "v_head_init": v_head_init, "steps": steps}


if __name__ == "__main__":
    names = sys.argv[1:] or list(CONFIGS)
    with tempfile.TemporaryDirectory() as tmp:
        path = old_transformers_copy(REPO / "assets" / "tiny-gpt2", Path(tmp) / "tiny-gpt2")
        configs = {name: run(path, CONFIGS[name]) for name in names}
    about = (f"Outputs of the real TRL {trl.__version__} PPOTrainer.step (transformers "
             f"{__import__('transformers').__version__}, torch {torch.__version__}) on assets/tiny-gpt2 with "
             "AutoModelForCausalLMWithValueHead.from_pretrained(path, summary_dropout_prob=0.0), the value head set to "
             "v_head_init, create_reference_model(model), two consecutive step() calls on the same inputs. Made by "
             "benchmarks/seed_reference/ppo_seed_step.py in a virtualenv with trl==0.8.6.")
    output = REPO / "tests" / "data" / "seed_ppo_steps.json"
    output.write_text(json.dumps({"about": about, "configs": configs}, indent=0))
    print(f"wrote {output} ({', '.join(names)})")

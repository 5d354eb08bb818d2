"""TRL's side of benchmarks/vs_trl.py: one TRL 1.16 trainer run, timed. Runs inside TRL's own virtualenv.

    <trl venv>/bin/python benchmarks/vs_trl_runner.py --algo dpo --model M --data D --output_dir O --result R.json

It trains --steps optimizer steps of --batch_size samples with the same settings the harness gives our script (no
evaluation, no checkpoints, gradient checkpointing off, fp32 unless --bf16, --learning_rate with linear decay), saves
the final model, and writes the wall-clock time of every step's end (a TrainerCallback) and of the save, and the
trainer's log history, to --result. Peak memory is measured by the harness (the process's peak RSS; the CUDA peak is
written here when a GPU is present). Nothing of this project is imported: the project does not depend on TRL, and TRL
does not see the project; the reward functions and the environment are loaded from their files by path.

grpo_tools is GRPOTrainer(environment_factory=...) on the tiny tool world: --environment_factory FILE.py:CLASS (one
instance per rollout, reset(**row) before it, its public methods the tools), the reward of --reward_funcs, TRL's
defaults for everything of the tool loop (max_tool_calling_iterations None: until a turn calls nothing or the
completion budget is used up; the tokenizer's own chat template and response_template), and logging_steps 1, so that
the log history holds every step's reward and tools/call_frequency.
"""

import argparse
import importlib.util
import json
import os
import time

START = time.time()

import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


class StepTimer(TrainerCallback):
    """Wall-clock time at the start of training and at the end of every optimizer step."""

    def __init__(self):
        self.train_begin, self.step_ends = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_begin = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ends.append(time.time())


MODULES = {}  # path -> the module imported from it


def load_from_file(spec: str):
    """FILE.py:NAME, the file imported once by path (a reward function and an environment of one file share it)."""
    path, _, name = spec.rpartition(":")
    if path not in MODULES:
        module_spec = importlib.util.spec_from_file_location(f"benchmark_module_{len(MODULES)}", path)
        MODULES[path] = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(MODULES[path])
    return getattr(MODULES[path], name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algo", required=True,
                        choices=["sft", "reward", "dpo", "kto", "orpo", "cpo", "grpo", "rloo", "grpo_tools",
                                 "distill"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="a folder with train.jsonl")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--reward_funcs", default=None,
                        help="grpo/rloo/grpo_tools: FILE.py:NAME, the reward both sides use")
    parser.add_argument("--num_generations", type=int, default=8, help="grpo/rloo: completions per prompt")
    parser.add_argument("--max_completion_length", type=int, default=24, help="grpo/rloo/grpo_tools/distill")
    parser.add_argument("--environment_factory", default=None, help="grpo_tools: FILE.py:CLASS, the environment")
    parser.add_argument("--teacher", default=None, help="distill: the teacher model's folder")
    args = parser.parse_args()

    import trl

    common = dict(output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
                  gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.learning_rate,
                  lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, logging_steps=10, save_strategy="no",
                  eval_strategy="no", report_to="none", bf16=args.bf16, gradient_checkpointing=False,
                  max_length=args.max_length, seed=args.seed, data_seed=args.seed, disable_tqdm=True,
                  dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
    if args.bf16:
        common["model_init_kwargs"] = {"dtype": torch.bfloat16}
    train = load_dataset("json", data_files=f"{args.data}/train.jsonl", split="train")
    if args.algo == "sft":
        config, trainer_class = trl.SFTConfig(**common), trl.SFTTrainer
    elif args.algo == "reward":
        config, trainer_class = trl.RewardConfig(**common), trl.RewardTrainer
    elif args.algo == "dpo":
        config, trainer_class = trl.DPOConfig(**common, beta=0.1), trl.DPOTrainer
    elif args.algo == "kto":
        config, trainer_class = trl.KTOConfig(**common, beta=0.1), trl.KTOTrainer
    elif args.algo == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        config, trainer_class = ORPOConfig(**common, beta=0.1), ORPOTrainer
    elif args.algo == "cpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        config, trainer_class = CPOConfig(**common, beta=0.1), CPOTrainer
    elif args.algo == "distill":  # batch_size completions per step, sampled by the student and scored by the teacher
        rl = {key: value for key, value in common.items() if key != "max_length"}
        rl.update(max_completion_length=args.max_completion_length, logging_steps=args.steps,
                  teacher_model_init_kwargs={"dtype": "bfloat16" if args.bf16 else "float32"})
        timer = StepTimer()
        trainer = trl.DistillationTrainer(model=args.model, teacher_model=args.teacher,
                                          args=trl.DistillationConfig(**rl), train_dataset=train, callbacks=[timer])
    elif args.algo == "grpo_tools":  # batch_size completions per step, multi-turn, with the environment's tools
        os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"  # environment_factory is experimental in TRL 1.16 (a warning)
        rl = {key: value for key, value in common.items() if key != "max_length"}
        # TRL's defaults are ours: beta 0 (no reference), loss_type dapo, temperature 1, top_k 0, one iteration per
        # generation, max_tool_calling_iterations None, log_completions off; logging_steps 1 for the learning curve.
        rl.update(num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                  logging_steps=1, beta=0.0, loss_type="dapo", temperature=1.0, max_tool_calling_iterations=None,
                  log_completions=False)
        timer = StepTimer()
        trainer = trl.GRPOTrainer(model=args.model, reward_funcs=[load_from_file(args.reward_funcs)],
                                  args=trl.GRPOConfig(**rl), train_dataset=train, callbacks=[timer],
                                  environment_factory=load_from_file(args.environment_factory))
    else:  # grpo / rloo: batch_size completions per step, the reward function both sides share (loaded from its file)
        rl = {key: value for key, value in common.items() if key != "max_length"}
        rl.update(num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                  logging_steps=args.steps)
        config = (trl.GRPOConfig(**rl) if args.algo == "grpo" else trl.RLOOConfig(**rl))
        trainer_class = trl.GRPOTrainer if args.algo == "grpo" else trl.RLOOTrainer
        timer = StepTimer()
        trainer = trainer_class(model=args.model, reward_funcs=[load_from_file(args.reward_funcs)], args=config,
                                train_dataset=train, callbacks=[timer])
    if args.algo not in ("grpo", "rloo", "grpo_tools", "distill"):
        timer = StepTimer()
        trainer = trainer_class(model=args.model, args=config, train_dataset=train, callbacks=[timer])
    trainer.train()
    trainer.save_model(args.output_dir)
    end = time.time()
    result = {"trl_version": trl.__version__, "process_start": START, "train_begin": timer.train_begin,
              "step_ends": timer.step_ends, "end": end,
              "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
              "params": sum(p.numel() for p in trainer.model.parameters()),
              "log_history": trainer.state.log_history}
    with open(args.result, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

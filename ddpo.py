"""Denoising Diffusion Policy Optimization (DDPO): fine-tune a text-to-image diffusion model on a reward, with PPO.

DDPO (Black et al. 2023, "Training Diffusion Models with Reinforcement Learning", https://arxiv.org/abs/2305.13301;
reference implementation kvablack/ddpo-pytorch) treats the denoising chain as a multi-step decision process: every
DDIM step with eta > 0 samples the next latent from a Gaussian, so the probability of a whole trajectory is the product
of those Gaussians and a policy gradient exists. Each epoch samples images from prompts while storing every latent, its
timestep and the log-probability of each step; a reward scores the decoded images; rewards are normalised into
advantages (per prompt, or over the batch); then a clipped PPO loss over the stored timesteps updates the UNet (LoRA
adapters by default). This file reproduces TRL's v0.8 `DDPOConfig`, `DDPOTrainer` and
`DefaultDDPOStableDiffusionPipeline` in one piece ("the seed" throughout: TRL v0.8.6 and its documented behaviour),
with the reference's rewards (JPEG compressibility and incompressibility, brightness, the LAION aesthetic predictor)
and prompts (its animal list). See docs/ddpo.md for the stages, the metrics and the deviations.

    # offline quickstart: the tiny world's Stable Diffusion (assets/tiny-sd), CPU, about a minute: brighter images
    python ddpo.py
    # the seed's example: Stable Diffusion 1.5, animal prompts, the LAION aesthetic predictor on CLIP ViT-L/14
    python ddpo.py --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 --reward aesthetic \
        --num_epochs 200 --sample_num_steps 50 --sample_batch_size 6 --train_batch_size 3 \
        --sample_num_batches_per_epoch 4 --per_prompt_stat_tracking --per_prompt_stat_tracking_buffer_size 32 \
        --train_learning_rate 3e-4 --train_clip_range 1e-4 --mixed_precision fp16 --save_freq 10
    # several GPUs: each process samples and trains on its own batches; rewards are normalised over all of them
    accelerate launch --multi_gpu --num_processes 8 ddpo.py \
        --pretrained_model stable-diffusion-v1-5/stable-diffusion-v1-5 --reward aesthetic --sample_num_steps 50 \
        --sample_batch_size 8 --train_batch_size 4 --train_learning_rate 3e-4 --train_clip_range 1e-4 \
        --mixed_precision fp16
    # continue a stopped run from its newest complete checkpoint (none yet: start), e.g. in a requeued job
    python ddpo.py --resume_from latest

From Python, as in the seed: `from ddpo import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline`;
`main(DDPOConfig())` runs the command line's training.
"""

import importlib.util
import io
import json
import math
import os
import pickle
import random
import resource
import shutil
import signal
import sys
import time
from collections import deque
from concurrent import futures
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar, Literal, NoReturn

import numpy as np
import torch
import tyro
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

ASSETS = Path(__file__).resolve().parent / "assets"

# The reference's prompts (kvablack/ddpo-pytorch, TRL's examples/scripts/ddpo.py).
ANIMALS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
           "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla",
           "hedgehog", "kangaroo"]


@dataclass
class DDPOConfig:
    """The seed's `DDPOConfig` (field names and meanings) plus its example script's `pretrained_model`,
    `pretrained_revision` and `use_lora`; also this script's command line. Fields that set the scale of a run default
    to the tiny pipeline (about a minute on CPU); docs/ddpo.md gives the seed's values."""

    # --- experiment ---
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (used in the wandb run name)"""
    run_name: str = ""
    """the wandb run name (default: {exp_name}__{seed}__{time})"""
    seed: int = 0
    """seed of the experiment: prompts, sampling noise, shuffles (each process adds its index)"""
    output_dir: str = "runs/ddpo"
    """where the final weights (adapter or pipeline), metrics.jsonl, images/, config.json go (a previous run is kept)"""
    overwrite_output_dir: bool = False
    """replace a previous run in output_dir (by default it is kept: a named output_dir is refused)"""
    logdir: str | None = None
    """the checkpoints' directory (checkpoint_<epoch> inside; default: output_dir/checkpoints)"""
    track: bool = False
    """log to Weights & Biases (metrics and the image grids)"""
    wandb_project_name: str = "post-training"
    """the wandb project (the seed's tracker_project_name)"""
    wandb_entity: str | None = None
    """the wandb entity (team)"""
    push_to_hub: bool = False
    """push output_dir (weights, config.json, metrics.jsonl, images/; not checkpoints/) to the Hub under its name"""

    # --- model ---
    pretrained_model: str = str(ASSETS / "tiny-sd")
    """a Stable Diffusion pipeline: Hub id or local directory (default: the tiny world's; seed: SD v1.5)"""
    pretrained_revision: str = "main"
    """the Hub revision of the pipeline"""
    use_lora: bool = True
    """train LoRA adapters on the UNet's attention projections (to_q, to_k, to_v, to_out.0) instead of the whole UNet"""
    lora_r: int = 4
    """LoRA rank (the reference's 4)"""
    lora_alpha: int = 4
    """LoRA scaling numerator (the reference's 4)"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """precision of the frozen weights and autocast (seed: fp16, a GPU setting; trained weights stay float32)"""
    allow_tf32: bool = True
    """allow TF32 matrix products on Ampere and newer GPUs"""

    # --- epochs, checkpoints ---
    num_epochs: int = 16
    """epochs (each: sample, score, train) (seed: 100)"""
    save_freq: int = 4
    """write a checkpoint every this many epochs (seed: 1; SIGTERM / SIGINT always write one, after the epoch)"""
    num_checkpoint_limit: int = 5
    """keep only the newest this many checkpoints (the oldest is deleted)"""
    resume_from: str = ""
    """a checkpoint_<epoch> directory (or a folder of them: its newest), or latest: the newest complete one in logdir"""

    # --- sampling ---
    sample_num_steps: int = 10
    """DDIM steps per image (seed: 50)"""
    sample_eta: float = 1.0
    """DDIM eta, > 0 (0 would be deterministic: no log-probability to train); 1 is DDPM-like noise"""
    sample_guidance_scale: float = 5.0
    """classifier-free guidance weight"""
    sample_batch_size: int = 8
    """images per process per sampling batch (seed: 1)"""
    sample_num_batches_per_epoch: int = 2
    """sampling batches per process per epoch"""

    # --- training ---
    train_batch_size: int = 4
    """samples per process per training batch (seed: 1)"""
    train_learning_rate: float = 3e-3
    """AdamW learning rate (seed: 3e-4; the tiny pipeline's LoRA adapters need more to move in 16 epochs)"""
    train_adam_beta1: float = 0.9
    """AdamW beta1"""
    train_adam_beta2: float = 0.999
    """AdamW beta2"""
    train_adam_weight_decay: float = 1e-4
    """AdamW weight decay"""
    train_adam_epsilon: float = 1e-8
    """AdamW epsilon"""
    train_gradient_accumulation_steps: int = 1
    """training batches per optimizer step (each batch contributes all its trained timesteps)"""
    train_max_grad_norm: float = 1.0
    """clip the global gradient norm to this"""
    train_num_inner_epochs: int = 1
    """passes over an epoch's samples"""
    train_cfg: bool = True
    """recompute the log-probs with classifier-free guidance, as they were sampled"""
    train_adv_clip_max: float = 5.0
    """clamp advantages to [-train_adv_clip_max, train_adv_clip_max]"""
    train_clip_range: float = 1e-2
    """the PPO clip range of the probability ratio (seed: 1e-4, which on the tiny pipeline clips most updates away)"""
    train_timestep_fraction: float = 1.0
    """the fraction of each trajectory's timesteps trained on (a random subset per sample), in (0, 1]"""

    # --- advantages, rewards, prompts ---
    per_prompt_stat_tracking: bool = False
    """normalise each reward by its prompt's running mean and std (else by the epoch's mean and std)"""
    per_prompt_stat_tracking_buffer_size: int = 16
    """rewards remembered per prompt"""
    per_prompt_stat_tracking_min_count: int = 16
    """below this many remembered rewards, a prompt is normalised with the epoch's mean and std"""
    async_reward_computation: bool = False
    """score each sampling batch in a thread pool while the next one is sampled"""
    max_workers: int = 2
    """threads of the reward pool"""
    negative_prompts: str = ""
    """the negative prompt of classifier-free guidance (one string, as the seed uses it)"""
    reward: Literal["brightness", "jpeg_compressibility", "jpeg_incompressibility", "aesthetic"] = "brightness"
    """the reward: mean pixel value, minus (plus) the JPEG size in kB, or the LAION aesthetic predictor (Hub weights)"""
    prompts: Literal["animals", "fixed"] = "animals"
    """the prompt function: a random animal of the reference's list, or always --prompt"""
    prompt: str = "cat"
    """the prompt of --prompts fixed"""

    check_on_init: ClassVar[bool] = True  # the command line checks in main, to print one line instead of a traceback

    def __post_init__(self):
        if self.check_on_init:
            self.check()

    def check(self) -> None:
        """Sizes that must divide and values that must lie in range; a ValueError that says what was found."""
        for name in ["num_epochs", "save_freq", "num_checkpoint_limit", "sample_num_steps", "sample_batch_size",
                     "sample_num_batches_per_epoch", "train_batch_size", "train_gradient_accumulation_steps",
                     "train_num_inner_epochs", "per_prompt_stat_tracking_buffer_size", "max_workers"]:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        samples = self.sample_batch_size * self.sample_num_batches_per_epoch
        per_step = self.train_batch_size * self.train_gradient_accumulation_steps
        for bad, message in [
            (not 0 < self.train_timestep_fraction <= 1,
             f"train_timestep_fraction must be in (0, 1], got {self.train_timestep_fraction}"),
            (int(self.sample_num_steps * self.train_timestep_fraction) == 0, f"train_timestep_fraction "
             f"{self.train_timestep_fraction} of {self.sample_num_steps} sampling steps trains on no timestep"),
            (self.sample_batch_size % self.train_batch_size, f"sample_batch_size ({self.sample_batch_size}) must be a "
             f"multiple of train_batch_size ({self.train_batch_size})"),
            (samples % per_step, f"the samples of an epoch per process (sample_batch_size x "
             f"sample_num_batches_per_epoch = {samples}) must be a multiple of train_batch_size x "
             f"train_gradient_accumulation_steps = {per_step} (the total train batch over {world_size} processes is "
             f"{per_step * world_size})"),
            (self.sample_eta <= 0, f"sample_eta must be positive: with eta = 0 DDIM is deterministic and a step has "
             f"no log-probability; got {self.sample_eta}"),
            (self.train_clip_range <= 0 or self.train_adv_clip_max <= 0, f"train_clip_range and train_adv_clip_max "
             f"must be positive, got {self.train_clip_range} and {self.train_adv_clip_max}")]:
            if bad:
                raise ValueError(message)


# ----------------------------------------------------------------------------------------------------------------------
# The DDIM step with the log-probability of its sample, and sampling that stores whole trajectories
# ----------------------------------------------------------------------------------------------------------------------
def left_broadcast(values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(B,) -> shape (B, ...): broadcast from the left (a per-sample scalar over its latent)."""
    return values.reshape(values.shape + (1,) * (len(shape) - values.dim())).broadcast_to(shape)


def ddim_step_with_logprob(scheduler, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
                           eta: float, prev_sample: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} that also returns log p(x_{t-1} | x_t) (Song et al. 2020, eq. 12).

    With a = alphas_cumprod[t], a' = alphas_cumprod[t'] (t' = t - 1000 / steps, or the final alpha below 0) and the
    predicted noise eps (B, C, H, W):
        x0    = (x_t - sqrt(1 - a) eps) / sqrt(a)                            the predicted clean latent
        sigma = eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))                the step's standard deviation
        mu    = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps                     the step's mean
        x_{t-1} = mu + sigma z, z ~ N(0, I)   (or the given prev_sample: recomputing a stored step)
        log p = mean over the C*H*W latent dimensions of
                -(x_{t-1} - mu)^2 / (2 sigma^2) - log sigma - log sqrt(2 pi)
    The sample is detached in log p, so the gradient flows through mu (the UNet) only. The mean over dimensions,
    not the sum, is the reference's: it scales the log-ratio, so train_clip_range is tuned for it. timestep is a
    scalar or (B,); returns (x_{t-1} (B, C, H, W), log p (B,)).
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no timesteps: call scheduler.set_timesteps(num_steps) first")
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"only epsilon-prediction schedulers are supported, got {scheduler.config.prediction_type}")
    timestep = torch.as_tensor(timestep, device="cpu").long().reshape(-1).expand(sample.shape[0])
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    alpha_t = alphas[timestep]
    # the seed clamps prev_timestep to >= 0 before this test, so it never takes the final alpha: the same numbers
    # whenever set_alpha_to_one is False (Stable Diffusion's setting), the scheduler's own rule otherwise
    alpha_prev = torch.where(prev_timestep >= 0, alphas[prev_timestep.clamp(min=0)],
                             torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32))
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    alpha_t, alpha_prev, std = (left_broadcast(x, sample.shape).to(sample.device, torch.float32)
                                for x in (alpha_t, alpha_prev, eta * variance.sqrt()))
    model_output, sample_f = model_output.float(), sample.float()
    x0 = (sample_f - (1 - alpha_t).sqrt() * model_output) / alpha_t.sqrt()
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    mean = alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * model_output
    if prev_sample is None:
        noise = torch.randn(sample.shape, generator=generator, device=sample.device if generator is None else
                            generator.device, dtype=torch.float32).to(sample.device)
        prev_sample = mean + std * noise
    log_prob = (-((prev_sample.detach().float() - mean) ** 2) / (2 * std**2) - std.log()
                - math.log(math.sqrt(2 * math.pi)))
    return prev_sample.to(sample.dtype), log_prob.mean(dim=tuple(range(1, log_prob.dim())))


@torch.no_grad()
def sample_with_logprob(pipe, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor,
                        num_inference_steps: int, guidance_scale: float, eta: float,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, list, list]:
    """Stable Diffusion sampling that keeps the trajectory: (B, L, D) prompt embeddings (and the negative prompt's)
    -> images (B, 3, H, W) in [0, 1], the latents x_T ... x_0 (steps + 1 tensors of (B, C, h, w)) and the log-prob
    of each step (steps tensors of (B,)). Classifier-free guidance when guidance_scale > 1."""
    unet, scheduler, vae = pipe.unet, pipe.scheduler, pipe.vae
    batch, device = prompt_embeds.shape[0], prompt_embeds.device
    scheduler.set_timesteps(num_inference_steps, device=device)
    size = unet.config.sample_size
    latents = torch.randn((batch, unet.config.in_channels, size, size), generator=generator, device=device,
                          dtype=prompt_embeds.dtype) * scheduler.init_noise_sigma
    guided = guidance_scale > 1.0
    embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if guided else prompt_embeds
    all_latents, all_log_probs = [latents], []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        noise_pred = unet(model_input, t, encoder_hidden_states=embeds).sample
        if guided:  # eps = eps(uncond) + w (eps(text) - eps(uncond))
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (text - uncond)
        latents, log_prob = ddim_step_with_logprob(scheduler, noise_pred, t, latents, eta, generator=generator)
        all_latents.append(latents)
        all_log_probs.append(log_prob)
    images = vae.decode(latents / vae.config.scaling_factor).sample
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return images, all_latents, all_log_probs


class DefaultDDPOStableDiffusionPipeline:
    """The seed's pipeline wrapper: a diffusers StableDiffusionPipeline with a DDIM scheduler, frozen VAE and text
    encoder, and either LoRA adapters on the UNet's attention (use_lora, the reference's r=4 on to_q, to_k, to_v,
    to_out.0, Gaussian init) or the whole UNet trainable. Calling it samples with log-probs (sample_with_logprob);
    `scheduler_step` is ddim_step_with_logprob. A pipeline directory that also holds pytorch_lora_weights.safetensors
    (a base pipeline with an earlier run's adapters copied in) starts from those adapters under use_lora."""

    def __init__(self, pretrained_model_name: str, *, pretrained_model_revision: str = "main", use_lora: bool = True,
                 lora_r: int = 4, lora_alpha: int = 4):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        self.sd_pipeline = StableDiffusionPipeline.from_pretrained(pretrained_model_name,
                                                                   revision=pretrained_model_revision,
                                                                   safety_checker=None, requires_safety_checker=False)
        self.sd_pipeline.scheduler = DDIMScheduler.from_config(self.sd_pipeline.scheduler.config)
        self.sd_pipeline.vae.requires_grad_(False)
        self.sd_pipeline.text_encoder.requires_grad_(False)
        self.use_lora, self.lora_r, self.lora_alpha = use_lora, lora_r, lora_alpha
        self.pretrained_model, self.pretrained_revision = pretrained_model_name, pretrained_model_revision
        self.sd_pipeline.unet.requires_grad_(not use_lora)
        self.initial_lora = Path(pretrained_model_name) / "pytorch_lora_weights.safetensors"

    def __call__(self, *args, **kwargs):
        return sample_with_logprob(self.sd_pipeline, *args, **kwargs)

    def scheduler_step(self, *args, **kwargs):
        return ddim_step_with_logprob(self.sd_pipeline.scheduler, *args, **kwargs)

    unet = property(lambda self: self.sd_pipeline.unet)
    vae = property(lambda self: self.sd_pipeline.vae)
    tokenizer = property(lambda self: self.sd_pipeline.tokenizer)
    scheduler = property(lambda self: self.sd_pipeline.scheduler)
    text_encoder = property(lambda self: self.sd_pipeline.text_encoder)

    def get_trainable_layers(self) -> list[torch.nn.Parameter]:
        """Add the LoRA adapters (trainable, float32 whatever the UNet's dtype) or unfreeze the UNet; returns the
        trainable parameters."""
        if self.use_lora:
            from peft import LoraConfig

            self.unet.add_adapter(LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, init_lora_weights="gaussian",
                                             target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
            if self.initial_lora.exists():  # an earlier run's adapters: continue from them
                self.load_checkpoint(self.initial_lora.parent)
            for parameter in self.unet.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
        return [p for p in self.unet.parameters() if p.requires_grad]

    def save_pretrained(self, output_dir) -> None:
        """LoRA: the adapter alone (pytorch_lora_weights.safetensors, which `pipe.load_lora_weights(output_dir)`
        loads onto the base pipeline); else the whole pipeline (StableDiffusionPipeline.from_pretrained loads it)."""
        if self.use_lora:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft import get_peft_model_state_dict

            state_dict = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
            # the adapter's config (lora_alpha above all) goes into the file's metadata: without it, plain diffusers'
            # load_lora_weights assumes alpha = rank and scales a --lora_alpha != --lora_r adapter wrongly
            self.sd_pipeline.save_lora_weights(save_directory=str(output_dir), unet_lora_layers=state_dict,
                                               unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict())
        else:
            self.sd_pipeline.save_pretrained(str(output_dir))

    def load_checkpoint(self, input_dir) -> None:
        """The trained weights of save_pretrained's output (adapter or UNet) back into this pipeline's UNet."""
        if self.use_lora:
            from diffusers.utils import convert_unet_state_dict_to_peft
            from peft import set_peft_model_state_dict

            state_dict, _ = self.sd_pipeline.lora_state_dict(str(input_dir),
                                                              weight_name="pytorch_lora_weights.safetensors")
            state_dict = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
            result = set_peft_model_state_dict(self.unet, convert_unet_state_dict_to_peft(state_dict))
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"the LoRA weights in {input_dir} do not fit this UNet: unexpected keys "
                                 f"{result.unexpected_keys[:5]}")
        else:
            from diffusers import UNet2DConditionModel

            trained = UNet2DConditionModel.from_pretrained(str(input_dir), subfolder="unet")
            self.unet.load_state_dict(trained.state_dict())


# ----------------------------------------------------------------------------------------------------------------------
# Rewards: reward_function(images, prompts, metadata) -> (rewards, metadata), images (B, 3, H, W) in [0, 1]
# ----------------------------------------------------------------------------------------------------------------------
def brightness():
    """The mean pixel value of each image, in [0, 1]."""
    return lambda images, prompts, metadata: (images.float().mean(dim=(1, 2, 3)), {})


def jpeg_sizes_kb(images: torch.Tensor) -> np.ndarray:
    """The size of each image as a quality-95 JPEG, in kB (the reference's measure of (in)compressibility)."""
    from PIL import Image

    pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return np.array(sizes)


def jpeg_compressibility():
    """Minus the JPEG size in kB: smaller files (smoother, simpler images) score higher."""
    return lambda images, prompts, metadata: (torch.as_tensor(-jpeg_sizes_kb(images), dtype=torch.float32), {})


def jpeg_incompressibility():
    """The JPEG size in kB: larger files (more detail and texture) score higher."""
    return lambda images, prompts, metadata: (torch.as_tensor(jpeg_sizes_kb(images), dtype=torch.float32), {})


def aesthetic_score(hub_model_id: str = "trl-lib/ddpo-aesthetic-predictor", model_filename: str = "aesthetic-model.pth",
                    device: str | torch.device = "cpu"):
    """The LAION aesthetic predictor (christophschuhmann/improved-aesthetic-predictor): an MLP on the normalised CLIP
    ViT-L/14 image embedding, about 1 (ugly) to 10 (beautiful). Needs the CLIP and MLP weights from the Hub."""
    from huggingface_hub import hf_hub_download
    from transformers import CLIPModel, CLIPProcessor

    try:
        clip = CLIPModel.from_pretrained("openai/clip-vit-large-patch14").eval().to(device)
        processor = CLIPProcessor.from_pretrained("openai/clip-vit-large-patch14")
        path = Path(hub_model_id) / model_filename
        if not path.exists():
            path = hf_hub_download(hub_model_id, model_filename)
    except Exception as error:  # offline, or no such repository
        raise OSError(f"the aesthetic reward needs openai/clip-vit-large-patch14 and {hub_model_id}/{model_filename} "
                      f"from the Hugging Face Hub (or its cache), which could not be loaded: "
                      f"{' '.join(str(error).split())[:300]}") from None
    mlp = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                              torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    state = torch.load(path, map_location="cpu", weights_only=True)
    mlp.load_state_dict({key.removeprefix("layers."): value for key, value in state.items()})
    mlp = mlp.eval().to(device)

    @torch.no_grad()
    def reward_fn(images: torch.Tensor, prompts, metadata):
        pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
        inputs = processor(images=list(pixels.cpu()), return_tensors="pt")
        embed = clip.get_image_features(pixel_values=inputs["pixel_values"].to(device))
        embed = embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)
        return mlp(embed).squeeze(1).cpu(), {}

    return reward_fn


REWARDS = {"brightness": brightness, "jpeg_compressibility": jpeg_compressibility,
           "jpeg_incompressibility": jpeg_incompressibility, "aesthetic": aesthetic_score}


# Prompt functions: prompt_function() -> (prompt, metadata)
def animal_prompt():
    """A random animal of the reference's list (numpy's global RNG, as the reference)."""
    return str(np.random.choice(ANIMALS)), {}


def fixed_prompt(prompt: str):
    return lambda: (prompt, {})


class PerPromptStatTracker:
    """The seed's per-prompt normalisation: each prompt remembers its last buffer_size rewards; a reward's advantage
    is (reward - mean) / (std + 1e-6) over its prompt's buffer once that holds min_count rewards, and over the whole
    batch before."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count, self.stats = buffer_size, min_count, {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        prompts, rewards = np.array(prompts), np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            mine = rewards[prompts == prompt]
            buffer = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(mine)
            pool = buffer if len(buffer) >= self.min_count else rewards
            advantages[prompts == prompt] = (mine - np.mean(pool)) / (np.std(pool) + 1e-6)
        return advantages

    def state_dict(self) -> dict:
        """{prompt: its remembered rewards}, as plain str and float (a checkpoint loads it with weights_only=True)."""
        return {str(prompt): [float(reward) for reward in buffer] for prompt, buffer in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state.items()}


def ddpo_loss(advantages: torch.Tensor, clip_range: float, ratio: torch.Tensor) -> torch.Tensor:
    """The clipped PPO objective, negated: mean over the batch of max(-A r, -A clip(r, 1 - eps, 1 + eps)).
    (B,), float, (B,) -> scalar."""
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


# ----------------------------------------------------------------------------------------------------------------------
# The trainer: sample trajectories, score, normalise into advantages, clipped PPO over the stored timesteps
# ----------------------------------------------------------------------------------------------------------------------
class DDPOTrainer:
    """The seed's DDPOTrainer. reward_function(images, prompts, metadata) -> (rewards, metadata) with images
    (B, 3, H, W) in [0, 1] and one reward per image; prompt_function() -> (prompt, metadata); sd_pipeline a
    DefaultDDPOStableDiffusionPipeline; image_samples_hook(prompt_image_data, global_step, tracker) is called once per
    epoch with [images, prompts, prompt_metadata, rewards, reward_metadata] per sampling batch (tracker: the wandb
    module under --track, else None). `train()` runs the epochs; `step(epoch, global_step)` is one epoch."""

    def __init__(self, config: DDPOConfig, reward_function: Callable, prompt_function: Callable, sd_pipeline,
                 image_samples_hook: Callable | None = None):
        config.check()
        if not callable(reward_function) or not callable(prompt_function):
            raise ValueError("reward_function and prompt_function must be callables (see the class docstring)")
        self.config, self.reward_fn, self.prompt_fn = config, reward_function, prompt_function
        self.sd_pipeline, self.image_samples_callback = sd_pipeline, image_samples_hook
        self.num_train_timesteps = int(config.sample_num_steps * config.train_timestep_fraction)
        self.logdir = ddpo_logdir(config)
        if config.resume_from == "latest":  # (the command line has resolved it already, in check_ddpo_run)
            checkpoints = complete_ddpo_checkpoints(self.logdir)
            config.resume_from = str(checkpoints[-1]) if checkpoints else ""
        resume = resolve_checkpoint(config.resume_from) if config.resume_from else None
        refuse_previous_run(config)  # a fresh run never writes over a previous one
        self.preemption = None  # set while train() runs: SIGTERM / SIGINT then end the run after the epoch

        # 1. Accelerator (several processes but no GPU: one gloo group on CPU, as every script here), seeds, dtypes.
        multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        self.accelerator = accelerator = Accelerator(cpu=multi_process_cpu, mixed_precision=config.mixed_precision)
        world_size, images = accelerator.num_processes, config.sample_batch_size * config.sample_num_batches_per_epoch
        per_step = world_size * config.train_batch_size * config.train_gradient_accumulation_steps
        accelerator.print(f"run: {world_size} process(es) x {config.train_batch_size} per device x "
                          f"{config.train_gradient_accumulation_steps} accumulation = {per_step} samples (all their "
                          f"trained timesteps) per optimizer step; {world_size * images} images sampled per epoch")
        set_seed(config.seed, device_specific=True)  # seed + process index: each process its own prompts and noise
        if config.allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        # Only what is frozen goes to half precision: the VAE, the text encoder, and the UNet under LoRA (its adapters
        # stay float32). The seed casts a fully trained UNet too, whose half-precision gradients the fp16 GradScaler
        # then refuses ("Attempting to unscale FP16 gradients"); here it stays float32 and trains under autocast.
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
        for module in (sd_pipeline.vae, sd_pipeline.text_encoder, sd_pipeline.unet):
            cast = dtype != torch.float32 and (module is not sd_pipeline.unet or sd_pipeline.use_lora)
            module.to(accelerator.device, **({"dtype": dtype} if cast else {}))
        sd_pipeline.sd_pipeline.set_progress_bar_config(disable=True)

        # 2. Trainable weights (LoRA adapters in float32, or the UNet), AdamW, the negative prompt's embedding.
        self.trainable_layers = sd_pipeline.get_trainable_layers()
        optimizer = torch.optim.AdamW(self.trainable_layers, lr=config.train_learning_rate,
                                      betas=(config.train_adam_beta1, config.train_adam_beta2),
                                      weight_decay=config.train_adam_weight_decay, eps=config.train_adam_epsilon)
        self.neg_prompt_embed = self.encode_prompts([config.negative_prompts])  # (1, L, D)
        self.stat_tracker = (PerPromptStatTracker(config.per_prompt_stat_tracking_buffer_size,
                                                  config.per_prompt_stat_tracking_min_count)
                             if config.per_prompt_stat_tracking else None)
        # frozen weights in half precision are run as they are under LoRA; a full (float32) UNet trains under autocast
        self.autocast = nullcontext if sd_pipeline.use_lora else accelerator.autocast
        self.unet, self.optimizer = accelerator.prepare(sd_pipeline.unet, optimizer)  # DDP-wrapped for training
        self.executor = futures.ThreadPoolExecutor(config.max_workers) if config.async_reward_computation else None

        # 3. Resume (weights, optimizer, counters, prompt statistics, RNG); the logs.
        self.first_epoch, self.global_step = load_ddpo_checkpoint(self, resume) if resume is not None else (0, 0)
        self.log, self.tracker = open_ddpo_logs(config, accelerator, self.first_epoch, resumed=resume is not None)

    def train(self, epochs: int | None = None) -> int:
        """Run the epochs from where a resumed run stopped (or 0) to `epochs` (default num_epochs). Meanwhile SIGTERM
        and SIGINT end the run after the epoch in progress, with a checkpoint of it (step() saves and exits)."""
        epochs = self.config.num_epochs if epochs is None else epochs
        progress = tqdm(range(self.first_epoch, epochs), initial=self.first_epoch, total=epochs, desc="ddpo",
                        disable=not self.accelerator.is_local_main_process)
        handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
        self.preemption = DDPOPreemption()
        try:
            for epoch in progress:
                self.global_step = self.step(epoch, self.global_step)
        finally:  # from Python, the signals behave as before once training is over
            self.preemption = None
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        return self.global_step

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch: sample, score, advantages, train_num_inner_epochs passes of clipped PPO; returns the global step
        (optimizer steps so far)."""
        config, accelerator = self.config, self.accelerator
        start = time.time()

        # 1. Sample sample_num_batches_per_epoch batches of trajectories (the rewards may start in the pool).
        samples, prompt_image_data = self._generate_samples(config.sample_num_batches_per_epoch,
                                                            config.sample_batch_size)
        samples = {key: torch.cat([s[key] for s in samples]) for key in samples[0]}
        sample_seconds = time.time() - start

        # 2. Rewards, checked, gathered over all processes; the image hook sees every batch with its rewards.
        reward_start = time.time()
        rewards, reward_metadata = self.compute_rewards(prompt_image_data)
        for data, reward, metadata in zip(prompt_image_data, rewards, reward_metadata):
            data.extend([reward, metadata])
        if self.image_samples_callback is not None and accelerator.is_main_process:
            self.image_samples_callback(prompt_image_data, global_step, self.tracker)
        all_rewards = accelerator.gather(torch.cat(rewards)).cpu().numpy().astype(np.float64)
        all_prompts = gather_object([prompt for data in prompt_image_data for prompt in data[1]])
        reward_seconds = time.time() - reward_start

        # 3. Advantages over all processes: per prompt (the stat tracker), or (r - mean) / (std + 1e-8) over the
        #    epoch; this process keeps its own share.
        if self.stat_tracker is not None:
            advantages = self.stat_tracker.update(all_prompts, all_rewards)
        else:
            advantages = (all_rewards - all_rewards.mean()) / (all_rewards.std() + 1e-8)
        advantages = torch.as_tensor(advantages, dtype=torch.float32)
        samples["advantages"] = advantages.reshape(accelerator.num_processes, -1)[accelerator.process_index].to(
            accelerator.device)

        # 4. train_num_inner_epochs passes: samples shuffled, and each sample's timesteps shuffled independently (the
        #    first num_train_timesteps of them are trained on); then batches of train_batch_size.
        train_start = time.time()
        total, num_steps = samples["timesteps"].shape
        info = {"loss": [], "approx_kl": [], "clipfrac": []}
        self.unet.train()
        for inner_epoch in range(config.train_num_inner_epochs):
            order = torch.randperm(total, device=accelerator.device)
            shuffled = {key: value[order] for key, value in samples.items()}
            per_sample = torch.stack([torch.randperm(num_steps, device=accelerator.device) for _ in range(total)])
            rows = torch.arange(total, device=accelerator.device)[:, None]
            for key in ["timesteps", "latents", "next_latents", "log_probs"]:
                shuffled[key] = shuffled[key][rows, per_sample]
            batches = [{key: value[i : i + config.train_batch_size] for key, value in shuffled.items()}
                       for i in range(0, total, config.train_batch_size)]
            global_step = self._train_batched_samples(inner_epoch, epoch, global_step, batches, info)

        # 5. Log the epoch; checkpoint every save_freq epochs, and after a SIGTERM / SIGINT (then stop). The signal is
        #    taken at the end of the epoch: an epoch's samples are not part of a checkpoint.
        seconds = time.time() - start
        self.log({"epoch": epoch, "step": global_step, "images": len(all_rewards),
                  "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()),
                  **{key: float(torch.stack(values).mean()) for key, values in info.items() if values},
                  "images_per_second": len(all_rewards) / seconds, "time/sample": sample_seconds,
                  "time/reward": reward_seconds, "time/train": time.time() - train_start,
                  "peak_memory_mb": peak_memory_mb()}, all_rewards)
        signum = self.preemption.requested(accelerator) if self.preemption is not None else 0  # alike everywhere
        if epoch + 1 < config.num_epochs and (signum or (epoch + 1) % config.save_freq == 0):
            path = save_ddpo_checkpoint(self, epoch + 1, global_step)
            if signum:
                self.preemption.stop(accelerator, signum, path)
        return global_step

    def _generate_samples(self, iterations: int, batch_size: int) -> tuple[list[dict], list[list]]:
        """`iterations` batches of `batch_size` prompts -> per batch the trajectory tensors (prompt_embeds (B, L, D),
        timesteps (B, T), latents (B, T, C, h, w) before each step, next_latents after it, log_probs (B, T)) and
        [images, prompts, prompt_metadata]; with async_reward_computation, each batch's reward is already
        being computed in the pool (a future) while the next batch samples."""
        samples, prompt_image_data = [], []
        self.sd_pipeline.unet.eval()
        for _ in range(iterations):
            prompts, prompt_metadata = zip(*[self.prompt_fn() for _ in range(batch_size)])
            prompt_embeds = self.encode_prompts(list(prompts))
            with self.autocast():
                images, latents, log_probs = self.sd_pipeline(
                    prompt_embeds, self.neg_prompt_embed.expand(batch_size, -1, -1),
                    num_inference_steps=self.config.sample_num_steps,
                    guidance_scale=self.config.sample_guidance_scale, eta=self.config.sample_eta)
            latents = torch.stack(latents, dim=1)  # (B, T + 1, C, h, w): x_T ... x_0
            samples.append({"prompt_embeds": prompt_embeds,
                            "timesteps": self.sd_pipeline.scheduler.timesteps.repeat(batch_size, 1),  # (B, T)
                            "latents": latents[:, :-1],  # the latent each step starts from
                            "next_latents": latents[:, 1:],  # the latent it sampled
                            "log_probs": torch.stack(log_probs, dim=1)})  # (B, T)
            data = [images, list(prompts), list(prompt_metadata)]
            if self.executor is not None:
                data.append(self.executor.submit(self.reward_fn, images, list(prompts), list(prompt_metadata)))
            prompt_image_data.append(data)
        return samples, prompt_image_data

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (B, L, D) text-encoder states, tokenised as Stable Diffusion does (padded to the tokenizer's
        model_max_length)."""
        tokenizer = self.sd_pipeline.tokenizer
        ids = tokenizer(prompts, return_tensors="pt", padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length).input_ids.to(self.accelerator.device)
        return self.sd_pipeline.text_encoder(ids)[0]

    def compute_rewards(self, prompt_image_data: list[list]) -> tuple[list[torch.Tensor], list]:
        """Each batch's (rewards (B,), reward metadata), from the pool's futures or computed here; checked: one finite
        number per image."""
        rewards, reward_metadata = [], []
        for data in prompt_image_data:
            images, prompts, prompt_metadata = data[:3]
            result = data[3].result() if len(data) > 3 else self.reward_fn(images, prompts, prompt_metadata)
            if not (isinstance(result, (tuple, list)) and len(result) == 2):
                raise ValueError(f"reward_function must return (rewards, metadata), got {type(result).__name__}")
            reward = torch.as_tensor(np.asarray(result[0].detach().cpu() if isinstance(result[0], torch.Tensor)
                                                else result[0], dtype=np.float32)).flatten()
            if reward.numel() != len(images):
                raise ValueError(f"reward_function returned {reward.numel()} rewards (shape "
                                 f"{tuple(np.shape(result[0]))}) for {len(images)} images; expected one per image")
            if not torch.isfinite(reward).all():
                bad = (~torch.isfinite(reward)).nonzero().flatten().tolist()
                raise ValueError(f"reward_function returned non-finite rewards {reward[bad].tolist()}"
                                 f" for prompts {[p for p, r in zip(prompts, reward) if not torch.isfinite(r)][:5]}")
            rewards.append(reward.to(self.accelerator.device))
            reward_metadata.append(result[1])
            del data[3:]  # the future, if any
        return rewards, reward_metadata

    def _train_batched_samples(self, inner_epoch: int, epoch: int, global_step: int, batches: list[dict],
                               info: dict) -> int:
        """Every batch, every trained timestep: accumulate the gradient of the loss; one optimizer step per
        train_gradient_accumulation_steps batches (all their timesteps), so each step's gradient is the mean of its
        batches' per-timestep losses. A non-finite loss stops before the optimizer sees it."""
        config, accelerator = self.config, self.accelerator
        group_size = config.train_gradient_accumulation_steps
        for first in range(0, len(batches), group_size):
            group = batches[first : first + group_size]
            micro_steps = len(group) * self.num_train_timesteps
            for b, batch in enumerate(group):
                embeds = (torch.cat([self.neg_prompt_embed.expand(len(batch["prompt_embeds"]), -1, -1),
                                     batch["prompt_embeds"]]) if config.train_cfg else batch["prompt_embeds"])
                for j in range(self.num_train_timesteps):
                    last = b == len(group) - 1 and j == self.num_train_timesteps - 1
                    with nullcontext() if last else accelerator.no_sync(self.unet):  # gradients meet once a step
                        loss, approx_kl, clipfrac = self.calculate_loss(
                            batch["latents"][:, j], batch["timesteps"][:, j], batch["next_latents"][:, j],
                            batch["log_probs"][:, j], batch["advantages"], embeds)
                        if not torch.isfinite(loss):
                            self.optimizer.zero_grad(set_to_none=True)
                            raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, optimizer step "
                                                     f"{global_step + 1}; the optimizer was not stepped")
                        accelerator.backward(loss / micro_steps)
                    info["loss"].append(loss.detach())
                    info["approx_kl"].append(approx_kl.detach())
                    info["clipfrac"].append(clipfrac.detach())
            accelerator.clip_grad_norm_(self.trainable_layers, config.train_max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            global_step += 1
        return global_step

    def calculate_loss(self, latents, timesteps, next_latents, log_probs, advantages, embeds):
        """The clipped PPO loss of one timestep of a batch: the UNet's noise prediction (guided when train_cfg, as
        sampled) gives the step's Gaussian, whose log-density of the stored next latent, against the stored log-prob,
        is the log-ratio. latents, next_latents (B, C, h, w); timesteps, log_probs, advantages (B,); embeds (2B or B,
        L, D) (negative prompts first when train_cfg). Returns (loss, approx_kl, clipfrac), scalars."""
        config = self.config
        with self.autocast():
            if config.train_cfg:
                noise_pred = self.unet(torch.cat([latents] * 2), torch.cat([timesteps] * 2), embeds).sample
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + config.sample_guidance_scale * (text - uncond)
            else:
                noise_pred = self.unet(latents, timesteps, embeds).sample
            _, log_prob = self.sd_pipeline.scheduler_step(noise_pred, timesteps, latents, eta=config.sample_eta,
                                                          prev_sample=next_latents)
        advantages = torch.clamp(advantages, -config.train_adv_clip_max, config.train_adv_clip_max)
        ratio = torch.exp(log_prob - log_probs)
        loss = self.loss(advantages, config.train_clip_range, ratio)
        approx_kl = 0.5 * torch.mean((log_prob - log_probs) ** 2)
        clipfrac = torch.mean((torch.abs(ratio - 1.0) > config.train_clip_range).float())
        return loss, approx_kl, clipfrac

    def loss(self, advantages: torch.Tensor, clip_range: float, ratio: torch.Tensor) -> torch.Tensor:
        """The seed's method: ddpo_loss."""
        return ddpo_loss(advantages, clip_range, ratio)

    def _save_pretrained(self, save_directory) -> None:
        """The final weights: the LoRA adapter (load_lora_weights loads it) or the whole pipeline."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.sd_pipeline.save_pretrained(save_directory)
        self.accelerator.wait_for_everyone()


def main(config: DDPOConfig) -> None:
    # 0. Check what can be checked before anything is loaded (and before anything is written): the sizes; then the
    #    learning rate, the pipeline path, output_dir and logdir, --resume_from (latest: the newest complete
    #    checkpoint), that a fresh run does not write over a previous one, and that no FSDP / DeepSpeed was asked for.
    try:
        config.check()
    except ValueError as error:
        fail(str(error), once=True)
    check_ddpo_run(config)
    refuse_sharding()

    # 1. The pipeline (DDIM scheduler; LoRA adapters are added by the trainer), the reward and the prompts.
    try:
        pipeline = DefaultDDPOStableDiffusionPipeline(config.pretrained_model,
                                                      pretrained_model_revision=config.pretrained_revision,
                                                      use_lora=config.use_lora, lora_r=config.lora_r,
                                                      lora_alpha=config.lora_alpha)
    except (OSError, ValueError) as error:
        fail(f"could not load pipeline {config.pretrained_model}: {' '.join(str(error).split())[:500]}")
    try:
        reward_fn = REWARDS[config.reward]()
    except OSError as error:
        fail(str(error))
    prompt_fn = animal_prompt if config.prompts == "animals" else fixed_prompt(config.prompt)

    # 2. The trainer (resumed, or a fresh run: a default output_dir's previous run is moved beside it), then the
    #    epochs. A non-finite loss or a reward of the wrong shape stops the run with one line that names the last
    #    checkpoint; SIGTERM / SIGINT stop it after the epoch in progress, with a checkpoint (exit 128 + N).
    try:
        trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline,
                              image_samples_hook=save_image_grid(Path(config.output_dir)))
    except ValueError as error:
        fail(str(error))
    try:
        trainer.train()
    except (FloatingPointError, ValueError) as error:
        checkpoints = complete_ddpo_checkpoints(trainer.logdir)
        kept = f"the last checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
        fail(f"{error}; stopping ({kept})")

    # 3. Save: the LoRA adapter (pipe.load_lora_weights(output_dir) on the base pipeline) or the whole pipeline.
    trainer._save_pretrained(config.output_dir)
    if trainer.accelerator.is_main_process:
        if config.push_to_hub:
            from huggingface_hub import HfApi

            repo = HfApi().create_repo(Path(config.output_dir).name, exist_ok=True).repo_id
            HfApi().upload_folder(folder_path=config.output_dir, repo_id=repo, ignore_patterns=["checkpoints/*"])
        if trainer.tracker is not None:
            trainer.tracker.finish()
    trainer.accelerator.print(f"saved to {config.output_dir}")
    trainer.accelerator.end_training()


# ======================================================================================================================
# The plumbing: launch checks, runs and checkpoints, logging. The ddpo_* run and checkpoint helpers, refuse_sharding,
# DDPOPreemption and save_image_grid are ddpo.py's own; every other function is byte-identical in every script that
# has it (tests/test_layout.py).
# ======================================================================================================================
def fail(message: str, once: bool = False) -> NoReturn:
    """Stop with one line, `<script>: error: <message>`, exit status 1. once: every process meets the same error, so
    only the first one prints it; the others wait for it to exit (the launcher then stops them), because a launcher
    that sees any process fail kills the rest, and the first one could be killed before it printed."""
    if once and int(os.environ.get("RANK", "0")) > 0:
        time.sleep(60)
        sys.exit(1)
    sys.exit(f"{Path(__file__).name}: error: {message}")


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def refuse_sharding() -> None:
    """FSDP / DeepSpeed without a GPU (or DeepSpeed not installed) is one line, as in every script; with them, one
    line says that ddpo.py does not shard (its UNet fits one GPU): data parallelism instead."""
    requested = [name for variable, name in [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")]
                 if os.environ.get(variable, "false").lower() == "true"]
    if requested and not torch.cuda.is_available():
        fail(f"{requested[0]} was requested (accelerate config or --use_fsdp / --use_deepspeed) but this machine has "
             "no GPU, and FSDP and DeepSpeed shard over GPUs; for several CPU processes (gloo data parallelism) use "
             "`accelerate launch --multi_gpu --num_processes N`", once=True)
    if requested == ["DeepSpeed"] and importlib.util.find_spec("deepspeed") is None:
        fail("DeepSpeed was requested (accelerate config or --use_deepspeed) but it is not installed: "
             "`pip install deepspeed` (an optional dependency of these scripts)", once=True)
    if requested:
        fail(f"{Path(__file__).name} does not shard its UNet with {requested[0]}: the UNet (and its LoRA adapters) "
             "fits one GPU, so train with data parallelism: accelerate_configs/multi_gpu.yaml", once=True)


FINAL_WEIGHTS = ("pytorch_lora_weights.safetensors", "model_index.json")  # what the final save writes (LoRA, pipeline)


def ddpo_logdir(config: DDPOConfig) -> Path:
    """Where the checkpoints go: --logdir, default output_dir/checkpoints."""
    return Path(config.logdir) if config.logdir else Path(config.output_dir) / "checkpoints"


def complete_ddpo_checkpoints(logdir: Path) -> list[Path]:
    """The checkpoint_<epoch> directories of logdir, oldest first: whole, since save_ddpo_checkpoint renames a
    checkpoint into place only once every file is written (a checkpoint_<epoch>.incomplete is never one)."""
    found = [path for path in Path(logdir).glob("checkpoint_*")
             if path.name.split("_")[-1].isdigit() and (path / "training_state.pt").exists()]
    return sorted(found, key=lambda path: int(path.name.split("_")[-1]))


def check_ddpo_run(config: DDPOConfig) -> None:
    """check_run for ddpo.py, whose checkpoints are logdir/checkpoint_<epoch> and whose flag is the seed's
    --resume_from; the same rules and messages. Before anything loads: the learning rate, --pretrained_model,
    --output_dir and --logdir are checked (one line each). `--resume_from latest` becomes the newest complete
    checkpoint in logdir (none: a fresh start; a finished run: nothing to do, exit 0). A fresh run never writes over a
    previous one (refuse_previous_run; the default output_dir's is kept beside it by open_ddpo_logs)."""
    def say(line: str) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            print(line)
    if not config.train_learning_rate > 0:
        fail(f"--train_learning_rate must be positive, got {config.train_learning_rate}", once=True)
    pipeline = Path(config.pretrained_model).expanduser()
    if pipeline.exists() and not (pipeline / "model_index.json").exists():
        fail(f"--pretrained_model {config.pretrained_model} is not a diffusers pipeline directory (no model_index.json "
             "in it)", once=True)
    if not pipeline.exists() and (config.pretrained_model.startswith((".", "/", "~"))
                                  or config.pretrained_model.count("/") > 1):
        fail(f"--pretrained_model {config.pretrained_model} does not exist: expected a pipeline directory or a Hub id",
             once=True)
    output_dir, logdir = Path(config.output_dir), ddpo_logdir(config)
    for name, path in [("output_dir", output_dir), ("logdir", logdir)]:
        if path.exists() and not path.is_dir():
            fail(f"--{name} {path} is a file; expected a directory (or a path that does not exist yet)", once=True)
    latest = config.resume_from == "latest"
    if latest:
        if any((output_dir / name).exists() for name in FINAL_WEIGHTS):  # written by the final save only
            say(f"{output_dir} holds a finished run: nothing to resume")
            sys.exit(0)
        checkpoints = complete_ddpo_checkpoints(logdir)
        config.resume_from = str(checkpoints[-1]) if checkpoints else ""
        say(f"resuming from the latest checkpoint, {checkpoints[-1]}" if checkpoints else
            f"no complete checkpoint in {logdir}: starting fresh")
    try:
        if config.resume_from:
            resolve_checkpoint(config.resume_from)
        refuse_previous_run(config, latest)
    except ValueError as error:
        fail(str(error), once=True)


def refuse_previous_run(config: DDPOConfig, latest: bool = False) -> None:
    """A fresh run (no --resume_from, no --overwrite_output_dir) never writes over a previous one: a named output_dir
    that holds anything, or a --logdir outside output_dir that holds checkpoints, is a ValueError that names the
    options (latest: --resume_from latest found no checkpoint to continue). The default output_dir's previous run is
    let through: open_ddpo_logs moves it beside."""
    if config.resume_from or config.overwrite_output_dir:
        return
    output_dir, logdir = Path(config.output_dir), ddpo_logdir(config)
    held = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
    named = config.output_dir != DDPOConfig.__dataclass_fields__["output_dir"].default
    if held and named:
        raise ValueError(f"--output_dir {output_dir} holds a previous run ({', '.join(held[:4])}"
                         f"{', ...' * (len(held) > 4)}); " + (
                             "it has no complete checkpoint to continue from: pass " if latest else
                             "pass --resume_from latest to continue it, ") +
                         "--overwrite_output_dir to replace it, or another --output_dir")
    inside = output_dir.resolve() in logdir.resolve().parents  # then it moves with output_dir
    if not inside and list(logdir.glob("checkpoint_*")):
        raise ValueError(f"--logdir {logdir} holds checkpoints of a previous run; pass --resume_from latest to "
                         "continue it, --overwrite_output_dir to replace them, or another --logdir")


def resolve_checkpoint(path: str) -> Path:
    """A complete checkpoint_<epoch> directory, or the newest complete one inside the given directory."""
    path = Path(os.path.expanduser(path))
    if path in complete_ddpo_checkpoints(path.parent):
        return path
    found = complete_ddpo_checkpoints(path) if path.is_dir() else []
    if not found:
        raise ValueError(f"resume_from {path} is neither a complete checkpoint_<epoch> directory of this script nor a "
                         "directory holding one")
    return found[-1]


def save_ddpo_checkpoint(trainer: DDPOTrainer, epoch: int, global_step: int) -> Path:
    """logdir/checkpoint_<epoch>: the trained weights (adapter or UNet), optimizer, counters, prompt statistics and
    every process's RNG, all loadable with weights_only=True. Written under <path>.incomplete and renamed once whole
    (a same-named checkpoint of an earlier attempt is replaced); then only the newest num_checkpoint_limit are kept."""
    accelerator, path = trainer.accelerator, trainer.logdir / f"checkpoint_{epoch}"
    partial = path.with_name(path.name + ".incomplete")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
        partial.mkdir(parents=True)
        if trainer.sd_pipeline.use_lora:
            trainer.sd_pipeline.save_pretrained(partial)
        else:
            accelerator.unwrap_model(trainer.unet).save_pretrained(partial / "unet")
        torch.save({"epoch": epoch, "global_step": global_step, "optimizer": trainer.optimizer.state_dict(),
                    "stat_tracker": trainer.stat_tracker.state_dict() if trainer.stat_tracker else None},
                   partial / "training_state.pt")
    accelerator.wait_for_everyone()
    name, keys, position, has_gauss, gauss = np.random.get_state()  # numpy's array as a tensor: weights_only loads it
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state(),
                "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               partial / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if path.exists():
            shutil.rmtree(path)
        partial.rename(path)
        for old in complete_ddpo_checkpoints(trainer.logdir)[: -trainer.config.num_checkpoint_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path


def load_ddpo_checkpoint(trainer: DDPOTrainer, path: Path) -> tuple[int, int]:
    """A checkpoint of save_ddpo_checkpoint back into the trainer (torch.load with weights_only=True: a checkpoint
    cannot run code); returns (epochs done, optimizer steps done)."""
    def load(file: Path):
        try:
            return torch.load(file, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:  # e.g. an older ddpo.py's pickles
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            hint = ("; a checkpoint of an older ddpo.py holds pickled numpy objects, which it refuses"
                    if isinstance(error, pickle.UnpicklingError) else "")
            raise ValueError(f"could not load {file} with weights_only=True ({type(error).__name__}: {reason}){hint}") \
                from None
    trainer.sd_pipeline.load_checkpoint(path)
    for parameter in trainer.trainable_layers:  # adapters stay float32
        parameter.data = parameter.data.float()
    state = load(path / "training_state.pt")
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.stat_tracker is not None and state["stat_tracker"] is not None:
        trainer.stat_tracker.load_state_dict(state["stat_tracker"])
    rng = load(path / f"rng_state_{trainer.accelerator.process_index}.pt")
    random.setstate(rng["python"])
    name, keys, position, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    trainer.accelerator.print(f"resumed from {path} at epoch {state['epoch']}")
    return state["epoch"], state["global_step"]


def open_ddpo_logs(config: DDPOConfig, accelerator, first_epoch: int, resumed: bool):
    """output_dir with config.json, metrics.jsonl (resumed: its rows before first_epoch kept) and wandb under --track.
    A fresh run's previous run in output_dir (refuse_previous_run let it through) is moved to <output_dir>-<its
    time>, or deleted with a --logdir's checkpoints under --overwrite_output_dir, as open_logs does. Returns
    (log(row, rewards), tracker): log writes a console line, a strict-JSON metrics.jsonl row and a wandb point with
    the rewards' histogram, from the main process; tracker is the wandb module under --track, else None."""
    output_dir, tracker = Path(config.output_dir), None
    if accelerator.is_main_process:
        if not resumed and config.overwrite_output_dir:
            for old in ddpo_logdir(config).glob("checkpoint_*"):
                if old.is_dir():
                    shutil.rmtree(old)
        if not resumed and output_dir.is_dir() and any(output_dir.iterdir()):
            if config.overwrite_output_dir:
                shutil.rmtree(output_dir)
                print(f"--overwrite_output_dir: removed the previous run in {output_dir}")
            else:
                stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(output_dir.stat().st_mtime))
                kept = next(path for n in range(1000) if not (path := output_dir.with_name(
                    f"{output_dir.name}-{stamp}" + (f"-{n}" if n else ""))).exists())
                output_dir.rename(kept)
                print(f"{output_dir} held a previous run: kept as {kept} (--overwrite_output_dir replaces it)")
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
        metrics = output_dir / "metrics.jsonl"
        if not resumed:
            metrics.unlink(missing_ok=True)
        elif metrics.exists():  # keep what was logged before the checkpoint, and append
            logged = [line for line in metrics.read_text().splitlines() if json.loads(line)["epoch"] < first_epoch]
            metrics.write_text("".join(line + "\n" for line in logged))
        if config.track:
            import wandb

            wandb.init(project=config.wandb_project_name, entity=config.wandb_entity, config=asdict(config),
                       name=config.run_name or f"{config.exp_name}__{config.seed}__{int(time.time())}")
            tracker = wandb

    def log(row: dict, rewards: np.ndarray) -> None:
        if accelerator.is_main_process:
            tqdm.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            with open(output_dir / "metrics.jsonl", "a") as f:  # NaN and infinity are not JSON: null
                f.write(json.dumps({key: None if isinstance(value, float) and not math.isfinite(value) else value
                                    for key, value in row.items()}) + "\n")
            if tracker is not None:
                tracker.log({**row, "reward": tracker.Histogram(rewards)}, step=row["step"])
    accelerator.wait_for_everyone()  # no process writes into output_dir before it is ready
    return log, tracker


class Preemption:
    """SIGTERM (what Slurm and Kubernetes send before a kill) and SIGINT set a flag instead of killing: the loop ends
    the step in progress, asks requested() (all-reduced: every process stops at the same step), saves and calls
    stop(). Signals during the save are only noted; a checkpoint appears under its name only once whole."""

    def __init__(self):
        self.signum = 0
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.note)

    def note(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def requested(self, accelerator) -> int:
        if accelerator.num_processes == 1:
            return self.signum
        return int(accelerator.reduce(torch.tensor(self.signum, device=accelerator.device), "max"))

    def stop(self, accelerator, signum: int, checkpoint: Path) -> NoReturn:
        flag = "--resume_from_checkpoint"
        argv = [arg for i, arg in enumerate(sys.argv) if not arg.startswith(flag) and sys.argv[i - 1] != flag]
        launcher = "the same `accelerate launch ...` and" if accelerator.num_processes > 1 else "python"
        accelerator.print(f"stopped by {signal.Signals(signum).name}: saved {checkpoint}; resume with: {launcher} "
                          f"{' '.join(argv)} --resume_from_checkpoint latest")
        sys.exit(128 + signum)


class DDPOPreemption(Preemption):
    """Preemption whose resume line names ddpo.py's flag, the seed's --resume_from (the shared stop() names
    --resume_from_checkpoint); the signal is taken at the end of the epoch in progress."""

    def stop(self, accelerator, signum: int, checkpoint: Path) -> NoReturn:
        flags = ("--resume_from", "--resume-from")
        argv = [arg for i, arg in enumerate(sys.argv) if not arg.startswith(flags) and sys.argv[i - 1] not in flags]
        launcher = "the same `accelerate launch ...` and" if accelerator.num_processes > 1 else "python"
        accelerator.print(f"stopped by {signal.Signals(signum).name}: saved {checkpoint}; resume with: {launcher} "
                          f"{' '.join(argv)} --resume_from latest")
        sys.exit(128 + signum)


def save_image_grid(output_dir: Path, columns: int = 8):
    """The default image hook: each epoch, the first sampling batch as a PNG grid (output_dir/images/
    step_<global_step>.png), every image captioned with its prompt and reward; wandb images under --track."""

    def hook(prompt_image_data: list[list], global_step: int, tracker) -> None:
        from PIL import Image, ImageDraw

        images, prompts, _, rewards, _ = prompt_image_data[0]
        pixels = (images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        scale = max(1, 96 // pixels.shape[1])  # tiny images are enlarged so that the captions fit
        tiles = [Image.fromarray(p).resize((p.shape[1] * scale, p.shape[0] * scale), Image.NEAREST) for p in pixels]
        width, height = tiles[0].size
        rows = math.ceil(len(tiles) / columns)
        grid = Image.new("RGB", (min(columns, len(tiles)) * width, rows * (height + 14)), "white")
        draw = ImageDraw.Draw(grid)
        for i, (tile, prompt, reward) in enumerate(zip(tiles, prompts, rewards.tolist())):
            x, y = (i % columns) * width, (i // columns) * (height + 14)
            grid.paste(tile, (x, y))
            draw.text((x + 2, y + height + 1), f"{prompt[:12]} {reward:.3g}", fill="black")
        folder = output_dir / "images"
        folder.mkdir(parents=True, exist_ok=True)
        grid.save(folder / f"step_{global_step}.png")
        if tracker is not None:
            tracker.log({"images": [tracker.Image(tile, caption=f"{p} | {r:.2f}")
                                    for tile, p, r in zip(tiles, prompts, rewards.tolist())]}, step=global_step)

    return hook


if __name__ == "__main__":
    DDPOConfig.check_on_init = False  # main checks the config, to print one line instead of a traceback
    main(tyro.cli(DDPOConfig, use_underscores=True))

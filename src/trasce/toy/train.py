"""Train the embedded text-to-image model from scratch on the toy world, end to end, in one file.

    python -m trasce.toy.train --out toy-train            # GPU if there is one, else CPU
    python -m trasce.toy.train --out toy-train --resume   # go on from toy-train/checkpoint.pt

Ctrl-C (SIGINT) or SIGTERM stops after the step under way and saves the checkpoint and the pipeline,
as ``--minutes`` does. A resumed run gives the same weights as one never stopped (the checkpoint
holds every random state), and refuses arguments other than the checkpoint's.

Every step draws a fresh batch of scenes, renders them on the training device and captions them
with *training-split* captions only (see ``captions.split_of``). The model is a pixel-space
``UNet2DConditionModel`` with a small CLIP text encoder trained jointly, saved as an ordinary
diffusers ``StableDiffusionPipeline`` folder without a VAE. The recipe choices, each for sample
efficiency on 32x32 images:

- cosine ("squaredcos_cap_v2") betas: the linear schedule wastes most steps at noise levels where
  a 32 px image is already destroyed, and its terminal SNR leaks the background colour;
- Min-SNR-5 loss weighting (Hang et al. 2023), which balances the noise levels' gradients;
- an EMA of the weights, which is what gets saved;
- DDIM sampling with x0 clipping at inference (pixel space: images live in [-1, 1]).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trasce.toy import captions, world

# ---- hyper-parameters -------------------------------------------------------------------------
BATCH_SIZE = 512
MAX_STEPS = 12_000
LEARNING_RATE = 6e-4
WARMUP_STEPS = 300
WEIGHT_DECAY = 0.01
EMA_DECAY = 0.999
UNCOND_PROB = 0.12  # share of empty captions, for classifier-free guidance
ALIAS_PROB = 0.5  # share of captions that use an alias instead of the attribute's name
MIN_SNR_GAMMA = 5.0
# A per-image, per-channel constant added to the noise ("offset noise") can teach the mean colour
# (the background); the shipped model was trained without it (0.0), which --offset-noise changes.
OFFSET_NOISE = 0.0
CHECKPOINT_EVERY = 1000
SEED = 0
# The arguments that define a run: a checkpoint resumes only under the same ones.
RUN_ARGUMENTS = ("steps", "batch_size", "seed", "init", "lr", "offset_noise")
# What the shipped model's measurement chose (README, "The embedded model"); measure a retrained
# model's own with benchmarks/toy_fidelity.py --model FOLDER.
CALL_DEFAULTS = {"guidance_scale": 1.5, "steps": 25}

UNET_CONFIG = dict(
    sample_size=world.IMAGE_SIZE,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(64, 96, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=128,
    attention_head_dim=4,
    norm_num_groups=16,
)
TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=captions.MAX_WORDS,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
    clip_sample_range=1.0,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)
# -----------------------------------------------------------------------------------------------


def build_components(seed: int = SEED):
    """Fresh tokenizer, text encoder, UNet and inference scheduler (random weights)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = captions.build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT_CONFIG))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    return tokenizer, text_encoder, unet, scheduler


def save_pipeline(out: Path, tokenizer, text_encoder, unet, scheduler, extra: dict) -> None:
    """Write a diffusers ``StableDiffusionPipeline`` folder with no VAE, plus ``trasce_toy.json``."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # StableDiffusionPipeline.__init__ turns clip_sample off (a latent-space habit); a pixel model
    # wants it on, so the saved scheduler config keeps the training-time setting.
    type(scheduler)(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    (out / "trasce_toy.json").write_text(json.dumps(extra, indent=2) + "\n")


def training_batch(batch_size: int, rng: random.Random, generator: torch.Generator, device: str):
    """Images ``(B, 3, 32, 32)`` on ``device`` and their training-split captions (list of B)."""
    scenes = world.sample_scenes(batch_size, generator)
    images = world.render(scenes, device=device)
    labels = {name: values.tolist() for name, values in scenes.labels().items()}
    texts = []
    for i in range(batch_size):
        if rng.random() < UNCOND_PROB:
            texts.append("")
            continue
        label = {name: values[i] for name, values in labels.items()}
        texts.append(captions.caption_for(label, rng, "train", aliases=rng.random() < ALIAS_PROB))
    return images, texts


@contextlib.contextmanager
def stop_requests() -> Iterator[list[str]]:
    """While inside, SIGINT (Ctrl-C) and SIGTERM append their name to the list yielded instead of stopping
    the process, so that the loop ends between steps and the checkpoint saved after it holds whole steps.
    The handlers before are restored on leaving; outside the main thread (which alone may set them) the
    list stays empty."""
    stop: list[str] = []

    def ask_to_stop(signum, frame) -> None:
        stop.append(signal.Signals(signum).name)
        print(f"\n{stop[-1]}: stopping after this step, then saving", file=sys.stderr)

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    before = {signum: signal.signal(signum, ask_to_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the checkpoint and the pipeline")
    parser.add_argument("--steps", type=int, default=MAX_STEPS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--minutes", type=float, default=None, help="stop (and save) after this long")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--init", type=Path, default=None, help="start from this pipeline folder's weights")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--offset-noise", type=float, default=OFFSET_NOISE)
    parser.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY, help="steps between checkpoints")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    run = {name: str(value) if isinstance(value, Path) else value
           for name, value in vars(args).items() if name in RUN_ARGUMENTS}

    from diffusers import DDPMScheduler

    device = args.device
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, text_encoder, unet, scheduler = build_components(args.seed)
    if args.init is not None:
        from safetensors.torch import load_file

        unet.load_state_dict(load_file(args.init / "unet" / "diffusion_pytorch_model.safetensors"))
        text_encoder.load_state_dict(load_file(args.init / "text_encoder" / "model.safetensors"), strict=False)
    text_encoder.to(device).train()
    unet.to(device).train()
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        unet.to(memory_format=torch.channels_last)
    modules = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    noise_schedule = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    alphas_cumprod = noise_schedule.alphas_cumprod.to(device)

    step, seconds_before = 0, 0.0
    losses: list[torch.Tensor] = []  # kept on the device: reading one per step would stall the GPU
    rng, generator = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    checkpoint = out / "checkpoint.pt"
    if checkpoint.exists() and not args.resume:
        parser.error(f"{checkpoint} holds a run already: --resume continues it; another --out starts afresh")
    if args.resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        for name, value in state.get("run", {}).items():
            if run.get(name) != value:
                parser.error(f"{checkpoint} was made with --{name.replace('_', '-')} {value}, not {run.get(name)}: "
                             "resume with the checkpoint's arguments, or train afresh in another --out")
        modules.load_state_dict(state["modules"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, seconds_before = state["step"], state["seconds"]
        rng.setstate(state["rng"])
        generator.set_state(state["generator"])
        if "torch_rng" in state:  # the noise and timesteps of every step after this one
            torch.set_rng_state(state["torch_rng"])
            if state.get("cuda_rng") is not None and device.startswith("cuda"):
                torch.cuda.set_rng_state_all(state["cuda_rng"])
        losses = [loss.to(device) for loss in state.get("losses", [])]
        print(f"resuming {checkpoint} at step {step} of {args.steps}", file=sys.stderr)
    elif args.resume:
        print(f"no {checkpoint} to resume: starting at step 0", file=sys.stderr)

    def save_checkpoint() -> None:
        state = dict(modules=modules.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                     step=step, seconds=seconds_before + time.time() - start, rng=rng.getstate(),
                     generator=generator.get_state(), torch_rng=torch.get_rng_state(),
                     cuda_rng=torch.cuda.get_rng_state_all() if device.startswith("cuda") else None,
                     losses=[loss.cpu() for loss in losses[-200:]], run=run)
        torch.save(state, checkpoint.with_suffix(".tmp"))
        checkpoint.with_suffix(".tmp").replace(checkpoint)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    start = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="train toy", dynamic_ncols=True)
    with stop_requests() as stop:
        while step < args.steps and not stop:
            if args.minutes is not None and seconds_before + time.time() - start > args.minutes * 60:
                stop.append("minutes")
                break
            # The schedule runs on whichever budget, steps or minutes, is nearer its end.
            progress = step / args.steps
            if args.minutes is not None:
                progress = max(progress, (seconds_before + time.time() - start) / (args.minutes * 60))
            lr = args.lr * min(1.0, (step + 1) / WARMUP_STEPS)
            lr *= 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * 0.9 + 0.1
            for group in optimizer.param_groups:
                group["lr"] = lr

            images, texts = training_batch(args.batch_size, rng, generator, device)
            ids = tokenizer(texts, padding="max_length", max_length=captions.MAX_WORDS, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            noise = torch.randn_like(images)
            noise += args.offset_noise * torch.randn(len(images), images.shape[1], 1, 1, device=device)
            t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(images),), device=device)
            noisy = noise_schedule.add_noise(images, noise, t)
            with autocast:
                states = text_encoder(ids)[0]
                prediction = unet(noisy, t, encoder_hidden_states=states).sample
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            weight = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr
            loss = (weight * F.mse_loss(prediction.float(), noise, reduction="none").mean(dim=(1, 2, 3))).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                decay = min(EMA_DECAY, (1 + step) / (10 + step))
                for e, p in zip(ema.parameters(), modules.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
            step += 1
            losses.append(loss.detach())
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{torch.stack(losses[-50:]).mean().item():.4f}", lr=f"{lr:.1e}")
            if step % args.checkpoint_every == 0:
                save_checkpoint()
    bar.close()
    save_checkpoint()

    seconds = seconds_before + time.time() - start
    pipeline_dir = out / "pipeline"
    final = copy.deepcopy(ema).float().cpu()
    save_pipeline(pipeline_dir, tokenizer, final["text_encoder"], final["unet"], scheduler, extra={
        "trained_steps": step,
        "batch_size": args.batch_size,
        "images_seen": step * args.batch_size,
        "seconds": round(seconds, 1),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "final_loss": torch.stack(losses[-200:]).mean().item() if losses else None,
        "seed": args.seed,
        "initialised_from": str(args.init) if args.init else None,
        "offset_noise": args.offset_noise,
        "learning_rate": args.lr,
        "arguments": {**run, "minutes": args.minutes},
        "stopped_by": stop[0] if stop else "steps",
        "defaults": CALL_DEFAULTS,
        "defaults_chosen_by": "the shipped model's measurement; measure this model's own with "
                              "benchmarks/toy_fidelity.py --model FOLDER",
    })
    print(f"saved {pipeline_dir} after {step} steps ({step * args.batch_size} images, {seconds:.0f} s)")
    return pipeline_dir


if __name__ == "__main__":
    main()

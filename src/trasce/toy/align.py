"""Second training stage of the embedded model: teach the text encoder that aliases mean names.

    python -m trasce.toy.align --model src/trasce/toy/weights/model --out toy-aligned --steps 300

After the first stage (``train.py``) the model follows attribute *names* well but some aliases
less well ("amber" should draw orange). This stage is distillation: the frozen model, prompted
with a caption that uses names (the teacher), predicts the noise; the same UNet, prompted with
the same caption worded with aliases, must predict the same, and only the text encoder learns.
A second term keeps the encoder's output for name captions where it was. The target is a
prediction rather than noise, so it has no sampling variance, which is why a few hundred CPU
steps suffice. Only training-split captions are used, as teacher or student.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trasce.toy import captions, world

# ---- hyper-parameters -------------------------------------------------------------------------
STEPS = 300
BATCH_SIZE = 32
LEARNING_RATE = 1e-4
KEEP_WEIGHT = 1.0  # weight of the term that keeps name captions' embeddings in place
SEED = 1
# -----------------------------------------------------------------------------------------------


def caption_pair(labels: dict[str, int], rng: random.Random) -> tuple[str, str] | None:
    """A training-split caption worded with aliases, and the same template worded with names."""
    template = rng.choice(captions.TEMPLATES)
    alias_fields, name_fields = {}, {}
    for attribute, values in world.ATTRIBUTES.items():
        options = captions.VOCABULARY[attribute][values[labels[attribute]]]
        name_fields[attribute] = options[0]
        alias_fields[attribute] = rng.choice(options[1:])
    student, teacher = template.format(**alias_fields), template.format(**name_fields)
    if student == teacher or captions.split_of(student) != "train" or captions.split_of(teacher) != "train":
        return None
    return student, teacher


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="pipeline folder from train.py (or 'toy', the shipped one)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the aligned pipeline")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    from trasce.pipeline import load_diffusers_pipeline, resolve_model

    model = Path(resolve_model(args.model))
    pipe = load_diffusers_pipeline(model)
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    teacher_encoder = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    unet.eval().requires_grad_(False)
    text_encoder.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(text_encoder.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    alphas = pipe.scheduler.alphas_cumprod
    rng, generator = random.Random(args.seed), torch.Generator().manual_seed(args.seed)

    def ids(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=captions.MAX_WORDS, truncation=True,
                         return_tensors="pt").input_ids

    start = time.time()
    history = []
    for _ in tqdm(range(args.steps), desc="align aliases", dynamic_ncols=True):
        scenes = world.sample_scenes(args.batch_size * 2, generator)
        labels = {name: values.tolist() for name, values in scenes.labels().items()}
        pairs, keep = [], []
        for i in range(len(scenes)):
            pair = caption_pair({name: values[i] for name, values in labels.items()}, rng)
            if pair is not None and len(pairs) < args.batch_size:
                pairs.append((i, *pair))
        keep = [i for i, _, _ in pairs]
        images = world.render(scenes)[keep]
        noise = torch.randn(images.shape, generator=generator)
        t = torch.randint(0, len(alphas), (len(images),), generator=generator)
        a = alphas[t].reshape(-1, 1, 1, 1)
        noisy = a.sqrt() * images + (1 - a).sqrt() * noise
        students, teachers = [p[1] for p in pairs], [p[2] for p in pairs]
        with torch.no_grad():
            teacher_states = teacher_encoder(ids(teachers))[0]
            target = unet(noisy, t, encoder_hidden_states=teacher_states).sample
        prediction = unet(noisy, t, encoder_hidden_states=text_encoder(ids(students))[0]).sample
        keep_loss = F.mse_loss(text_encoder(ids(teachers))[0], teacher_states)
        loss = F.mse_loss(prediction, target) + KEEP_WEIGHT * keep_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(loss.item())

    text_encoder.eval()
    pipe.save_pretrained(args.out, safe_serialization=True)
    type(pipe.scheduler).from_pretrained(model, subfolder="scheduler").save_pretrained(args.out / "scheduler")
    info = json.loads((model / "trasce_toy.json").read_text())
    info["alias_alignment"] = {"steps": args.steps, "batch_size": args.batch_size, "device": "cpu",
                               "seconds": round(time.time() - start),
                               "final_loss": sum(history[-20:]) / max(1, len(history[-20:]))}
    (args.out / "trasce_toy.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved {args.out}: {args.steps} steps in {time.time() - start:.0f} s")
    return args.out


if __name__ == "__main__":
    main()

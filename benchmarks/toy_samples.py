"""The README's sample grid: 16 test captions at the embedded model's defaults, with the judge's shape.

    python benchmarks/toy_samples.py --out docs/toy_samples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from trasce import TraSCEPipeline
from trasce.pipeline import model_call_defaults
from trasce.report import _font, save_png
from trasce.toy import captions
from trasce.toy.judge import Judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/toy_samples.png"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    defaults = model_call_defaults("toy")
    pipe = TraSCEPipeline.from_pretrained("toy", mode="none")
    prompts = captions.caption_set(16, "test", seed=args.seed, require=("shape",))
    out = pipe(prompts, num_inference_steps=defaults["steps"], guidance_scale=defaults["guidance_scale"],
               generator=[torch.Generator().manual_seed(i) for i in range(16)])
    verdicts = Judge.load().classify_pil(out.images)

    cell, text_width = 112, 140
    canvas = Image.new("RGB", (4 * (cell + text_width) + 10, 4 * (cell + 40) + 10), "white")
    draw, font = ImageDraw.Draw(canvas), _font(11)
    for i, (image, prompt, verdict) in enumerate(zip(out.images, prompts, verdicts, strict=True)):
        x, y = 10 + (i % 4) * (cell + text_width), 10 + (i // 4) * (cell + 40)
        canvas.paste(image.resize((cell, cell), Image.NEAREST), (x, y))
        lines, line = [], ""
        for word in prompt.split():
            if draw.textlength(f"{line} {word}".strip(), font=font) > text_width - 10:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        draw.multiline_text((x + cell + 6, y), "\n".join(lines[:5]), fill="black", font=font)
        draw.text((x + cell + 6, y + cell - 14), f"judge: {verdict['shape']}", fill=(0, 110, 0), font=font)
    save_png(canvas, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

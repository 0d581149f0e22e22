"""Pictures of one diffusion generation: which denoising step committed each token, and the canvas filling in.

    python examples/denoise_viz.py --tiny --png denoise.png --gif denoise.gif          # offline, tiny random model
    python examples/denoise_viz.py --model inclusionAI/LLaDA-MoE-7B-A1B-Instruct --prompt "What is 7 * 8?" \\
        --max-new-tokens 64 --block-length 32 --threshold 0.9 --use-cache dual --png denoise.png --gif denoise.gif

The PNG is a heat map of the generated canvas built from `unmask_step`: each semi-autoregressive block is its own
band of rows, each cell holds the decoded token and is coloured by the forward pass that committed it (the step
number is in its corner), and a colour bar maps colours to steps. The GIF replays `history`, one frame per
denoising step: masked cells are hatched, the tokens committed at that step are highlighted. Pillow only.

The rendering functions take a `DiffusionGenerateOutput` and the tokenizer; `canvas_cells` (one canvas -> labelled
cells) is what the Gradio demo (`examples/app.py`) reuses to draw its live canvas.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from modeling_llada_moe.generation_utils import (
    REMASKING_STRATEGIES,
    DiffusionGenerateOutput,
    split_blocks,
)


MASKED, COMMITTED, NEW, STOPPED = "masked", "committed", "new", "stopped"

CELL_W, CELL_H, MARGIN, LABEL_W, BLOCK_GAP = 76, 40, 16, 64, 10
BACKGROUND, INK, GRID = (255, 255, 255), (33, 33, 33), (120, 120, 120)
MASK_FILL, MASK_DOTS = (214, 214, 214), (150, 150, 150)
NEW_FILL, NEW_EDGE, OLD_FILL = (255, 183, 3), (200, 60, 0), (232, 238, 247)
STOPPED_FILL = (189, 189, 189)
# Colour-bar anchors for steps, early to late: deep blue, teal, green, yellow.
STEP_ANCHORS = ((40, 44, 120), (33, 120, 160), (50, 170, 110), (245, 220, 60))


@dataclass
class Cell:
    """One generated position: its token text (empty while masked) and `state` (masked / committed / new)."""

    text: str
    state: str


@functools.lru_cache(maxsize=1 << 16)  # the live demo relabels the whole canvas at every step
def token_text(tokenizer, token_id: int) -> str:
    """How one token reads in a cell: its decoded text, newlines and tabs made visible, `␣` for pure whitespace."""
    text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
    text = text.replace("\n", "↵").replace("\t", "→").strip()
    return text or "␣"


def canvas_cells(
    canvas: torch.Tensor,
    previous: torch.Tensor | None,
    prompt_length: int,
    tokenizer,
    mask_token_id: int,
) -> list[Cell]:
    """The generated part of one canvas row ([P + N] ids, masks in place) as N cells.

    A cell is `MASKED` where the canvas holds `mask_token_id`, `NEW` where it holds a token but `previous` (the canvas
    one step earlier; `None` = before the first step, all masked) was still masked, and `COMMITTED` otherwise.
    """
    if canvas.dim() != 1:
        raise ValueError(f"canvas_cells: canvas must be one [P + N] row, got shape {tuple(canvas.shape)}")
    if not 0 <= prompt_length < canvas.numel():
        raise ValueError(f"canvas_cells: prompt_length={prompt_length} must be in [0, {canvas.numel()})")
    generated = canvas[prompt_length:].tolist()
    before = previous[prompt_length:].tolist() if previous is not None else [mask_token_id] * len(generated)
    cells = []
    for token, old in zip(generated, before):
        if token == mask_token_id:
            cells.append(Cell("", MASKED))
        else:
            cells.append(Cell(token_text(tokenizer, token), NEW if old == mask_token_id else COMMITTED))
    return cells


def step_colour(step: int, total_steps: int) -> tuple[int, int, int]:
    """The heat-map colour of a token committed at forward pass `step` of `total_steps` (0 = first)."""
    t = step / max(total_steps - 1, 1)
    segment = min(int(t * (len(STEP_ANCHORS) - 1)), len(STEP_ANCHORS) - 2)
    local = t * (len(STEP_ANCHORS) - 1) - segment
    low, high = STEP_ANCHORS[segment], STEP_ANCHORS[segment + 1]
    return tuple(round(a + (b - a) * local) for a, b in zip(low, high))


def text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on `fill`."""
    luminance = 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2]
    return INK if luminance > 140 else BACKGROUND


def load_font(size: int, bold: bool = False) -> ImageFont.ImageFont:
    """DejaVu Sans (on most Linux systems) at `size` px, or Pillow's built-in font."""
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size)


def fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, shortened with an ellipsis until it is at most `width` px wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def grid_positions(length: int, block_length: int, columns: int) -> tuple[list[tuple[int, int]], list[int], int]:
    """Top-left corners of `length` cells laid out block by block (each block starts a new band of rows of at most
    `columns` cells; a remainder is a shorter last block, as `diffusion_generate` decodes it), the y of each block
    band, and the grid height; x counts from the block-label margin."""
    if block_length < 1 or length < 1:
        raise ValueError(f"block_length={block_length}, canvas length {length}: expected positive integers")
    if columns < 1:
        raise ValueError(f"columns={columns}: expected a positive integer")
    rows_per_block = -(-block_length // columns)
    band = rows_per_block * CELL_H + BLOCK_GAP
    positions, bands = [], []
    for block, size in enumerate(split_blocks(length, block_length)):
        bands.append(block * band)
        for i in range(size):
            positions.append(((i % columns) * CELL_W, block * band + (i // columns) * CELL_H))
    return positions, bands, len(bands) * band - BLOCK_GAP


def draw_mask(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
    """A `▒`-like stipple: a grey cell with a checker of darker dots."""
    draw.rectangle(box, fill=MASK_FILL)
    for y in range(box[1] + 3, box[3] - 1, 4):
        for x in range(box[0] + 3 + (y // 4) % 2 * 2, box[2] - 1, 4):
            draw.rectangle((x, y, x + 1, y + 1), fill=MASK_DOTS)


class Canvas:
    """A white image with a header, the block-banded grid and room for a legend; cells are drawn by the caller."""

    def __init__(self, length: int, block_length: int, columns: int, header: list[str], legend_height: int):
        self.positions, self.bands, grid_height = grid_positions(length, block_length, columns)
        self.font, self.small, self.bold = load_font(13), load_font(10), load_font(14, bold=True)
        self.grid_top = MARGIN + 20 * len(header) + 8
        self.grid_left = MARGIN + LABEL_W
        width = max(self.grid_left + min(columns, block_length) * CELL_W + MARGIN, 420)
        self.legend_top = self.grid_top + grid_height + 14
        self.image = Image.new("RGB", (width, self.legend_top + legend_height + MARGIN), BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        text_width = width - 2 * MARGIN
        for i, line in enumerate(header):
            font = self.bold if i == 0 else self.font
            self.draw.text((MARGIN, MARGIN + 20 * i), fit_text(self.draw, line, font, text_width), fill=INK, font=font)
        for block, y in enumerate(self.bands):
            self.draw.text((MARGIN, self.grid_top + y + 4), f"block {block}", fill=GRID, font=self.small)
            if block:  # a rule between blocks
                rule_y = self.grid_top + y - BLOCK_GAP // 2
                self.draw.line((MARGIN, rule_y, width - MARGIN, rule_y), fill=GRID, width=1)

    def box(self, index: int) -> tuple[int, int, int, int]:
        x, y = self.positions[index]
        left, top = self.grid_left + x, self.grid_top + y
        return left, top, left + CELL_W - 2, top + CELL_H - 2

    def cell(self, index: int, text: str, fill, corner: str = "", edge=None) -> None:
        box = self.box(index)
        self.draw.rectangle(box, fill=fill, outline=edge or fill, width=3 if edge else 1)
        ink = text_colour(fill)
        label = fit_text(self.draw, text, self.font, CELL_W - 10)
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2 + 3)
        self.draw.text(centre, label, fill=ink, font=self.font, anchor="mm")
        if corner:
            self.draw.text((box[0] + 3, box[1] + 1), corner, fill=ink, font=self.small)

    def swatch(self, x: int, y: int, label: str, fill=None, edge=None, masked: bool = False) -> int:
        """A legend entry at (x, y); returns the x after it."""
        box = (x, y, x + 18, y + 14)
        if masked:
            draw_mask(self.draw, box)
        else:
            self.draw.rectangle(box, fill=fill, outline=edge or GRID, width=2 if edge else 1)
        self.draw.text((x + 24, y), label, fill=INK, font=self.font)
        return x + 24 + int(self.draw.textlength(label, font=self.font)) + 18


def generation_rows(output: DiffusionGenerateOutput, row: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The generated ids, `unmask_step` and number of forward passes of batch row `row` of `output`."""
    if output.sequences is None or output.unmask_step is None:
        raise ValueError("the output has no `sequences` / `unmask_step`: generate with return_dict_in_generate=True")
    if not 0 <= row < output.sequences.shape[0]:
        raise ValueError(f"row={row}: the output has {output.sequences.shape[0]} row(s)")
    unmask = output.unmask_step[row].cpu()
    generated = output.sequences[row, -unmask.numel() :].cpu()
    steps = int(output.nfe[row]) if output.nfe is not None else 0
    return generated, unmask, max(steps, int(unmask.max()) + 1, 1)


def render_heatmap(
    output: DiffusionGenerateOutput,
    tokenizer,
    block_length: int,
    row: int = 0,
    columns: int = 16,
    title: str = "",
) -> Image.Image:
    """A PNG-ready heat map of one generation: pass `diffusion_generate(..., return_dict_in_generate=True)`'s output,
    the tokenizer, the `block_length` it decoded with and optionally the batch `row`, cells per grid row and a title.

    Each generated token is a cell (its decoded text, its step number in the corner) coloured by the forward pass
    that committed it; pad cells filled after a stop (`unmask_step` -1) are grey. A colour bar maps steps to colours.
    """
    generated, unmask, total = generation_rows(output, row)
    stats = (
        f"{generated.numel()} tokens in blocks of {block_length}, {total} forward passes "
        f"({(unmask >= 0).sum().item() / total:.2f} tokens/forward)"
    )
    canvas = Canvas(generated.numel(), block_length, columns, [title or "denoising order", stats], 44)
    for i, (token, step) in enumerate(zip(generated.tolist(), unmask.tolist())):
        text = token_text(tokenizer, token)
        if step < 0:
            canvas.cell(i, text, STOPPED_FILL, "pad")
        else:
            canvas.cell(i, text, step_colour(step, total), str(step))

    draw, top, left = canvas.draw, canvas.legend_top, MARGIN
    bar_width = min(canvas.image.width - 2 * MARGIN - 200, 480)
    for x in range(bar_width):  # one equal segment per step
        draw.line((left + x, top, left + x, top + 14), fill=step_colour(x * total // bar_width, total))
    draw.rectangle((left, top, left + bar_width, top + 14), outline=GRID)
    ticks = range(total) if total <= 12 else sorted({round(k * (total - 1) / 4) for k in range(5)})
    for tick in ticks:
        x = left + round((tick + 0.5) * bar_width / total)
        draw.line((x, top + 14, x, top + 18), fill=GRID)
        draw.text((x, top + 20), str(tick), fill=INK, font=canvas.small, anchor="ma")
    draw.text((left + bar_width + 10, top), "step that unmasked the token", fill=INK, font=canvas.font)
    if (unmask < 0).any():
        canvas.swatch(left + bar_width + 10, top + 20, "pad after a stop", fill=STOPPED_FILL)
    return canvas.image


def render_frames(
    output: DiffusionGenerateOutput,
    tokenizer,
    block_length: int,
    mask_token_id: int,
    row: int = 0,
    columns: int = 16,
    title: str = "",
) -> list[Image.Image]:
    """One image per denoising step of `output.history` (generate with `output_history=True`): masked cells hatched,
    the tokens committed at that step highlighted, earlier ones plain. Pass the `mask_token_id` the model used."""
    if not output.history:
        raise ValueError("the output has no `history`: generate with output_history=True to render frames")
    length = output.unmask_step.shape[1]
    prompt_length = output.sequences.shape[1] - length
    frames, previous = [], None
    for step, snapshot in enumerate(output.history):
        current = snapshot[row].cpu()
        cells = canvas_cells(current, previous, prompt_length, tokenizer, mask_token_id)
        new = sum(cell.state == NEW for cell in cells)
        done = sum(cell.state != MASKED for cell in cells)
        progress = f"step {step + 1}/{len(output.history)}: +{new} tokens, {done}/{length} unmasked"
        header = [title or "denoising", progress]
        canvas = Canvas(length, block_length, columns, header, 18)
        for i, cell in enumerate(cells):
            if cell.state == MASKED:
                draw_mask(canvas.draw, canvas.box(i))
            elif cell.state == NEW:
                canvas.cell(i, cell.text, NEW_FILL, edge=NEW_EDGE)
            else:
                canvas.cell(i, cell.text, OLD_FILL)
        x = canvas.swatch(MARGIN, canvas.legend_top, "masked", masked=True)
        x = canvas.swatch(x, canvas.legend_top, "unmasked at this step", fill=NEW_FILL, edge=NEW_EDGE)
        canvas.swatch(x, canvas.legend_top, "unmasked earlier", fill=OLD_FILL)
        frames.append(canvas.image)
        previous = current
    return frames


def save_gif(frames: list[Image.Image], path: str | Path, frame_ms: int = 300, hold_ms: int = 2000) -> None:
    """Write `frames` as a looping GIF: `frame_ms` per frame, the last one held for `hold_ms`."""
    if not frames:
        raise ValueError("save_gif: no frames to write")
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    # One shared palette (every frame's legend holds every fill colour) keeps the file small and the colours stable.
    palette = frames[-1].quantize(colors=96)
    frames = [frame.quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder or Hub repo id (official checkpoint or saved by llada-moe)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and word-level tokenizer (offline)")
    parser.add_argument("--prompt", default=None, help="user message (sent through the chat template)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="canvas length (default 64; tiny: 32)")
    parser.add_argument("--block-length", type=int, default=None, help="block size (default 32; tiny: 8)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: one token per step)")
    parser.add_argument("--threshold", type=float, default=None, help="Fast-dLLM parallel-decoding threshold")
    parser.add_argument(
        "--use-cache", choices=["none", "prefix", "dual"], default="none", help="cache_implementation (none = exact)"
    )
    parser.add_argument("--remasking", choices=REMASKING_STRATEGIES, default="low_confidence")
    parser.add_argument("--bits", type=int, choices=[4, 8], default=None, help="load 4- or 8-bit (bitsandbytes)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    parser.add_argument("--columns", type=int, default=16, help="cells per grid row (default 16)")
    parser.add_argument("--png", type=Path, help="write the heat map here (.png)")
    parser.add_argument("--gif", type=Path, help="write the animation here (.gif)")
    args = parser.parse_args(argv)

    if args.tiny == bool(args.model):
        parser.error("pass exactly one of --model PATH_OR_REPO or --tiny")
    if args.png is None and args.gif is None:
        parser.error("pass --png OUT.png and/or --gif OUT.gif")
    for flag, path, suffix in (("--png", args.png, ".png"), ("--gif", args.gif, ".gif")):
        if path is not None and path.suffix.lower() != suffix:
            parser.error(f"{flag} {str(path)!r}: expected a file name ending in {suffix}")
    if args.columns < 1:
        parser.error(f"--columns {args.columns}: expected a positive integer")

    from modeling_llada_moe.apps.inference import decode_completion, encode_prompt, load_model_and_tokenizer

    if args.tiny:
        from modeling_llada_moe.apps.tiny_task import save_tiny_folder

        source = save_tiny_folder(tempfile.mkdtemp(prefix="llada_moe_tiny_"))
        prompt, new_tokens, block = args.prompt or "t1 t2 t3 t4", args.max_new_tokens or 32, args.block_length or 8
    else:
        prompt = args.prompt or "Explain diffusion language models in one sentence."
        source, new_tokens, block = args.model, args.max_new_tokens or 64, args.block_length or 32
    model, tokenizer = load_model_and_tokenizer(source, bits=args.bits, device=args.device)
    input_ids = encode_prompt(tokenizer, prompt).to(model.device)
    try:
        output = model.diffusion_generate(
            input_ids,
            max_new_tokens=new_tokens,
            block_length=block,
            steps=args.steps,
            threshold=args.threshold,
            cache_implementation=None if args.use_cache == "none" else args.use_cache,
            remasking=args.remasking,
            return_dict_in_generate=True,
            output_history=args.gif is not None,
        )
    except ValueError as err:  # bad decoding settings: report them as a usage error, not a traceback
        parser.error(str(err))
    answer = decode_completion(tokenizer, output.sequences[0, input_ids.shape[1] :])
    print(f"answer: {answer}")
    print(f"forward passes: {int(output.nfe[0])}, tokens/forward: {float(output.tokens_per_forward[0]):.2f}")
    title = f"prompt: {prompt}"
    if args.png is not None:
        render_heatmap(output, tokenizer, block, columns=args.columns, title=title).save(args.png)
        print(f"wrote {args.png}")
    if args.gif is not None:
        mask_id = model.generation_config.mask_token_id
        mask_id = model.config.mask_token_id if mask_id is None else mask_id
        frames = render_frames(output, tokenizer, block, mask_id, columns=args.columns, title=title)
        save_gif(frames, args.gif)
        print(f"wrote {args.gif} ({len(frames)} frames)")


if __name__ == "__main__":
    main()

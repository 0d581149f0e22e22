"""The denoising pictures (examples/denoise_viz.py): rendering a handcrafted generation, and the script end to end."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_example, tiny_tokenizer
from PIL import Image

from modeling_llada_moe.generation_utils import DiffusionGenerateOutput


viz = load_example("denoise_viz")


MASK = 126
PROMPT = [5, 6, 7]
TOKENS = [11, 12, 13, 14, 15, 16, 120, 120]
UNMASK = [2, 0, 1, 3, 5, 4, -1, -1]  # two blocks of 4; the last two positions were pad-filled after a stop


def handcrafted_output() -> DiffusionGenerateOutput:
    """A 2-block generation of 8 tokens in 6 forward passes, with the canvases each step would have shown."""
    sequences = torch.tensor([PROMPT + TOKENS])
    unmask = torch.tensor([UNMASK])
    history = []
    for step in range(6):
        generated = [token if 0 <= s <= step else MASK for token, s in zip(TOKENS, UNMASK)]
        history.append(torch.tensor([PROMPT + generated]))
    return DiffusionGenerateOutput(sequences=sequences, nfe=torch.tensor([6]), unmask_step=unmask, history=history)


def cell_pixel(index: int, block_length: int = 4, columns: int = 16, header_lines: int = 2) -> tuple[int, int]:
    """A pixel inside cell `index`, away from its text (near the bottom-right corner)."""
    positions, _, _ = viz.grid_positions(len(TOKENS), block_length, columns)
    x, y = positions[index]
    left, top = viz.MARGIN + viz.LABEL_W + x, viz.MARGIN + 20 * header_lines + 8 + y
    return left + viz.CELL_W - 6, top + viz.CELL_H - 6


def test_canvas_cells_states():
    tokenizer = tiny_tokenizer()
    before = torch.tensor(PROMPT + [11, MASK, MASK, MASK])
    after = torch.tensor(PROMPT + [11, 12, MASK, MASK])
    cells = viz.canvas_cells(after, before, len(PROMPT), tokenizer, MASK)
    assert [(c.text, c.state) for c in cells] == [("t11", "committed"), ("t12", "new"), ("", "masked"), ("", "masked")]
    assert [c.state for c in viz.canvas_cells(after, None, len(PROMPT), tokenizer, MASK)][:2] == ["new", "new"]
    with pytest.raises(ValueError, match=r"prompt_length=9 must be in \[0, 7\)"):
        viz.canvas_cells(after, None, 9, tokenizer, MASK)


def test_heatmap_colours_each_token_by_its_unmask_step():
    image = viz.render_heatmap(handcrafted_output(), tiny_tokenizer(), block_length=4, title="handcrafted")
    assert image.mode == "RGB" and image.width >= 420 and 150 < image.height < 400
    for index, step in enumerate(UNMASK):
        expected = viz.STOPPED_FILL if step < 0 else viz.step_colour(step, 6)
        assert image.getpixel(cell_pixel(index)) == expected, index
    assert viz.step_colour(0, 6) != viz.step_colour(5, 6)
    # Each block starts its own band of rows, so block 1 sits below block 0 even with room for 16 cells per row.
    assert cell_pixel(4)[1] > cell_pixel(0)[1] + viz.CELL_H and cell_pixel(4)[0] == cell_pixel(0)[0]
    narrow = viz.render_heatmap(handcrafted_output(), tiny_tokenizer(), block_length=4, columns=2)
    assert narrow.height > image.height  # 2 cells per row: 2 rows per block


def test_frames_show_masks_and_highlight_new_tokens(tmp_path):
    output = handcrafted_output()
    frames = viz.render_frames(output, tiny_tokenizer(), block_length=4, mask_token_id=MASK)
    assert len(frames) == 6 and len({frame.size for frame in frames}) == 1
    first, last = frames[0], frames[-1]
    assert first.getpixel(cell_pixel(1)) == viz.NEW_FILL  # committed at step 0
    assert first.getpixel(cell_pixel(0)) in (viz.MASK_FILL, viz.MASK_DOTS)  # still masked
    assert last.getpixel(cell_pixel(4)) == viz.NEW_FILL and last.getpixel(cell_pixel(1)) == viz.OLD_FILL
    viz.save_gif(frames, tmp_path / "denoise.gif", frame_ms=100)
    gif = Image.open(tmp_path / "denoise.gif")
    assert gif.n_frames == 6 and gif.size == first.size
    with pytest.raises(ValueError, match="output_history=True"):
        no_history = DiffusionGenerateOutput(sequences=output.sequences, unmask_step=output.unmask_step)
        viz.render_frames(no_history, None, 4, MASK)
    viz.render_heatmap(output, tiny_tokenizer(), block_length=3)  # 8 tokens: blocks of 3, 3 and a shorter 2
    assert len(viz.grid_positions(8, 3, 16)[1]) == 3
    with pytest.raises(ValueError, match="block_length=0"):
        viz.render_heatmap(output, tiny_tokenizer(), block_length=0)


def test_script_writes_png_and_gif_in_tiny_mode(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "examples/denoise_viz.py", "--tiny", "--max-new-tokens", "16", "--block-length", "8"]
    command += ["--steps", "8", "--png", str(tmp_path / "d.png"), "--gif", str(tmp_path / "d.gif")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "forward passes: 8, tokens/forward: 2.00" in result.stdout and "(8 frames)" in result.stdout
    png, gif = Image.open(tmp_path / "d.png"), Image.open(tmp_path / "d.gif")
    assert png.format == "PNG" and 420 <= png.width <= 2000 and 150 <= png.height <= 1000
    assert gif.format == "GIF" and gif.n_frames == 8 and gif.width == png.width


def test_script_rejects_bad_flags(capsys):
    for argv, message in (
        (["--tiny", "--png", "out.jpg"], "--png 'out.jpg': expected a file name ending in .png"),
        (["--tiny"], "pass --png OUT.png and/or --gif OUT.gif"),
        (["--png", "out.png"], "pass exactly one of --model PATH_OR_REPO or --tiny"),
        (["--tiny", "--png", "o.png", "--use-cache", "full"], "argument --use-cache: invalid choice: 'full'"),
        (["--tiny", "--png", "o.png", "--max-new-tokens", "12", "--block-length", "8", "--steps", "1"], "`steps`=1"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            viz.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv

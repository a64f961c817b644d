"""
Denoising you can see. A Recorder, passed to decode.generate_block as its on_step callback, keeps
each row as it stands after every forward (its prompt, what is committed, masks for the rest, up to
prompt + max_new_tokens) and which positions that forward committed: one Frame a forward. Shown as
text (sample.py --show_steps: the block a row is decoding, a line per row), drawn on a matplotlib
Axes (draw_frame: a line per row, a cell per position, the block grid), or strung into a GIF
(save_gif; sample.py --animate, the notebook). matplotlib is imported only where a picture is drawn.

    recorder = Recorder(prompts, max_new_tokens, recipe.block_size, recipe.mask_id, run.end_ids)
    generate_block(model, prompts, max_new_tokens, recipe, decoding, on_step=recorder)
    save_gif(recorder.frames, "denoising.gif", tokenizer.decode)
"""

from dataclasses import dataclass

VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥"}  # characters a reader could not see, drawn as glyphs
BOX = {"mask": "#c4c4c4", "new": "#f4a259", "after": "#eeeeee"}  # a cell's background: a mask, a commit, a mask past the end
INK = {"prompt": "#555555", "new": "black", "old": "black", "after": "#c0c0c0"}  # its glyph's colour (a mask: none)


@dataclass
class Frame:
    """The rows after one forward. Positions are absolute: row r's tokens[r][i] is position i."""
    forward: int        # 1, 2, ...: the forwards that denoised (with fused commits, the default, all of them)
    s: int              # the first position of the block this forward decoded (blocks lie on the grid of B)
    tokens: list        # per row, its tokens up to its limit (prompt + max_new_tokens), mask_id where still masked
    committed: list     # per row, the positions this forward committed
    prompt_lens: list   # per row, its prompt's length
    block_size: int
    mask_id: int
    end_ids: tuple      # a row's output ends at the first of these


class Recorder:
    """generate_block's on_step(s, block, committed): appends a Frame to .frames after every forward.
    Given fewer prompts than the batch has rows, it records the first rows only."""

    def __init__(self, prompts, max_new_tokens, block_size, mask_id, end_ids=()):
        self.rows = [list(p) + [mask_id] * max_new_tokens for p in prompts]
        self.prompt_lens = [len(p) for p in prompts]
        self.block_size, self.mask_id, self.end_ids = block_size, mask_id, tuple(end_ids)
        self.frames = []

    def __call__(self, s, block, committed):
        block, committed = block.tolist(), committed.tolist()
        marks = []
        for row, new, done in zip(self.rows, block, committed):  # the block, cut at the row's limit
            n = max(0, min(len(new), len(row) - s))
            row[s:s + n] = new[:n]
            marks.append([s + j for j in range(n) if done[j]])
        self.frames.append(Frame(len(self.frames) + 1, s, [list(r) for r in self.rows], marks, self.prompt_lens,
                                 self.block_size, self.mask_id, self.end_ids))


def cells(frame, decode):
    """Per row, a (glyph, kind) per position: kind 'prompt', 'mask', 'new' (this forward's commit),
    'old' (an earlier commit) or 'after' (past the row's end token: not part of its output).
    Glyphs: '_' masked, '$' an end token, '␣' a space, '⏎' a newline; decode: token ids -> text."""
    rows = []
    for r, tokens in enumerate(frame.tokens):
        n, new = frame.prompt_lens[r], set(frame.committed[r])
        end = next((i for i in range(n, len(tokens)) if tokens[i] in frame.end_ids), len(tokens))
        row = []
        for i, t in enumerate(tokens):
            glyph = ("_" if t == frame.mask_id else "$" if t in frame.end_ids else
                     "".join(VISIBLE.get(c, c) for c in decode([t])))
            kind = ("prompt" if i < n else "new" if i in new else "after" if i > end else
                    "mask" if t == frame.mask_id else "old")
            row.append((glyph, kind))
        rows.append(row)
    return rows


def frame_text(frame, decode, rows=4):
    """sample.py --show_steps: the lines of one forward, for each of the first `rows` rows that it
    committed in, the row's block ('_' masked, '$' end, '␣' a space, blank past the row's limit)
    and under it a '^' under each position the forward committed."""
    B, lines = frame.block_size, []
    for r, row in enumerate(cells(frame, decode)[:rows]):
        if not frame.committed[r]:  # a row with masks left commits at least one a forward: this one is done
            continue
        block = [row[i][0] if i < len(row) else " " for i in range(frame.s, frame.s + B)]
        label = f"row {r}  " if len(frame.tokens) > 1 else ""
        head = f"forward {frame.forward:3d}  positions {frame.s:3d}-{frame.s + B - 1:3d}  {label}|"
        lines.append(f"{head}{''.join(block)}|  +{len(frame.committed[r])} committed")
        lines.append(" " * len(head) + "".join("^" if i in frame.committed[r] else " " for i in range(frame.s, frame.s + B)))
    return lines


def figsize(frame, cell=0.2):
    """(width, height) in inches that fit a frame's picture: `cell` inches a position, a title and a key."""
    return cell * max(len(t) for t in frame.tokens) + 0.3, 1.7 * cell * len(frame.tokens) + 0.9


def draw_frame(ax, frame, decode):
    """One frame on a matplotlib Axes: a line per row, a cell per position. Prompt tokens in grey,
    masked positions grey boxes, this forward's commits on orange, earlier ones plain, '$' the
    end token, what lies past it faint; vertical lines on the block grid (every B positions), the
    block this forward decoded shaded; 'forward k' in the title. The glyphs fit the Axes' size."""
    from matplotlib.patches import Rectangle
    rows = cells(frame, decode)
    width, B = max(len(r) for r in rows), frame.block_size
    ax.set_xlim(0, width)
    ax.set_ylim(len(rows), 0)  # row 0 on top
    ax.axis("off")
    points = min(ax.bbox.width / width, ax.bbox.height / len(rows)) * 72 / ax.figure.dpi  # a cell, in points
    ax.axvspan(frame.s, min(frame.s + B, width), color="#e3edf9", zorder=0)
    ax.vlines(range(0, width + 1, B), 0, len(rows), color="#5b7fb0", lw=1, zorder=1)
    for y, row in enumerate(rows):
        for x, (glyph, kind) in enumerate(row):
            masked = frame.tokens[y][x] == frame.mask_id
            if masked or kind == "new":
                ax.add_patch(Rectangle((x + 0.08, y + 0.15), 0.84, 0.7, color=BOX.get(kind, BOX["mask"]), lw=0, zorder=2))
            if not masked:
                ax.text(x + 0.5, y + 0.52, glyph, ha="center", va="center", family="DejaVu Sans Mono",
                        fontsize=0.62 * points, color=INK[kind], weight="bold" if kind == "new" else "normal", zorder=3)
    n = sum(len(c) for c in frame.committed)
    ax.set_title(f"forward {frame.forward}: block {frame.s}-{frame.s + B - 1}, {n} committed", fontsize=0.8 * points)
    ax.text(0, len(rows) + 0.25, "grey: masked  orange: this forward's commits  $: end  ␣: space", va="top",
            fontsize=0.55 * points, color="#555555", clip_on=False)


def save_gif(frames, path, decode, seconds=0.6, hold=3.0, dpi=90):
    """Writes the frames as a GIF: one image a frame (a forward), each shown `seconds`, the last
    held `hold` seconds (by its duration: no extra frames), looping. Returns the number of images."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image
    w, h = figsize(frames[0])
    fig = Figure(figsize=(w, h), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes([0.15 / w, 0.45 / h, 1 - 0.3 / w, 1 - 0.9 / h])  # room for the title above, the key below
    images = []
    for frame in frames:
        ax.clear()
        draw_frame(ax, frame, decode)
        canvas.draw()
        images.append(Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB"))
    durations = [round(1000 * seconds)] * (len(images) - 1) + [round(1000 * hold)]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0,
                   optimize=True)
    return len(images)

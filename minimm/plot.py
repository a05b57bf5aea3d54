"""A loss-curve picture drawn with Pillow alone (no plotting library): train and val loss, per task.

Reads the log.jsonl that train.py appends to; writes a PNG. Axes: step (linear) and loss (log scale,
because losses fall by orders of magnitude early and by hundredths late).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 900, 560, 70
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def read_curves(log_path: Path) -> dict[str, list[tuple[int, float]]]:
    """{'train all': [(step, loss)], 'val code': [...], ...} from the log."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for line in Path(log_path).read_text().splitlines():
        record = json.loads(line)
        for split in ("train", "val"):
            for task, loss in record.get(split, {}).items():
                if loss > 0 and math.isfinite(loss):
                    curves.setdefault(f"{split} {task}", []).append((record["step"], loss))
    return curves


def plot_losses(log_path: str | Path, png_path: str | Path) -> None:
    curves = read_curves(Path(log_path))
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    points = [p for c in curves.values() for p in c]
    if not points:
        draw.text((MARGIN, MARGIN), "no losses logged yet", fill="black")
        image.save(png_path)
        return
    max_step = max(s for s, _ in points) or 1
    lo, hi = math.log10(min(v for _, v in points)), math.log10(max(v for _, v in points))
    hi = hi if hi > lo else lo + 1

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = MARGIN + (WIDTH - 2 * MARGIN) * step / max_step
        y = HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * (math.log10(loss) - lo) / (hi - lo)
        return x, y

    draw.rectangle([MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN], outline="black")
    for i in range(5):  # loss ticks, evenly spaced on the log axis
        value = 10 ** (lo + (hi - lo) * i / 4)
        draw.text((8, xy(0, value)[1] - 6), f"{value:.3g}", fill="black")
        draw.text((xy(max_step * i / 4, 10 ** lo)[0] - 10, HEIGHT - MARGIN + 8), f"{int(max_step * i / 4)}",
                  fill="black")
    draw.text((WIDTH // 2 - 20, HEIGHT - 30), "step", fill="black")
    draw.text((MARGIN, 20), "loss (log scale): solid = train, dots = val", fill="black")
    for i, (name, curve) in enumerate(sorted(curves.items())):
        task = name.split(" ", 1)[1]
        color = COLORS[sorted({n.split(" ", 1)[1] for n in curves}).index(task) % len(COLORS)]
        line = [xy(s, v) for s, v in sorted(curve)]
        if name.startswith("train") and len(line) > 1:
            draw.line(line, fill=color, width=2 if task == "all" else 1)
        else:
            for x, y in line:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.text((WIDTH - MARGIN + 5, MARGIN + 14 * i), name, fill=color)
    tmp = Path(str(png_path) + ".tmp.png")
    image.save(tmp)
    tmp.replace(png_path)

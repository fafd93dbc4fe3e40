"""Pictures a person can check at a glance (Pillow only): landmark overlays, severity crops,
confusion matrices.

write_overlay("overlay.png", series, true_points, predicted_points, point_names)
# what the severity network sees, with the grades
save_crops_png("crops.png", crops, groups, labels)
save_confusion_png("confusion.png", {"spinal": counts_3x3, ...})
"""

import numpy as np
from PIL import Image, ImageDraw

import data
import inputs


def write_overlay(path, series, targets, predicted, names):
    """PNG of the slices holding true (green) and predicted (red) points, labelled with their
    level."""
    slices = sorted(
        {int(t[0]) for t in targets if np.isfinite(t).all()}
        | {int(p[0]) for p in predicted if np.isfinite(p).all()}
    )[:4]
    panels = []
    for d in slices:
        image = inputs.normalise(series.volume[d]).clip(0, 1) * 255
        # small frames are enlarged so the labels stay legible
        zoom = max(1, int(np.ceil(320 / image.shape[1])))
        panel = (
            Image.fromarray(image.astype(np.uint8))
            .convert("RGB")
            .resize((image.shape[1] * zoom, image.shape[0] * zoom))
        )
        draw = ImageDraw.Draw(panel)
        for points, colour in ((targets, (0, 255, 0)), (predicted, (255, 60, 60))):
            for (pd_, col, row), (condition, level) in zip(points, names):
                col, row = (col + 0.5) * zoom - 0.5, (row + 0.5) * zoom - 0.5
                if np.isfinite([pd_, col, row]).all() and int(pd_) == d:
                    draw.ellipse([col - 3, row - 3, col + 3, row + 3], outline=colour, width=2)
                    draw.text((col + 5, row - 6), f"{condition[0].upper()}{level[1]}{level[-1]}",
                              fill=colour)
        draw.text((3, 3), f"slice {d}", fill=(255, 255, 0))
        panels.append(panel)
    if panels:
        canvas = Image.new("RGB", (sum(p.width for p in panels), panels[0].height))
        for i, panel in enumerate(panels):
            canvas.paste(panel, (sum(p.width for p in panels[:i]), 0))
        canvas.save(path)


def save_confusion_png(path, matrices):
    """Three 3x3 grids (rows true, columns predicted) as one PNG."""
    cell, canvas = 40, Image.new("RGB", (len(matrices) * 170, 170), "white")
    draw = ImageDraw.Draw(canvas)
    for g, (name, matrix) in enumerate(matrices.items()):
        x0 = g * 170 + 35
        draw.text((x0, 5), name, fill="black")
        for i in range(3):
            for j in range(3):
                share = matrix[i, j] / max(matrix[i].sum(), 1)
                shade = int(255 * (1 - share))
                box = [x0 + j * cell, 25 + i * cell, x0 + (j + 1) * cell, 25 + (i + 1) * cell]
                draw.rectangle(box, fill=(shade, shade, 255), outline="black")
                draw.text((box[0] + 8, box[1] + 14), str(matrix[i, j]), fill="black")
        draw.text((x0, 150), "rows: true N/M/S", fill="black")
    canvas.save(path)


def save_crops_png(path, crops, groups, labels, per_group=8):
    """The centre slice of up to per_group crops of each condition group, one row a group, labelled
    with its grade: what the severity network sees. crops (N, S, C, C) normalised, groups and
    labels (N,)."""
    size, rows = crops.shape[-1] * 2, []
    for g in range(len(data.GROUPS)):
        picks = np.flatnonzero(np.asarray(groups) == g)[:per_group]
        row = Image.new("RGB", (per_group * (size + 4), size + 14), "black")
        draw = ImageDraw.Draw(row)
        for k, i in enumerate(picks):
            image = (crops[i, crops.shape[1] // 2].clamp(0, 1).numpy() * 255).astype(np.uint8)
            row.paste(Image.fromarray(image).resize((size, size)).convert("RGB"),
                      (k * (size + 4), 14))
            grade = "?" if labels[i] < 0 else data.SEVERITIES[int(labels[i])].split("/")[0]
            draw.text((k * (size + 4) + 2, 1), f"{data.GROUPS[g][:4]} {grade}", fill=(255, 255, 0))
        rows.append(row)
    canvas = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)))
    for k, row in enumerate(rows):
        canvas.paste(row, (0, k * row.height))
    canvas.save(path)

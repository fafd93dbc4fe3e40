"""Pictures a person can check at a glance (Pillow only): landmark overlays, severity crops,
confusion matrices.

write_overlay("overlay.png", series, true_points, predicted_points, point_names)
# what the severity network sees, with the grades
save_crops_png("crops.png", crops, groups, labels)
save_confusion_png("confusion.png", {"spinal": counts_3x3, ...})
# one page a study: every series on the slices its landmarks were found, then the 25 crops graded
write_report("report_4003253.png", "study 4003253", study, landmarks, crops, rows)
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import cache
import data
import inputs

TEXT_PX = 14  # report text, legible at 100 %


def font(size=TEXT_PX):
    """Pillow's own scalable font (no font file needed)."""
    return ImageFont.load_default(size=size)


def write_overlay(path, series, targets, predicted, names):
    """PNG of the slices holding true (green) and predicted (red) points, labelled with their
    level."""
    slices = sorted(
        {int(t[0]) for t in targets if np.isfinite(t).all()}
        | {int(p[0]) for p in predicted if np.isfinite(p).all()}
    )[:4]
    panels = []
    for d in slices:
        image = cache.normalise(series.volume[d], series.intensity_range).clip(0, 1) * 255
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
    """Three 3x3 grids (rows true, columns predicted) as one PNG, each cell shaded by its share of
    its row."""
    cell, width = 44, 200
    canvas = Image.new("RGB", (len(matrices) * width, 200), "white")
    draw = ImageDraw.Draw(canvas)
    for g, (name, matrix) in enumerate(matrices.items()):
        x0 = g * width + 40
        draw.text((x0, 4), name, fill="black", font=font(15))
        for i in range(3):
            draw.text((x0 - 16, 40 + i * cell), "NMS"[i], fill="black", font=font(14))
            draw.text((x0 + 16 + i * cell, 28 + 3 * cell), "NMS"[i], fill="black",
                      font=font(14))
            for j in range(3):
                share = matrix[i, j] / max(matrix[i].sum(), 1)
                shade = int(255 * (1 - share))
                box = [x0 + j * cell, 26 + i * cell, x0 + (j + 1) * cell, 26 + (i + 1) * cell]
                draw.rectangle(box, fill=(shade, shade, 255), outline="black")
                draw.text((box[0] + 8, box[1] + 14), str(matrix[i, j]),
                          fill="black" if share < 0.6 else "white", font=font(14))
        draw.text((x0 - 30, 182), "rows true, columns predicted", fill="black", font=font(11))
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


# -----------------------------------------------------------------------------
# one page a study (infer.py --report)

GRADE_COLOURS = [(60, 200, 90), (245, 185, 40), (235, 60, 60)]  # Normal/Mild, Moderate, Severe
WRONG = (255, 0, 255)  # the frame of a row whose most likely grade is not the true one
SHORT_CONDITIONS = ["canal", "L foramen", "R foramen", "L recess", "R recess"]
PANEL_PX, CROP_PX = 200, 96
# a report's colours: 248 greys and the marks, so that its PNG can be stored as a palette image
REPORT_PALETTE = Image.new("P", (1, 1))
GREYS = np.linspace(0, 255, 248).round().astype(int)
REPORT_PALETTE.putpalette([v for g in GREYS for v in (g, g, g)]
                          + [v for colour in GRADE_COLOURS + [WRONG] for v in colour] + [0] * 12)


def write_report(path, title, study, landmarks, crops, rows):
    """One PNG page of what infer.py did with a study; returns the captions of its series panels
    and the label columns it marks wrong.

    Top: every series of the study on each slice a landmark was found (its middle slice, marked
    unused, when none was), the points drawn in the colour of the grade their row got and the
    labelled points, where known, as white crosses; a grey panel for a series type the study
    lacks. Below: the 25 rows as a grid (levels down, conditions
    across), each with the centre slice of the crop the severity network graded (right sides
    mirrored, as it saw them) and the submitted probabilities, or the reason the row got the
    prior. Where the truth is known, a magenta frame marks each row whose most likely grade is not
    the true one.
    study: {series_id: data.StudySeries}; landmarks: {(condition, level): data.Landmark};
    crops: {column index: (S, C, C) crop}; rows: 25 dicts {probabilities (3,), truth (grade index,
    or data.MISSING), note (why the row has no crop, or ""), labelled (the labelled
    data.Landmark, or None)}, in data.LABEL_COLUMNS order.
    """
    panels, captions = series_panels(study, landmarks, rows)
    grid, wrong = crop_grid(crops, rows)
    per_line = max(1, grid.width // (PANEL_PX + 8))
    lines = [panels[i:i + per_line] for i in range(0, len(panels), per_line)]
    panel_height = PANEL_PX + TEXT_PX + 10
    height = 30 + len(lines) * panel_height + grid.height
    page = Image.new("RGB", (grid.width, height), "white")
    draw = ImageDraw.Draw(page)
    legend = "   ".join(data.SEVERITIES) + "   + labelled point"
    draw.text((6, 6), f"{title}    grades: {legend}", fill="black", font=font(16))
    x = 6 + draw.textlength(f"{title}    grades: ", font=font(16))
    for name, colour in zip(data.SEVERITIES, GRADE_COLOURS):
        right = x + draw.textlength(name, font=font(16))
        draw.rectangle([x, 8, right, 24], outline=colour, width=2)
        x += draw.textlength(name + "   ", font=font(16))
    for k, line in enumerate(lines):
        for i, panel in enumerate(line):
            page.paste(panel, (6 + i * (PANEL_PX + 8), 30 + k * panel_height))
    page.paste(grid, (0, 30 + len(lines) * panel_height))
    page.quantize(palette=REPORT_PALETTE, dither=Image.Dither.NONE).save(path)  # 2/3 the bytes
    return captions, wrong


def series_panels(study, landmarks, rows):
    """[PIL image] of each (series, slice) holding landmarks or labelled points, in
    data.SERIES_TYPES order, and their captions."""
    graded = {data.COLUMN_POINTS[j]: int(np.argmax(r["probabilities"])) for j, r in enumerate(rows)}
    labelled = {data.COLUMN_POINTS[j]: r["labelled"] for j, r in enumerate(rows) if r["labelled"]}
    panels, captions = [], []
    for series_type in data.SERIES_TYPES:
        of_type = [s for s in study.values() if s.series_type == series_type]
        if not of_type:
            captions.append(f"{series_type}: no series")
            panels.append(captioned(None, captions[-1]))
        for item in of_type:
            points = [(k, lm) for k, lm in landmarks.items() if lm.series_id == item.series_id]
            truth = [lm for lm in labelled.values() if lm.series_id == item.series_id]
            slices = sorted({int(round(lm.slice)) for lm in [p for _, p in points] + truth})
            for d in slices or [item.series.volume.shape[0] // 2]:
                on_slice = [(name, lm) for name, lm in points if int(round(lm.slice)) == d]
                truth_on_slice = [lm for lm in truth if int(round(lm.slice)) == d]
                caption = f"{data.SERIES_TAGS[series_type]} {item.series_id} s{d}"
                if not slices:
                    caption += " (unused)"
                captions.append(caption)
                panel = slice_with_points(item.series, d, on_slice, truth_on_slice, graded)
                panels.append(captioned(panel, caption))
    return panels, captions


def slice_with_points(series, d, points, truth, graded):
    """One slice scaled to fit PANEL_PX, each labelled point (truth) a white cross, each landmark a
    ring in its row's grade colour and a label."""
    image = cache.normalise(series.volume[d], series.intensity_range).clip(0, 1) * 255
    zoom = PANEL_PX / max(image.shape)
    size = (max(1, round(image.shape[1] * zoom)), max(1, round(image.shape[0] * zoom)))
    panel = Image.fromarray(image.astype(np.uint8)).convert("RGB").resize(size)
    draw = ImageDraw.Draw(panel)
    for lm in truth:
        col, row = (lm.col + 0.5) * zoom - 0.5, (lm.row + 0.5) * zoom - 0.5
        draw.line([col - 5, row, col + 5, row], fill="white", width=2)
        draw.line([col, row - 5, col, row + 5], fill="white", width=2)
    for (condition, level), lm in points:
        col, row = (lm.col + 0.5) * zoom - 0.5, (lm.row + 0.5) * zoom - 0.5
        colour = GRADE_COLOURS[graded[(condition, level)]]
        draw.ellipse([col - 4, row - 4, col + 4, row + 4], outline=colour, width=2)
        name = f"{SHORT_CONDITIONS[data.CONDITIONS.index(condition)]} "
        name += data.LEVEL_NAMES[data.LEVELS.index(level)]
        width = draw.textlength(name, font=font(11))
        x = col + 6 if col + 6 + width < panel.width else col - 6 - width  # inside the panel
        y = row - 16 if condition.startswith("left") else row + 2 if condition.startswith(
            "right") else row - 7  # the two recesses of one axial slice apart
        draw.text((x, y), name, fill=colour, font=font(11), stroke_width=1, stroke_fill="black")
    return panel


def captioned(panel, caption):
    """A PANEL_PX square (grey when panel is None) with a caption line under it."""
    out = Image.new("RGB", (PANEL_PX, PANEL_PX + TEXT_PX + 6), "white")
    out.paste(panel if panel is not None else Image.new("RGB", (PANEL_PX, PANEL_PX), "grey"))
    ImageDraw.Draw(out).text((0, PANEL_PX + 2), caption, fill="black", font=font(12))
    return out


def crop_grid(crops, rows):
    """The 25 rows as a 5 x 5 grid image, and the columns whose most likely grade is not the
    truth."""
    cell_w, cell_h, left, top = CROP_PX + 120, CROP_PX + 10, 56, 24
    grid = Image.new("RGB", (left + 5 * cell_w, top + 5 * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(SHORT_CONDITIONS):
        draw.text((left + c * cell_w, 4), name, fill="black", font=font(15))
    for v, name in enumerate(data.LEVEL_NAMES):
        draw.text((4, top + v * cell_h + CROP_PX // 2 - 8), name, fill="black", font=font(15))
    wrong = []
    for j, row in enumerate(rows):
        c, v = divmod(j, data.N_LEVELS)
        x, y = left + c * cell_w, top + v * cell_h
        if j in crops:
            centre = crops[j][crops[j].shape[0] // 2].clamp(0, 1).numpy() * 255
            image = Image.fromarray(centre.astype(np.uint8)).resize((CROP_PX, CROP_PX))
            grid.paste(image.convert("RGB"), (x, y))
        else:
            draw.rectangle([x, y, x + CROP_PX - 1, y + CROP_PX - 1], fill=(200, 200, 200))
            words = ("prior: " + row["note"]).split()
            text = "\n".join(" ".join(words[i:i + 2]) for i in range(0, len(words), 2))
            draw.multiline_text((x + 3, y + 3), text, fill="black", font=font(10))
        for k, p in enumerate(row["probabilities"]):
            line_y = y + 4 + k * 18
            draw.rectangle([x + CROP_PX + 4, line_y, x + CROP_PX + 4 + 50 * p, line_y + 13],
                           fill=GRADE_COLOURS[k])
            draw.text((x + CROP_PX + 58, line_y - 1), f"{'NMS'[k]} {p:.2f}", fill="black",
                      font=font(13))
        truth = row["truth"]
        if truth != data.MISSING:
            draw.text((x + CROP_PX + 4, y + 60), f"true {'NMS'[truth]}", fill="black",
                      font=font(13))
            if int(np.argmax(row["probabilities"])) != truth:
                draw.rectangle([x - 3, y - 3, x + cell_w - 8, y + CROP_PX + 3], outline=WRONG,
                               width=3)
                wrong.append(j)
    return grid, wrong

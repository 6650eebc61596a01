"""report.html: one self-contained page of an offline replay, images embedded, that opens offline.

First the summary table (summary.csv's columns) and the plots, then one row per evaluated frame: the frame,
and per evaluation point (full budget first) what the LLM read drawn on it (``engine.overlay``) with that
point's answers underneath; then one row per question over several images: each image's overlay and the
answer. The offline loop saves the frames and overlays as PNGs under ``images/`` while it runs
(``save_frame_images``, ``save_image_set_overlays``), so a resumed run's report still shows those of earlier runs.
"""
from __future__ import annotations

import base64
import html
import pathlib
import re

import numpy as np
from PIL import Image

from zip_vlm_ros.engine.overlay import draw_overlay
from zip_vlm_ros.replay.inputs import FULL_BUDGET
from zip_vlm_ros.replay.metrics import SUMMARY_COLUMNS

__all__ = ["HTML_REPORT_FILE", "IMAGES_DIR", "file_name_of", "image_path", "save_frame_images",
           "save_image_set_overlays", "write_html_report"]

HTML_REPORT_FILE = 'report.html'
IMAGES_DIR = 'images'
_STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; margin-bottom: 1em; }
td, th { border: 1px solid #bbb; padding: 4px; vertical-align: top; font-size: 13px; }
td img { max-width: 320px; display: block; }
.answers { max-width: 320px; white-space: pre-wrap; }
"""


def image_path(out_dir: pathlib.Path, topic: str, index: int, point: str = '', bag: str = '') -> pathlib.Path:
    """Where the frame (`point` empty) or its overlay at `point` is saved under --out (in a folder per
    bag when the frame has a bag label)."""
    name = re.sub(r'[^A-Za-z0-9]+', '_', topic).strip('_') + f'_{index}' + (
        '_' + re.sub(r'[^A-Za-z0-9]+', '_', point) if point else '')
    folder = out_dir / IMAGES_DIR
    return (folder / file_name_of(bag) if bag else folder) / f'{name}.png'


def file_name_of(label: str) -> str:
    """A bag label as a file or folder name (letters, digits, dots and dashes; the rest as _)."""
    return re.sub(r'[^A-Za-z0-9.-]+', '_', label).strip('_') or '_'


def save_frame_images(out_dir: pathlib.Path, frame, point: str, provenance) -> None:
    """Save `frame`'s image (once) and its overlay at `point` (when the family traces its tokens)."""
    frame_path = image_path(out_dir, frame.topic, frame.index, bag=frame.bag)
    frame_path.parent.mkdir(parents=True, exist_ok=True)
    if not frame_path.exists():
        Image.fromarray(frame.rgb).save(frame_path)
    if provenance is not None:
        Image.fromarray(draw_overlay(frame.rgb, provenance)).save(image_path(out_dir, frame.topic, frame.index, point,
                                                                              frame.bag))


def save_image_set_overlays(out_dir: pathlib.Path, anchor, group: list, point: str, output) -> list[str]:
    """Each image's overlay of a multi-image answer (`group`: its frames, in `output.images`' order), saved
    under the anchor frame's name and `point`; their paths relative to `out_dir`."""
    paths = []
    for number, (frame, image) in enumerate(zip(group, output.images)):
        if image.provenance is not None:
            path = image_path(out_dir, anchor.topic, anchor.index, f'{point} image{number}', anchor.bag)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(draw_overlay(frame.rgb, image.provenance)).save(path)
            paths.append(str(path.relative_to(out_dir)))
    return paths


def _embedded(path: pathlib.Path, alt: str) -> str:
    if not path.exists():
        return f'<p>({html.escape(alt)}: no image)</p>'
    data = base64.b64encode(path.read_bytes()).decode('ascii')
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _summary_table(summaries: list[dict]) -> list[str]:
    columns = [column for column in SUMMARY_COLUMNS if any(s.get(column) is not None for s in summaries)]
    lines = ['<table id="summary"><tr>' + ''.join(f'<th>{html.escape(c)}</th>' for c in columns) + '</tr>']
    for summary in summaries:
        cells = (summary.get(column) for column in columns)
        lines.append('<tr>' + ''.join(f'<td>{html.escape(_format(value))}</td>' for value in cells) + '</tr>')
    return lines + ['</table>']


def _format(value) -> str:
    if value is None:
        return ''
    if isinstance(value, (float, np.floating)):
        return f'{value:.4g}'
    return str(value)


def _frame_rows(out_dir: pathlib.Path, rows: list[dict], points: list[str]) -> list[str]:
    frames = sorted({(row.get('bag', ''), row['stamp_ns'], row['topic'], row['index']) for row in rows})
    lines = ['<table id="frames"><tr><th>frame</th>' + ''.join(f'<th>{html.escape(p)}</th>' for p in points)
             + '</tr>']
    for bag, stamp_ns, topic, index in frames:
        label = (f'{bag}: ' if bag else '') + f'{topic} frame {index} at {stamp_ns / 1e9:.3f} s'
        cells = [f'<td>{_embedded(image_path(out_dir, topic, index, bag=bag), label)}'
                 f'<p>{html.escape(label)}</p></td>']
        for point in points:
            answers = [row for row in rows
                       if (row.get('bag', ''), row['topic'], row['index'], row['budget']) == (bag, topic, index, point)]
            answers.sort(key=lambda row: row['kind'] != 'describe')
            text = '\n'.join(f'{row["prompt"]}\n-> {row["text"]}' for row in answers)
            tokens = f'{answers[0]["visual_tokens"]} visual tokens\n' if answers else ''
            cells.append(f'<td>{_embedded(image_path(out_dir, topic, index, point, bag), f"{label}, {point}")}'
                         f'<div class="answers">{html.escape(tokens + text)}</div></td>')
        lines.append('<tr class="frame">' + ''.join(cells) + '</tr>')
    return lines + ['</table>']


def _image_set_rows(out_dir: pathlib.Path, rows: list[dict]) -> list[str]:
    """One table row per answer over several images: what the LLM read of each image, then the answer."""
    if not rows:
        return []
    lines = ['<h2>Questions over several images</h2>', '<table id="image_sets"><tr><th>question</th>'
             '<th>images (overlays)</th><th>answer</th></tr>']
    for row in sorted(rows, key=lambda row: (row['stamp_ns'], row['topic'], row['prompt'], row['budget'] != FULL_BUDGET)):
        labels = [image['label'] for image in row.get('images', [])]
        images = ''.join(_embedded(out_dir / path, f'{row["prompt"]}, {row["budget"]}, {label}') + f'<p>{html.escape(label)}</p>'
                         for path, label in zip(row.get('overlay_images', []), labels))
        question = f'{row["prompt"]}\n{row["budget"]}, {row["visual_tokens"]} visual tokens'
        lines.append(f'<tr class="image-set"><td class="answers">{html.escape(question)}</td><td>{images}</td>'
                     f'<td class="answers">{html.escape(row["text"])}</td></tr>')
    return lines + ['</table>']


def write_html_report(out_dir: pathlib.Path, rows: list[dict], summaries: list[dict], plots: list[str], *,
                      images_dir: pathlib.Path | None = None) -> pathlib.Path:
    """report.html for the rows of results.jsonl (one table row per frame, then one per answer over several
    images); `plots` are PNG file names in `out_dir` embedded after the summary; the frames' PNGs are read
    from `images_dir` (the run's --out, where ``save_frame_images`` put them; default `out_dir`)."""
    frame_rows = [row for row in rows if row.get('kind') in ('describe', 'question') and 'index' in row]
    points = list(dict.fromkeys(row['budget'] for row in frame_rows))
    points.sort(key=lambda point: point != FULL_BUDGET)  # the reference first, the rest in run order
    body = ['<!DOCTYPE html>', '<html><head><meta charset="utf-8"><title>vlm_replay report</title>',
            f'<style>{_STYLE}</style></head><body>', '<h1>vlm_replay report</h1>', '<h2>Per budget</h2>']
    body += _summary_table(summaries)
    body += [_embedded(out_dir / plot, plot) for plot in plots]
    body += ['<h2>Per frame</h2>', '<p>Overlays: the frame dimmed; patches a kept visual token stands for at full '
             'brightness with a yellow outline; each merged group tinted in its own colour; the crop the vision '
             'tower saw outlined in cyan.</p>']
    body += _frame_rows(images_dir or out_dir, frame_rows, points)
    body += _image_set_rows(images_dir or out_dir, [row for row in rows if row.get('kind') == 'images'])
    body += ['</body></html>']
    path = out_dir / HTML_REPORT_FILE
    path.write_text('\n'.join(body) + '\n', encoding='utf-8')
    return path

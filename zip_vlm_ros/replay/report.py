"""The last step of a replay: summary.csv, report.md and the two plots, all derived from results.jsonl."""
from __future__ import annotations

import csv
import pathlib
import re
from collections import Counter

import numpy as np

from zip_vlm_ros.replay.bag import SkippedFrame
from zip_vlm_ros.replay.inputs import FULL_BUDGET, Label, point_budget, point_reducer
from zip_vlm_ros.replay.metrics import (LATENCY_FIELDS, MIN_SAMPLES_FOR_P95, SUMMARY_COLUMNS, frame_id, summarize,
                                        summarize_image_sets)
from zip_vlm_ros.replay.results import REPORT_FILE, RESULTS_FILE, SUMMARY_FILE

IMAGE_SETS_FILE = 'image_sets.csv'
LATENCY_PLOT = 'latency_vs_budget.png'
AGREEMENT_PLOT = 'agreement_vs_budget.png'


def write_summary_csv(summaries: list[dict], path: pathlib.Path) -> None:
    """summary.csv with full-precision numbers (empty cells for values that do not apply)."""
    with path.open('w', newline='', encoding='utf-8') as file:
        writer = csv.DictWriter(file, fieldnames=list(summaries[0]) if summaries else list(SUMMARY_COLUMNS))
        writer.writeheader()
        for summary in summaries:
            writer.writerow({key: '' if value is None else value for key, value in summary.items()})


def format_ms(value: float | None) -> str:
    return '—' if value is None else f'{value:.1f}'


def format_rate(value: float | None) -> str:
    return '—' if value is None else f'{value:.3f}'


def format_pair(p50: float | None, p95: float | None) -> str:
    return f'{format_ms(p50)} / {format_ms(p95)}'


def format_stamp(stamp_ns: int | None) -> str:
    return '—' if stamp_ns is None else f'{stamp_ns // 10**9}.{stamp_ns % 10**9:09d}'


def _counted(value: float | None, count: int) -> str:
    return '—' if value is None else f'{format_rate(value)} ({count})'


def _bleu(value: float | None) -> str:
    return '—' if value is None else f'{value:.1f}'


def budget_table(summaries: list[dict]) -> list[str]:
    """The per-budget markdown table of report.md: cost, and agreement with the full budget."""
    lines = [
        '| budget | visual tokens | reduction | frames | answers | vision ms p50 / p95 | prefill ms p50 / p95 '
        '| TTFT ms p50 / p95 | total ms p50 / p95 | reused-prefix total ms p50 | decode tok/s | KV MB / frame '
        '| exact match | token F1 | ROUGE-L | BLEU | keyword hits |',
        '|' + '---|' * 17,
    ]
    for s in summaries:
        visual = '—' if s['visual_tokens'] is None else f'{s["visual_tokens"]:g}'
        kv = '—' if s['kv_cache_bytes_per_frame'] is None else f'{s["kv_cache_bytes_per_frame"] / 1e6:.3f}'
        tokens_per_s = '—' if s['decode_tokens_per_s'] is None else f'{s["decode_tokens_per_s"]:.1f}'
        if s['budget'] == FULL_BUDGET:
            agreement = ['reference'] * 4
        else:
            agreement = [_counted(s['exact_match_rate'], s['agreement_pairs']), format_rate(s['token_f1_mean']),
                         format_rate(s['rouge_l_mean']), _bleu(s['bleu'])]
        latencies = [format_pair(s[f'{field}_p50'], s[f'{field}_p95']) for field in LATENCY_FIELDS]
        cells = [s['budget'], visual, s['reduction'] or '—', str(s['frames']), str(s['answers']), *latencies,
                 format_ms(s['reused_prefix_total_ms_p50']), tokens_per_s, kv, *agreement,
                 _counted(s['keyword_hit_rate'], s['keyword_answers'])]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def image_set_table(summaries: list[dict]) -> list[str]:
    """report.md's table of questions over several images, per question and budget."""
    lines = ['| question | budget | images | answers | visual tokens | vision ms p50 | TTFT ms p50 | total ms p50 '
             '| KV MB | exact match | token F1 | keyword hits |', '|' + '---|' * 12]
    for s in summaries:
        kv = '—' if s['kv_cache_bytes_mean'] is None else f'{s["kv_cache_bytes_mean"] / 1e6:.3f}'
        agreement = (['reference'] * 2 if s['budget'] == FULL_BUDGET else
                     [_counted(s['exact_match_rate'], s['agreement_pairs']), format_rate(s['token_f1_mean'])])
        cells = [_cell(s['question']), s['budget'], '—' if s['images'] is None else str(s['images']), str(s['answers']),
                 f'{s["visual_tokens"]:g}', format_ms(s['vision_ms_p50']), format_ms(s['ttft_ms_p50']),
                 format_ms(s['total_ms_p50']), kv, *agreement, _counted(s['keyword_hit_rate'], s['keyword_answers'])]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def label_table(summaries: list[dict]) -> list[str]:
    lines = ['| budget | labelled answers | exact match | token F1 | ROUGE-L | BLEU | keyword hits |',
             '|' + '---|' * 7]
    for s in summaries:
        lines.append(f'| {s["budget"]} | {s["label_pairs"]} | {format_rate(s["label_exact_match_rate"])} '
                     f'| {format_rate(s["label_token_f1_mean"])} | {format_rate(s["label_rouge_l_mean"])} '
                     f'| {_bleu(s["label_bleu"])} '
                     f'| {_counted(s["label_keyword_hit_rate"], s["label_keyword_answers"])} |')
    return lines


def live_table(summaries: list[dict]) -> list[str]:
    lines = ['| budget | rounds answered | requests | refused | timed out | service latency ms p50 / p95 '
             '| image age at answer ms p50 / p95 |', '|' + '---|' * 7]
    for s in summaries:
        lines.append(f'| {s["budget"]} | {s["rounds_answered"]}/{s["rounds"]} | {s["requests"]} | {s["refused"]} '
                     f'| {s["timed_out"]} | {format_pair(s["latency_ms_p50"], s["latency_ms_p95"])} '
                     f'| {format_pair(s["image_age_ms_p50"], s["image_age_ms_p95"])} |')
    return lines


def _series(summaries: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if s[key] is None else s[key] for s in summaries], dtype=float)


def plot_budgets(summaries: list[dict], out_dir: pathlib.Path) -> None:
    """latency_vs_budget.png and agreement_vs_budget.png (budgets on a categorical axis, in report order)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    labels = [s['budget'] if s['visual_tokens'] is None else f'{s["budget"]}\n({s["visual_tokens"]:g} tok)'
              for s in summaries]
    positions = np.arange(len(summaries))
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for field, name in zip(LATENCY_FIELDS, ('vision', 'prefill', 'time to first token', 'total')):
        line, = axes.plot(positions, _series(summaries, f'{field}_p50'), marker='o', label=f'{name} p50')
        axes.plot(positions, _series(summaries, f'{field}_p95'), marker='x', linestyle='--', color=line.get_color(),
                  alpha=0.6, label=f'{name} p95')
    if summaries and 'latency_ms_p50' in summaries[0]:
        axes.plot(positions, _series(summaries, 'latency_ms_p50'), marker='s', color='black',
                  label='service latency p50')
    _finish_axes(axes, positions, labels, 'ms (fresh frame)', 'Latency vs visual-token budget')
    figure.tight_layout()
    figure.savefig(out_dir / LATENCY_PLOT, dpi=100)
    plt.close(figure)

    if any(point_reducer(s['budget']) for s in summaries):
        plot_agreement_per_reducer(summaries, out_dir)
        return
    figure, axes = plt.subplots(figsize=(7, 4.2))
    curves = (('exact_match_rate', 'exact match vs full', 'o'), ('token_f1_mean', 'token F1 vs full', 's'),
              ('rouge_l_mean', 'ROUGE-L vs full', 'D'), ('keyword_hit_rate', 'keyword hit rate', '^'),
              ('label_token_f1_mean', 'token F1 vs labels', 'v'), ('label_rouge_l_mean', 'ROUGE-L vs labels', 'P'))
    drawn = 0
    for key, name, marker in curves:
        values = _series(summaries, key)
        if not np.all(np.isnan(values)):
            axes.plot(positions, values, marker=marker, label=name)
            drawn += 1
    _agreement_axes(axes, drawn, 'no full-budget reference, keywords or labels')
    _finish_axes(axes, positions, labels, 'rate', 'Agreement with the full budget and the labels')
    _write_figure(figure, out_dir / AGREEMENT_PLOT)


def plot_agreement_per_reducer(summaries: list[dict], out_dir: pathlib.Path) -> None:
    """agreement_vs_budget.png for vlm_replay --reducers: one line per reducer over the budgets (token F1 with
    the full-budget answer, solid; with the labels, dashed, when there are labels)."""
    import matplotlib.pyplot as plt

    budgets = list(dict.fromkeys(point_budget(s['budget']) for s in summaries if point_reducer(s['budget'])))
    positions = np.arange(len(budgets))
    figure, axes = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for reducer in dict.fromkeys(point_reducer(s['budget']) for s in summaries if point_reducer(s['budget'])):
        by_budget = {point_budget(s['budget']): s for s in summaries if point_reducer(s['budget']) == reducer}
        ordered = [by_budget.get(budget) for budget in budgets]
        for key, style, name in (('token_f1_mean', '-', 'token F1 vs full'),
                                 ('label_token_f1_mean', '--', 'token F1 vs labels')):
            values = np.array([np.nan if s is None or s[key] is None else s[key] for s in ordered], dtype=float)
            if not np.all(np.isnan(values)):
                axes.plot(positions, values, marker='o', linestyle=style, label=f'{reducer}: {name}')
                drawn += 1
    _agreement_axes(axes, drawn, 'no full-budget reference or labels')
    _finish_axes(axes, positions, budgets, 'token F1', 'Agreement vs budget, one line per reducer')
    _write_figure(figure, out_dir / AGREEMENT_PLOT)


def _agreement_axes(axes, drawn: int, missing: str) -> None:
    """The agreement axes' shared parts: a 0..1 rate scale, and a note instead of lines when none was drawn."""
    if not drawn:
        axes.text(0.5, 0.5, f'{missing}:\nadd "full" to --budgets', ha='center', va='center',
                  transform=axes.transAxes)
    axes.set_ylim(-0.05, 1.05)


def _write_figure(figure, path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _finish_axes(axes, positions, labels, ylabel: str, title: str) -> None:
    axes.set_xticks(positions, labels)
    axes.set_xlabel('token budget')
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7, ncol=2)


def write_report(out_dir: pathlib.Path, rows: list[dict], skipped: list[SkippedFrame], run: dict, *,
                 problems: list[str] = (), partial: list[str] = (), labels: list[Label] = ()) -> list[dict]:
    """Write summary.csv, report.md and the plots for all rows of results.jsonl; return the summaries.

    `partial` lists why the run did not cover the whole selection (interrupted, bag cut or unreadable).
    """
    live = run['mode'] == 'live'
    summaries = summarize(rows, run['budgets'], live=live, labels=labels, describe_prompt=run['describe_prompt'])
    write_summary_csv(summaries, out_dir / SUMMARY_FILE)
    plot_budgets(summaries, out_dir)
    lines = ['# vlm_replay report', '']
    if partial:
        lines += ['**Partial run:** ' + ' '.join(f'{reason.rstrip(".")}.' for reason in partial), '']
    lines += _run_lines(rows, skipped, run, problems)
    lines += ['', '## Per budget', ''] + budget_table(summaries) + ['', _reading_guide(run, summaries)]
    if labels:
        lines += ['', '## Against the labels', ''] + label_table(summaries) + [
            '', f'Each answer is compared with the human label for its frame and prompt ({len(labels)} labels). '
                'BLEU is sacrebleu corpus BLEU-4 (0-100); ROUGE-L is the mean F-measure (rouge-score).']
    image_sets = summarize_image_sets(rows, run['budgets'])
    if image_sets:
        write_summary_csv(image_sets, out_dir / IMAGE_SETS_FILE)
        lines += ['', '## Questions over several images', ''] + image_set_table(image_sets) + [
            '', f'One answer per selected frame of the question\'s first topic (paired with the other topics\' '
                f'frames stamped within {run.get("pair_tolerance_s", 0):g} s) or per selected frame of its history '
                f'topic (the frames before it). Budgets are per image: the answer reads images x budget visual '
                f'tokens. Agreement compares with the `full` answer on the same frames ({IMAGE_SETS_FILE}).']
    if live:
        lines += ['', '## Service calls', ''] + live_table(summaries) + [
            '', 'Rounds answered: rounds in which both calls of the budget (description and questions) got '
                'an answer. Service latency is measured by the caller from request to response. Image age is '
                'the bag time at the response minus the header stamp of the frame the answer is about.']
    lines += ['', f'![latency vs budget]({LATENCY_PLOT})', '', f'![agreement vs budget]({AGREEMENT_PLOT})']
    lines += _skipped_lines(skipped, several_bags=len(run.get('bags', {})) > 1)
    lines += _failure_lines(rows) + _example_lines(rows, summaries)
    (out_dir / REPORT_FILE).write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return summaries


def _run_lines(rows: list[dict], skipped: list[SkippedFrame], run: dict, problems: list[str]) -> list[str]:
    answered = [row for row in rows if row.get('status', 'ok') == 'ok']
    frames = {(row.get('bag', ''), row['topic'], row.get('index')) for row in answered}
    frames_per_topic = Counter(topic for _, topic, _ in frames)
    if run['mode'] == 'live':
        lines = [f'- mode: live, bag `{run["bag"]}` played at rate {run["rate"]:g} into node `{run["node_name"]}` '
                 f'(camera `{run["camera"] or "node default"}`), one round of requests every {run["ask_period_s"]:g} s '
                 f'of bag time; playback pauses during a round so every budget answers the same frame',
                 '- frames played: ' + (', '.join(f'{t}: {n}' for t, n in run['published'].items()) or 'none')
                 + '; received by the node: ' + (', '.join(f'{c}: {n}' for c, n in run['node_frames_received'].items())
                                                 or 'unknown'),
                 f'- rounds: {run["rounds"]}, every budget answered on the same frame in {run["same_frame_rounds"]}',
                 f'- model: `{run["model"]}` on {run["device"]} ({run["dtype"]}) with the node\'s settings, max new '
                 f'tokens {run["max_new_tokens"]}, greedy decoding']
    else:
        bags = run.get('bags', {})
        lines = [f'- mode: offline, bag `{run["bag"]}`' if len(bags) < 2 else
                 f'- mode: offline, {len(bags)} bags (per-bag reports in `bags/`): '
                 + ', '.join(f'`{label}` {sum(bag == label for bag, _, _ in frames)} frames' for label in bags),
                 f'- model: `{run["model"]}` on {run["device"]} ({run["dtype"]}), VisionZip dominant ratio '
                 f'{run["dominant_ratio"]:.4g}, max new tokens {run["max_new_tokens"]}, greedy decoding']
    questions = run['questions']
    lines += [
        '- frames evaluated: ' + (', '.join(f'{t}: {n}' for t, n in sorted(frames_per_topic.items())) or 'none'),
        f'- prompts: description `{run["describe_prompt"]}` and {len(questions)} question(s)'
        + (f', {sum(bool(q["expect"]) for q in questions)} with expected keywords' if questions else ''),
        f'- answers: {len(answered)} in `{RESULTS_FILE}`'
        + (f' ({len({row["request"] for row in rows if row["status"] != "ok"})} requests failed)'
           if run['mode'] == 'live' else ''),
        f'- skipped frames: {len(skipped)}' + (' (listed below)' if skipped else ''),
    ]
    return lines + [f'- note: {note}' for note in run.get('bag_notes', [])] + [f'- problem: {p}' for p in problems]


def _reading_guide(run: dict, summaries: list[dict]) -> str:
    reference = next((s for s in summaries if s['budget'] == FULL_BUDGET), None)
    if reference is None:
        agreement = ('There is no agreement reference: add "full" to --budgets to compare each budget with the '
                     'unreduced model.')
    else:
        tokens = '' if reference['visual_tokens'] is None else f' ({reference["visual_tokens"]:g} visual tokens)'
        agreement = (f'The agreement reference is the `full` budget{tokens}: exact match, token F1, ROUGE-L and BLEU '
                     f'compare each answer with the full-budget answer to the same prompt on the same frame '
                     f'(number of pairs in brackets).')
    few = [s['budget'] for s in summaries if 0 < s['fresh_answers'] < MIN_SAMPLES_FOR_P95]
    warning = (f' **Warning:** budget(s) {", ".join(few)} have fewer than {MIN_SAMPLES_FOR_P95} fresh answers, so '
               f'their p95 is the maximum or next to it, not a tail estimate: evaluate more frames.') if few else ''
    return ('Latency columns are over fresh answers: the scene description of each frame and budget, which '
            'computed the image prefix (vision encoder, VisionZip, prefill). Later prompts on the same frame reuse '
            'that prefix (`reused-prefix total`). Decode tok/s counts tokens after the first. ' + agreement
            + ' Keyword hits count answers containing an expected keyword (answers with keywords in brackets).'
            + warning)


def _skipped_lines(skipped: list[SkippedFrame], *, several_bags: bool) -> list[str]:
    if not skipped:
        return []
    lines = ['', '## Skipped frames', '', '| topic | index | stamp | reason |', '|---|---|---|---|']
    return lines + [f'| {f"{frame.bag}: " if several_bags else ""}{frame.topic or "—"} '
                    f'| {"—" if frame.index is None else frame.index} '
                    f'| {format_stamp(frame.stamp_ns)} | {_cell(frame.reason)} |' for frame in skipped]


def _failure_lines(rows: list[dict]) -> list[str]:
    failed = {row['request']: row for row in rows if row.get('status', 'ok') != 'ok'}.values()
    # One row per cause: numbers in a message (a frame's age, a queue depth) vary call by call.
    failures = Counter((row['status'], _message_kind(row.get('message', ''))) for row in failed)
    if not failures:
        return []
    lines = ['', '## Failed requests', '', '| status | requests | message (numbers shown as #) |', '|---|---|---|']
    return lines + [f'| {status} | {count} | {_cell(message)} |' for (status, message), count in failures.most_common()]


def _message_kind(message: str) -> str:
    return re.sub(r'\d+(\.\d+)?', '#', message)


def _example_lines(rows: list[dict], summaries: list[dict]) -> list[str]:
    answered = [row for row in rows if row.get('status', 'ok') == 'ok']
    if not answered:
        return []
    first = min(answered, key=lambda row: (row['stamp_ns'], row.get('bag', ''), row['topic'], row.get('index') or 0))
    example = [row for row in answered if frame_id(row) == frame_id(first)]
    order = {s['budget']: position for position, s in enumerate(summaries)}
    example.sort(key=lambda row: (row['kind'] != 'describe', row['prompt'], order.get(row['budget'], 0)))
    lines = ['', f'## Example answers ({first["topic"]} frame {first.get("index")} at '
                 f'{format_stamp(first["stamp_ns"])})', '', '| prompt | budget | answer |', '|---|---|---|']
    return lines + [f'| {_cell(row["prompt"])} | {row["budget"]} | {_cell(row["text"])} |' for row in example]


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (one line, no pipes, control characters shown as U+FFFD)."""
    printable = ''.join(char if char.isprintable() or char.isspace() else '\ufffd' for char in text)
    return ' '.join(printable.split()).replace('|', '\\|') or '(empty)'

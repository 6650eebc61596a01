"""Numbers per budget from results.jsonl rows: latency percentiles, agreement with the full budget, and
scores against human labels (exact match, token F1, ROUGE-L, BLEU, keyword hits).

ROUGE-L is Google's ``rouge-score`` (F-measure of the longest common subsequence) and BLEU is
``sacrebleu``'s corpus BLEU-4 (0-100), the two text metrics driving VQA benchmarks such as DriveLM
report.
"""
from __future__ import annotations

import functools
import re
from collections import Counter
from typing import Any, Iterable

import numpy as np

from zip_vlm_ros.replay.inputs import FULL_BUDGET, Label

# Fewer latency samples than this make p95 (linear interpolation) the maximum or next to it.
MIN_SAMPLES_FOR_P95 = 20

# summary.csv columns, in order. Latency percentiles are over "fresh" answers: the scene description
# that computed the frame's image prefix (one per frame and budget), i.e. what a new frame costs.
LATENCY_FIELDS = ('vision_ms', 'prefill_ms', 'ttft_ms', 'total_ms')
TEXT_SCORES = ('exact_match_rate', 'token_f1_mean', 'rouge_l_mean', 'bleu')
SUMMARY_COLUMNS = (
    ('budget', 'reducer', 'token_budget', 'reduction', 'visual_tokens', 'visual_tokens_full', 'frames', 'answers',
     'fresh_answers')
    + tuple(f'{field}_{q}' for field in LATENCY_FIELDS for q in ('p50', 'p95'))
    + ('reused_prefix_answers', 'reused_prefix_total_ms_p50', 'decode_tokens_per_s', 'kv_cache_bytes_per_frame',
       'agreement_pairs') + TEXT_SCORES + ('keyword_answers', 'keyword_hit_rate', 'label_pairs')
    + tuple(f'label_{score}' for score in TEXT_SCORES) + ('label_keyword_answers', 'label_keyword_hit_rate')
)
# Rows of questions over several images (replay.image_set_questions): summarized on their own, per
# question and budget, because their visual tokens and costs are those of several frames.
IMAGE_SET_KIND = 'images'
IMAGE_SET_COLUMNS = ('question', 'budget', 'images', 'answers', 'visual_tokens', 'vision_ms_p50', 'ttft_ms_p50',
                     'total_ms_p50', 'kv_cache_bytes_mean', 'agreement_pairs', 'exact_match_rate', 'token_f1_mean',
                     'keyword_answers', 'keyword_hit_rate')
LIVE_COLUMNS = ('rounds', 'rounds_answered', 'requests', 'refused', 'timed_out', 'latency_ms_p50', 'latency_ms_p95',
                'image_age_ms_p50', 'image_age_ms_p95')


def answer_tokens(text: str) -> list[str]:
    """Lower-case word tokens of an answer; punctuation and spacing do not count as disagreement."""
    return re.findall(r'\w+', text.lower())


def exact_match(answer: str, reference: str) -> bool:
    return answer_tokens(answer) == answer_tokens(reference)


def token_f1(answer: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (multiset overlap), as in SQuAD. Two empty answers agree."""
    answer_words, reference_words = answer_tokens(answer), answer_tokens(reference)
    if not answer_words or not reference_words:
        return float(answer_words == reference_words)
    overlap = sum((Counter(answer_words) & Counter(reference_words)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(answer_words), overlap / len(reference_words)
    return 2 * precision * recall / (precision + recall)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score, no stemming) of an answer against one reference."""
    return _rouge_l_scorer().score(reference, answer)['rougeL'].fmeasure


@functools.cache
def _rouge_l_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(['rougeL'])


def corpus_bleu(pairs: list[tuple[str, str]]) -> float | None:
    """sacrebleu corpus BLEU-4 (0-100) of (answer, reference) pairs; None without pairs."""
    import sacrebleu

    if not pairs:
        return None
    answers, references = zip(*pairs)
    return float(sacrebleu.corpus_bleu(list(answers), [list(references)]).score)


def keyword_hit(answer: str, expect: Iterable[str]) -> bool:
    """True when any expected keyword (a word or phrase) occurs in the answer as whole words."""
    words = answer_tokens(answer)
    for keyword in expect:
        wanted = answer_tokens(keyword)
        if wanted and any(words[i:i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1)):
            return True
    return False


def percentile(values: list[float | None], q: float) -> float | None:
    """numpy's linear-interpolation percentile of the values that are not None; None when there are none."""
    known = [value for value in values if value is not None]
    return float(np.percentile(np.asarray(known, dtype=np.float64), q)) if known else None


def text_scores(pairs: list[tuple[str, str]]) -> dict[str, float | None]:
    """Exact match, token F1, ROUGE-L (means) and corpus BLEU of (answer, reference) pairs."""
    return {
        'exact_match_rate': _mean_or_none([float(exact_match(a, b)) for a, b in pairs]),
        'token_f1_mean': _mean_or_none([token_f1(a, b) for a, b in pairs]),
        'rouge_l_mean': _mean_or_none([rouge_l(a, b) for a, b in pairs]),
        'bleu': corpus_bleu(pairs),
    }


def is_fresh(row: dict) -> bool:
    """The answer that computed its frame's image prefix: the description, first on every frame.

    A resumed run may compute a prefix for a later question (its frame was cut mid-batch); that
    question's time is not what a new frame costs, so only descriptions count.
    """
    return row['kind'] == 'describe' and not row['prefix_reused']


def frame_id(row: dict) -> tuple:
    return row.get('bag', ''), row['topic'], row.get('index')


def summarize(rows: list[dict], budgets: list[str], *, live: bool = False, labels: list[Label] = (),
              describe_prompt: str = '') -> list[dict]:
    """One summary dict per budget (SUMMARY_COLUMNS, plus LIVE_COLUMNS in live mode), in `budgets` order.

    Rows with a "status" other than "ok" (live mode) count only as refused or timed out.
    """
    answered = [row for row in rows if row.get('status', 'ok') == 'ok' and row.get('kind') != IMAGE_SET_KIND]
    rows = [row for row in rows if row.get('kind') != IMAGE_SET_KIND]
    reference = {frame_id(row) + (row['prompt'],): row['text'] for row in answered if row['budget'] == FULL_BUDGET}
    summaries = []
    for budget in budgets:
        budget_rows = [row for row in answered if row['budget'] == budget]
        summary = _cost_summary(budget, budget_rows)
        pairs = [(row['text'], reference[frame_id(row) + (row['prompt'],)]) for row in budget_rows
                 if frame_id(row) + (row['prompt'],) in reference]
        keyword_rows = [row for row in budget_rows if row.get('expect')]
        summary.update(text_scores(pairs), agreement_pairs=len(pairs), keyword_answers=len(keyword_rows),
                       keyword_hit_rate=_mean_or_none([float(keyword_hit(row['text'], row['expect']))
                                                       for row in keyword_rows]))
        summary.update(label_summary(budget_rows, labels, describe_prompt))
        if live:
            summary.update(live_summary([row for row in rows if row['budget'] == budget], budget_rows))
        columns = SUMMARY_COLUMNS + (LIVE_COLUMNS if live else ())
        summaries.append({column: summary[column] for column in columns})
    return summaries


def summarize_image_sets(rows: list[dict], budgets: list[str]) -> list[dict]:
    """IMAGE_SET_COLUMNS per question over several images and budget (agreement: with its `full` answer)."""
    image_rows = [row for row in rows if row.get('kind') == IMAGE_SET_KIND]
    reference = {frame_id(row) + (row['prompt'],): row['text'] for row in image_rows if row['budget'] == FULL_BUDGET}
    summaries = []
    for prompt in dict.fromkeys(row['prompt'] for row in image_rows):
        for budget in budgets:
            selected = [row for row in image_rows if row['prompt'] == prompt and row['budget'] == budget]
            if not selected:
                continue
            pairs = [(row['text'], reference[frame_id(row) + (prompt,)]) for row in selected
                     if frame_id(row) + (prompt,) in reference]
            keyword_rows = [row for row in selected if row.get('expect')]
            summaries.append({
                'question': prompt, 'budget': budget, 'images': _common(len(row['images']) for row in selected),
                'answers': len(selected), 'visual_tokens': _mean_or_none([row['visual_tokens'] for row in selected]),
                **{f'{field}_p50': percentile([row[field] for row in selected], 50)
                   for field in ('vision_ms', 'ttft_ms', 'total_ms')},
                'kv_cache_bytes_mean': _mean_or_none([row['kv_cache_bytes'] for row in selected]),
                'agreement_pairs': len(pairs),
                'exact_match_rate': _mean_or_none([float(exact_match(a, b)) for a, b in pairs]),
                'token_f1_mean': _mean_or_none([token_f1(a, b) for a, b in pairs]),
                'keyword_answers': len(keyword_rows),
                'keyword_hit_rate': _mean_or_none([float(keyword_hit(row['text'], row['expect']))
                                                   for row in keyword_rows]),
            })
    return summaries


def _cost_summary(budget: str, budget_rows: list[dict]) -> dict[str, Any]:
    """Token counts, frames, latency percentiles, decode speed and KV-cache size of one budget."""
    fresh = [row for row in budget_rows if is_fresh(row)]
    reused = [row for row in budget_rows if row['prefix_reused']]
    kv_per_frame: dict[tuple, int] = {}
    for row in budget_rows:
        kv_per_frame.setdefault(frame_id(row), row['kv_cache_bytes'])
    decode_tokens = sum(max(row['generated_tokens'] - 1, 0) for row in budget_rows)
    decode_s = sum(row['decode_ms'] for row in budget_rows) / 1000
    summary = {
        'budget': budget,
        'reducer': _common(row.get('reducer') for row in budget_rows),
        'token_budget': _common(row['token_budget'] for row in budget_rows),
        'reduction': _common(row['reduction'] for row in budget_rows),
        'visual_tokens': _mean_or_none([row['visual_tokens'] for row in budget_rows]),
        'visual_tokens_full': _common(row['visual_tokens_full'] for row in budget_rows),
        'frames': len(kv_per_frame), 'answers': len(budget_rows), 'fresh_answers': len(fresh),
        'reused_prefix_answers': len(reused),
        'reused_prefix_total_ms_p50': percentile([row['total_ms'] for row in reused], 50),
        'decode_tokens_per_s': decode_tokens / decode_s if decode_s > 0 else None,
        'kv_cache_bytes_per_frame': _mean_or_none(list(kv_per_frame.values())),
    }
    for field in LATENCY_FIELDS:
        values = [row[field] for row in fresh]
        summary[f'{field}_p50'] = percentile(values, 50)
        summary[f'{field}_p95'] = percentile(values, 95)
    return summary


def label_summary(budget_rows: list[dict], labels: list[Label], describe_prompt: str) -> dict[str, Any]:
    """Scores of one budget's answers against the human labels that name their frame and prompt."""
    answer_pairs, keyword_hits = [], []
    for row in budget_rows:
        for label in labels:
            if label.matches(row, describe_prompt):
                if label.answer is not None:
                    answer_pairs.append((row['text'], label.answer))
                if label.keywords:
                    keyword_hits.append(float(keyword_hit(row['text'], label.keywords)))
    scores = {f'label_{name}': value for name, value in text_scores(answer_pairs).items()}
    return dict(scores, label_pairs=len(answer_pairs), label_keyword_answers=len(keyword_hits),
                label_keyword_hit_rate=_mean_or_none(keyword_hits))


def live_summary(all_rows: list[dict], answered_rows: list[dict]) -> dict[str, Any]:
    """Rounds answered, refusals, timeouts, service latency and image age of one budget in live mode.

    One entry per service call: an AskMany call carries several answers but one latency.
    """
    status_of = {row['request']: row['status'] for row in all_rows}
    latency_of = {row['request']: row['latency_ms'] for row in answered_rows}
    rounds = {row['round'] for row in all_rows}
    failed_rounds = {row['round'] for row in all_rows if row['status'] != 'ok'}
    return {
        'rounds': len(rounds), 'rounds_answered': len(rounds - failed_rounds), 'requests': len(status_of),
        'refused': sum(status == 'refused' for status in status_of.values()),
        'timed_out': sum(status == 'timeout' for status in status_of.values()),
        'latency_ms_p50': percentile(list(latency_of.values()), 50),
        'latency_ms_p95': percentile(list(latency_of.values()), 95),
        'image_age_ms_p50': percentile([row['image_age_ms'] for row in answered_rows], 50),
        'image_age_ms_p95': percentile([row['image_age_ms'] for row in answered_rows], 95),
    }


def _mean_or_none(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return float(np.mean(known)) if known else None


def _common(values: Iterable[Any]) -> Any:
    """The value all rows share, or None when they differ or there are none."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None

"""Few-shot prompts as LLM Foundry builds them (the evaluator DCLM uses), and the shots DCLM core gives each task.

A prompt is the demonstrations and the scored context joined with `example_delimiter` ("\\n", LLM Foundry's default):
each demonstration is context + continuation delimiter + gold continuation. The demonstrations of an item are drawn
from the same split or file without replacement, never the item itself. Departure from LLM Foundry: it advances
one shared `random.Random(1234)` over the whole file in order, so an item's shots depend on every item before it;
here each item has its own generator seeded by (seed, row), so the shots of an item do not depend on which subset
of the split is scored and a larger subset keeps the prompts of a smaller one.

Plain Python/numpy: no Dagster, no torch (`evaluation` and `icl_tasks` both build on it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from groupmates_assets.lib.evaluation import MCExample

EXAMPLE_DELIMITER = "\n"  # LLM Foundry's default example_delimiter
CONTINUATION_DELIMITER = " "  # LLM Foundry's default continuation_delimiter (its ICL task files)
DCLM = "dclm"  # evaluation.num_fewshot value: the per-task counts below

# Shots per task in DCLM's evaluation (mlfoundations/dclm, eval/heavy.yaml and eval/mmlu_and_lowvar.yaml, the
# LLM Foundry `icl_tasks` lists its core and extended scores come from): arc_easy, arc_challenge, piqa,
# hellaswag, boolq and siqa `num_fewshot: [10]`; copa, openbook_qa and winogrande `[0]`. SciQ is not in DCLM's
# lists and stays zero-shot.
DCLM_NUM_FEWSHOT: dict[str, int] = {
    "arc_easy": 10, "arc_challenge": 10, "piqa": 10, "hellaswag": 10, "boolq": 10, "social_iqa": 10,
    "copa": 0, "openbookqa": 0, "winogrande": 0, "sciq": 0,
}


def shots_for(setting: int | str, task: str) -> int:
    """Shots for a built-in task under `evaluation.num_fewshot`: "dclm" (DCLM's count, 0 for tasks it does not run)
    or one count for every task."""
    if setting == DCLM:
        return DCLM_NUM_FEWSHOT.get(task, 0)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(f"num_fewshot must be {DCLM!r} or a whole number >= 0, got {setting!r}")
    return setting


def shot_candidates(n_rows: int, row: int, seed: int) -> list[int]:
    """Every row except `row`, in the order item `row` draws its shots from (its own seeded generator)."""
    order = np.random.default_rng([seed, row]).permutation(n_rows).tolist()
    return [r for r in order if r != row]


def draw_shots(n_rows: int, row: int, k: int, seed: int, usable: Callable[[int], bool] = lambda _: True) -> list[int]:
    """Up to `k` rows other than `row` for which `usable` holds, drawn without replacement (fewer if the split
    has fewer; LLM Foundry also caps at the rows available)."""
    if k <= 0:
        return []
    chosen: list[int] = []
    for candidate in shot_candidates(n_rows, row, seed):
        if usable(candidate):
            chosen.append(candidate)
            if len(chosen) == k:
                break
    return chosen


def demonstration(example: MCExample) -> str:
    """An item as a solved demonstration: its gold context followed by its gold continuation."""
    context, continuation = example.requests()[example.gold]
    return context + continuation


def prompt(demonstrations: Sequence[str], context: str, delimiter: str = EXAMPLE_DELIMITER) -> str:
    """The demonstrations, then the scored context, joined by the example delimiter (no delimiter when zero-shot)."""
    return delimiter.join([*demonstrations, context])


def with_fewshot(example: MCExample, demonstrations: Sequence[str], delimiter: str = EXAMPLE_DELIMITER) -> MCExample:
    """The example with the demonstrations in front of every context it scores (choices are unchanged)."""
    if not demonstrations:
        return example
    contexts = None
    if example.choice_contexts is not None:
        contexts = tuple(prompt(demonstrations, c, delimiter) for c in example.choice_contexts)
    return dataclasses.replace(example, context=prompt(demonstrations, example.context, delimiter),
                               choice_contexts=contexts)


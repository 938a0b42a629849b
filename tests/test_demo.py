"""The demo's pure parts: where its recall part cuts the document, and how it scores a continuation."""

from __future__ import annotations

import torch

from memorizing_experiments.demo import definition_cuts, matched

TEXT = '''import os


def first(a, b):
    """Documented."""
    return a


def undocumented(x):
    return x


class Holder:
    def method(self):
        """Indented: not a top-level function."""


def second(y,
           z):
    """Documented, signature on two lines."""


def third(
    y,
    z,
):
    """Signature on four lines: beyond what the pattern looks at."""
'''


def char_offsets(text: str) -> list[tuple[int, int]]:
    """One token per character."""
    return [(i, i + 1) for i in range(len(text))]


def test_cuts_fall_just_past_the_parenthesis_of_documented_top_level_functions():
    cuts = definition_cuts(TEXT, char_offsets(TEXT), 0, len(TEXT))
    assert [TEXT[:cut].rsplit("def ", 1)[-1] for cut in cuts] == ["first(", "second("]


def test_cuts_outside_the_token_range_are_left_out():
    everything = definition_cuts(TEXT, char_offsets(TEXT), 0, len(TEXT))
    assert definition_cuts(TEXT, char_offsets(TEXT), everything[0] + 1, len(TEXT)) == everything[1:]
    assert definition_cuts(TEXT, char_offsets(TEXT), 0, everything[1] - 1) == everything[:1]


def test_a_dropped_token_costs_one_token_in_order_and_every_later_one_by_position() -> None:
    truth = torch.arange(10, 58)
    dropped = torch.cat([truth[:6], truth[7:], torch.tensor([99])])  # the real text without its 7th token
    assert matched(dropped, truth) == (6, 47)
    assert matched(truth, truth) == (48, 48)
    assert matched(torch.full((48,), 5), truth) == (0, 0)
    assert matched(truth[:20], truth) == (20, 20)  # a continuation that stopped early

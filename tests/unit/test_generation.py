"""Sampling against hand-computed references; stop strings and streaming; settings."""


import pytest
import torch

from phase7fw.components.tokenizers import BytesTokenizer
from phase7fw.errors import Phase7Error
from phase7fw.inference.generation import (
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k_top_p,
    generate_text,
    sample_next,
)

NEG = float("-inf")


def test_repetition_penalty_handles_both_signs():
    logits = torch.tensor([[2.0, -2.0, 1.0, -0.5]])
    seen = torch.tensor([[0, 1, 1]])  # repeats are fine
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -0.5]]  # 2 / 2, -2 * 2, untouched, untouched
    assert logits.tolist() == [[2.0, -2.0, 1.0, -0.5]]  # not modified in place
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_penalty_can_change_the_greedy_choice_even_for_negative_logits():
    logits = torch.tensor([[-1.0, -1.5]])
    seen = torch.tensor([[0]])
    # Dividing a negative logit would *raise* it (-1 / 2 = -0.5); multiplying lowers it to -2.
    assert int(sample_next(logits, temperature=0, top_k=None, top_p=None, repetition_penalty=2.0, seen=seen,
                           generator=None)) == 1


def test_top_k_and_top_p_against_hand_computed_sets():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_top_k_top_p(logits, 2, None)).tolist() == [[False, False, True, True]]
    keep = lambda p: (~torch.isinf(filter_top_k_top_p(logits, None, p))).tolist()[0]  # noqa: E731
    assert keep(0.5) == [True, False, False, False]  # 0.5 already reaches 0.5
    assert keep(0.7) == [True, True, False, False]
    assert keep(0.81) == [True, True, True, False]  # 0.5 + 0.3 = 0.8 < 0.81
    assert keep(0.01) == [True, False, False, False]  # the most likely token always stays
    assert keep(1.0) == [True] * 4
    assert keep(None) == [True] * 4
    both = filter_top_k_top_p(logits, 3, 0.7)
    assert (~torch.isinf(both)).tolist() == [[True, True, False, False]]


def test_sampled_frequencies_match_the_renormalized_distribution():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    logits = (2.0 * torch.log(probs)).expand(40000, 4)  # temperature 2 undoes the factor 2
    g = torch.Generator().manual_seed(0)
    tokens = sample_next(logits, temperature=2.0, top_k=None, top_p=0.84, repetition_penalty=1.0,
                         seen=torch.zeros(40000, 0, dtype=torch.long), generator=g)
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    expected = torch.tensor([0.6, 0.25, 0.0, 0.0]) / 0.85  # 0.6 + 0.25 passes 0.84: the rest is cut
    assert torch.allclose(freq, expected, atol=0.01)
    top1 = sample_next(logits[:100], temperature=5.0, top_k=1, top_p=None, repetition_penalty=1.0,
                       seen=torch.zeros(100, 0, dtype=torch.long), generator=g)
    assert (top1 == 0).all()


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(1, 50)
    draw = lambda: [int(sample_next(logits, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,  # noqa
                                    seen=torch.zeros(1, 0, dtype=torch.long),
                                    generator=torch.Generator().manual_seed(7))) for _ in range(5)]
    assert draw() == draw()


def test_sampling_params_validation_and_set():
    with pytest.raises(Phase7Error, match="temperature must be >= 0"):
        SamplingParams(temperature=-1).checked()
    with pytest.raises(Phase7Error, match="top_p must be in"):
        SamplingParams(top_p=1.5).checked()
    with pytest.raises(Phase7Error, match="repetition_penalty must be > 0"):
        SamplingParams(repetition_penalty=-1.2).checked()
    p = SamplingParams().with_setting("temperature", "0.7").with_setting("top-k", "40")
    assert p.temperature == 0.7 and p.top_k == 40
    assert p.with_setting("top_k", "none").top_k is None
    with pytest.raises(Phase7Error, match="top_k expects an integer"):
        p.with_setting("top_k", "many")
    with pytest.raises(Phase7Error, match="unknown setting 'warmth'"):
        p.with_setting("warmth", "1")


# ----------------------------------------------------------------------------- text loop
class Scripted:
    """A decoder stand-in whose model always predicts the next token of a script."""

    device = torch.device("cpu")

    def __init__(self, script: list[int]):
        self.script, self.ids = script, [256]

    def logits(self):
        n = len(self.ids) - 1
        out = torch.full((1, 257), -10.0)
        out[0, self.script[n] if n < len(self.script) else 256] = 10.0
        return out

    def visible(self):
        return self.ids

    def extend(self, tokens):
        self.ids += list(tokens)


def run(text: str, stop=None, max_new_tokens=100):
    pieces = []
    out = generate_text(Scripted(list(text.encode())), BytesTokenizer(), SamplingParams(max_new_tokens, 0.0),
                        stop=stop, on_text=pieces.append)
    return out, pieces


def test_stop_strings_cut_and_are_never_streamed():
    out, pieces = run("hello\nUser: more", stop="\nUser:")
    assert out == "hello" and "".join(pieces) == "hello"
    assert all("\n" not in p for p in pieces)
    out, pieces = run("abcSTOPdef", stop=["XYZ", "STOP"])
    assert out == "abc" and "".join(pieces) == "abc"
    out, _ = run("no stop here", stop=["zz"])
    assert out == "no stop here"  # ends at the script's EOS


def test_streaming_never_splits_a_utf8_character_and_respects_max_tokens():
    out, pieces = run("h\u00e9llo \u2603!")
    assert out == "h\u00e9llo \u2603!" and "".join(pieces) == out
    assert all("\ufffd" not in p for p in pieces)
    out, _ = run("abcdef", max_new_tokens=3)
    assert out == "abc"

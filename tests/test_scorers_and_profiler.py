import numpy as np
import pytest
import torch

from baklava.profiles import calibration as calib
from baklava.profiles.head_scores import HeadScores
from baklava.profiles.profiler import profile_model, repeat_half
from baklava.profiles.scorers import SCORERS, CosineScorer, EntropyScorer, RetrievalScorer

S, D = 12, 8


def attention_case(weights):
    values = torch.randn(1, 1, S, D, generator=torch.Generator().manual_seed(0))
    return dict(query=values, values=values, weights=weights, output=weights @ values)


def test_cosine_zero_for_a_head_that_only_reads_itself():
    scores = CosineScorer(skip_first=0).score(**attention_case(torch.eye(S)[None, None]))
    assert scores.shape == (1, 1, S)
    torch.testing.assert_close(scores, torch.zeros(1, 1, S), atol=1e-6, rtol=0)


def test_cosine_positive_for_a_head_that_reads_elsewhere():
    shift = torch.zeros(S, S)
    shift[0, 0] = 1
    shift[torch.arange(1, S), torch.arange(S - 1)] = 1  # every token reads its predecessor
    scores = CosineScorer(skip_first=1).score(**attention_case(shift[None, None]))
    assert scores.shape == (1, 1, S - 1)
    assert scores.mean() > 0.5


def test_entropy_zero_when_focused_one_when_uniform():
    causal_uniform = torch.tril(torch.ones(S, S))
    causal_uniform /= causal_uniform.sum(-1, keepdim=True)
    ent = EntropyScorer(skip_first=0)
    torch.testing.assert_close(ent.score(**attention_case(torch.eye(S)[None, None])), torch.zeros(1, 1, S))
    uniform = ent.score(**attention_case(causal_uniform[None, None]))
    torch.testing.assert_close(uniform[..., 1:], torch.ones(1, 1, S - 1), atol=1e-5, rtol=0)


def test_retrieval_scores_the_copy_source_only():
    m = S // 2  # the second copy starts at m; its token t came first at t, the next one at t + 1
    induction = torch.eye(S)  # reads itself ...
    induction[m:-1] = 0
    induction[torch.arange(m, S - 1), torch.arange(1, m)] = 1  # ... except the copy source
    previous = torch.zeros(S, S)
    previous[0, 0] = 1
    previous[torch.arange(1, S), torch.arange(S - 1)] = 1  # previous-token head: not a copier
    weights = torch.stack([induction, previous, torch.eye(S)])[None]  # [1, 3, S, S]
    case = attention_case(weights[:, :1]) | {"weights": weights}
    scores = RetrievalScorer().score(**case)
    assert scores.shape == (1, 3, m - 1)
    torch.testing.assert_close(scores[0, 0], torch.ones(m - 1))
    torch.testing.assert_close(scores[0, 1:], torch.zeros(2, m - 1))
    with pytest.raises(ValueError, match="repeated twice"):
        RetrievalScorer().score(**(case | {"weights": weights[..., :-1, :-1]}))


def test_repeat_half():
    assert repeat_half(torch.arange(7)).tolist() == [0, 1, 2, 0, 1, 2]


class _Tok:
    """Whitespace 'tokenizer' over a fixed vocabulary, enough for calibration.build."""

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        ids = [3 + sum(map(ord, w)) % 90 for w in text.split()]
        return {"input_ids": torch.tensor([ids])}


def test_profile_tiny_model_shapes_and_gqa_reduction(tiny_llama):
    cal = calib.build(
        _Tok(), calib.default_text(), "pydoc", num_samples=2, seq_len=64, num_heldout=1, heldout_len=80
    )
    scores = profile_model(tiny_llama, cal, method="cosine", skip_first=4, progress=False)
    assert isinstance(scores, HeadScores)
    assert scores.kv_head.shape == (2, 2) and scores.layer.shape == (2,)
    assert np.isfinite(scores.kv_head).all() and (scores.kv_head > 0).all()
    assert (scores.layer > 0).all()
    raw = scores.raw["scorers"]
    assert set(raw) == set(SCORERS)
    q = np.array(raw["cosine"]["q_head_mean"])  # [L, H_q=4] -> KV heads own query heads (0,1), (2,3)
    np.testing.assert_allclose(scores.kv_head, q.reshape(2, 2, 2).mean(-1), atol=1e-5)
    assert raw["cosine"]["tokens_per_head"] == 2 * (64 - 4)
    assert raw["retrieval"]["tokens_per_head"] == 2 * (32 - 1)  # the repeated pass's second copies
    retrieval = profile_model(tiny_llama, cal, method="retrieval", skip_first=4, progress=False)
    q = np.array(retrieval.raw["scorers"]["retrieval"]["q_head_mean"])
    np.testing.assert_allclose(retrieval.kv_head, q.reshape(2, 2, 2).max(-1), atol=1e-5)  # GQA: max
    np.testing.assert_allclose(retrieval.layer, scores.layer)  # the layer proxy reads the plain pass
    assert tiny_llama.config._attn_implementation != "baklava_profile"  # restored afterwards


def test_profile_is_deterministic(tiny_llama):
    cal = calib.build(_Tok(), calib.default_text(), "pydoc", num_samples=1, seq_len=48)
    a = profile_model(tiny_llama, cal, progress=False, skip_first=0)
    b = profile_model(tiny_llama, cal, progress=False, skip_first=0)
    np.testing.assert_array_equal(a.kv_head, b.kv_head)


def test_calibration_text_too_short():
    from baklava.errors import BaklavaError

    with pytest.raises(BaklavaError, match="tokens"):
        calib.build(_Tok(), "a few words", "tiny", num_samples=1, seq_len=64)


def test_calibration_jsonl(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "hello world"}\n\n{"text": "more"}\n')
    text, desc = calib.read_text(p)
    assert text == "hello world\n\nmore" and desc == str(p)
    p.write_text("not json\n")
    from baklava.errors import BaklavaError

    with pytest.raises(BaklavaError, match="c.jsonl:1"):
        calib.read_text(p)

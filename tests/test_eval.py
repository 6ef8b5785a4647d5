"""Perplexity on a tiny random Llama against a hand-written reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from liftquant.evaluation import eval as lq_eval

VOCAB = 128
SEQ_LEN = 16


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    return LlamaForCausalLM(config).float()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (1, 5 * SEQ_LEN + 7), generator=gen)  # 5 windows + 7 extra


def _reference(model, ids: torch.Tensor, seq_len: int) -> float:
    """Loop over full windows, summed cross-entropy / number of predicted tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.shape[1] - seq_len + 1, seq_len):
            window = ids[:, start:start + seq_len]
            logits = model(window).logits[0]
            total += F.cross_entropy(logits[:-1], window[0, 1:], reduction="sum").item()
            count += seq_len - 1
    return math.exp(total / count)


def test_matches_manual_computation(model, ids):
    ppl = lq_eval.perplexity(model, ids, seq_len=SEQ_LEN, progress=False)
    assert ppl == pytest.approx(_reference(model, ids, SEQ_LEN), rel=1e-5)
    assert 0.5 * VOCAB < ppl < 2 * VOCAB  # a random model is near uniform


def test_trailing_partial_window_dropped(model, ids):
    full = lq_eval.perplexity(model, ids[:, : 5 * SEQ_LEN], seq_len=SEQ_LEN, progress=False)
    with_tail = lq_eval.perplexity(model, ids, seq_len=SEQ_LEN, progress=False)
    assert with_tail == full
    four = lq_eval.perplexity(model, ids, seq_len=SEQ_LEN, max_windows=4, progress=False)
    assert four == pytest.approx(_reference(model, ids[:, : 4 * SEQ_LEN], SEQ_LEN), rel=1e-5)
    assert four != pytest.approx(full, rel=1e-6)


def test_batch_sizes_agree_and_training_mode_restored(model, ids):
    model.train()
    one = lq_eval.perplexity(model, ids, seq_len=SEQ_LEN, batch_size=1, progress=False)
    assert model.training
    three = lq_eval.perplexity(model, ids, seq_len=SEQ_LEN, batch_size=3, progress=False)
    assert three == pytest.approx(one, rel=1e-5)
    model.eval()


def test_chunked_loss_equals_full(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 9, VOCAB, generator=gen).bfloat16()
    targets = torch.randint(0, VOCAB, (2, 9), generator=gen)
    expected = F.cross_entropy(logits.float().view(-1, VOCAB), targets.view(-1), reduction="sum")
    monkeypatch.setattr(lq_eval, "LOSS_CHUNK_TOKENS", 4)  # 18 rows -> 5 chunks
    assert lq_eval.sum_nll(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_too_few_tokens_and_bad_shape(model):
    with pytest.raises(ValueError, match="no full window"):
        lq_eval.perplexity(model, torch.zeros(1, SEQ_LEN - 1, dtype=torch.long),
                           seq_len=SEQ_LEN, progress=False)
    with pytest.raises(ValueError, match="shape"):
        lq_eval.perplexity(model, torch.zeros(2, 4 * SEQ_LEN, dtype=torch.long),
                           seq_len=SEQ_LEN, progress=False)

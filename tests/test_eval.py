import time

import pytest
import torch
from torch import nn

from kompakt.eval import accuracy, latency_ms, perplexity
from tests.models import tiny_llama


class Lookup(nn.Module):
    """Predicts class ``answers[i]`` for input row ``i`` (the row holds its index)."""

    def __init__(self, answers: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.table = nn.functional.one_hot(answers, classes).float()

    def forward(self, x):
        return self.table[x[:, 0].long()]


def test_accuracy_counts_correct_rows_across_batches_and_restores_the_mode():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    answers = labels.clone()
    answers[[1, 4, 7]] = 0  # 3 of 10 wrong
    model = Lookup(answers, 3).train()
    rows = torch.arange(10.0)[:, None]
    assert accuracy(model, rows, labels, batch_size=3) == pytest.approx(0.7)
    assert model.training


def test_perplexity_of_uniform_next_token_guesses_is_the_vocabulary_size():
    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: each of the 96 tokens equally likely
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, ids, batch=2) == pytest.approx(96, rel=1e-5)


def test_perplexity_is_lower_for_the_model_that_predicts_the_text():
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model = tiny_llama()
    before = perplexity(model, ids)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        model(ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
    assert perplexity(model.eval(), ids) < before / 2


class Sleeper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        time.sleep(0.004)
        return x


def test_latency_is_the_median_of_the_timed_calls_after_warmup():
    model = Sleeper()
    ms = latency_ms(model, torch.zeros(1), repeats=5, warmup=2)
    assert model.calls == 7
    assert 4 <= ms < 40

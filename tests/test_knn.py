"""The weighted kNN monitor against a plain computation."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from moco.knn import extract_features, knn_predict, knn_top1


def plain_knn_scores(queries, bank, bank_labels, num_classes, k, t):
    scores = []
    for q in queries.tolist():
        sims = [sum(a * b for a, b in zip(q, row)) for row in bank.tolist()]
        nearest = sorted(range(len(sims)), key=lambda i: sims[i], reverse=True)[:k]
        row = [0.0] * num_classes
        for i in nearest:
            row[bank_labels[i].item()] += math.exp(sims[i] / t)
        scores.append(row)
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("k, t, chunk", [(1, 0.1, 1024), (3, 0.1, 2), (5, 0.5, 1024), (100, 0.07, 3)])
def test_knn_predict_matches_a_plain_loop(k, t, chunk):
    generator = torch.Generator().manual_seed(k)
    queries = F.normalize(torch.randn(7, 6, generator=generator, dtype=torch.float64), dim=1)
    bank = F.normalize(torch.randn(11, 6, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (11,), generator=generator)
    scores = knn_predict(queries, bank, labels, 4, k=k, t=t, chunk=chunk)
    assert scores.shape == (7, 4)
    expected = plain_knn_scores(queries, bank, labels, 4, min(k, 11), t)
    torch.testing.assert_close(scores, expected, rtol=1e-9, atol=1e-12)


def test_knn_predict_empty_queries():
    bank = F.normalize(torch.randn(5, 3), dim=1)
    assert knn_predict(torch.zeros(0, 3), bank, torch.zeros(5, dtype=torch.long), 2).shape == (0, 2)


def _clusters(per_class, num_classes, dim, generator, noise=0.05):
    centres = torch.eye(dim)[:num_classes] * 3
    x = torch.cat([centres[c] + noise * torch.randn(per_class, dim, generator=generator)
                   for c in range(num_classes)])
    y = torch.arange(num_classes).repeat_interleave(per_class)
    return x, y


def test_knn_top1_on_separable_features_is_100():
    generator = torch.Generator().manual_seed(0)
    bank_x, bank_y = _clusters(10, 3, 8, generator)
    query_x, query_y = _clusters(4, 3, 8, generator)
    bank = DataLoader(TensorDataset(bank_x, bank_y), batch_size=7)
    queries = DataLoader(TensorDataset(query_x, query_y), batch_size=5)
    encoder = nn.Sequential(nn.Identity())
    encoder.train()
    assert knn_top1(encoder, bank, queries, 3, torch.device("cpu"), k=5, t=0.1) == 100.0
    assert encoder.training  # restored after evaluation


def test_knn_top1_counts_wrong_labels():
    generator = torch.Generator().manual_seed(1)
    bank_x, bank_y = _clusters(10, 2, 4, generator)
    query_x, query_y = _clusters(5, 2, 4, generator)
    query_y[:3] = 1 - query_y[:3]  # 3 of the 10 queries carry the other cluster's label
    bank = DataLoader(TensorDataset(bank_x, bank_y), batch_size=4)
    queries = DataLoader(TensorDataset(query_x, query_y), batch_size=4)
    top1 = knn_top1(nn.Identity(), bank, queries, 2, torch.device("cpu"), k=3, t=0.1)
    assert top1 == pytest.approx(70.0)


def test_extract_features_are_unit_norm_and_in_order():
    x = torch.randn(9, 5)
    y = torch.arange(9)
    features, labels = extract_features(nn.Identity(), DataLoader(TensorDataset(x, y), batch_size=4),
                                        torch.device("cpu"))
    torch.testing.assert_close(features, F.normalize(x, dim=1))
    assert torch.equal(labels, y)

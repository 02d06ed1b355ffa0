"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018), the monitor of the
upstream CIFAR-10 demo: cosine similarity to a memory bank, the k nearest vote with weight exp(s / t)."""
import torch
import torch.nn.functional as F

from moco.distributed import all_reduce_sum, concat_all_gather_varlen


@torch.no_grad()
def extract_features(encoder, loader, device, channels_last=False):
    """L2-normalised features and labels of this process's share of `loader`."""
    features, labels = [], []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features.append(F.normalize(encoder(images).float(), dim=1))
        labels.append(targets.to(device, non_blocking=True))
    if not features:
        return torch.empty(0, 0, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_predict(queries, bank, bank_labels, num_classes, k=200, t=0.1, chunk=1024):
    """Class scores (Q x num_classes) of `queries` (Q x D) against `bank` (B x D), both unit-norm."""
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ bank.t()  # similarities: q x B
        sim_topk, idx_topk = sim.topk(k, dim=1)  # q x k
        weights = (sim_topk / t).exp()
        one_hot = F.one_hot(bank_labels[idx_topk], num_classes).to(weights.dtype)  # q x k x classes
        scores.append((one_hot * weights.unsqueeze(-1)).sum(dim=1))
    return torch.cat(scores) if scores else queries.new_zeros(0, num_classes)


@torch.no_grad()
def knn_top1(encoder, bank_loader, query_loader, num_classes, device, k=200, t=0.1,
             channels_last=False):
    """kNN top-1 (percent) of the queries against the bank, each sharded over processes.

    The bank is gathered from every process; each process classifies its own queries and the counts
    are summed, so every image counts exactly once.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        bank, bank_labels = extract_features(encoder, bank_loader, device, channels_last)
        bank = concat_all_gather_varlen(bank)
        bank_labels = concat_all_gather_varlen(bank_labels)
        queries, query_labels = extract_features(encoder, query_loader, device, channels_last)
        if queries.shape[0]:
            pred = knn_predict(queries, bank, bank_labels, num_classes, k, t).argmax(dim=1)
            correct = (pred == query_labels).sum()
        else:
            correct = torch.zeros((), dtype=torch.long, device=device)
        counts = torch.stack([correct.long(), torch.tensor(queries.shape[0], device=device)])
        correct, total = all_reduce_sum(counts).tolist()
    finally:
        encoder.train(was_training)
    return 100.0 * correct / max(1, total)

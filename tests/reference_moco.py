"""A deliberately plain, reference-style MoCo used as an independent oracle by the tests and benchmarks.

It follows the published MoCo v1/v2 training code (He et al. 2019; Chen et al. 2020) and the
paper's Algorithm 1 in the most literal way: a Python loop for the momentum update, the
shuffle done with plain `torch.distributed` calls, the queue written through a Python-int pointer.
It shares no code with `moco/builder.py` or `moco/distributed.py` on purpose, so that an error there
cannot be hidden by agreeing with itself.

An optional symmetric mode follows the upstream one-GPU CIFAR-10 demo: momentum update first, then
(q1 = encoder_q(im1), k2 = keys of im2), then (q2 = encoder_q(im2), k1 = keys of im1); the loss is the
SUM of both cross-entropies and both key batches are enqueued, k1 first.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _dist_on():
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def gather_plain(tensor):
    """all_gather along dim 0 in rank order; the tensor itself without a process group."""
    if not _dist_on():
        return tensor
    pieces = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, tensor.contiguous())
    return torch.cat(pieces, dim=0)


class ReferenceSplitBatchNorm(nn.BatchNorm2d):
    """Split BN written as a loop: group s (samples s, s+S, ...) is batch-normalised on its own.

    Each group updates its own copy of the running statistics; the layer keeps their mean.
    Eval mode is plain BatchNorm2d. Same parameters and buffers as nn.BatchNorm2d.
    """

    def __init__(self, num_features, num_splits=2, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        S = self.num_splits
        self.num_batches_tracked += 1
        outs, means, variances = [], [], []
        for s in range(S):
            rm = self.running_mean.clone()
            rv = self.running_var.clone()
            outs.append(F.batch_norm(x[s::S], rm, rv, self.weight, self.bias, True, self.momentum, self.eps))
            means.append(rm)
            variances.append(rv)
        with torch.no_grad():
            self.running_mean.copy_(sum(means) / S)
            self.running_var.copy_(sum(variances) / S)
        # stacking on dim 1 puts group s of output row j back at sample j * S + s
        n, c, h, w = x.shape
        return torch.stack(outs, dim=1).reshape(n, c, h, w)


def split_bn_encoder(base_encoder, num_splits):
    """A base-encoder constructor whose every norm layer is a ReferenceSplitBatchNorm."""
    def build(num_classes):
        return base_encoder(num_classes=num_classes,
                            norm_layer=lambda ch: ReferenceSplitBatchNorm(ch, num_splits=num_splits))
    return build


class ReferenceMoCo(nn.Module):
    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False, symmetric=False):
        super().__init__()
        self.K = K
        self.m = m
        self.T = T
        self.symmetric = symmetric

        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:
            width = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), self.encoder_q.fc)
            self.encoder_k.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), self.encoder_k.fc)

        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            p_k.data.copy_(p_q.data)
            p_k.requires_grad = False

        queue = torch.randn(dim, K)
        queue = F.normalize(queue, dim=0)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self):
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            p_k.data = p_k.data * self.m + p_q.data * (1. - self.m)

    @torch.no_grad()
    def shuffle(self, x):
        n_this = x.shape[0]
        x_all = gather_plain(x)
        n_all = x_all.shape[0]
        perm = torch.randperm(n_all).to(x.device)  # CPU generator, as upstream
        if _dist_on():
            dist.broadcast(perm, src=0)
        rank = dist.get_rank() if _dist_on() else 0
        mine = perm[rank * n_this:(rank + 1) * n_this]
        return x_all[mine], torch.argsort(perm)

    @torch.no_grad()
    def unshuffle(self, k, inverse):
        n_this = k.shape[0]
        k_all = gather_plain(k)
        rank = dist.get_rank() if _dist_on() else 0
        mine = inverse[rank * n_this:(rank + 1) * n_this]
        return k_all[mine]

    @torch.no_grad()
    def keys(self, im_k):
        x, inverse = self.shuffle(im_k)
        k = self.encoder_k(x)
        k = F.normalize(k, dim=1)
        return self.unshuffle(k, inverse)

    @torch.no_grad()
    def enqueue(self, k):
        k = gather_plain(k)
        n = k.shape[0]
        ptr = int(self.queue_ptr)
        assert self.K % n == 0
        self.queue[:, ptr:ptr + n] = k.T
        ptr = (ptr + n) % self.K
        self.queue_ptr[0] = ptr

    def contrast(self, q, k):
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return logits, labels

    def forward(self, im_q, im_k):
        """Asymmetric MoCo, Algorithm 1: returns (logits, labels)."""
        q = self.encoder_q(im_q)
        q = F.normalize(q, dim=1)
        with torch.no_grad():
            self.momentum_update()
            k = self.keys(im_k)
        logits, labels = self.contrast(q, k)
        self.enqueue(k)
        return logits, labels

    def forward_symmetric(self, im1, im2):
        """CIFAR-demo order. Returns (loss_sum, logits_12, logits_21)."""
        with torch.no_grad():
            self.momentum_update()
        q1 = F.normalize(self.encoder_q(im1), dim=1)
        k2 = self.keys(im2)
        logits_12, labels_12 = self.contrast(q1, k2)
        loss_12 = F.cross_entropy(logits_12, labels_12)
        q2 = F.normalize(self.encoder_q(im2), dim=1)
        k1 = self.keys(im1)
        logits_21, labels_21 = self.contrast(q2, k1)
        loss_21 = F.cross_entropy(logits_21, labels_21)
        self.enqueue(torch.cat([k1, k2], dim=0))
        return loss_12 + loss_21, logits_12, logits_21

    def step_loss(self, im_q, im_k):
        """(loss, logits) of one training step, whichever mode; logits stacked [12; 21] when symmetric."""
        if self.symmetric:
            loss, logits_12, logits_21 = self.forward_symmetric(im_q, im_k)
            return loss, torch.cat([logits_12, logits_21], dim=0)
        logits, labels = self.forward(im_q, im_k)
        return F.cross_entropy(logits, labels), logits

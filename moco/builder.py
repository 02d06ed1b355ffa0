"""The MoCo module: a query encoder, a momentum key encoder and a queue of negative keys.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning" (MoCo v1),
arXiv:1911.05722, Algorithm 1; Chen et al., "Improved Baselines with Momentum Contrastive Learning"
(MoCo v2), arXiv:2003.04297 (MLP head, temperature 0.2).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from moco.distributed import broadcast_from_main, concat_all_gather, get_rank, get_world_size
from moco.transfer import to_device


def check_queue_divisible(K, keys_per_step):
    """Raise ValueError unless the queue length K is a multiple of the keys enqueued per step.

    `keys_per_step` is the global batch (summed over all processes), twice that with the symmetric
    loss. Each step overwrites a whole block of queue columns, as in the reference.
    """
    if keys_per_step <= 0 or K % keys_per_step != 0:
        raise ValueError(
            f"the queue size K={K} (--moco-k) must be divisible by the number of keys enqueued per step, "
            f"{keys_per_step} (the global batch over all processes, doubled with --symmetric); "
            f"choose a K that is a multiple of {keys_per_step}")


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises `num_splits` groups of the batch separately.

    It imitates `num_splits` devices on one (the upstream one-GPU CIFAR-10 demo): group s holds samples
    s, s + S, s + 2S, ... of the batch, so the batch size must be a multiple of S. Running statistics
    are the mean over groups of what each group would have accumulated. In eval mode it is plain BN.
    Its parameters and buffers are exactly BatchNorm2d's, so state_dicts load into a plain ResNet.
    """

    def __init__(self, num_features, num_splits=1, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x):
        S = self.num_splits
        if S == 1 or not self.training:
            return super().forward(x)
        N, C, H, W = x.shape
        if N % S != 0:
            raise ValueError(f"SplitBatchNorm: batch {N} is not divisible by num_splits {S}")
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = self.momentum
            if momentum is None:  # cumulative moving average, as in BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)
        else:
            momentum = 0.0
        # N x C x H x W viewed as N/S x (S*C) x H x W: channel block s holds samples s, s+S, ...
        running_mean = running_var = None
        if self.track_running_stats:
            running_mean = self.running_mean.repeat(S)
            running_var = self.running_var.repeat(S)
        weight = self.weight.repeat(S) if self.weight is not None else None
        bias = self.bias.repeat(S) if self.bias is not None else None
        out = F.batch_norm(x.reshape(N // S, S * C, H, W), running_mean, running_var, weight, bias,
                           True, momentum, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(S, C).mean(dim=0))
                self.running_var.copy_(running_var.view(S, C).mean(dim=0))
        return out.view(N, C, H, W)

    def extra_repr(self):
        return super().extra_repr() + f", num_splits={self.num_splits}"


def convert_to_split_bn(module, num_splits):
    """Replace every BatchNorm2d inside `module` by a SplitBatchNorm with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm):
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                   affine=child.affine, track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            split.to(device=child.weight.device if child.weight is not None else None)
            setattr(module, name, split)
        else:
            convert_to_split_bn(child, num_splits)
    return module


def add_mlp_head(encoder):
    """MoCo v2's head: fc becomes Linear(d, d) -> ReLU -> the original fc (keys fc.0.*, fc.2.*)."""
    fc = getattr(encoder, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise ValueError("mlp=True needs an encoder whose final layer is a Linear named `fc` (a ResNet)")
    d = fc.in_features
    encoder.fc = nn.Sequential(nn.Linear(d, d), nn.ReLU(), fc)
    return encoder


def build_encoder(base_encoder, dim, mlp, bn_splits):
    """`base_encoder` with a `dim`-dimensional output, MoCo v2's MLP head (`mlp`) and SplitBatchNorm."""
    encoder = base_encoder(num_classes=dim)
    if mlp:
        add_mlp_head(encoder)
    if bn_splits > 1:
        convert_to_split_bn(encoder, bn_splits)
    return encoder


@torch.no_grad()
def batch_shuffle(x):
    """Shuffling BN (He et al. 2019, Sec. 3.3): shuffle the global key batch across processes, so that the
    key encoder's BN never sees the query's batch composition.

    Returns this process's slice of the permuted global batch and the inverse permutation.
    """
    x_all = concat_all_gather(x)  # B_all x ...
    batch_all = x_all.shape[0]
    # drawn on the CPU generator (as the reference does) and made identical on every process; copied
    # from pinned memory, so that the host does not wait for the GPU to finish the step so far
    perm = to_device(torch.randperm(batch_all), x.device)
    broadcast_from_main(perm)
    idx_unshuffle = torch.argsort(perm)
    idx_this = perm.view(get_world_size(), -1)[get_rank()]
    return x_all[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x, idx_unshuffle):
    """Undo `batch_shuffle`: gather the encoded slices, return this process's original rows."""
    x_all = concat_all_gather(x)  # B_all x ...
    idx_this = idx_unshuffle.view(get_world_size(), -1)[get_rank()]
    return x_all[idx_this]


class MoCo(nn.Module):
    """Momentum Contrast (MoCo v1/v2).

    Args:
        base_encoder: a model constructor taking `num_classes`, e.g. `torchvision.models.resnet50`;
            its final fc layer becomes the projection to `dim` features.
        dim: feature dimension of the keys and queries (default 128).
        K: queue length, the number of negative keys (default 65536).
        m: momentum of the key-encoder update, theta_k <- m theta_k + (1 - m) theta_q (default 0.999).
        T: softmax temperature (default 0.07; 0.2 for MoCo v2).
        mlp: MoCo v2's 2-layer MLP projection head (default False).
        bn_splits: keyword-only. >1 uses SplitBatchNorm with that many groups in both encoders, to imitate
            several devices' BN on one (the upstream one-GPU CIFAR-10 demo uses 8). Default 1: plain BN.
        symmetric: keyword-only. Each crop is query once and key once; see `forward`. Default False.
    """

    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False, *, bn_splits=1,
                 symmetric=False):
        super().__init__()
        self.K = K
        self.m = m
        self.T = T
        self.symmetric = symmetric

        self.encoder_q = build_encoder(base_encoder, dim, mlp, bn_splits)
        self.encoder_k = build_encoder(base_encoder, dim, mlp, bn_splits)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False  # the key encoder follows by momentum, never by gradient

        # queue: dim x K, each column a unit-length key
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def keys_per_step(self, global_batch):
        """Keys enqueued per step for a global batch: doubled with the symmetric loss."""
        return 2 * global_batch if self.symmetric else global_batch

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        """theta_k <- m theta_k + (1 - m) theta_q, in place over all parameters at once (not buffers)."""
        params_k = list(self.encoder_k.parameters())
        params_q = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_mul_(params_k, self.m)
        torch._foreach_add_(params_k, params_q, alpha=1.0 - self.m)

    @torch.no_grad()
    def _encode_keys(self, im_k):
        im_k, idx_unshuffle = batch_shuffle(im_k)
        k = F.normalize(self.encoder_k(im_k), dim=1)  # keys: N x C
        return batch_unshuffle(k, idx_unshuffle)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        """Write the keys of all processes (rank order) into the oldest queue columns."""
        keys = concat_all_gather(keys)  # B_all x C
        batch_all = keys.shape[0]
        check_queue_divisible(self.K, batch_all)
        # column indices computed on the device: no host sync on queue_ptr
        columns = (self.queue_ptr + torch.arange(batch_all, device=keys.device)) % self.K
        self.queue.index_copy_(1, columns, keys.t().to(self.queue.dtype))
        self.queue_ptr.add_(batch_all).remainder_(self.K)

    def _contrast(self, q, k, queue):
        """Logits of each query against its positive key (column 0) and the queue's negatives."""
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # positive logits: N x 1
        l_neg = torch.einsum("nc,ck->nk", q, queue)  # negative logits: N x K
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T  # logits: N x (1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # positives at 0
        return logits, labels

    def forward(self, im_q, im_k):
        """
        Args:
            im_q: a batch of query images, N x 3 x H x W.
            im_k: a batch of key images (the other crops of the same images), N x 3 x H x W.
        Returns:
            logits, labels: cross-entropy(logits, labels) is the InfoNCE loss. Asymmetric: logits N x (1+K).
            Symmetric: logits 2N x (1+K), rows [0, N) with im_q as queries against keys of im_k and rows
            [N, 2N) the other way round; both key batches are enqueued afterwards.
        """
        # fail before anything changes (key encoder, BN statistics) when the queue cannot take the keys
        check_queue_divisible(self.K, self.keys_per_step(im_q.shape[0] * get_world_size()))
        q = F.normalize(self.encoder_q(im_q), dim=1)  # queries: N x C
        with torch.no_grad():
            self._momentum_update_key_encoder()
        # the queue changes in place after this step; the loss's backward needs the old one
        queue = self.queue.clone().detach()
        if not self.symmetric:
            k = self._encode_keys(im_k)
            logits, labels = self._contrast(q, k, queue)
            self._dequeue_and_enqueue(k)
            return logits, labels

        # symmetric: same order of key encodings (hence random draws and BN updates) as the upstream demo
        k2 = self._encode_keys(im_k)
        q2 = F.normalize(self.encoder_q(im_k), dim=1)
        k1 = self._encode_keys(im_q)
        logits_12, labels_12 = self._contrast(q, k2, queue)
        logits_21, labels_21 = self._contrast(q2, k1, queue)
        self._dequeue_and_enqueue(torch.cat([k1, k2], dim=0))
        return torch.cat([logits_12, logits_21], dim=0), torch.cat([labels_12, labels_21], dim=0)


def contrastive_loss(logits, labels, symmetric=False):
    """InfoNCE loss from MoCo's logits.

    With `symmetric`, the loss is the SUM of the two directions' mean cross-entropies, as in the
    upstream CIFAR-10 demo whose published numbers (and lr 0.06, wd 5e-4) were obtained that way;
    averaging would halve the gradient against the weight decay and change the recipe.
    Its chance level is then 2 log(K+1) instead of log(K+1).
    """
    loss = F.cross_entropy(logits, labels)
    return 2.0 * loss if symmetric else loss

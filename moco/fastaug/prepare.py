"""Per mode, what turns one loader batch (its images part) into the list `[im_q, im_k]` of device
tensors the model takes: the `prepare` that moco.prefetch.DeviceBatches runs one batch ahead."""
import torch

from moco.fastaug.params import COLOR_FIELDS, select
from moco.transfer import to_device


def crop_params(batch, c):
    """The colour parameters of crop `c` (0: q, 1: k) of a collated batch."""
    return {name: batch[name][:, c] for name in COLOR_FIELDS}


def augment_pair(augment, crops, params, device, channels_last):
    """`[im_q, im_k]`: both crops of a batch (N x 2 x 3 x S x S on the device) augmented with their colour
    parameters."""
    return [to_device(augment(crops[:, c], crop_params(params, c)), device, channels_last) for c in range(2)]


class CopyToDevice:
    """The reference's PIL pipeline: the loader's normalised float crops `[q, k]`, only copied."""

    def __init__(self, device, channels_last=False):
        self.device, self.channels_last = torch.device(device), channels_last

    def __call__(self, images):
        return [to_device(x, self.device, self.channels_last) for x in images]


class AugmentOnDevice:
    """`--fast-aug`: the workers' uint8 crops (`crops`, N x 2 x 3 x S x S) copied to the device and
    augmented there (moco.fastaug.batch_augment.BatchAugment) with the workers' colour parameters."""

    def __init__(self, augment, device, channels_last=False):
        self.augment, self.device, self.channels_last = augment, torch.device(device), channels_last

    def __call__(self, batch):
        crops = to_device(batch["crops"], self.device)
        return augment_pair(self.augment, crops, batch, self.device, self.channels_last)


class DecodeOnDevice:
    """`--device-decode`: the batch's files decoded and cropped on the device
    (moco.fastaug.device_decode.DeviceDecoder), then augmented like `AugmentOnDevice`; an unreadable
    image's stand-in takes the stand-in's colour parameters too."""

    def __init__(self, decoder, augment, device, channels_last=False):
        self.decoder, self.augment = decoder, augment
        self.device, self.channels_last = torch.device(device), channels_last

    def __call__(self, batch):
        crops, source = self.decoder(batch)
        return augment_pair(self.augment, crops, select(batch, source), self.device, self.channels_last)

"""The training data pipeline of pre-training, behind one door: `train_pipeline`.

Three modes, all built from the recipe declared in moco/loader.py (`recipe(aug_plus)`):

* the reference's PIL pipeline (default): the workers run the whole recipe;
* `--fast-aug`: the workers decode, crop and flip to uint8 and draw the colour parameters
  (moco.fastaug.worker); the training device applies the colour steps to the batch
  (moco.fastaug.batch_augment, moco.fastaug.color_ops);
* `--device-decode`: the workers read the files and draw the same numbers; the device decodes and crops
  (moco.fastaug.device_decode) and then augments as with `--fast-aug`.
"""
import os

from moco import loader
from moco.data import RobustImageFolder
from moco.fastaug.batch_augment import BatchAugment
from moco.fastaug.device_decode import DeviceDecoder
from moco.fastaug.prepare import AugmentOnDevice, CopyToDevice, DecodeOnDevice
from moco.fastaug.worker import EncodedTwoCrops, TwoCropsUint8, collate_encoded, open_lazily, read_encoded


def train_pipeline(args, data_seed, device):
    """(dataset, collate_fn, prepare) of DIR/train for the mode of `args` (--fast-aug, --device-decode,
    --aug-plus, --crop-size, --channels-last): the per-sample-seeded dataset (moco.data.RobustImageFolder),
    the DataLoader's collate_fn (None: the default) and `prepare`, which turns a loader batch's images
    into `[im_q, im_k]` on `device` (moco.prefetch.DeviceBatches runs it one batch ahead)."""
    root = os.path.join(args.data, "train")
    recipe = loader.recipe(args.aug_plus)
    if args.device_decode:
        dataset = RobustImageFolder(root, EncodedTwoCrops(args.crop_size, recipe), data_seed, loader=read_encoded)
        decoder = DeviceDecoder(args.crop_size, device, on_bad=dataset.report_unreadable)
        return dataset, collate_encoded, DecodeOnDevice(decoder, BatchAugment(recipe), device, args.channels_last)
    if args.fast_aug:
        dataset = RobustImageFolder(root, TwoCropsUint8(args.crop_size, recipe), data_seed, loader=open_lazily)
        return dataset, None, AugmentOnDevice(BatchAugment(recipe), device, args.channels_last)
    dataset = RobustImageFolder(root, loader.pretrain_transform(args.aug_plus, args.crop_size), data_seed)
    return dataset, None, CopyToDevice(device, args.channels_last)

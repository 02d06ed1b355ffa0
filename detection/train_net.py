#!/usr/bin/env python
"""Fine-tune a detectron2 detector from MoCo weights and evaluate it.

    python train_net.py --config-file configs/pascal_voc_R_50_C4_24k_moco.yaml \
        --num-gpus 8 MODEL.WEIGHTS ./output.pkl

Everything but two pieces is detectron2's own machinery (its default trainer, argument parser and
launcher): the `Res5ROIHeadsExtraNorm` ROI head that the configs name, and the choice of evaluator from the
dataset name. `--eval-only` evaluates the weights given by MODEL.WEIGHTS (or the last checkpoint in
OUTPUT_DIR with `--resume`); `--resume` continues an interrupted run from OUTPUT_DIR. Any config key can be
overridden after the flags as `KEY VALUE` pairs. With smoke_test.py (which checks an install), this is the
only file of the project that imports detectron2; see README.md next to it for installing detectron2 and
laying out the datasets.
"""
import inspect
import os
import sys

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

# The *_moco.yaml configs carry this placeholder: the weights must come from the converter.
WEIGHTS_PLACEHOLDER = "See Instructions"


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """The C4 res5 ROI head with one more normalisation layer after the res5 stage.

    The layer is of type cfg.MODEL.RESNETS.NORM (naiveSyncBN in the configs), as wide as res5's output,
    and is appended to the res5 block under the name `norm`, so the pooled region features that the box
    (and mask) predictors read are normalised. It is newly initialised: the converted weights have no
    counterpart for it.
    """

    @classmethod
    def _build_res5_block(cls, cfg):
        build = super()._build_res5_block
        # Recent detectron2 makes this a classmethod; releases before Res5ROIHeads became configurable
        # define it as a plain method, which arrives here unbound.
        res5, out_channels = build(cfg) if inspect.ismethod(build) else build(cls, cfg)
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return res5, out_channels


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with the evaluator chosen from the dataset name."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        name = dataset_name.lower()
        if "coco" in name:
            return COCOEvaluator(dataset_name, output_dir=output_folder)
        if "voc" in name:
            return PascalVOCDetectionEvaluator(dataset_name)
        raise ValueError(
            f"no evaluator for test dataset {dataset_name!r}: train_net.py evaluates COCO and Pascal VOC "
            "datasets, chosen by 'coco' or 'voc' in the dataset name"
        )


def setup(args):
    """Build the frozen config from --config-file and the KEY VALUE overrides; set up logging and seeds."""
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if cfg.MODEL.WEIGHTS == WEIGHTS_PLACEHOLDER and not args.resume:
        sys.exit(
            "train_net.py: error: MODEL.WEIGHTS is not set; convert a MoCo checkpoint with "
            "convert-pretrain-to-detectron2.py and append 'MODEL.WEIGHTS ./output.pkl' to the command"
        )
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )

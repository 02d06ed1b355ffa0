#!/usr/bin/env python
"""Fine-tune a detectron2 detector from MoCo weights and evaluate it.

    python train_net.py --config-file configs/pascal_voc_R_50_C4_24k_moco.yaml \
        --num-gpus 8 MODEL.WEIGHTS ./output.pkl

Everything but two pieces is detectron2's own machinery (its default trainer, argument parser and
launcher): the `Res5ROIHeadsExtraNorm` ROI head that the configs name, and the choice of evaluator from the
dataset name. `--eval-only` evaluates the weights given by MODEL.WEIGHTS (or the last checkpoint in
OUTPUT_DIR with `--resume`); `--resume` continues an interrupted run from OUTPUT_DIR (a fresh OUTPUT_DIR starts a new
run from MODEL.WEIGHTS, as in detectron2). What is to be loaded is checked before anything is built: a
missing checkpoint or weight file is refused with one line and exit status 2. Any config key can be
overridden after the flags as `KEY VALUE` pairs. With smoke_test.py (which checks an install), this is the
only file of the project that imports detectron2; see README.md next to it for installing detectron2 and
laying out the datasets.
"""
import inspect
import os
import sys

# The shared error helpers live in the package at the repository root, one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moco.errors import UserError, run_cli  # noqa: E402

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

PROG = "train_net.py"
# The *_moco.yaml configs carry this placeholder: the weights must come from the converter.
WEIGHTS_PLACEHOLDER = "See Instructions"
# The file in OUTPUT_DIR through which detectron2's checkpointer records its latest checkpoint.
LAST_CHECKPOINT = "last_checkpoint"


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


def load_config(args):
    """The frozen config from --config-file and the KEY VALUE overrides (nothing is written)."""
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def setup(args):
    """Build the config, check what it will load, then set up logging and seeds (which creates OUTPUT_DIR)."""
    cfg = load_config(args)
    weights_to_load(cfg, args.resume)
    default_setup(cfg, args)
    return cfg


def weights_to_load(cfg, resume):
    """The file that detectron2's `resume_or_load` will read, checked before anything is built or written.

    With `resume`, that is the checkpoint OUTPUT_DIR/last_checkpoint names, when there is one; otherwise (a
    fresh OUTPUT_DIR starts a new run, as in detectron2) MODEL.WEIGHTS. Raises UserError, one line, where
    detectron2 would fail later with an assertion ("Checkpoint See Instructions not found!") or train from
    a missing file. Returns the path or URL ("" for no weights: the model's own initialisation).
    """
    pointer = os.path.join(cfg.OUTPUT_DIR, LAST_CHECKPOINT)
    if resume and os.path.exists(pointer):
        try:
            with open(pointer) as f:
                name = f.read().strip()
        except OSError as err:
            raise UserError(f"--resume: cannot read {pointer}: {err.strerror}") from None
        path = os.path.join(cfg.OUTPUT_DIR, name)
        if not name or not os.path.isfile(path):
            raise UserError(
                f"--resume: {pointer} names the checkpoint {name!r}, which is not in {cfg.OUTPUT_DIR!r}; "
                "restore it, or write the name of a model_*.pth that is there into that file"
            )
        return path
    weights = cfg.MODEL.WEIGHTS
    if weights == WEIGHTS_PLACEHOLDER:
        if resume:
            raise UserError(
                f"--resume: OUTPUT_DIR {cfg.OUTPUT_DIR!r} holds no checkpoint to resume (no {LAST_CHECKPOINT} "
                "file) and MODEL.WEIGHTS is not set; give the OUTPUT_DIR of the run to continue, or start a "
                "new run with 'MODEL.WEIGHTS ./output.pkl' (a file from convert-pretrain-to-detectron2.py)"
            )
        raise UserError(
            "MODEL.WEIGHTS is not set; convert a MoCo checkpoint with convert-pretrain-to-detectron2.py "
            "and append 'MODEL.WEIGHTS ./output.pkl' to the command"
        )
    # URLs (detectron2://, https://) are fetched by detectron2 itself; a local file must exist.
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise UserError(f"MODEL.WEIGHTS {weights!r} does not exist (or is not a file)")
    return weights


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv):
    """Parse the command line, check the weights in this process (a refusal is then one line, not one
    traceback per spawned worker), and launch `main` on every GPU."""
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    weights_to_load(load_config(args), args.resume)
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    run_cli(cli, sys.argv[1:], PROG)

#!/usr/bin/env python
"""Check a detectron2 install against this folder, end to end, on the CPU in a few minutes.

    python smoke_test.py                      # the VOC MoCo config, 10 iterations
    python smoke_test.py --configs all        # all five configs

In a scratch folder (--work-dir, else a temporary one that is removed afterwards) it

1. pre-trains a ResNet-50 for one epoch with ../main_moco.py on a few generated images, and writes a
   MoCo v1 checkpoint in the released format (a seeded torchvision ResNet-50, not ImageNet weights);
2. converts both with convert-pretrain-to-detectron2.py;
3. writes a tiny data set in the Pascal VOC layout (VOC2007/) and one in the COCO json layout (coco/),
   under the names detectron2 gives its built-in data sets (voc_2007_trainval/test, coco_2017_train/val);
4. checks that train_net.py's evaluation can score: fed known detections (the ground truth, boxes of the
   wrong class, the ground truth less one class of 20) on a VOC and a COCO data set, its evaluator must
   give exactly 100, 0 and 95 (see `check_evaluator`);
5. for each config: builds its model and loads the converted weights in this process, and checks that
   every converted backbone and res5 tensor is in the model unchanged and that every one of the model's
   318 ResNet-50 tensors got one; then runs train_net.py for --iters iterations and its evaluation, then
   `--eval-only` on the final model, checks that every AP is a finite number and that training moved the
   backbone a little but not far (see `check_drift`), and prints the AP figures.

The configs are overridden only where a CPU and a tiny data set need it (see `cpu_overrides`): the
device, 2 images per batch with the learning rate scaled linearly, the schedule, the image size, the
number of regions per image, and the number of Precise-BN batches. The supervised configs name
detectron2's ImageNet weights, which are downloaded; here MODEL.WEIGHTS points at a converted file
instead, so no network is needed. AP is near zero after so few iterations on such data: step 4 is what
shows that the evaluation would count correct detections. Exit status 0 when every check passes.
"""
import argparse
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from moco.errors import UserError, run_cli  # noqa: E402

PROG = "smoke_test.py"
CONVERTER = HERE / "convert-pretrain-to-detectron2.py"
TRAIN_NET = HERE / "train_net.py"
CONFIGS = HERE / "configs"
# Each config, with the checkpoint it starts from and the data set it trains on. The base config names no
# data set; it gets the COCO one, whose 80 classes are its default NUM_CLASSES.
RUNS = {
    "pascal_voc_R_50_C4_24k_moco.yaml": ("main_moco", "voc"),
    "pascal_voc_R_50_C4_24k.yaml": ("released", "voc"),
    "coco_R_50_C4_2x_moco.yaml": ("released", "coco"),
    "coco_R_50_C4_2x.yaml": ("main_moco", "coco"),
    "Base-RCNN-C4-BN.yaml": ("main_moco", "coco"),
}
DEFAULT_CONFIGS = ["pascal_voc_R_50_C4_24k_moco.yaml"]
DATASETS = {
    "voc": ("('voc_2007_trainval',)", "('voc_2007_test',)"),
    "coco": ("('coco_2017_train',)", "('coco_2017_val',)"),
}
IMAGE_SIZE = (96, 128)  # height, width of the generated detection images
IMS_PER_BATCH = 2
REFERENCE_BATCH, REFERENCE_LR = 16, 0.02  # Base-RCNN-C4-BN.yaml
# The ResNet-50 tensors an R50-C4 detector takes from the converted file (backbone stem..res4, and res5
# in the ROI head): 53 convolutions, and 53 BN layers with 5 tensors each.
RESNET50_TENSORS = 53 + 53 * 5
# Training may move the converted backbone only a little in a smoke run: ||w - w0|| / ||w0|| of the
# convolutions stays far below this after DRIFT_ITERS iterations (the bound grows with longer runs). A
# random or ImageNet start would be at distance ~1; 0 would mean the backbone was not trained at all.
DRIFT_BOUND, DRIFT_ITERS = 0.05, 20
# The evaluator check (`check_evaluator`): a data set in which each of EVAL_CLASSES classes appears once.
EVAL_CLASSES = 20


# ---------------------------------------------------------------------------------------------------
# data


def _noise_image(rng, height, width):
    """Uniform RGB noise."""
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _boxes(rng, height, width, count):
    """`count` random boxes (x0, y0, x1, y1) in pixels, each a quarter to a half of the image side."""
    boxes = []
    for _ in range(count):
        w = int(rng.integers(width // 4, width // 2))
        h = int(rng.integers(height // 4, height // 2))
        x0 = int(rng.integers(0, width - w))
        y0 = int(rng.integers(0, height - h))
        boxes.append((x0, y0, x0 + w, y0 + h))
    return boxes


def draw_scene(rng, n_classes, size=IMAGE_SIZE):
    """A noise image with one or two filled rectangles; the class sets the fill colour.

    Returns (image, [(class_index, (x0, y0, x1, y1)), ...]).
    """
    height, width = size
    image = _noise_image(rng, height, width)
    draw = ImageDraw.Draw(image)
    objects = []
    for box in _boxes(rng, height, width, int(rng.integers(1, 3))):
        cls = int(rng.integers(0, n_classes))
        colour = ((cls * 97) % 256, (cls * 53 + 128) % 256, (cls * 29 + 64) % 256)
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=colour)
        objects.append((cls, box))
    return image, objects


def tiled_scenes(n_classes, size=IMAGE_SIZE, seed=0):
    """Scenes in which every class appears exactly once and no two objects overlap.

    Two objects per image, one in each half, so that a box given the wrong class can never match another
    object (its IoU with every other object is 0): what an evaluator must score is then known exactly.
    Returns [(image, [(class_index, (x0, y0, x1, y1)), ...]), ...].
    """
    height, width = size
    half = width // 2
    rng = np.random.default_rng(seed)
    scenes = []
    for first in range(0, n_classes, 2):
        image = _noise_image(rng, height, width)
        draw = ImageDraw.Draw(image)
        objects = []
        for cls, left in zip(range(first, min(first + 2, n_classes)), (0, half)):
            x0, y0, x1, y1 = _boxes(rng, height, half, 1)[0]
            box = (left + x0, y0, left + x1, y1)
            draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(255, 255, 255))
            objects.append((cls, box))
        scenes.append((image, objects))
    return scenes


def write_voc(root, class_names, n_images=4, seed=0, used_classes=2, scenes=None):
    """A VOC2007 folder under `root`: JPEGImages/, Annotations/ (VOC XML), ImageSets/Main/{trainval,test}.txt.

    The test split lists the same images as trainval. The images are `scenes` (see `tiled_scenes`) when
    given, else `n_images` random ones whose objects belong to the first `used_classes` classes.
    """
    voc = Path(root, "VOC2007")
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if scenes is None:
        scenes = [draw_scene(rng, used_classes) for _ in range(n_images)]
    ids = [f"{i:06d}" for i in range(len(scenes))]
    for image_id, (image, objects) in zip(ids, scenes):
        image.save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        xml_objects = "".join(
            f"<object><name>{class_names[cls]}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for cls, (x0, y0, x1, y1) in objects
        )
        (voc / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>{image.width}</width><height>{image.height}</height><depth>3</depth></size>"
            f"{xml_objects}</annotation>"
        )
    for split in ("trainval", "test"):
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return voc


def write_coco(root, categories, n_images=4, seed=0, used_classes=2, scenes=None):
    """A coco/ folder under `root`: train2017/, val2017/ and annotations/instances_{train,val}2017.json.

    `categories` is the list of {"id", "name"} the json declares (all of them, as in COCO); objects use the
    first `used_classes`, or both splits hold `scenes` (see `tiled_scenes`) when given. Each object has its
    box and its rectangle as a polygon (for Mask R-CNN).
    """
    coco = Path(root, "coco")
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    for split_index, split in enumerate(("train2017", "val2017")):
        (coco / split).mkdir(exist_ok=True)
        rng = np.random.default_rng([seed, split_index])
        images, annotations = [], []
        split_scenes = scenes or [draw_scene(rng, used_classes) for _ in range(n_images)]
        for i, (image, objects) in enumerate(split_scenes):
            name = f"{i + 1:012d}.jpg"
            image.save(coco / split / name, quality=95)
            images.append({"id": i + 1, "file_name": name, "height": image.height, "width": image.width})
            for cls, (x0, y0, x1, y1) in objects:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1, "category_id": categories[cls]["id"],
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                })
        content = {"images": images, "annotations": annotations, "categories": categories,
                   "info": {"description": "smoke_test.py"}, "licenses": []}
        (coco / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return coco


def builtin_classes():
    """detectron2's class lists for its built-in data sets: VOC names, and COCO categories with their ids."""
    from detectron2.data import MetadataCatalog

    voc = list(MetadataCatalog.get("voc_2007_trainval").thing_classes)
    coco = MetadataCatalog.get("coco_2017_train")
    ids = sorted(coco.thing_dataset_id_to_contiguous_id, key=coco.thing_dataset_id_to_contiguous_id.get)
    categories = [{"id": i, "name": name, "supercategory": "thing"} for i, name in zip(ids, coco.thing_classes)]
    return voc, categories


def write_image_folder(root, classes=2, per_class=8, size=40, seed=0):
    """ImageNet layout (root/train/<class>/*.png) for a one-epoch main_moco.py run."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = Path(root, "train", f"class{c}")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _noise_image(rng, size, size).save(folder / f"img{i:02d}.png")
    return Path(root)


# ---------------------------------------------------------------------------------------------------
# checkpoints


def _run(cmd, cwd, env=None, timeout=1800):
    """Run a script; returns its output, or raises UserError with the tail of it when the script fails."""
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-4000:]
        raise UserError(f"{Path(str(cmd[1])).name} failed (exit status {result.returncode}): "
                        + tail.replace("\n", " | "))
    return result.stdout + result.stderr


def pretrain_with_main_moco(work):
    """One epoch of MoCo v2 (MLP head) with a ResNet-50 on 16 tiny images; returns the checkpoint path."""
    data = write_image_folder(Path(work, "pretrain_images"))
    out = Path(work, "pretrain")
    _run([sys.executable, ROOT / "main_moco.py", data, "-a", "resnet50", "--crop-size", "32", "-b", "8",
          "--moco-k", "16", "--moco-dim", "16", "--mlp", "--aug-plus", "--cos", "--epochs", "1", "-j", "0",
          "--seed", "0", "--output-dir", out], cwd=ROOT)
    path = out / "checkpoint_0000.pth.tar"
    if not path.is_file():
        raise UserError(f"main_moco.py wrote no {path}")
    return path


def write_released_checkpoint(path, seed=0):
    """A MoCo v1 checkpoint in the released layout (epoch, arch, state_dict, optimizer) from a seeded
    torchvision ResNet-50 (not ImageNet weights): module.encoder_q/k.*, module.queue, module.queue_ptr."""
    import torchvision

    torch.manual_seed(seed)
    query = torchvision.models.resnet50(num_classes=128)
    with torch.no_grad():  # distinctive BN statistics, so that a copied tensor is recognisable
        for module in query.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = {f"module.encoder_q.{k}": v for k, v in query.state_dict().items()}
    state.update({f"module.encoder_k.{k}": v.clone() for k, v in query.state_dict().items()})
    state["module.queue"] = torch.nn.functional.normalize(torch.randn(128, 64), dim=0)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": []}}, path)
    return Path(path)


def convert(src, dst):
    """Run the converter; returns its one-line report."""
    return _run([sys.executable, CONVERTER, src, dst], cwd=HERE).strip()


def read_weights(path):
    """The {name: numpy array} of a converted file."""
    with open(path, "rb") as f:
        return pickle.load(f)["model"]


# ---------------------------------------------------------------------------------------------------
# detectron2


def cpu_overrides(iters, output_dir):
    """The config overrides a CPU and a tiny data set need (nothing about the model or the recipe)."""
    warmup = max(1, iters // 4)
    return [
        "MODEL.DEVICE", "cpu",
        "SOLVER.IMS_PER_BATCH", str(IMS_PER_BATCH),
        "SOLVER.BASE_LR", str(REFERENCE_LR * IMS_PER_BATCH / REFERENCE_BATCH),  # linear scaling
        "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({max(1, iters * 3 // 4)},)",
        "SOLVER.WARMUP_ITERS", str(warmup), "SOLVER.CHECKPOINT_PERIOD", str(iters + 1),
        "INPUT.MIN_SIZE_TRAIN", f"({IMAGE_SIZE[0]},)", "INPUT.MAX_SIZE_TRAIN", str(IMAGE_SIZE[1]),
        "INPUT.MIN_SIZE_TEST", str(IMAGE_SIZE[0]), "INPUT.MAX_SIZE_TEST", str(IMAGE_SIZE[1]),
        # The res5 ROI head runs once per region: 512 regions per image (1000 at test) would take
        # minutes a batch on a CPU.
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "8",
        "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
        # After a few iterations no class scores above the 0.05 default: keep every detection, so that
        # there is something to evaluate (COCO gives NaN and skips the masks when there is none).
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "TEST.PRECISE_BN.NUM_ITER", "2", "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(output_dir),
    ]


def config_overrides(config, dataset, weights, iters, output_dir):
    """Everything appended to a train_net.py command for `config` (see RUNS)."""
    train, test = DATASETS[dataset]
    return [*cpu_overrides(iters, output_dir), "DATASETS.TRAIN", train, "DATASETS.TEST", test,
            "MODEL.WEIGHTS", str(weights)]


def _register_train_net():
    """Import train_net.py once in this process (it registers the ROI head the configs name)."""
    import importlib.util

    if "moco_detection_train_net" not in sys.modules:
        spec = importlib.util.spec_from_file_location("moco_detection_train_net", TRAIN_NET)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["moco_detection_train_net"] = module
    return sys.modules["moco_detection_train_net"]


def model_tensor_name(converted_name):
    """Where a converted tensor lives in the R50-C4 model: res5 is in the ROI head, the rest in the backbone."""
    if converted_name.startswith("res5."):
        return "roi_heads." + converted_name
    return "backbone." + converted_name


def loaded_state(config, weights, opts=()):
    """Build `config`'s model and load `weights` as train_net.py does (None: no weights, the model's own
    initialisation); returns the model's state_dict."""
    _register_train_net()
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts, "MODEL.WEIGHTS", str(weights or "")])
    model = build_model(cfg)
    if weights is not None:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.state_dict()


def backbone_tensor_names(state):
    """The detector's tensors that must come from the converted file: the backbone's, and the res5
    stage's in the ROI head, less the extra norm after res5 (new: the converted file has none)."""
    return {
        name for name in state
        if name.startswith("backbone.")
        or (name.startswith("roi_heads.res5.") and not name.startswith("roi_heads.res5.norm."))
    }


def count_converted(state, weights, what):
    """The number of tensors of the converted file `weights` that `state` holds unchanged.

    Checks both ways: every converted tensor is in the model unchanged, and every backbone tensor of the
    model (see `backbone_tensor_names`) got one; raises UserError naming the first that fails. The
    projection head (stem.fc.*) has no place in the detector and is skipped.
    """
    matched, loaded = 0, set()
    for name, value in read_weights(weights).items():
        if name.startswith("stem.fc."):
            continue
        target = model_tensor_name(name)
        if target not in state:
            raise UserError(f"{what}: the model has no {target} for the converted {name}")
        if not np.array_equal(state[target].cpu().numpy(), value):
            raise UserError(f"{what}: {target} is not the converted {name} of {weights}")
        matched += 1
        loaded.add(target)
    # The other way round: a backbone tensor with no converted counterpart keeps detectron2's random
    # initialisation without a word (only a log line among hundreds), and the transfer is not MoCo's.
    expected = backbone_tensor_names(state)
    missing = sorted(expected - loaded)
    if missing:
        raise UserError(f"{what}: {len(missing)} of the model's {len(expected)} backbone tensors got no "
                        f"converted tensor from {weights}, the first {missing[0]}")
    return matched


def check_loaded(config, weights):
    """Load `weights` into `config`'s model; returns how many converted tensors it holds unchanged."""
    return count_converted(loaded_state(config, weights), weights, config)


def train_net(args, datasets_root, timeout=1800):
    """Run train_net.py (one process, CPU); returns its log (stdout and stderr)."""
    env = {**os.environ, "DETECTRON2_DATASETS": str(datasets_root), "CUDA_VISIBLE_DEVICES": ""}
    return _run([sys.executable, TRAIN_NET, "--num-gpus", "1", *args], cwd=HERE, env=env, timeout=timeout)


COPYPASTE = re.compile(r"copypaste: (.*)$")


def parse_results(log):
    """The evaluation results that detectron2 prints as `copypaste:` lines: {task: {metric: value}}."""
    lines = [m.group(1).strip() for m in map(COPYPASTE.search, log.splitlines()) if m]
    results = {}
    for i, line in enumerate(lines):
        if line.startswith("Task: ") and i + 2 < len(lines):
            names, values = lines[i + 1].split(","), lines[i + 2].split(",")
            results[line[len("Task: "):]] = {k: float(v) for k, v in zip(names, values)}
    return results


def backbone_drift(final_path, weights):
    """Relative distance of the trained conv weights from the converted ones: ||w - w0|| / ||w0||."""
    trained = torch.load(final_path, map_location="cpu", weights_only=False)["model"]
    num = den = 0.0
    for name, value in read_weights(weights).items():
        if name.endswith("conv1.weight") or name.endswith("conv2.weight") or name.endswith("conv3.weight"):
            w0 = torch.from_numpy(value).double()
            num += float((trained[model_tensor_name(name)].double() - w0).pow(2).sum())
            den += float(w0.pow(2).sum())
    return math.sqrt(num / den)


def check_results(results, what):
    """Every evaluation gave a finite AP, AP50 and AP75 between 0 and 100 (COCO gives NaN when there is
    nothing to evaluate; that must not pass as a result)."""
    if not results:
        raise UserError(f"{what}: the evaluation gave no results")
    for task, metrics in results.items():
        for name in ("AP", "AP50", "AP75"):
            value = metrics.get(name)
            # (A perfect VOC07 score sums 11 elevenths: 100 give or take the last bit.)
            if value is None or not math.isfinite(value) or not -1e-9 <= value <= 100.0 + 1e-9:
                raise UserError(f"{what}: {task} {name} is {value}, not a number from 0 to 100: {metrics}")


def check_drift(drift, iters, what):
    """The trained backbone moved from the converted weights, but only a little (see DRIFT_BOUND)."""
    bound = DRIFT_BOUND * max(1.0, iters / DRIFT_ITERS)
    if not (math.isfinite(drift) and 0.0 < drift < bound):
        raise UserError(f"{what}: the backbone's relative drift from the converted weights is {drift:.3g} "
                        f"after {iters} iterations, outside (0, {bound:g})")


def check_loaded_count(loaded, what):
    """All RESNET50_TENSORS tensors of the detector's ResNet-50 came from the converted file."""
    if loaded != RESNET50_TENSORS:
        raise UserError(f"{what}: {loaded} converted tensors loaded, expected the {RESNET50_TENSORS} of a "
                        "ResNet-50 backbone and res5")


def run_config(config, weights, datasets_root, out, iters, eval_only=True):
    """Load check, training with its evaluation, and (eval_only) --eval-only of the final model, for one
    config; returns a dict of what was measured."""
    checkpoint_kind, dataset = RUNS[config]
    overrides = config_overrides(config, dataset, weights, iters, out)
    report = {"config": config, "checkpoint": checkpoint_kind, "dataset": dataset}
    report["loaded"] = check_loaded(config, weights)
    check_loaded_count(report["loaded"], config)
    started = time.time()
    log = train_net(["--config-file", f"configs/{config}", *overrides], datasets_root)
    report["train_s"] = time.time() - started
    if "Reading a file from 'MOCO'" not in log:
        raise UserError(f"{config}: train_net.py did not load the converted file {weights}")
    report["results"] = parse_results(log)
    final = Path(out, "model_final.pth")
    if not final.is_file():
        raise UserError(f"{config}: train_net.py wrote no {final}")
    report["drift"] = backbone_drift(final, weights)
    check_drift(report["drift"], iters, config)
    report["eval_only_results"] = None
    if eval_only:
        log = train_net(["--config-file", f"configs/{config}", "--eval-only",
                         *overrides[:-2], "MODEL.WEIGHTS", str(final)], datasets_root)
        report["eval_only_results"] = parse_results(log)
    for key in ("results", "eval_only_results")[:1 + eval_only]:
        check_results(report[key], f"{config} ({key})")
    return report


# ---------------------------------------------------------------------------------------------------
# the evaluator: scores that are known exactly


class OracleModel(torch.nn.Module):
    """Stands in for a detector at test time: returns each image's ground-truth objects as detections
    (score 1, masks from the ground-truth polygons where there are any), with the class changed by
    `relabel` (class index -> class index, or None: the object is not detected)."""

    def __init__(self, dataset_name, relabel):
        super().__init__()
        from detectron2.data import DatasetCatalog

        self.truth = {record["image_id"]: record for record in DatasetCatalog.get(dataset_name)}
        self.relabel = relabel

    def forward(self, batched_inputs):
        return [{"instances": self.detections(image)} for image in batched_inputs]

    def detections(self, image):
        from detectron2.structures import Boxes, BoxMode, Instances, polygons_to_bitmask

        height, width = image["height"], image["width"]
        objects = []
        for annotation in self.truth[image["image_id"]]["annotations"]:
            cls = self.relabel(annotation["category_id"])
            if cls is not None:
                objects.append((cls, annotation))
        boxes = [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for _, a in objects]
        found = Instances((height, width))
        found.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        found.scores = torch.ones(len(objects))
        found.pred_classes = torch.tensor([cls for cls, _ in objects], dtype=torch.int64)
        if objects and all("segmentation" in a for _, a in objects):
            masks = [polygons_to_bitmask([np.asarray(p, dtype=np.float64) for p in a["segmentation"]],
                                         height, width) for _, a in objects]
            found.pred_masks = torch.from_numpy(np.stack(masks))
        return found


# What the evaluator must give for each kind of detections, when each of EVAL_CLASSES classes appears
# once and no two objects overlap: AP, AP50 and AP75 alike, for boxes and masks, and for the VOC07
# 11-point metric as for COCO's (an AP is the mean over the classes with ground truth).
EVAL_CASES = {
    "ground truth": (lambda cls: cls, 100.0),
    "wrong class": (lambda cls: (cls + 1) % EVAL_CLASSES, 0.0),
    "class 0 missed": (lambda cls: None if cls == 0 else cls, 100.0 * (EVAL_CLASSES - 1) / EVAL_CLASSES),
}
EVAL_CONFIGS = {"voc": "pascal_voc_R_50_C4_24k_moco.yaml", "coco": "coco_R_50_C4_2x_moco.yaml"}
_registered = iter(range(1, 1 << 30))  # a fresh data set name for each check in one process


def register_eval_datasets(root):
    """Write a VOC and a COCO data set of `tiled_scenes` under `root` and register each under a new name
    that train_net.py maps to its evaluator ('voc' or 'coco' in it); returns {"voc": name, "coco": name}."""
    from detectron2.data.datasets import register_coco_instances
    from detectron2.data.datasets.pascal_voc import register_pascal_voc

    voc_classes, categories = builtin_classes()
    scenes = tiled_scenes(EVAL_CLASSES)
    voc = write_voc(root, voc_classes[:EVAL_CLASSES], scenes=scenes)
    coco = write_coco(root, categories, scenes=scenes)
    n = next(_registered)
    names = {"voc": f"voc_2007_test_evaluator_check{n}", "coco": f"coco_2017_val_evaluator_check{n}"}
    register_pascal_voc(names["voc"], str(voc), "test", 2007, voc_classes[:EVAL_CLASSES])
    register_coco_instances(names["coco"], {}, str(coco / "annotations" / "instances_val2017.json"),
                            str(coco / "val2017"))
    return names


def evaluate_oracle(config, dataset_name, relabel, out):
    """train_net.py's evaluation (its Trainer.test: test loader, evaluator, inference) of an OracleModel."""
    from detectron2.config import get_cfg

    trainer = _register_train_net().Trainer
    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIGS / config))
    cfg.merge_from_list([*cpu_overrides(1, out), "DATASETS.TEST", f"('{dataset_name}',)"])
    return trainer.test(cfg, OracleModel(dataset_name, relabel))


def check_evaluator(work):
    """Feed train_net.py's VOC and COCO evaluation the ground truth, boxes of the wrong class, and the
    ground truth less one class (EVAL_CASES); returns {dataset: {case: results}}.

    Raises UserError unless every AP, AP50 and AP75 is the known value: an evaluator that could never count
    a correct detection, or counted a wrong one, would otherwise pass unseen (smoke runs score near 0).
    """
    names = register_eval_datasets(Path(work, "evaluator_check"))
    scores = {}
    for dataset, name in names.items():
        scores[dataset] = {}
        for case, (relabel, expected) in EVAL_CASES.items():
            out = Path(work, "evaluator_check", "runs", f"{dataset}-{case.replace(' ', '_')}")
            results = evaluate_oracle(EVAL_CONFIGS[dataset], name, relabel, out)
            what = f"evaluator check, {dataset} {case}"
            check_results(results, what)
            for task, metrics in results.items():
                for metric in ("AP", "AP50", "AP75"):
                    if abs(metrics[metric] - expected) > 1e-6:
                        raise UserError(f"{what}: {task} {metric} is {metrics[metric]}, expected {expected}")
            scores[dataset][case] = results
    return scores


def prepare(work):
    """Checkpoints, their conversions and both data sets under `work`; returns a dict of paths."""
    work = Path(work)
    voc_classes, coco_categories = builtin_classes()
    datasets = work / "datasets"
    write_voc(datasets, voc_classes)
    write_coco(datasets, coco_categories)
    paths = {"datasets": datasets, "lines": []}
    sources = {"main_moco": pretrain_with_main_moco(work),
               "released": write_released_checkpoint(work / "moco_v1_200ep_pretrain.pth.tar")}
    for kind, src in sources.items():
        paths[kind] = work / f"{kind}.pkl"
        paths["lines"].append(convert(src, paths[kind]))
    return paths


def format_results(results):
    """`task: AP x, AP50 y, AP75 z; ...` for printing."""
    return "; ".join(
        f"{task}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k in ("AP", "AP50", "AP75"))
        for task, metrics in results.items()
    )


def parse_args(argv):
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="NAME",
                        help=f"configs to run ('all' for the five): {', '.join(RUNS)}")
    parser.add_argument("--iters", type=int, default=10, help="training iterations per config")
    parser.add_argument("--work-dir", default=None,
                        help="where to write data, checkpoints and runs, kept afterwards (unset: a temporary folder, removed)")
    return parser.parse_args(argv)


def main(argv):
    """Prepare the checkpoints and data, run the chosen configs, print what each measured."""
    args = parse_args(argv)
    configs = list(RUNS) if args.configs == ["all"] else args.configs
    unknown = [c for c in configs if c not in RUNS]
    if unknown:
        raise UserError(f"unknown config {unknown[0]!r}; choose from {', '.join(RUNS)} or 'all'")
    if args.iters < 1:
        raise UserError(f"--iters must be at least 1, got {args.iters}")
    try:
        import detectron2
    except ImportError as err:
        raise UserError(f"detectron2 is not importable ({err}); build it as in detection/README.md") from None
    print(f"detectron2 {detectron2.__version__} from {os.path.dirname(detectron2.__file__)}, "
          f"torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="d2-smoke-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.time()
        paths = prepare(work)
        for line in paths["lines"]:
            print(line, flush=True)
        scores = check_evaluator(work)
        print("evaluator check (train_net.py's evaluation of known detections): " + "; ".join(
            f"{dataset} {case}: {format_results(results)}"
            for dataset, cases in scores.items() for case, results in cases.items()), flush=True)
        for config in configs:
            report = run_config(config, paths[RUNS[config][0]], paths["datasets"],
                                work / "runs" / config.replace(".yaml", ""), args.iters)
            print(f"{config} ({report['checkpoint']} weights, {report['dataset']} data): "
                  f"{report['loaded']} converted tensors loaded; {args.iters} iterations in "
                  f"{report['train_s']:.0f} s, backbone drift {report['drift']:.1e}; "
                  f"{format_results(report['results'])}; "
                  f"eval-only: {format_results(report['eval_only_results'])}", flush=True)
        print(f"OK: {len(configs)} config(s) in {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], PROG))

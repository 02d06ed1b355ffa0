"""A built-in, procedurally generated image data set for trying MoCo without ImageNet.

`generate(root, ...)` writes an ImageFolder tree, `root/train/<class>/*.png` and `root/val/<class>/*.png`,
that main_moco.py and main_lincls.py read like ImageNet, plus `root/metadata.csv` with every image's label
and nuisance factors. Two styles:

- "patterns" (the default): a periodic two-colour structure fills the image: stripes, checker, dots, grid,
  rings, zigzag, waves, triangles. Every crop of an image shows its class. The two colours, the period
  (scale), the phase (position) and the orientation are random and independent of the class. With
  `regions=n` an image is a patchwork of n regions of one pattern, each at its own orientation and phase
  (the built-in data set uses 4).
- "shapes": one to a few copies of a shape (disk, square, triangle, plus, ring, star, crescent, bar, arrow,
  frame) over a background; colours, background kind, count, positions, sizes and rotations are random.

Colours come from a small palette by default (`palette=3`: white, black, red). With colours uniform in the
RGB cube, an image's colours alone tell it apart from thousands of others, and MoCo's instance
discrimination learns colour instead of structure in a short run (its features then do no better than
random ones on the class); with a few colours, used as foreground and background alike, colour carries
little identity and the structure is what MoCo learns. Random-init features still lean on colour and
score low.

Everything is drawn from numpy's PCG64 generator seeded from (seed, split, label, index), so the same
arguments give the same bytes, image by image. `ensure_dataset(...)` generates once into a cache folder
(atomically: a temporary folder renamed into place) and returns its path.
"""
import csv
import hashlib
import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

# Bump when the drawing changes, so that cached data sets made by an older generator are not reused.
GENERATOR_VERSION = 1

SPLITS = ("train", "val")
BACKGROUNDS = ("solid", "gradient", "noise")
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges

# Defaults: the settings of the one-command CPU demo (see the README).
DEFAULT_NUM_CLASSES = None  # all the classes of the style: 10 shapes or 8 patterns
DEFAULT_TRAIN_PER_CLASS = 500
DEFAULT_VAL_PER_CLASS = 100
DEFAULT_IMAGE_SIZE = 32
DEFAULT_OBJECTS = (1, 3)
DEFAULT_SCALE = (0.14, 0.32)  # radius of a shape as a fraction of the image side
DEFAULT_STYLE = "patterns"
DEFAULT_PALETTE = 3  # the first 3 colours of PALETTE


# ---------------------------------------------------------------------------------------------------
# Shapes: each draws a white (255) mask of one shape of radius r centred at (cx, cy), rotated by angle
# (radians), on an 'L' image. Class identity never depends on the rotation.

def _polygon(n, r, cx, cy, angle, radii=None):
    pts = []
    for i in range(n):
        a = angle + 2 * math.pi * i / n
        rr = r if radii is None else r * radii[i % len(radii)]
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _rotated(points, r, cx, cy, angle):
    """Unit-frame points -> image coordinates (scaled by r, rotated by angle, moved to (cx, cy))."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def _disk(draw, r, cx, cy, angle):
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)


def _square(draw, r, cx, cy, angle):
    draw.polygon(_polygon(4, r, cx, cy, angle), fill=255)


def _triangle(draw, r, cx, cy, angle):
    draw.polygon(_polygon(3, r * 1.1, cx, cy, angle), fill=255)


def _plus(draw, r, cx, cy, angle):
    w = 0.3
    for bar in ([(-1, -w), (1, -w), (1, w), (-1, w)], [(-w, -1), (w, -1), (w, 1), (-w, 1)]):
        draw.polygon(_rotated(bar, r, cx, cy, angle), fill=255)


def _ring(draw, r, cx, cy, angle):
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    q = 0.55 * r
    draw.ellipse([cx - q, cy - q, cx + q, cy + q], fill=0)


def _star(draw, r, cx, cy, angle):
    draw.polygon(_polygon(10, r * 1.05, cx, cy, angle, radii=(1.0, 0.42)), fill=255)


def _crescent(draw, r, cx, cy, angle):
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    ox, oy = cx + 0.55 * r * math.cos(angle), cy + 0.55 * r * math.sin(angle)
    q = 0.85 * r
    draw.ellipse([ox - q, oy - q, ox + q, oy + q], fill=0)


def _bar(draw, r, cx, cy, angle):
    draw.polygon(_rotated([(-1, -0.28), (1, -0.28), (1, 0.28), (-1, 0.28)], r, cx, cy, angle), fill=255)


def _arrow(draw, r, cx, cy, angle):
    pts = [(-1, -0.22), (0.1, -0.22), (0.1, -0.6), (1, 0), (0.1, 0.6), (0.1, 0.22), (-1, 0.22)]
    draw.polygon(_rotated(pts, r, cx, cy, angle), fill=255)


def _frame(draw, r, cx, cy, angle):
    draw.polygon(_polygon(4, r, cx, cy, angle), fill=255)
    draw.polygon(_polygon(4, 0.55 * r, cx, cy, angle), fill=0)


SHAPES = (
    ("disk", _disk), ("square", _square), ("triangle", _triangle), ("plus", _plus), ("ring", _ring),
    ("star", _star), ("crescent", _crescent), ("bar", _bar), ("arrow", _arrow), ("frame", _frame),
)
CLASS_NAMES = tuple(name for name, _ in SHAPES)  # the "shapes" style


# ---------------------------------------------------------------------------------------------------
# Colours and backgrounds

def _luma(rgb):
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


# A palette of well-separated colours; with `palette=True` every colour is drawn from it, so an image's
# colours carry only a few bits and cannot tell one image from thousands of others.
PALETTE = np.array([
    (0.95, 0.95, 0.95), (0.05, 0.05, 0.05), (0.90, 0.10, 0.10), (0.95, 0.85, 0.10), (0.15, 0.25, 0.90),
    (0.10, 0.65, 0.15), (0.10, 0.80, 0.85), (0.85, 0.20, 0.85), (0.95, 0.55, 0.05), (0.50, 0.50, 0.50),
])


def _random_colour(rng, palette):
    if palette:  # True: the whole palette; an int n: its first n colours
        n = len(PALETTE) if palette is True else int(palette)
        return PALETTE[int(rng.integers(n))].copy()
    return rng.random(3)


def _contrasting_colour(rng, other, min_contrast, palette=False):
    """A random RGB colour (floats in [0, 1]) whose luma differs from `other`'s by >= min_contrast."""
    for _ in range(100):
        c = _random_colour(rng, palette)
        if abs(_luma(c) - _luma(other)) >= min_contrast:
            return c
    # unreachable in practice; a deterministic fallback keeps the shape visible
    return np.ones(3) if _luma(other) < 0.5 else np.zeros(3)


def _background(rng, kind, size, base):
    """An H x W x 3 float background around the colour `base`."""
    if kind == "solid":
        return np.broadcast_to(base, (size, size, 3)).copy()
    if kind == "gradient":
        # a linear ramp between `base` and a second colour of similar luma, in a random direction
        other = np.clip(base + rng.uniform(-0.25, 0.25, 3), 0, 1)
        a = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1) - 0.5
        t = (xs * math.cos(a) + ys * math.sin(a)) / math.sqrt(0.5) + 0.5  # in [0, 1]
        t = np.clip(t, 0, 1)[..., None]
        return base * (1 - t) + other * t
    if kind == "noise":
        # smooth blotches: a coarse random grid bilinearly upsampled, +-0.15 around `base`
        g = 4
        coarse = rng.uniform(-0.15, 0.15, (g, g, 3))
        up = np.asarray(Image.fromarray(((coarse + 0.15) / 0.3 * 255).astype(np.uint8)).resize(
            (size, size), Image.BILINEAR), dtype=np.float64) / 255 * 0.3 - 0.15
        return np.clip(base + up, 0, 1)
    if kind.startswith("confetti"):
        # a grid of independent random colours (cells of `cell` pixels): every image has the same colour
        # statistics, and two crops of one image do not line the cells up, so it carries no identity
        cell = int(kind[len("confetti"):] or 2)
        g = -(-size // cell)
        cells = rng.random((g, g, 3))
        return np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)[:size, :size]
    raise ValueError(f"unknown background kind {kind!r}; choose from {BACKGROUNDS}")


# ---------------------------------------------------------------------------------------------------
# One image

def draw_image(rng, label, image_size=DEFAULT_IMAGE_SIZE, objects=DEFAULT_OBJECTS, scale=DEFAULT_SCALE,
               backgrounds=BACKGROUNDS, min_contrast=0.25, palette=False, rotation=True):
    """Draw one image of class `label` with `rng`; return (PIL RGB image, dict of nuisance factors).

    The draws (and their order) never depend on `label`, except the one that picks the shape's outline.
    """
    size = image_size
    kind = backgrounds[int(rng.integers(len(backgrounds)))]
    bg_colour = _random_colour(rng, palette)
    canvas = _background(rng, kind, size, bg_colour)
    n = int(rng.integers(objects[0], objects[1] + 1))
    hi = size * SUPERSAMPLE
    fg_colours, radii, xs, ys, angles = [], [], [], [], []
    shape_fn = SHAPES[label][1]
    for _ in range(n):
        colour = _contrasting_colour(rng, bg_colour, min_contrast, palette)
        r = rng.uniform(scale[0], scale[1]) * size
        cx = rng.uniform(r * 0.8, size - r * 0.8)
        cy = rng.uniform(r * 0.8, size - r * 0.8)
        angle = rng.uniform(0, 2 * math.pi) if rotation else 0.0
        mask = Image.new("L", (hi, hi), 0)
        shape_fn(ImageDraw.Draw(mask), r * SUPERSAMPLE, cx * SUPERSAMPLE, cy * SUPERSAMPLE, angle)
        alpha = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float64)[..., None] / 255.0
        canvas = canvas * (1 - alpha) + colour * alpha
        fg_colours.append(colour)
        radii.append(r / size)
        xs.append(cx / size)
        ys.append(cy / size)
        angles.append(angle)
    image = Image.fromarray(np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8), "RGB")
    fg = np.mean(fg_colours, axis=0)
    factors = {
        "background": kind,
        "bg_r": round(float(bg_colour[0]), 4), "bg_g": round(float(bg_colour[1]), 4),
        "bg_b": round(float(bg_colour[2]), 4),
        "fg_r": round(float(fg[0]), 4), "fg_g": round(float(fg[1]), 4), "fg_b": round(float(fg[2]), 4),
        "objects": n,
        "scale": round(float(np.mean(radii)), 4),
        "x": round(float(np.mean(xs)), 4), "y": round(float(np.mean(ys)), 4),
        "angle": round(float(np.mean(angles)), 4),
    }
    return image, factors


# ---------------------------------------------------------------------------------------------------
# Patterns: classes defined by a periodic structure that fills the whole image, so every crop of it
# shows the class. Each is a function of rotated coordinates (u, v) in units of the period, returning a
# boolean foreground mask.

def _p_stripes(u, v, rng):
    return np.mod(u, 1.0) < 0.5


def _p_checker(u, v, rng):
    return (np.floor(u) + np.floor(v)) % 2 == 0


def _p_dots(u, v, rng):
    return (np.mod(u, 1.0) - 0.5) ** 2 + (np.mod(v, 1.0) - 0.5) ** 2 < 0.3 ** 2


def _p_grid(u, v, rng):
    return (np.abs(np.mod(u, 1.0) - 0.5) < 0.14) | (np.abs(np.mod(v, 1.0) - 0.5) < 0.14)


def _p_rings(u, v, rng):
    return np.mod(np.sqrt(u ** 2 + v ** 2), 1.0) < 0.5


def _p_zigzag(u, v, rng):
    tri = np.abs(np.mod(v, 1.0) - 0.5) * 2  # triangle wave in [0, 1]
    return np.mod(u + tri, 1.0) < 0.5


def _p_waves(u, v, rng):
    return np.mod(u + 0.3 * np.sin(2 * math.pi * v * 0.5), 1.0) < 0.5


def _p_triangles(u, v, rng):
    return np.mod(u, 1.0) + np.mod(v, 1.0) < 1.0


PATTERNS = (
    ("stripes", _p_stripes), ("checker", _p_checker), ("dots", _p_dots), ("grid", _p_grid),
    ("rings", _p_rings), ("zigzag", _p_zigzag), ("waves", _p_waves), ("triangles", _p_triangles),
)


def draw_pattern(rng, label, image_size=DEFAULT_IMAGE_SIZE, period=(0.2, 0.35), palette=False,
                 min_contrast=0.25, rotation=True, regions=1):
    """Draw one pattern image of class `label`; return (PIL RGB image, dict of nuisance factors).

    regions: with n > 1 the image is a patchwork of n cells (the Voronoi cells of n random points), each
        showing the class's pattern at its own orientation and phase; colours and period are the image's.
    """
    size = image_size
    bg_colour = _random_colour(rng, palette)
    fg_colour = _contrasting_colour(rng, bg_colour, min_contrast, palette)
    p = rng.uniform(period[0], period[1]) * size  # period in pixels
    hi = size * SUPERSAMPLE
    grid_y, grid_x = (np.mgrid[0:hi, 0:hi] + 0.5) / SUPERSAMPLE - size / 2.0
    mask = np.zeros((hi, hi))
    cell = np.zeros((hi, hi), dtype=np.int64)
    if regions > 1:  # the cell of every (supersampled) pixel: its nearest seed point
        seeds = rng.uniform(-0.5, 0.5, (regions, 2)) * size
        distance2 = (grid_x[..., None] - seeds[:, 0]) ** 2 + (grid_y[..., None] - seeds[:, 1]) ** 2
        cell = np.argmin(distance2, axis=-1)
    angles = []
    for region in range(regions):
        angle = rng.uniform(0, 2 * math.pi) if rotation else 0.0
        ox, oy = rng.uniform(-0.5, 0.5, 2) * size  # shifts the pattern's origin (its phase, and the rings' centre)
        inside = cell == region  # the pattern is evaluated on this region's pixels only
        xs, ys = grid_x[inside] - ox, grid_y[inside] - oy
        c, s = math.cos(angle), math.sin(angle)
        mask[inside] = PATTERNS[label][1]((xs * c + ys * s) / p, (-xs * s + ys * c) / p, rng)
        angles.append(angle)
    angle = angles[0]
    alpha = mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    canvas = bg_colour * (1 - alpha) + fg_colour * alpha
    image = Image.fromarray(np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8), "RGB")
    factors = {
        "background": "solid",
        "bg_r": round(float(bg_colour[0]), 4), "bg_g": round(float(bg_colour[1]), 4),
        "bg_b": round(float(bg_colour[2]), 4),
        "fg_r": round(float(fg_colour[0]), 4), "fg_g": round(float(fg_colour[1]), 4),
        "fg_b": round(float(fg_colour[2]), 4),
        "objects": 1, "scale": round(p / size, 4),
        "x": round(float(ox / size + 0.5), 4), "y": round(float(oy / size + 0.5), 4),
        "angle": round(angle, 4),
    }
    return image, factors


# ---------------------------------------------------------------------------------------------------
# The ImageFolder tree

METADATA_FIELDS = ("split", "path", "label", "class_name", "background", "bg_r", "bg_g", "bg_b",
                   "fg_r", "fg_g", "fg_b", "objects", "scale", "x", "y", "angle")


STYLES = ("shapes", "patterns")


def class_names(style="shapes"):
    """The class names of a style, in label order."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {STYLES}")
    return tuple(name for name, _ in (PATTERNS if style == "patterns" else SHAPES))


def _num_classes(num_classes, style):
    return len(class_names(style)) if num_classes is None else int(num_classes)


def _check_args(num_classes, train_per_class, val_per_class, image_size, style="shapes"):
    n = len(class_names(style))
    if not 2 <= num_classes <= n:
        raise ValueError(f"num_classes must be between 2 and {n} for style {style!r}, got {num_classes}")
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError("train_per_class and val_per_class must be at least 1")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")


def generate(root, seed=0, num_classes=DEFAULT_NUM_CLASSES, train_per_class=DEFAULT_TRAIN_PER_CLASS,
             val_per_class=DEFAULT_VAL_PER_CLASS, image_size=DEFAULT_IMAGE_SIZE, objects=DEFAULT_OBJECTS,
             scale=DEFAULT_SCALE, backgrounds=BACKGROUNDS, palette=DEFAULT_PALETTE, rotation=True,
             style=DEFAULT_STYLE, regions=1):
    """Write the data set under `root` (created if missing) and return `root`.

    Layout: `root/train/<class>/<class>_<index>.png`, `root/val/...` likewise, and `root/metadata.csv`
    with one row per image (split, path relative to root, label, class name and nuisance factors).
    Class folders are named `<label>_<name>` (e.g. `00_disk`) so that ImageFolder's sorted order is the
    label order. Same arguments, same bytes.

    style: "shapes" (one to a few copies of a shape over a background; `objects`, `scale` and
        `backgrounds` apply) or "patterns" (a periodic structure filling the image: stripes, checker,
        dots, grid, rings, zigzag, waves, triangles; random colours, period, phase and orientation).
    palette: False for colours uniform in the RGB cube, True for the 10-colour PALETTE, n for its first
        n colours (the "gradient" and "noise" backgrounds still shade around a palette colour).
    rotation: random orientation of the shapes or patterns (else upright).
    regions: patterns only; n > 1 makes every image a patchwork of n regions, each with its own
        orientation and phase (see draw_pattern); the metadata's angle is the first region's and its x,
        y the last region's pattern origin.
    """
    num_classes = _num_classes(num_classes, style)
    _check_args(num_classes, train_per_class, val_per_class, image_size, style)
    if regions < 1 or (regions > 1 and style != "patterns"):
        raise ValueError(f"regions must be 1, or more for style 'patterns'; got {regions} for style {style!r}")
    objects = tuple(int(v) for v in objects)
    scale = tuple(float(v) for v in scale)
    backgrounds = tuple(backgrounds)
    rows = []
    counts = {"train": train_per_class, "val": val_per_class}
    for split_id, split in enumerate(SPLITS):
        for label in range(num_classes):
            cls = f"{label:02d}_{class_names(style)[label]}"
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for i in range(counts[split]):
                # one independent stream per image: parallel-safe, and adding classes or images leaves
                # the others unchanged
                rng = np.random.default_rng([seed, split_id, label, i])
                if style == "patterns":
                    image, factors = draw_pattern(rng, label, image_size, palette=palette,
                                                  rotation=rotation, regions=regions)
                else:
                    image, factors = draw_image(rng, label, image_size, objects, scale, backgrounds,
                                                palette=palette, rotation=rotation)
                rel = f"{split}/{cls}/{cls}_{i:05d}.png"
                image.save(os.path.join(root, rel), format="PNG", compress_level=1)
                rows.append({"split": split, "path": rel, "label": label, "class_name": class_names(style)[label],
                             **factors})
    with open(os.path.join(root, "metadata.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METADATA_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return root


def read_metadata(root):
    """The rows of `root/metadata.csv` as dicts (numbers converted)."""
    out = []
    with open(os.path.join(root, "metadata.csv"), newline="") as f:
        for row in csv.DictReader(f):
            for k in ("label", "objects"):
                row[k] = int(row[k])
            for k in ("bg_r", "bg_g", "bg_b", "fg_r", "fg_g", "fg_b", "scale", "x", "y", "angle"):
                row[k] = float(row[k])
            out.append(row)
    return out


def dataset_name(seed=0, num_classes=DEFAULT_NUM_CLASSES, train_per_class=DEFAULT_TRAIN_PER_CLASS,
                 val_per_class=DEFAULT_VAL_PER_CLASS, image_size=DEFAULT_IMAGE_SIZE, **options):
    """The cache folder's name: every argument that changes the bytes, and the generator version.

    `options` are generate()'s other keyword arguments; those given are folded into a short digest.
    """
    style = options.get("style", DEFAULT_STYLE)
    num_classes = _num_classes(num_classes, style)
    name = (f"{style}-v{GENERATOR_VERSION}-c{num_classes}-train{train_per_class}-val{val_per_class}"
            f"-px{image_size}-seed{seed}")
    rest = {k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items() if k != "style"}
    if rest:
        digest = hashlib.sha1(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:8]
        name += f"-{digest}"
    return name


def default_cache_dir():
    """`$MOCO_DATA_CACHE` if set, else `~/.cache/moco-synthetic`."""
    return os.environ.get("MOCO_DATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                             "moco-synthetic")


def _where_the_cache_is_set():
    return "from MOCO_DATA_CACHE" if os.environ.get("MOCO_DATA_CACHE") else "the default; MOCO_DATA_CACHE is unset"


def _reason(err):
    """An OSError's reason and the file it concerns, in a few words."""
    reason = err.strerror or str(err) or type(err).__name__
    return f"{reason} ('{err.filename}')" if err.filename else reason


def ensure_dataset(cache_dir=None, seed=0, num_classes=DEFAULT_NUM_CLASSES,
                   train_per_class=DEFAULT_TRAIN_PER_CLASS, val_per_class=DEFAULT_VAL_PER_CLASS,
                   image_size=DEFAULT_IMAGE_SIZE, **options):
    """Return the path of the cached data set with these arguments, generating it first if needed.

    `cache_dir` defaults to `default_cache_dir()`; `options` are passed on to generate().

    The data are written into a temporary folder beside the final one and renamed into place, so a
    generation that is killed never leaves a half data set under the final name (at most a `.tmp-*`
    folder, which later calls ignore). Two processes racing keep whichever finished first.
    """
    cache_dir = cache_dir or default_cache_dir()
    num_classes = _num_classes(num_classes, options.get("style", DEFAULT_STYLE))
    _check_args(num_classes, train_per_class, val_per_class, image_size,
                options.get("style", DEFAULT_STYLE))
    final = os.path.join(cache_dir, dataset_name(seed, num_classes, train_per_class, val_per_class,
                                                 image_size, **options))
    if os.path.isdir(final):
        return final
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final) + "-", dir=cache_dir)
    try:
        generate(tmp, seed=seed, num_classes=num_classes, train_per_class=train_per_class,
                 val_per_class=val_per_class, image_size=image_size, **options)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isdir(final):  # not a lost race: a real error
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def describe(num_classes=DEFAULT_NUM_CLASSES, train_per_class=DEFAULT_TRAIN_PER_CLASS,
             val_per_class=DEFAULT_VAL_PER_CLASS, image_size=DEFAULT_IMAGE_SIZE, seed=0,
             style=DEFAULT_STYLE, regions=1):
    """One line saying what the data set is."""
    num_classes = _num_classes(num_classes, style)
    names = ", ".join(class_names(style)[:num_classes])
    patchwork = f", each image a patchwork of {regions} regions" if regions > 1 else ""
    return (f"synthetic {style} (v{GENERATOR_VERSION}, seed {seed}): {num_classes} classes ({names}), "
            f"{train_per_class} train + {val_per_class} val images per class, {image_size}x{image_size} "
            f"RGB{patchwork}; colours, position, size and orientation are random and carry no label "
            f"information")


# ---------------------------------------------------------------------------------------------------
# The scripts' built-in data set (main_moco.py / main_lincls.py with DIR omitted, scripts/demo.py)

# The size of the built-in data set, and a seconds-long one for smoke tests. The built-in images are
# patchworks of 4 regions, each with its own orientation: a random-init network's features then say
# little about the class, while MoCo, whose crops see different regions of one image, learns the
# pattern that the regions share (the demo's kNN margin: see the README).
DEFAULT_SIZES = {"num_classes": 8, "train_per_class": DEFAULT_TRAIN_PER_CLASS,
                 "val_per_class": DEFAULT_VAL_PER_CLASS, "image_size": DEFAULT_IMAGE_SIZE, "regions": 4}
TINY = {"num_classes": 3, "train_per_class": 16, "val_per_class": 4, "image_size": 24}


def default_dataset(seed=0, log=print, **sizes):
    """The built-in data set's path, generated on first use in the cache folder; says where."""
    sizes = {**DEFAULT_SIZES, **sizes}
    from moco.errors import UserError
    cache = default_cache_dir()
    if os.path.exists(cache) and not os.path.isdir(cache):
        raise UserError(f"the cache folder of the built-in data set '{cache}' ({_where_the_cache_is_set()}) is "
                        f"a file, not a folder; set MOCO_DATA_CACHE to a writable folder, or pass a data "
                        f"folder DIR")
    try:
        path = ensure_dataset(seed=seed, **sizes)
    except OSError as err:  # the cache folder is under a file, read-only, full, ...
        raise UserError(f"cannot write the built-in data set to the cache folder '{default_cache_dir()}' "
                        f"({_where_the_cache_is_set()}): {_reason(err)}; set MOCO_DATA_CACHE to a writable "
                        f"folder with a few MB free, or pass a data folder DIR") from None
    log(f"=> built-in data set: {path} ({describe(seed=seed, **sizes)})")
    return path

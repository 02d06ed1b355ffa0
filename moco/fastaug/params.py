"""The random part of a recipe's colour steps (moco.loader.Recipe): per-image parameters, drawn as named
fields, and the per-image sequence of operations they select.

The distributions are those of torchvision: ColorJitter applies its four operations in a uniform random
order per image (as `ColorJitter.get_params` does with `randperm(4)`), with brightness / contrast /
saturation factors uniform in [max(0, 1 - s), 1 + s] and a hue shift uniform in [-h, h]; the blur's
sigma is uniform in its range (SimCLR's blur, MoCo v2). Parameters are always drawn on the CPU, so the
stream does not depend on the device.
"""
import torch

from moco.loader import BlurStep, ColorJitterStep, GrayscaleStep

# The four ColorJitter operations, numbered as `ColorJitter.get_params` numbers them (fn_idx); also
# the columns of the `factors` field.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
JITTER_NAMES = {BRIGHTNESS: "brightness", CONTRAST: "contrast", SATURATION: "saturation", HUE: "hue"}
# The named fields of the colour parameters of N images (first dimension N): jitter (bool, ColorJitter
# applied), order (long N x 4, the jitter operations' order), factors (float N x 4: brightness,
# contrast, saturation factors, hue shift in turns), gray (bool), blur (bool), sigma (float, PIL radius).
COLOR_FIELDS = ("jitter", "order", "factors", "gray", "blur", "sigma")
UNIFORMS = 12  # per image: jitter coin, 4 for the order, 4 factors, gray coin, blur coin, sigma


def select(params, index):
    """The colour parameters of the images `index` (anything that indexes a tensor's first dimension)."""
    return {name: params[name][index] for name in COLOR_FIELDS}


class ColorDraws:
    """Draws the colour parameters of a recipe's steps. Every recipe draws the same 12 uniforms per image
    in the same roles; a step the recipe lacks is drawn as its step type's default (never applied)."""

    def __init__(self, recipe):
        self.jitter = recipe.step(ColorJitterStep) or ColorJitterStep(p=0.0)
        self.gray = recipe.step(GrayscaleStep) or GrayscaleStep(p=0.0)
        self.blur = recipe.step(BlurStep) or BlurStep(p=0.0)

    def ranges(self):
        """(low, high) of the brightness, contrast, saturation factors and the hue shift."""
        j = self.jitter
        return [(max(0.0, 1.0 - j.brightness), 1.0 + j.brightness), (max(0.0, 1.0 - j.contrast), 1.0 + j.contrast),
                (max(0.0, 1.0 - j.saturation), 1.0 + j.saturation), (-j.hue, j.hue)]

    def __call__(self, n, generator=None):
        """The parameters of `n` images from one draw of 12 uniforms each (the global torch RNG, or a CPU
        `generator`): u < p for the coin flips, the argsort of 4 uniforms for the jitter order (a uniform
        random permutation, like randperm(4)), low + (high - low) u for the factors and sigma."""
        u = torch.rand(n, UNIFORMS, generator=generator)
        # the value of each uniform's role, computed over all 12 columns (unused ones span nothing)
        ranges = [(0.0, 0.0)] * 5 + self.ranges() + [(0.0, 0.0)] * 2 + [tuple(self.blur.sigma)]
        low = torch.tensor([r[0] for r in ranges])
        span = torch.tensor([r[1] - r[0] for r in ranges])
        values = torch.addcmul(low, u, span)
        return {"jitter": u[:, 0] < self.jitter.p, "order": torch.argsort(u[:, 1:5], dim=1),
                "factors": values[:, 5:9].contiguous(), "gray": u[:, 9] < self.gray.p,
                "blur": u[:, 10] < self.blur.p, "sigma": values[:, 11].contiguous()}


def programs(recipe, params):
    """Per image, the operations it undergoes in the recipe's order: a list of (name, value) tuples."""
    factors, order = params["factors"].tolist(), params["order"].tolist()
    applied = {name: params[name].tolist() for name in ("jitter", "gray", "blur")}
    sigma = params["sigma"].tolist()
    result = []
    for k in range(len(sigma)):
        ops = []
        for step in recipe.color:
            if isinstance(step, ColorJitterStep) and applied["jitter"][k]:
                ops += [(JITTER_NAMES[o], factors[k][o]) for o in order[k]]
            elif isinstance(step, GrayscaleStep) and applied["gray"][k]:
                ops.append(("gray", None))
            elif isinstance(step, BlurStep) and applied["blur"][k]:
                ops.append(("blur", sigma[k]))
        result.append(ops)
    return result

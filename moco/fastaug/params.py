"""The random part of the MoCo colour recipes: per-image parameters and the distributions they follow.

* v1 (`aug_plus=False`): RandomGrayscale(p=0.2) -> ColorJitter(0.4, 0.4, 0.4, 0.4).
* v2 (`aug_plus=True`): RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8) -> RandomGrayscale(p=0.2)
  -> RandomApply([GaussianBlur(sigma ~ U(0.1, 2.0))], p=0.5).

ColorJitter applies its four operations in a random order per image (a uniform random permutation, as
`ColorJitter.get_params` does with `randperm(4)`), with brightness / contrast / saturation factors
uniform in [0.6, 1.4] and a hue shift uniform in [-h, h]. Parameters are always drawn on the CPU (the
global torch RNG or a CPU `torch.Generator`), so the stream does not depend on the device.
"""
from dataclasses import dataclass, fields

import torch

# The four ColorJitter operations, numbered as `ColorJitter.get_params` numbers them (fn_idx).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
JITTER_NAMES = {BRIGHTNESS: "brightness", CONTRAST: "contrast", SATURATION: "saturation", HUE: "hue"}
PARAM_COLUMNS = 12


@dataclass
class AugParams:
    """Parameters of a batch of N images (CPU tensors, first dimension N).

    jitter: bool, ColorJitter applied (always True for v1). order: long N x 4, the order of the jitter
    operations (a permutation of BRIGHTNESS, CONTRAST, SATURATION, HUE). brightness, contrast,
    saturation: factors. hue: shift in turns. gray: bool, grayscale applied. blur: bool, blur applied.
    sigma: the blur's standard deviation (PIL radius).
    """
    jitter: torch.Tensor
    order: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor

    def __len__(self):
        return self.jitter.shape[0]

    def select(self, index):
        return AugParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to_tensor(self):
        """N x 12 float64: jitter, order (4 columns), brightness, contrast, saturation, hue, gray, blur,
        sigma (collates like any tensor; `from_tensor` reads it back exactly)."""
        cols = [self.jitter[:, None], self.order] + [getattr(self, name)[:, None] for name in
                                                     ("brightness", "contrast", "saturation", "hue", "gray",
                                                      "blur", "sigma")]
        return torch.cat([c.to(torch.float64) for c in cols], dim=1)

    @staticmethod
    def from_tensor(t):
        t = torch.as_tensor(t).cpu().reshape(-1, PARAM_COLUMNS)
        return AugParams(jitter=t[:, 0] != 0, order=t[:, 1:5].round().long(),
                         brightness=t[:, 5].float(), contrast=t[:, 6].float(), saturation=t[:, 7].float(),
                         hue=t[:, 8].float(), gray=t[:, 9] != 0, blur=t[:, 10] != 0, sigma=t[:, 11].float())


def looks_like_params(value):
    """True for AugParams or their N x 12 floating-point tensor form."""
    return isinstance(value, AugParams) or (torch.is_tensor(value) and value.dim() == 2
                                            and value.shape[1] == PARAM_COLUMNS and value.is_floating_point())


def _factor_range(value, center=1.0):
    return (max(0.0, center - value), center + value)


class ColorRecipe:
    """The colour distributions of the v1 (`aug_plus=False`) or v2 (`aug_plus=True`) recipe."""

    def __init__(self, aug_plus=False):
        self.aug_plus = bool(aug_plus)
        if self.aug_plus:  # loader.moco_v2_augmentation
            self.jitter_strength = (0.4, 0.4, 0.4, 0.1)
            self.p_jitter, self.p_gray, self.p_blur = 0.8, 0.2, 0.5
        else:  # loader.moco_v1_augmentation
            self.jitter_strength = (0.4, 0.4, 0.4, 0.4)
            self.p_jitter, self.p_gray, self.p_blur = 1.0, 0.2, 0.0
        self.sigma_range = (0.1, 2.0)
        b, c, s, h = self.jitter_strength
        self.brightness_range = _factor_range(b)
        self.contrast_range = _factor_range(c)
        self.saturation_range = _factor_range(s)
        self.hue_range = (-h, h)

    def describe(self):
        return (f"aug_plus={self.aug_plus}, jitter={self.jitter_strength}, p_jitter={self.p_jitter}, "
                f"p_gray={self.p_gray}, p_blur={self.p_blur}, sigma={self.sigma_range}")

    def sample_params(self, n, generator=None):
        """Draw the parameters of `n` images on the CPU (the global torch RNG, or a CPU `generator`)."""
        return AugParams.from_tensor(self.sample_params_tensor(n, generator))

    def sample_params_tensor(self, n, generator=None):
        """`sample_params` as its N x 12 tensor (`AugParams.to_tensor` layout), from one draw of 12
        uniforms per image: u < p for the coin flips, the argsort of 4 uniforms for the jitter order (a
        uniform random permutation, like randperm(4)), lo + (hi - lo) u for the factors and sigma."""
        u = torch.rand(n, PARAM_COLUMNS, generator=generator)
        ranges = [(0.0, 0.0)] * 5 + [self.brightness_range, self.contrast_range, self.saturation_range,
                                     self.hue_range, (0.0, 0.0), (0.0, 0.0), self.sigma_range]
        lo = torch.tensor([r[0] for r in ranges])
        span = torch.tensor([r[1] - r[0] for r in ranges])
        t = torch.addcmul(lo, u, span).double()
        t[:, 0] = (u[:, 0] < self.p_jitter).double()
        t[:, 1:5] = torch.argsort(u[:, 1:5], dim=1).double()
        t[:, 9] = (u[:, 9] < self.p_gray).double()
        t[:, 10] = (u[:, 10] < self.p_blur).double()
        return t

    def programs(self, params):
        """Per image, the sequence of operations it undergoes: a list of (name, value) tuples."""
        values = {name: getattr(params, name).tolist() for name in JITTER_NAMES.values()}
        jitter, order = params.jitter.tolist(), params.order.tolist()
        gray, blur, sigma = params.gray.tolist(), params.blur.tolist(), params.sigma.tolist()
        result = []
        for k in range(len(params)):
            ops_jitter = [(JITTER_NAMES[o], values[JITTER_NAMES[o]][k]) for o in order[k]] if jitter[k] else []
            ops_gray = [("gray", None)] if gray[k] else []
            if self.aug_plus:
                ops_blur = [("blur", sigma[k])] if blur[k] else []
                result.append(ops_jitter + ops_gray + ops_blur)
            else:
                result.append(ops_gray + ops_jitter)
        return result

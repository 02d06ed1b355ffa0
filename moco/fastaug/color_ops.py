"""Colour and blur operations of the MoCo recipes on float image batches, in place.

Each function follows torchvision's tensor semantics (`torchvision.transforms.functional` on float
images in [0, 1]) and works in place on N x 3 x H x W batches. The factor is a Python number (the same
for every image: the CPU path, one image at a time) or a tensor of N per-image factors (the batched
path). `ws` is an optional dict of preallocated buffers, reused across calls of the same shape.

The blur reproduces PIL's `GaussianBlur(radius=sigma)` (the reference's `loader.GaussianBlur`): PIL
approximates a Gaussian of standard deviation `radius` by three passes of an "extended" box filter per
axis (box radius l + a: integer part l and fractional end weight a chosen so that the three passes have
variance radius^2; Gwosdek et al. 2011), each pass replicating the edge pixels.
"""
import math

import torch
import torch.nn.functional as F

from moco.transfer import to_device, upload

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's tensor rgb_to_grayscale
_CONSTANTS = {}


def buffer(ws, name, shape, like):
    """A buffer of `shape` like `like`, kept in the workspace dict `ws` for the next call (fresh without one)."""
    if ws is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    key = (name, tuple(shape), like.dtype, like.device)
    buf = ws.get(key)
    if buf is None:
        buf = ws[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf


def _is_scalar(value):
    return isinstance(value, (int, float))


def _per_image(factor, x, dims=4):
    """N per-image values viewed for broadcasting over x; values not on x's device yet are copied
    without making the host wait (the batched path hands them over already there)."""
    factor = torch.as_tensor(factor)
    if factor.device != x.device:
        factor = to_device(factor, x.device)
    return factor.to(dtype=x.dtype).view((-1,) + (1,) * (dims - 1))


def constant(values, like, shape=(-1,)):
    """A constant tensor on like's device and dtype, copied there once per device and dtype."""
    key = (tuple(values), tuple(shape), like.device, like.dtype)
    if key not in _CONSTANTS:
        (_CONSTANTS[key],) = upload([torch.tensor(values, dtype=like.dtype).view(shape)], like.device)
    return _CONSTANTS[key]


def rgb_to_grayscale(x, out=None):
    """N x 1 x H x W luma with torchvision's weights (0.2989, 0.587, 0.114)."""
    wr, wg, wb = GRAY_WEIGHTS
    if out is None:
        out = torch.empty_like(x[:, :1])
    torch.mul(x[:, 0:1], wr, out=out)
    return out.add_(x[:, 1:2], alpha=wg).add_(x[:, 2:3], alpha=wb)


def grayscale_(x, ws=None):
    """torchvision rgb_to_grayscale(x, num_output_channels=3), in place."""
    n, _, h, w = x.shape
    gray = rgb_to_grayscale(x, buffer(ws, "gray", (n, 1, h, w), x))
    x.copy_(gray.expand_as(x))
    return x


def adjust_brightness_(x, factor):
    """torchvision adjust_brightness: clamp(factor * x, 0, 1)."""
    if _is_scalar(factor):
        x.mul_(factor)
        return x.clamp_(max=1.0) if factor > 1.0 else x  # factor <= 1 keeps [0, 1]
    return x.mul_(_per_image(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast_(x, factor):
    """torchvision adjust_contrast: blend with the mean of the grayscale image, clamp to [0, 1]."""
    weights = constant(GRAY_WEIGHTS, x)
    mean = (x.mean(dim=(2, 3)) * weights).sum(dim=1).view(-1, 1, 1, 1)  # the mean of the grayscale image
    if _is_scalar(factor):
        x.mul_(factor).add_(mean.mul_(1.0 - factor))
        return x.clamp_(0.0, 1.0) if factor > 1.0 else x  # a convex blend keeps [0, 1]
    f = _per_image(factor, x)
    return x.mul_(f).add_(mean.mul_(1.0 - f)).clamp_(0.0, 1.0)


def adjust_saturation_(x, factor, ws=None):
    """torchvision adjust_saturation: blend with the grayscale image, clamp to [0, 1]."""
    n, _, h, w = x.shape
    gray = rgb_to_grayscale(x, buffer(ws, "gray", (n, 1, h, w), x))
    if _is_scalar(factor):
        x.mul_(factor).add_(gray, alpha=1.0 - factor)
        return x.clamp_(0.0, 1.0) if factor > 1.0 else x
    f = _per_image(factor, x)
    return x.mul_(f).add_(gray.mul_(1.0 - f)).clamp_(0.0, 1.0)


def _hue_constants(x):
    shape = (1, 3, 1, 1)
    return (constant((3.0, 2.0, 4.0), x, shape), constant((1.0, -1.0, -1.0), x, shape),
            constant((-1.0, 2.0, 2.0), x, shape))


def adjust_hue_(x, hue, ws=None):
    """torchvision adjust_hue: shift the HSV hue by `hue` turns (in [-0.5, 0.5]), keeping S and V.

    With max V, min m, chroma C = V - m and the hue H in sixths of a turn (torchvision's RGB -> HSV:
    (g - b) / C if r is maximal, else 2 + (b - r) / C if g is, else 4 + (r - g) / C), the shifted image
    is m + C * T_c(H + 6 hue mod 6) with the triangle waves T_r = clamp(|H - 3| - 1, 0, 1),
    T_g = clamp(2 - |H - 2|, 0, 1), T_b = clamp(2 - |H - 4|, 0, 1): the piecewise HSV -> RGB of
    torchvision in closed form. Sextant selection uses sign(V - channel), which is exactly 0 or 1.
    """
    n, _, h, w = x.shape
    shape = (n, h, w)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    vmax = torch.maximum(r, g, out=buffer(ws, "hue_max", shape, x))
    vmax = torch.maximum(vmax, b, out=vmax)
    vmin = torch.minimum(r, g, out=buffer(ws, "hue_min", shape, x))
    vmin = torch.minimum(vmin, b, out=vmin)
    not_r = torch.sub(vmax, r, out=buffer(ws, "hue_a", shape, x)).sign_()  # 0 where r is maximal, else 1
    not_g = torch.sub(vmax, g, out=buffer(ws, "hue_b", shape, x)).sign_()  # 0 where g is maximal, else 1
    u = torch.sub(b, r, out=buffer(ws, "hue_u", shape, x))
    v = torch.sub(r, g, out=buffer(ws, "hue_v", shape, x))
    u.lerp_(v, not_g)  # g maximal: b - r; otherwise (b maximal): r - g
    num = torch.sub(g, b, out=v).lerp_(u, not_r)  # r maximal: g - b
    base = torch.addcmul(not_r, not_r, not_g, out=not_g)  # sextant: 0 (r maximal), 1 (g), 2 (b)
    if _is_scalar(hue):
        base.mul_(2.0).add_(6.0 * hue)
    else:
        base.mul_(2.0).add_(_per_image(hue, x, dims=3), alpha=6.0)
    chroma = torch.sub(vmax, vmin, out=u)
    # H' = 2 sextant + 6 hue + num / C; num is exactly 0 where C is 0
    hue6 = torch.addcdiv(base, num, torch.clamp(chroma, min=1e-12, out=not_r), out=v)
    wrap = torch.div(hue6, 6.0, out=not_r).floor_()
    hue6.sub_(wrap, alpha=6.0)  # now in [0, 6)
    centre, sign, offset = _hue_constants(x)
    torch.sub(hue6.unsqueeze(1), centre, out=x).abs_().mul_(sign).add_(offset).clamp_(0.0, 1.0)
    return torch.addcmul(vmin.unsqueeze(1), chroma.unsqueeze(1), x, out=x)


def pil_box_radius(sigma, passes=3):
    """Radius l + a of the extended box whose `passes` passes have variance sigma^2 (PIL's GaussianBlur).

    Gwosdek, Grewenig, Bruhn, Weickert (2011): box length L = sqrt(12 sigma^2 / passes + 1), integer
    radius l = floor((L - 1) / 2), fractional end weight
    a = (2l + 1) (l (l + 1) - 3 sigma^2 / passes) / (6 (sigma^2 / passes - (l + 1)^2)).
    """
    s2 = sigma * sigma / passes
    big_l = math.sqrt(12.0 * s2 + 1.0)
    l = math.floor((big_l - 1.0) / 2.0)
    a = (2 * l + 1) * (l * (l + 1) - 3.0 * s2) / (6.0 * (s2 - (l + 1) ** 2))
    return l + a


def box_kernel(radius):
    """The extended box of `radius` = l + a: 2l + 3 taps (a, 1, ..., 1, a) / (2 radius + 1)."""
    l = math.floor(radius)
    a = radius - l
    return [a / (2 * radius + 1)] + [1.0 / (2 * radius + 1)] * (2 * l + 1) + [a / (2 * radius + 1)]


def blur_passes(sigma):
    """The 1-D kernels applied one after the other along each axis for PIL's blur of `sigma`."""
    return [box_kernel(pil_box_radius(sigma))] * 3


class _PaddedPair:
    """Two buffers shaped like x with `pad` extra elements on both sides of `dim`, and cached views.

    A blur pass reads a padded buffer and writes the interior of the other one, whose edges are then
    filled by replication: no allocation and no view creation per pass (both cost as much as the
    arithmetic on one 224 x 224 crop).
    """

    def __init__(self, like, dim, pad):
        shape = list(like.shape)
        size = shape[dim]
        shape[dim] += 2 * pad
        self.views = []
        for _ in range(2):
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            shifted = {t: buf.narrow(dim, pad + t, size) for t in range(-pad, pad + 1)}
            left, right = buf.narrow(dim, 0, pad), buf.narrow(dim, pad + size, pad)
            edges = ((left, buf.narrow(dim, pad, 1).expand_as(left)),
                     (right, buf.narrow(dim, pad + size - 1, 1).expand_as(right)))
            self.views.append((shifted, edges))

    @staticmethod
    def fill_edges(views):
        for edge, source in views[1]:
            edge.copy_(source)


def _blur_axis_scalar_(x, kernels, dim, ws):
    """x <- the `kernels` (symmetric, odd lengths) applied one after the other along `dim`, each pass
    replicating the edge pixels of its own input (as PIL's box blur does)."""
    pad = max(len(k) for k in kernels) // 2
    key = ("blur", tuple(x.shape), dim, pad, x.dtype, x.device)
    pair = ws.get(key) if ws is not None else None
    if pair is None:
        pair = _PaddedPair(x, dim, pad)
        if ws is not None:
            ws[key] = pair
    src = pair.views[0]
    src[0][0].copy_(x)
    for p, kernel in enumerate(kernels):
        _PaddedPair.fill_edges(src)
        dst_view = x if p == len(kernels) - 1 else pair.views[(p + 1) % 2][0][0]
        r = len(kernel) // 2
        shifted = src[0]
        torch.mul(shifted[0], kernel[r], out=dst_view)
        for t in range(1, r + 1):
            if kernel[r + t] != 0.0:
                dst_view.add_(shifted[t], alpha=kernel[r + t])
                dst_view.add_(shifted[-t], alpha=kernel[r - t])
        src = pair.views[(p + 1) % 2]
    return x


def _pass_batched_(x, kernels, dim):
    """x <- per-image `kernels` (N x K, K odd) along `dim` (2 or 3), edges replicated, as a grouped conv."""
    n, c, h, w = x.shape
    k = kernels.shape[1]
    r = k // 2
    if kernels.device != x.device:
        kernels = to_device(kernels, x.device)
    weight = kernels.to(dtype=x.dtype).repeat_interleave(c, dim=0)
    if dim == 3:
        y = F.pad(x, (r, r, 0, 0), mode="replicate").view(1, n * c, h, w + 2 * r)
        y = F.conv2d(y, weight.view(n * c, 1, 1, k), groups=n * c)
    else:
        y = F.pad(x, (0, 0, r, r), mode="replicate").view(1, n * c, h + 2 * r, w)
        y = F.conv2d(y, weight.view(n * c, 1, k, 1), groups=n * c)
    x.copy_(y.view(n, c, h, w))
    return x


def blur_kernels(sigmas):
    """The per-image kernels of a batched blur of the N `sigmas` (a list): one N x K float32 CPU tensor
    per pass, every image's kernel centred in the pass's common (odd) length K with zeros."""
    per_image = [blur_passes(s) for s in sigmas]
    tables = []
    for p in range(len(per_image[0])):
        k = max(len(passes[p]) for passes in per_image)
        rows = []
        for passes in per_image:
            pad = (k - len(passes[p])) // 2
            rows.append([0.0] * pad + passes[p] + [0.0] * pad)
        tables.append(torch.tensor(rows, dtype=torch.float32))
    return tables


def blur_batched_(x, kernels):
    """x <- each pass of `kernels` (from `blur_kernels`, on x's device or not) along both axes."""
    for table in kernels:
        _pass_batched_(x, table, 3)
        _pass_batched_(x, table, 2)
    return x


def blur_(x, sigma, ws=None):
    """In place blur of PIL's GaussianBlur(radius=sigma).

    `sigma` is a number (every image) or a tensor of N per-image values.
    """
    if _is_scalar(sigma):
        kernels = blur_passes(sigma)
        _blur_axis_scalar_(x, kernels, 3, ws)
        return _blur_axis_scalar_(x, kernels, 2, ws)
    kernels = blur_kernels(torch.as_tensor(sigma).tolist())
    return blur_batched_(x, upload(kernels, x.device))

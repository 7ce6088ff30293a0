"""The built-in image descriptor: a fixed, weight-free vector for near-duplicate search and coarse grouping.

Model kind ``descriptor`` lets the pipeline run end to end with no model weights at all
(offline installs, the demo, tests). :class:`ImageDescriptor` is a deterministic function
of the pixels: no learned parameters, only a few fixed constants. It maps a batch of
``DESCRIPTOR_INPUT_SIZE`` x ``DESCRIPTOR_INPUT_SIZE`` RGB images (the whole image squashed
to a square, see :func:`descriptor_preprocessing`) to ``DESCRIPTOR_DIM`` float32 vectors of
unit length. It is meant to be compared by cosine distance after centring the vectors on
the dataset mean (as the SSCD vectors are), and is tuned for that.

The input is small on purpose (64 x 64): every block below works on coarse grids or global
statistics, so more pixels would add cost (JPEG draft decoding at 1/8 scale, transfer, the
forward pass) and no measured quality. The forward pass runs at about a thousand images per
second on one CPU core (copy variant: 800-1300 measured on a shared machine).

What it captures (four blocks, each normalised, then weighted and concatenated):

- **grey layout** (256 values): the luma on a 16 x 16 grid, low-passed (pooled to 32 x 32,
  blurred by a 3 x 3 binomial filter, pooled again) and standardised per image (minus its
  mean, over its standard deviation). Folded left/right: the mirror-symmetric part of the
  grid and the magnitude of its antisymmetric part.
- **colour layout** (128 values): two opponent-colour channels (red-green, yellow-blue) on a
  low-passed 8 x 8 grid, divided by the luma standard deviation, folded the same way. The
  block shrinks towards zero for nearly grey images instead of amplifying their noise.
- **edge layout** (64 values): histograms of gradient orientation (8 unsigned bins,
  magnitude weighted) on a 4 x 4 grid of cells, averaged with their own mirror image (cells
  flipped, bins reflected), square-rooted and centred.
- **global statistics** (64 values): grey-level, saturation and gradient-magnitude
  distributions, the orientation profile (how much of the edge energy is horizontal or
  vertical), flatness (the share of tiny steps between neighbours), how few colours the image uses (palette
  concentration), how much of it lies close to its median grey (background dominance,
  either polarity) and a 27-bin colour histogram. These separate drawn images (documents,
  charts, maps: flat backgrounds, thin axis-aligned strokes, few colours) from photos. The
  block carries about 40% of a photo's centred vector (grey layout ~20%, colour layout
  ~10%, edges ~30%), so that example images of a category find other images of it.

Two weightings of these blocks (the model entry's ``variant``): ``content`` (the global
statistics weigh most: grouping by example images) and ``copy`` (the default: near-duplicate
search). The copy variant (version 2) also crops uniform borders off the decoded image
(:func:`descriptor_preprocessing`), drops a 3-pixel margin of its 64 x 64 input,
centre-weights and blurs its grey grid harder, and lets colour weigh little; see
:class:`CopyGeometry` for each step and what it bought.

Distances below are cosine distances after centring on the dataset mean, for the copy
variant, measured by ``benchmarks/descriptor_quality.py`` on the generated demo pool and on
the held-out corpus (:mod:`curation_assets.demo.heldout`, edits the demo does not plant). On
the demo pool two unrelated photos sit at a median of ~1.0; 1% of such pairs come closer
than ~0.5, 0.1% closer than ~0.38 (held-out corpus: ~0.24). At the demo threshold 0.1 the
held-out corpus's pairs are found at 96% recall with no false pair, and no two adjacent
tiles of one photo are grouped (closest 0.27).

What it is invariant to, and how:

- **horizontal flips**: exactly, up to float rounding (< 1e-4 per value). Every layout
  block is symmetrised over the image and its mirror (the grids are folded, orientation
  bins reflected, the margin and the centre weighting are symmetric); the global
  statistics do not depend on position.
- **re-encoding, resizing, aspect changes, noise, blur**: the input is only 64 x 64 and
  every layout block is a low-passed coarse grid, so JPEG artefacts (even quality 20-30),
  resampling (also 4x down and up again), pixel noise, Gaussian blur and small text
  overlays typically move it by less than 0.01. Aspect changes (a 0.88 squash) vanish in
  the square resize.
- **borders and letterboxing**: cropped before describing (bars of one colour, any colour,
  up to 35% of a side from each end): a letterboxed copy lands at ~0.001, a 10% black
  frame at ~0.0001.
- **greyscale and colour changes**: colour weighs little in the copy variant, so a
  greyscale copy lands at ~0.05 (97% found at 0.1), saturation x1.6 or x0.3 at ~0.01.
- **brightness and contrast**: the layout blocks are standardised per image (grey),
  divided by the luma spread (colour) or normalised by the total edge energy (edges), so
  they follow affine changes of the grey levels: gamma 0.6, brightness x1.4 or contrast
  x0.6 cost ~0.01.
- **small crops, shifts and tilts**: cropping a few % per side or turning by a few degrees
  moves the coarse grids by less than a cell; a +-3 degree rotation's black corners fall in
  the dropped margin (3 degrees: ~0.01, 8 degrees: ~0.09; crops of 5% per side ~0.05, 10%
  ~0.15). A corner watermark box mostly lands in the down-weighted outer cells (~0.02,
  88% found at 0.1).

Limits (bring a real model, e.g. SSCD or CLIP, when these matter):

- not rotation invariant: a copy turned by 90 or 180 degrees, or flipped upside down, lands
  at ~0.9, outside any useful near-duplicate threshold (rotation has its own stage);
  heavily over- or under-exposed copies land at ~0.5-0.7 too;
- crops beyond ~10% per side (15%: ~0.28, 20%: ~0.42), collages, large overlays and
  textured (not uniform) frames change the coarse layout and lose the match;
- no semantics: it compares layout, colour and texture statistics, so different images that
  share layout and colours (two shots of one scene, two pages of one form, two charts of
  one style) can be as close as a real near duplicate, and two views of the same object
  are not close at all;
- the content grouping is coarse: drawn pages, charts and maps against photos, by example
  images. It does not recognise objects, scenes or text, and a category whose examples vary
  a lot (light and dark charts) needs examples of each variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as nnf

from curation_assets.core.embed.preprocess import Preprocessing

DESCRIPTOR_INPUT_SIZE = 64  # S: images are squashed to S x S before the descriptor sees them
DESCRIPTOR_DIM = 512  # D
# The module's version: the highest of VARIANT_VERSIONS below (each variant records its own).
DESCRIPTOR_VERSION = 2

_THUMB = 16  # grey layout grid
_CHROMA = 8  # colour layout grid
_CELLS = 4  # edge-orientation grid
_BINS = 8  # orientation bins over [0, pi)
_COLOUR_LEVELS = 3  # per channel, for the colour histogram (3**3 bins)
_LUMA = (0.299, 0.587, 0.114)
# Block weights (each block is unit length before weighting), chosen on the demo pool. With the
# content weights, after
# centring on the dataset mean, a photo's vector is then ~20% grey layout, ~10% colour
# layout, ~30% edges and ~40% global statistics (shares of its squared length). A larger
# global weight groups drawings better but lets brightness changes weigh more.
#
# Two weightings of the same blocks (the model entry's ``variant``):
# - ``content`` (the weights above): coarse content grouping, e.g. example filters that tell
#   drawn documents, charts and maps from photos.
# - ``copy``: near-duplicate search. Spatial layout dominates, so two different pages of
#   text, which share every global statistic, stay apart. On the demo pool at cosine
#   distance 0.1 after centring, content-weighted vectors put 339 pairs of different
#   document pages under the threshold (precision 0.61 against the planted copies); the
#   copy weighting kept recall (0.93) at precision 0.99. Version 2 of the copy variant (the
#   weights below and CopyGeometry) finds 0.96 of the planted copies at precision 1.0 there
#   (1500-image pool), and 0.96 of the held-out corpus's pairs, also at precision 1.0.
VARIANT_WEIGHTS: dict[str, dict[str, float]] = {
    "content": {"grey": 1.0, "colour": 0.7, "edges": 1.0, "global": 3.5},
    "copy": {"grey": 1.0, "colour": 0.3, "edges": 0.5, "global": 0.3},
}


@dataclass(frozen=True)
class CopyGeometry:
    """What the copy variant (version 2) does beyond the content variant's blocks, and why.

    Chosen on the held-out corpus (curation_assets/demo/heldout.py, edits the demo does not
    plant) and checked on the demo pool; see benchmarks/descriptor_quality.py.

    - ``margin`` pixels of the 64 x 64 input are dropped on every side (the rest is resized
      back to 64): a +-3 degree rotation's black corners, what is left of a letterbox bar after
      JPEG ringing and most of a corner watermark lie there. Held-out +-3 degree rotations went
      from 47% to 100% found, the hard negatives (adjacent tiles of one photo) moved from
      0.10 to 0.27 apart.
    - ``window``: the grey grid's outer cells weigh less (1 - window * r^2, r the distance
      from the centre in [-1, 1] per axis), for the same edits: corner watermarks 82% -> 88%.
    - ``blur_passes`` 5 x 5 binomial blurs of the 32 x 32 luma before it is pooled to the
      16 x 16 grid (instead of one 3 x 3): small shifts and crops move the grid less (the
      demo's planted crops of up to 10% per side: median ~0.09 -> ~0.06, found at 0.1 in
      53% -> 67% of cases on a 1500-image pool).
    - the colour layout and the global statistics weigh 0.3 (were 0.7 and 0.5): a greyscale
      copy loses all of its colour, which cost ~0.2 (6% of greyscale copies found at 0.1);
      now ~0.05 (97%). Layout alone still keeps unrelated photos apart (0.1% of such
      pairs are closer than ~0.24).
    """

    margin: int = 0
    window: float = 0.0
    blur_passes: int = 0  # 0: the content variant's single 3 x 3 blur


VARIANT_GEOMETRY: dict[str, CopyGeometry] = {
    "content": CopyGeometry(),
    "copy": CopyGeometry(margin=3, window=0.5, blur_passes=3),
}
# Part of a vector's identity, per variant: bump a variant's number on any change that alters
# its output, so stored vectors made by another version are not mixed with new ones. The
# content variant is unchanged since version 1 (its vectors stay valid); copy is at 2.
VARIANT_VERSIONS: dict[str, int] = {"content": 1, "copy": 2}
DEFAULT_VARIANT = "copy"
_EPS = 1e-6


def descriptor_preprocessing(variant: str = DEFAULT_VARIANT) -> Preprocessing:
    """The whole image squashed to S x S (bilinear), normalised to [0, 1] on the device.

    The copy variant first crops uniform bars off the decoded image (letterboxing, padding,
    plain frames), so a padded copy describes the same pixels as its original: held-out
    letterboxed copies went from 0% to 100% found. The content variant keeps the whole frame
    (a white page's margins are part of what makes it a document).
    """
    if variant not in VARIANT_WEIGHTS:
        raise ValueError(f"unknown descriptor variant {variant!r}; allowed: {', '.join(VARIANT_WEIGHTS)}")
    return Preprocessing(
        resize="square",
        size=DESCRIPTOR_INPUT_SIZE,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        interpolation="bilinear",
        crop_borders=variant == "copy",
    )


def _fold(t: torch.Tensor) -> torch.Tensor:
    """B x C x H x W -> B x (C*H*W) flip-invariant values: the symmetric part and |antisymmetric part|."""
    mirror = t.flip(-1)
    half = t.shape[-1] // 2
    sym = (t + mirror)[..., :half] * 0.5
    anti = (t - mirror)[..., :half].abs() * 0.5
    return torch.cat([sym.flatten(1), anti.flatten(1)], 1)


def _histogram(q: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Per-image fractions of the integer codes ``q`` (B x ..., values in [0, n_bins)): B x n_bins."""
    b = q.shape[0]
    offsets = torch.arange(b, device=q.device).view(b, 1) * n_bins
    counts = torch.bincount((q.reshape(b, -1) + offsets).flatten(), minlength=b * n_bins)
    return counts.view(b, n_bins).float() / (q[0].numel())


class ImageDescriptor(torch.nn.Module):
    """Weight-free image descriptor: B x 3 x S x S floats in [0, 1] -> B x D unit float32 vectors.

    See the module docstring for what the vector captures. Deterministic and batch
    independent (every value depends on its own image only); runs on CPU or CUDA and
    always computes in float32, also under autocast. Other spatial sizes are resized to S
    first (antialiased), uint8 input is scaled by 1/255.
    """

    DESCRIPTOR_DIM = DESCRIPTOR_DIM
    DESCRIPTOR_INPUT_SIZE = DESCRIPTOR_INPUT_SIZE

    def __init__(self, variant: str = DEFAULT_VARIANT) -> None:
        super().__init__()
        if variant not in VARIANT_WEIGHTS:
            raise ValueError(f"unknown descriptor variant {variant!r}; allowed: {', '.join(VARIANT_WEIGHTS)}")
        self.variant = variant
        self.weights = VARIANT_WEIGHTS[variant]
        self.geometry = VARIANT_GEOMETRY[variant]
        ramp = torch.linspace(-1.0, 1.0, _THUMB)
        window = 1.0 - self.geometry.window * ramp.square()  # symmetric: flips stay exact
        self.register_buffer(
            "_window", (window[:, None] * window[None, :]).view(1, 1, _THUMB, _THUMB), persistent=False
        )
        binomial5 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
        self.register_buffer(
            "_blur5", (binomial5[:, None] * binomial5[None, :] / 256).view(1, 1, 5, 5), persistent=False
        )
        centres = (torch.arange(_BINS, dtype=torch.float32) + 0.5) * (math.pi / _BINS)
        # Bin k is centred at (k + 1/2) pi / 8, so a mirror (theta -> pi - theta) maps bin k to 7 - k.
        self.register_buffer("_cos2", torch.cos(2 * centres).view(1, _BINS, 1, 1), persistent=False)
        self.register_buffer("_sin2", torch.sin(2 * centres).view(1, _BINS, 1, 1), persistent=False)
        self.register_buffer("_mirror_bins", torch.arange(_BINS - 1, -1, -1), persistent=False)
        binomial = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer(
            "_blur", (binomial[:, None] * binomial[None, :] / 16).view(1, 1, 3, 3), persistent=False
        )
        self.register_buffer("_luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)

    # -------------------------------------------------------------------------- helpers

    def _lowpass(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """Pool to 2n x 2n, blur 3 x 3, pool to n x n: a grid whose cells overlap their neighbours."""
        c = t.shape[1]
        t = nnf.adaptive_avg_pool2d(t, 2 * n)
        t = nnf.conv2d(nnf.pad(t, (1, 1, 1, 1), mode="replicate"), self._blur.expand(c, 1, 3, 3), groups=c)
        return nnf.adaptive_avg_pool2d(t, n)

    def _grey_grid(self, y: torch.Tensor) -> torch.Tensor:
        """The luma low-passed onto the 16 x 16 grid (copy variant: blurred harder)."""
        passes = self.geometry.blur_passes
        if not passes:
            return self._lowpass(y, _THUMB)
        t = nnf.adaptive_avg_pool2d(y, 2 * _THUMB)
        for _ in range(passes):
            t = nnf.conv2d(nnf.pad(t, (2, 2, 2, 2), mode="replicate"), self._blur5)
        return nnf.adaptive_avg_pool2d(t, _THUMB)

    def _edges(self, resp: torch.Tensor) -> torch.Tensor:
        """Orientation histograms on the cell grid, mirror-symmetrised, square-rooted, centred."""
        h = nnf.adaptive_avg_pool2d(resp, _CELLS)
        h = (h + h.flip(-1)[:, self._mirror_bins]) * 0.5
        h = h[..., : _CELLS // 2]  # the other half is its mirror image
        h = torch.sqrt(h / (h.sum((1, 2, 3), keepdim=True) + _EPS)).flatten(1)
        return h - h.mean(1, keepdim=True)

    # -------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a B x 3 x H x W batch, got shape {tuple(x.shape)}")
        with torch.autocast(x.device.type, enabled=False):
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            b = x.shape[0]
            if b == 0:
                return x.new_zeros((0, DESCRIPTOR_DIM))
            s = DESCRIPTOR_INPUT_SIZE
            if x.shape[-2:] != (s, s):
                x = nnf.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            m = self.geometry.margin
            if m:  # the inner part only, back at S x S (see CopyGeometry)
                x = nnf.interpolate(
                    x[..., m : s - m, m : s - m], size=(s, s), mode="bilinear", align_corners=False
                )
            x = x.clamp(0.0, 1.0)
            y = (x * self._luma).sum(1, keepdim=True)  # B x 1 x S x S luma
            mean = y.mean((2, 3), keepdim=True)
            spread = (y - mean).square().mean((2, 3), keepdim=True).sqrt() + 0.02  # two-pass: no cancellation

            # grey layout
            grey = _fold((self._grey_grid(y) - mean) / spread * self._window)

            # colour layout: opponent channels relative to the luma spread, bounded for grey images
            r, g, bl = x[:, 0:1], x[:, 1:2], x[:, 2:3]
            opponent = torch.cat([r - g, (r + g) * 0.5 - bl], 1)
            colour = _fold(self._lowpass(opponent, _CHROMA) / spread) / math.sqrt(2 * _CHROMA * _CHROMA)
            colour = colour / colour.norm(dim=1, keepdim=True).clamp_min(0.5)

            # edges: unsigned orientation, soft-assigned to 8 bins through the doubled angle
            yp = nnf.pad(y, (1, 1, 1, 1), mode="replicate")
            gx = yp[..., 1:-1, 2:] - yp[..., 1:-1, :-2]  # twice the central difference
            gy = yp[..., 2:, 1:-1] - yp[..., :-2, 1:-1]
            mag = 0.5 * torch.sqrt(gx * gx + gy * gy + 1e-12)  # |gradient|
            # (gx^2 - gy^2, 2 gx gy) = |g|^2 (cos 2theta, sin 2theta); projected on each bin centre
            resp = (gx * gx - gy * gy) * self._cos2
            resp = resp.addcmul_(2 * gx * gy, self._sin2).relu_().square_()
            # -> |g| cos^2(2 (theta - centre)) on the positive lobe
            resp = resp.mul_(0.0625 / (mag * mag * mag + 1e-12))
            edges = self._edges(resp)

            glob = self._global_stats(x, y, mag, resp)

            blocks = (
                self.weights["grey"] * nnf.normalize(grey, dim=1, eps=_EPS),
                self.weights["colour"] * colour,
                self.weights["edges"] * nnf.normalize(edges, dim=1, eps=_EPS),
                self.weights["global"] * nnf.normalize(glob, dim=1, eps=_EPS),
            )
            return nnf.normalize(torch.cat(blocks, 1), dim=1, eps=_EPS)

    def _global_stats(
        self, x: torch.Tensor, y: torch.Tensor, mag: torch.Tensor, resp: torch.Tensor
    ) -> torch.Tensor:
        """64 position-free statistics; distributions are square-rooted (Hellinger) so no bin dominates."""
        b = x.shape[0]
        dev = x.device
        stats = []
        # grey levels: 32 fine bins -> 8 coarse ones, plus mass near the median (either polarity)
        grey_hist = _histogram((y * 32).long().clamp_(0, 31), 32)
        stats.append(grey_hist.view(b, 8, 4).sum(2))
        median_bin = (grey_hist.cumsum(1) < 0.5).sum(1, keepdim=True)
        offset = (torch.arange(32, device=dev).view(1, 32) - median_bin).abs()
        stats.append(torch.stack([(grey_hist * (offset <= k)).sum(1) for k in (0, 1, 3, 6, 12)], 1))
        # saturation (max - min of R, G, B)
        sat = x.amax(1) - x.amin(1)
        stats.append(_histogram((sat * 5).long().clamp_(0, 4), 5))
        # gradient magnitude: fraction above 1, 3, 7, ..., 127 (/ 512), log-spaced
        mag_hist = _histogram(torch.log2(mag * 512 + 1).long().clamp_(0, 7), 8)
        stats.append(mag_hist.flip(1).cumsum(1).flip(1)[:, 1:])
        # orientation profile (mirror-symmetric, so bins 0-3 say it all)
        ori = resp.mean((2, 3))
        ori = (ori + ori[:, self._mirror_bins]) * 0.5
        stats.append(ori[:, : _BINS // 2] / (ori.sum(1, keepdim=True) + _EPS))
        # flatness: share of neighbour steps (horizontal and vertical) below 1.5, 3, 6, 12 grey levels
        steps = torch.cat(
            [(y[..., 1:] - y[..., :-1]).flatten(1), (y[..., 1:, :] - y[..., :-1, :]).flatten(1)], 1
        )
        stats.append(
            _histogram((steps.abs() * (255 / 1.5)).long().clamp_(0, 8), 9).cumsum(1)[:, [0, 1, 3, 7]]
        )
        # colours: a 3 x 3 x 3 histogram and how concentrated it is
        n = _COLOUR_LEVELS
        q = (x * n).long().clamp_(0, n - 1)
        colours = _histogram(q[:, 0] * (n * n) + q[:, 1] * n + q[:, 2], n**3)
        top = colours.sort(1, descending=True).values
        concentration = torch.stack(
            [(colours * colours).sum(1), top[:, 0], top[:, :3].sum(1), (colours > 0.01).float().mean(1)], 1
        )
        stats.append(concentration)
        stats.append(colours)
        return torch.sqrt(torch.cat(stats, 1).clamp_min(0.0))


_GLOBAL_DIM = 8 + 5 + 5 + 7 + _BINS // 2 + 4 + 4 + _COLOUR_LEVELS**3  # 64
_BLOCK_DIMS = (_THUMB * _THUMB, 2 * _CHROMA * _CHROMA, _BINS * _CELLS * _CELLS // 2, _GLOBAL_DIM)
assert sum(_BLOCK_DIMS) == DESCRIPTOR_DIM

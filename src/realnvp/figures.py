"""Image grids, figure layouts and PNG files, with Pillow and numpy only.

Everything here takes image tensors (N, C, H, W) or (C, H, W) with values in [0, 1] and returns
(C, H, W) figure tensors or writes PNGs; the model-side computations live in
:mod:`realnvp.experiments`.

- :func:`make_grid`, :func:`save_png`, :func:`save_image_grid`: plain grids and files.
- :func:`labelled_grid` (text left of rows and above columns), :func:`side_by_side` (titled
  panels), :func:`manifold_figure`, :func:`upscale`: the layouts of the figure commands, whose
  pixel sizes follow from the image sizes and the constants below (never from font metrics).
- :func:`scatter_panel`, :func:`heatmap_panel`, :func:`toy_figure`: the 2-D toy figure.
- :func:`read_images`: image files → uint8 tensors of the model's channels and size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .checkpoint import atomic_write, check_can_create
from .data.base import DatasetError, upright
from .data.formats import check_eight_bit


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2,
              pad_value: float = 1.0) -> Tensor:
    """Tile (N, C, H, W) images into one (C, rows·(H+p)+p, nrow·(W+p)+p) image, row-major.

    ``nrow`` images per row (default: a near-square grid); ``padding`` pixels of ``pad_value``
    between and around them.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding),
                      pad_value, dtype=images.dtype)
    for k in range(n):
        r, col = divmod(k, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[k]
    return grid


def to_pil(image: Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] → an 8-bit PIL image (mode L for 1 channel, RGB for 3, RGBA for 4).
    A value v is shown as the pixel whose dequantisation bin [k/256, (k + 1)/256) holds it,
    k = ⌊256 v⌋ (1.0 as 255): the inverse of the model's x̃ = (k + u)/256, and exact on 8-bit
    values k/255 (text, padding) too."""
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"image must be (1, 3 or 4, H, W), got shape {tuple(image.shape)}")
    scaled = (image.detach().float().cpu().clamp(0, 1) * 256).floor().clamp(max=255)
    array = scaled.to(torch.uint8).numpy()
    if array.shape[0] == 1:
        return Image.fromarray(array[0])
    return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)))  # RGB or RGBA


def png_path(text: str | Path) -> Path:
    """A path to write a PNG to (also an argparse type): it must end in .png and not be a
    folder, so that a figure's work is not lost at the end on a bad name."""
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name ending in .png")
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: figures are written as PNG; give a name ending in .png")
    return check_can_create(path)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a (C, H, W) image in [0, 1] as a PNG (folders created), atomically."""
    path = png_path(path)
    atomic_write(path, lambda f: to_pil(image).save(f, format="PNG"))
    return path


def save_image_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Tile (N, C, H, W) images in [0, 1] (see :func:`make_grid`) and write them as a PNG."""
    return save_png(make_grid(images.detach().float().cpu(), nrow), path)


# -- layout: labelled grids and side-by-side panels ---------------------------------------------
#
# Every size below is fixed by these constants and the image sizes (never by font metrics), so a
# figure's pixel size can be computed in advance:
#   labelled_grid: width  = (label_width if row_labels) + K·(W + padding) + padding
#                  height = (LABEL_HEIGHT if col_labels) + R·(H + padding) + padding
#   side_by_side:  width  = Σ W_i + gap·(n − 1),  height = max H_i + (LABEL_HEIGHT if titles)

LABEL_HEIGHT = 14      # pixels of the text strip above columns and panels
ROW_LABEL_WIDTH = 56   # default width of the text strip left of the rows
GAP = 8                # default gap between side-by-side panels
FONT_SIZE = 11         # largest font size; text is shrunk until it fits its box


def upscale(images: Tensor, zoom: int) -> Tensor:
    """Nearest-neighbour upscaling of (..., H, W) images by an integer factor → (..., zH, zW)."""
    if zoom < 1 or int(zoom) != zoom:
        raise ValueError(f"zoom must be a positive integer, got {zoom}")
    if zoom == 1:
        return images
    return images.repeat_interleave(int(zoom), dim=-2).repeat_interleave(int(zoom), dim=-1)


@functools.cache  # text_image tries several sizes for every label
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1, FreeType)
    except (TypeError, ValueError, OSError, ImportError):  # pragma: no cover - old Pillow
        return ImageFont.load_default()


def text_image(text: str, width: int, height: int) -> Tensor:
    """Black ``text`` centred on a white (1, height, width) image, in [0, 1]. The font shrinks
    (down to 6 px) until the text fits; text that still does not fit is clipped."""
    image = Image.new("L", (width, height), 255)
    if text:
        draw = ImageDraw.Draw(image)
        for size in range(min(FONT_SIZE, max(height - 2, 6)), 5, -1):
            font = _font(size)
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            if right - left <= width - 2 and bottom - top <= height:
                break
        x = (width - (right - left)) / 2 - left
        y = (height - (bottom - top)) / 2 - top
        draw.text((x, y), text, fill=0, font=font)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def _as_channels(image: Tensor, channels: int) -> Tensor:
    """A 1-channel image (text, a gray panel) as ``channels`` channels; RGBA gets the gray in
    R, G and B and an opaque alpha (gray in alpha too would make dark text transparent)."""
    if image.shape[0] == channels:
        return image
    if channels == 4:
        return torch.cat([image.expand(3, -1, -1), torch.ones_like(image[:1])])
    return image.expand(channels, -1, -1)


def labelled_grid(cells: Tensor, row_labels: Sequence[str] | None = None,
                  col_labels: Sequence[str] | None = None, padding: int = 2,
                  label_width: int = ROW_LABEL_WIDTH, pad_value: float = 1.0) -> Tensor:
    """An R×K grid of (R, K, C, H, W) images with optional text left of each row and above each
    column → (C, height, width), sizes as in the layout note above."""
    if cells.dim() != 5:
        raise ValueError(f"cells must be (R, K, C, H, W), got shape {tuple(cells.shape)}")
    r, k, c, h, w = cells.shape
    for labels, count, what in ((row_labels, r, "row"), (col_labels, k, "column")):
        if labels is not None and len(labels) != count:
            raise ValueError(f"{len(labels)} {what} labels for {count} {what}s")
    grid = make_grid(cells.detach().float().cpu().reshape(r * k, c, h, w), k, padding, pad_value)
    if col_labels is not None:
        strip = torch.full((c, LABEL_HEIGHT, grid.shape[2]), pad_value)
        for j, label in enumerate(col_labels):
            left = padding + j * (w + padding)
            strip[:, :, left:left + w] = _as_channels(text_image(label, w, LABEL_HEIGHT), c)
        grid = torch.cat([strip, grid], dim=1)
    if row_labels is not None:
        top0 = LABEL_HEIGHT if col_labels is not None else 0
        strip = torch.full((c, grid.shape[1], label_width), pad_value)
        for i, label in enumerate(row_labels):
            top = top0 + padding + i * (h + padding)
            strip[:, top:top + h] = _as_channels(text_image(label, label_width, h), c)
        grid = torch.cat([strip, grid], dim=2)
    return grid


def side_by_side(panels: Sequence[Tensor], titles: Sequence[str] | None = None, gap: int = GAP,
                 pad_value: float = 1.0) -> Tensor:
    """(C_i, H_i, W_i) panels in one row, top-aligned, ``gap`` pixels apart, with an optional
    title strip above each → (C, max H_i + LABEL_HEIGHT·[titles], Σ W_i + gap·(n − 1)).
    Grey panels become RGB when any panel is RGB."""
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    if titles is not None and len(titles) != len(panels):
        raise ValueError(f"{len(titles)} titles for {len(panels)} panels")
    channels = max(p.shape[0] for p in panels)
    top = LABEL_HEIGHT if titles is not None else 0
    height = top + max(p.shape[1] for p in panels)
    width = sum(p.shape[2] for p in panels) + gap * (len(panels) - 1)
    out = torch.full((channels, height, width), pad_value)
    left = 0
    for i, panel in enumerate(panels):
        _, h, w = panel.shape
        out[:, top:top + h, left:left + w] = _as_channels(panel.detach().float().cpu(), channels)
        if titles is not None:
            out[:, :top, left:left + w] = _as_channels(text_image(titles[i], w, top), channels)
        left += w + gap
    return out


def manifold_figure(grid: Tensor, originals: Tensor, padding: int = 2, gap: int = GAP,
                    pad_value: float = 1.0) -> Tensor:
    """The latent-manifold figure: the (k, k, C, H, W) decoded grid between two columns of
    originals (z1 top left, z3 bottom left, z2 top right, z4 bottom right, each beside the corner
    that reconstructs it). Size: height k·(H+p)+p, width k·(W+p)+p + 2·(W+2p) + 2·gap."""
    k, _, c, h, w = grid.shape
    if originals.shape != (4, c, h, w):
        raise ValueError(f"originals must be (4, {c}, {h}, {w}), got {tuple(originals.shape)}")
    originals = originals.detach().float().cpu()
    columns = []
    for top_index, bottom_index in ((0, 2), (1, 3)):
        column = torch.full((k, c, h, w), pad_value)
        column[0], column[k - 1] = originals[top_index], originals[bottom_index]
        columns.append(make_grid(column, 1, padding, pad_value))
    middle = make_grid(grid.detach().float().cpu().reshape(k * k, c, h, w), k, padding, pad_value)
    return side_by_side([columns[0], middle, columns[1]], gap=gap, pad_value=pad_value)


# -- 2-D scatter plots and heat maps (the toy figure) ------------------------------------------

# Anchors of the viridis colour map (matplotlib's default), interpolated linearly.
_VIRIDIS = np.array([[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
                     [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44],
                     [253, 231, 37]], dtype=np.float32) / 255.0


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape S) → viridis RGB colours, shape (*S, 3)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(v.astype(np.int64), len(_VIRIDIS) - 2)
    f = (v - i)[..., None]
    return _VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f


def point_colors(points: Tensor) -> Tensor:
    """(N, 2) points → (N, 3) RGB colours: hue from the angle around the points' mean,
    saturation from the distance to it, so a point keeps a recognisable colour when it is
    mapped through the flow (the paper's Figure 1)."""
    p = points.detach().double().cpu().numpy()
    d = p - p.mean(0)
    radius = np.hypot(d[:, 0], d[:, 1])
    hue = (np.arctan2(d[:, 1], d[:, 0]) / (2 * np.pi)) % 1.0
    sat = 0.35 + 0.65 * np.clip(radius / (np.quantile(radius, 0.95) + 1e-12), 0, 1)
    rgb = np.clip(np.abs((hue[:, None] * 6 + np.array([0, 4, 2])) % 6 - 3) - 1, 0, 1)
    value = 0.9
    return torch.from_numpy((value * (1 - sat[:, None] + sat[:, None] * rgb)).astype(np.float32))


def _frame(canvas: np.ndarray, extent: tuple[float, float, float, float]) -> None:
    """Light axes through the origin (when visible) and a grey border, on an (S, S, 3) canvas."""
    size = canvas.shape[0]
    x0, x1, y0, y1 = extent
    if x0 < 0 < x1:
        canvas[:, int((0 - x0) / (x1 - x0) * size)] = 0.85
    if y0 < 0 < y1:
        canvas[int((y1 - 0) / (y1 - y0) * size)] = 0.85
    canvas[[0, -1]] = 0.5
    canvas[:, [0, -1]] = 0.5


def scatter_panel(points: Tensor, extent: tuple[float, float, float, float], size: int = 256,
                  colors: Tensor | None = None, radius: int = 1) -> Tensor:
    """Draw (N, 2) points as squares of side 2·radius+1 on a white (3, size, size) panel showing
    [x0, x1] × [y0, y1] (y up); points outside are left out."""
    canvas = np.ones((size, size, 3), dtype=np.float32)
    _frame(canvas, extent)
    x0, x1, y0, y1 = extent
    p = points.detach().double().cpu().numpy()
    col = ((p[:, 0] - x0) / (x1 - x0) * size).astype(np.int64)
    row = ((y1 - p[:, 1]) / (y1 - y0) * size).astype(np.int64)
    rgb = (np.zeros((len(p), 3), np.float32) + 0.2 if colors is None
           else colors.detach().float().cpu().numpy())
    finite = np.isfinite(p).all(1)
    for dr in range(-radius, radius + 1):
        for dc in range(-radius, radius + 1):
            r, c = row + dr, col + dc
            inside = (r >= 0) & (r < size) & (c >= 0) & (c < size) & finite
            canvas[r[inside], c[inside]] = rgb[inside]
    return torch.from_numpy(canvas).permute(2, 0, 1).contiguous()


def heatmap_panel(values: Tensor, size: int = 256) -> Tensor:
    """A (G, G) grid of non-negative values (row 0 at the top) → a (3, size, size) viridis heat
    map, scaled so that the largest value is the brightest colour."""
    v = values.detach().double().cpu().numpy()
    v = np.nan_to_num(v / max(float(np.nanmax(v)), 1e-300))
    rgb = (colormap(v) * 255).round().astype(np.uint8)
    image = Image.fromarray(rgb, mode="RGB").resize((size, size), Image.NEAREST)
    canvas = np.asarray(image, dtype=np.float32) / 255.0  # a new, writable array
    canvas[[0, -1]] = 0.5
    canvas[:, [0, -1]] = 0.5
    return torch.from_numpy(canvas).permute(2, 0, 1).contiguous()


TOY_TITLES = ("data x ~ p(x)", "latent z = f(x)", "prior z ~ N(0, I)", "samples x = f^-1(z)",
              "density p(x)")


def toy_figure(data: Tensor, latents: Tensor, prior: Tensor, mapped: Tensor, density: Tensor,
               extent: tuple[float, float, float, float],
               latent_extent: tuple[float, float, float, float], size: int = 256,
               gap: int = GAP) -> Tensor:
    """The paper's Figure 1 for a 2-D model, five (3, size, size) panels side by side with
    titles: data points, their latents f(x) (same colours), prior samples, their images f⁻¹(z)
    (same colours) and the density as a heat map. Size: (3, size + LABEL_HEIGHT,
    5·size + 4·gap)."""
    data_colors, prior_colors = point_colors(data), point_colors(prior)
    panels = [
        scatter_panel(data, extent, size, data_colors),
        scatter_panel(latents, latent_extent, size, data_colors),
        scatter_panel(prior, latent_extent, size, prior_colors),
        scatter_panel(mapped, extent, size, prior_colors),
        heatmap_panel(density, size),
    ]
    return side_by_side(panels, TOY_TITLES, gap=gap)


# -- reading images -----------------------------------------------------------------------------

def read_images(paths: Sequence[str | Path], channels: int, size: tuple[int, int]) -> Tensor:
    """Image files → uint8 (N, channels, H, W). Each is turned upright as its EXIF orientation
    says, converted to grey (1 channel) or RGB (3 channels) and must then be ``size = (H, W)``;
    anything else is a ValueError naming the file. An alpha channel is dropped (transparent
    pixels keep their stored colour), as the ``folder`` dataset drops it."""
    if channels not in (1, 3):
        raise ValueError(f"only 1- and 3-channel models can read image files, not {channels}")
    out = []
    for path in paths:
        try:
            with Image.open(path) as image:
                check_eight_bit(image, str(path))  # 16-bit or float images would be clipped
                image = upright(image).convert("L" if channels == 1 else "RGB")
        except (FileNotFoundError, DatasetError):
            raise
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: cannot read the image ({error})") from error
        if (image.height, image.width) != tuple(size):
            raise ValueError(f"{path} is {image.width}x{image.height} pixels; the model takes "
                             f"{size[1]}x{size[0]} images (resize or crop it first)")
        array = np.array(image, dtype=np.uint8)
        out.append(torch.from_numpy(array[None] if channels == 1 else array.transpose(2, 0, 1)))
    return torch.stack(out)

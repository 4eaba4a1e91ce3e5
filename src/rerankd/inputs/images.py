"""Image loading with limits, and Qwen2-VL preprocessing.

Loading reproduces transformers' `load_image` (the reference's path for string sources: EXIF orientation, then
RGB) with limits the reference lacks: bytes (counted while downloading), pixels (read from the header, before
decoding), a fetch timeout, and an allow-list of formats. Preprocessing reproduces `Qwen2VLImageProcessor`
(transformers 4.4x-4.57, the slow numpy path): smart resize to multiples of 28, PIL bicubic, rescale 1/255,
normalize, each frame repeated to temporal_patch_size, patches in 2x2 merge-block order.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import stat
import threading
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import LoadOptions
from ..errors import InputError
from .urls import fetch_url

# Qwen2-VL's (CLIP's) normalization constants, from the model's preprocessor_config.json
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
# jina-reranker-m0's compute_score passes these to its processor
DEFAULT_MIN_PIXELS = 3136  # 56 * 56
DEFAULT_MAX_PIXELS = 602112  # 768 merged tokens of 28 * 28
MAX_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize refuses more
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_BASE64_RE = re.compile(rb"^[A-Za-z0-9+/=_-]+$")


class DecodeBudget:
    """Bytes of decoded pixels in memory at once, across every decode that shares it (one loaded model's): a decode
    waits, first come first served, until its bytes fit, and holds them until its image is preprocessed. A few KB of
    PNG can declare 100 M pixels, which decode to 300 MB and more; without a budget, every preparer decoding one at
    once multiplies that."""

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_decoded_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.in_use = 0
        self.peak = 0  # the most ever in use (tests read it)
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()  # waiting decodes, in arrival order (a large one is not starved)

    @contextmanager
    def hold(self, nbytes: int, param: str):
        if nbytes > self.max_bytes:
            raise InputError(f"image needs {nbytes} bytes decoded, over the server's budget of {self.max_bytes} "
                             "(--max-decoded-bytes); send a smaller image", param)  # fmt: skip
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            self._cond.wait_for(lambda: self._queue[0] is ticket and self.in_use + nbytes <= self.max_bytes)
            self._queue.popleft()
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
            self._cond.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= nbytes
                self._cond.notify_all()


def decoded_bytes(width: int, height: int, mode: str, fmt: str | None = None) -> int:
    """What decoding an image takes at once, as Pillow stores pixels: the image in its own mode (one byte a pixel
    for 1 / L / P, two for 16-bit, four for I and F and for every mode of several bands, RGB included), its RGB copy
    (four bytes a pixel), for I and F the 8-bit step between, and for WebP the decoder's own RGBA buffers (measured:
    a 7000 x 7000 WebP peaked at 16 bytes a pixel)."""
    own = 2 if ";16" in mode else 4 if mode in ("I", "F") or Image.getmodebands(mode) > 1 else 1
    step = 1 if mode in ("I", "F") else 0
    webp = 8 if fmt == "WEBP" else 0
    return width * height * (own + 4 + step + webp)


@dataclass(frozen=True)
class ImageLimits:
    max_image_bytes: int = LoadOptions.max_image_bytes
    """Largest encoded image accepted, in bytes (counted while downloading, before decoding)."""
    max_image_pixels: int = LoadOptions.max_image_pixels
    """Largest image accepted, in pixels (width * height, read from the header before decoding)."""
    fetch_timeout: float = LoadOptions.image_fetch_timeout
    """Seconds allowed for fetching one image URL."""
    allow_urls: bool = True
    """Fetch http(s) image URLs (the server applies its own URL policy on top)."""
    allow_local_files: bool = True
    """Read images from local paths."""
    local_media_root: str | None = None
    """If set, local paths must lie beneath this folder (after resolving links)."""
    allow_private_urls: bool = True
    """Fetch URLs whose host resolves to loopback, private, link-local or other non-public addresses. The library
    allows them (your own network); the server refuses them unless told otherwise."""
    decode_budget: DecodeBudget = field(default_factory=lambda: DecodeBudget(LoadOptions.max_decoded_bytes), compare=False)
    """Decoded bytes in memory at once, shared by every decode under these limits (and their `under` copies)."""

    @classmethod
    def from_options(cls, opts: LoadOptions) -> "ImageLimits":
        """The load-time limits of `opts`, every source allowed (the library's policy)."""
        return cls(opts.max_image_bytes, opts.max_image_pixels, opts.image_fetch_timeout,
                   decode_budget=DecodeBudget(opts.max_decoded_bytes))  # fmt: skip

    def under(self, policy: "ImagePolicy | None") -> "ImageLimits":
        """These limits with a caller's source policy applied (None: the library's, every source allowed)."""
        if policy is None:
            return self
        return replace(self, allow_private_urls=policy.allow_private_urls,
                       allow_local_files=policy.local_media_root is not None, local_media_root=policy.local_media_root)  # fmt: skip


@dataclass(frozen=True)
class ImagePolicy:
    """Which image sources an untrusted caller (the server's clients) may name: URLs only to public addresses
    unless allow_private_urls; local files only beneath local_media_root, none if it is None. A call carries its
    policy to the backend, so one loaded model serves trusted (library) and untrusted (server) callers at once."""

    allow_private_urls: bool = False
    local_media_root: str | None = None


@dataclass(frozen=True)
class PreparedImage:
    patches: torch.Tensor  # [grid_t * grid_h * grid_w, channels * temporal * patch * patch], float32
    grid: tuple[int, int, int]  # (grid_t, grid_h, grid_w) in patches

    def merged_tokens(self, merge_size: int) -> int:
        t, h, w = self.grid
        return t * h * w // merge_size**2


ORIENTATION = 0x0112  # the EXIF tag


def load_image(source: object, limits: ImageLimits, param: str, then: Callable[[Image.Image], object] | None = None):
    """Any accepted source -> a decoded RGB PIL image, or InputError naming `param`; with `then`, what `then` makes
    of that image, computed while its decoded bytes are still counted against the decode budget (preprocessing)."""
    if isinstance(source, Image.Image):
        _check_pixels(source.width, source.height, limits, param)
        # turned upright by its EXIF orientation, then RGB, as the reference's transformers.image_utils.load_image
        # does with every source, PIL images included (a phone's photo read with Image.open is sideways until then)
        img = ImageOps.exif_transpose(source) if source.getexif().get(ORIENTATION, 1) != 1 else source  # (no copy)
        img = img if img.mode == "RGB" else img.convert("RGB")
        return img if then is None else then(img)
    data = read_image_bytes(source, limits, param)
    return decode_image(data, limits, param, then)


def read_image_bytes(source: object, limits: ImageLimits, param: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, str):
        s = source.strip()
        if s.startswith(("http://", "https://")):
            data = _fetch(s, limits, param)
        elif s.startswith("data:"):
            # ';base64' may be left out: the reference decodes what follows the comma as base64 either way
            head, sep, payload = s.partition(",")
            if not sep or not head[5:].startswith("image/"):
                raise InputError("a data URI must look like 'data:image/<format>;base64,<data>'", param)
            data = _b64decode(payload, limits, param)
        elif len(s) < 4096 and _local_file(s, limits):
            data = _read_local(s, limits, param)
        elif _BASE64_RE.match("".join(s.split()).encode("ascii", "replace")) and len(s) >= 16:
            data = _b64decode(s, limits, param)
        elif limits.local_media_root is not None and ("/" in s or os.sep in s):
            raise _path_refused(param)  # a missing file answers as a forbidden one: no telling which files exist
        else:
            shown = s if len(s) <= 60 else s[:57] + "..."
            raise InputError(
                f"{shown!r} is not an http(s) URL, a data: URI, "
                f"{'an existing file or ' if limits.allow_local_files else ''}base64 image data", param
            )
    else:
        raise InputError(f"unsupported image source of type {type(source).__name__}", param)
    if len(data) > limits.max_image_bytes:
        raise InputError(f"image is {len(data)} bytes, over the limit of {limits.max_image_bytes}", param)
    return data


def decode_image(data: bytes, limits: ImageLimits, param: str, then: Callable[[Image.Image], object] | None = None):
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise InputError(f"not a {'/'.join(ALLOWED_FORMATS)} image (or a corrupt one)", param) from None
    except Image.DecompressionBombError as e:
        raise InputError(f"image is over the limit of {limits.max_image_pixels} pixels ({e})", param) from None
    except Exception as e:  # a header cut short or nonsense (Pillow raises OSError, SyntaxError, struct.error, ...)
        raise InputError(f"not a {'/'.join(ALLOWED_FORMATS)} image (corrupt header: {type(e).__name__})", param) from None
    _check_pixels(img.width, img.height, limits, param)
    with limits.decode_budget.hold(decoded_bytes(img.width, img.height, img.mode, img.format), param):
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = img.convert("RGB")
        except Exception as e:  # corrupt pixel data, in any of the ways a decoder can fail
            raise InputError(f"image data does not decode ({img.format}, {type(e).__name__})", param) from None
        del img
        return rgb if then is None else then(rgb)


def _check_pixels(width: int, height: int, limits: ImageLimits, param: str) -> None:
    if width * height > limits.max_image_pixels:
        raise InputError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_image_pixels}", param
        )
    if width < 1 or height < 1:
        raise InputError(f"image has no pixels ({width}x{height})", param)


def _b64decode(payload: str, limits: ImageLimits, param: str) -> bytes:
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise InputError(f"base64 image is over the limit of {limits.max_image_bytes} bytes", param)
    try:
        if "-" in payload or "_" in payload:
            return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"invalid base64 image data: {e}", param) from None


def _fetch(url: str, limits: ImageLimits, param: str) -> bytes:
    if not limits.allow_urls:
        raise InputError("image URLs are not allowed here", param)
    return fetch_url(url, limits.max_image_bytes, limits.fetch_timeout, limits.allow_private_urls, param)


def _local_file(path: str, limits: ImageLimits) -> bool:
    """Whether `path` names a file to read: any file for the library (no folder set), only one beneath the allowed
    folder for the server; none when local files are off. The disk is never looked at outside that folder, so
    what a client is told never depends on which files exist there."""
    if not limits.allow_local_files:
        return False
    if limits.local_media_root is not None:
        root = os.path.realpath(limits.local_media_root)
        if os.path.commonpath([os.path.realpath(path), root]) != root:
            return False
    return os.path.isfile(path)


def _path_refused(param: str) -> InputError:
    """One answer for a path outside the allowed folder and for a missing or unreadable one, naming neither the
    folder nor whether the file exists (a client must not learn the server's files from the errors)."""
    return InputError("no readable image file at this path in the folder the server allows", param)


def _read_local(path: str, limits: ImageLimits, param: str) -> bytes:
    if not limits.allow_local_files:
        raise InputError("local image paths are not allowed here", param)
    refused = _path_refused(param)
    real = os.path.realpath(path)
    if limits.local_media_root is not None:
        root = os.path.realpath(limits.local_media_root)
        if os.path.commonpath([real, root]) != root:
            raise refused
    try:
        # the resolved path opened without following a link and without blocking, then checked as opened: a file
        # swapped for a link out of the folder or for a FIFO after the check above is refused, never waited on
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        raise refused from None
    with os.fdopen(fd, "rb") as f:
        try:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise refused
            if info.st_size > limits.max_image_bytes:
                raise InputError(f"image file is {info.st_size} bytes, over the limit of {limits.max_image_bytes}",
                                 param)  # fmt: skip
            return f.read(limits.max_image_bytes + 1)
        except OSError:
            raise refused from None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f}:1 is over {MAX_ASPECT_RATIO}:1")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resized_pixels_bound(factor: int, min_pixels: int, max_pixels: int) -> int:
    """The most pixels smart_resize can give an image of any size and allowed aspect ratio (<= MAX_ASPECT_RATIO).

    Rounding keeps the area within max_pixels, but two of its branches can go past it: a side that the max_pixels
    scaling takes below `factor` is raised to `factor` (the other side is then up to sqrt(max_pixels x aspect)), and
    the min_pixels scaling rounds both sides up (up to factor x sqrt(min_pixels) x (sqrt(aspect) + 1 / sqrt(aspect))
    + factor^2 over min_pixels). Small custom pixel limits meet both.
    """
    aspect = MAX_ASPECT_RATIO
    raised = factor * math.sqrt(max_pixels * aspect)
    rounded_up = min_pixels + factor * math.sqrt(min_pixels) * (math.sqrt(aspect) + 1 / math.sqrt(aspect)) + factor**2
    return math.ceil(max(max_pixels, raised, rounded_up, factor**2))


def qwen2_vl_patches(
    img: Image.Image,
    *,
    patch_size: int,
    temporal_patch_size: int,
    merge_size: int,
    min_pixels: int,
    max_pixels: int,
    param: str,
) -> PreparedImage:
    """An RGB image -> flattened patches in the order the vision tower and patch merger expect."""
    try:
        rh, rw = smart_resize(img.height, img.width, patch_size * merge_size, min_pixels, max_pixels)
    except ValueError as e:
        raise InputError(f"image of {img.width}x{img.height} cannot be used: {e}", param) from None
    img = img.resize((rw, rh), resample=Image.Resampling.BICUBIC)
    a = np.asarray(img)  # [H, W, 3] uint8
    a = (a.astype(np.float64) * (1 / 255)).astype(np.float32)
    a = (a - np.asarray(IMAGE_MEAN, dtype=np.float32)) / np.asarray(IMAGE_STD, dtype=np.float32)
    a = a.transpose(2, 0, 1)  # [3, H, W]
    frames = np.broadcast_to(a, (temporal_patch_size, *a.shape))  # the one frame, repeated: [T, 3, H, W]
    gh, gw, c = rh // patch_size, rw // patch_size, a.shape[0]
    p = frames.reshape(
        1, temporal_patch_size, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size
    )
    p = p.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, gh/m, gw/m, m, m, c, T, p, p]
    flat = np.ascontiguousarray(p).reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size)
    return PreparedImage(patches=torch.from_numpy(flat), grid=(1, gh, gw))

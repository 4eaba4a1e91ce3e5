"""Image loading (sources, limits) and Qwen2-VL preprocessing against transformers' image processor."""

from __future__ import annotations

import base64
import http.server
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from rerankd.errors import InputError
from rerankd.inputs.images import ImageLimits, load_image, qwen2_vl_patches, resized_pixels_bound, smart_resize

from ..conftest import data_uri, encode, make_image

LIMITS = ImageLimits()


def patches_of(img, min_pixels=3136, max_pixels=602112):
    return qwen2_vl_patches(img, patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=min_pixels,
                            max_pixels=max_pixels, param="x")  # fmt: skip


@pytest.mark.parametrize("size", [(56, 56), (57, 300), (1000, 700), (20, 20), (3000, 2000), (28, 1400)])
def test_patches_equal_transformers_image_processor(size):
    transformers = pytest.importorskip("transformers")
    img = make_image(*size, seed=sum(size))
    ref = transformers.Qwen2VLImageProcessor(min_pixels=3136, max_pixels=602112)(images=[img], return_tensors="pt")
    ours = patches_of(img)
    assert ours.grid == tuple(ref["image_grid_thw"][0].tolist())
    assert ours.patches.shape == ref["pixel_values"].shape
    assert torch.allclose(ours.patches, ref["pixel_values"].float(), atol=1e-6)


def test_smart_resize_bounds():
    assert smart_resize(56, 56, 28, 3136, 602112) == (56, 56)
    h, w = smart_resize(4000, 3000, 28, 3136, 602112)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 602112
    h, w = smart_resize(10, 10, 28, 3136, 602112)
    assert h * w >= 3136
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000, 28, 3136, 602112)


@pytest.mark.parametrize("min_pixels, max_pixels", [(3136, 602112), (3136, 3136), (784, 3136), (3136, 12544),
                                                    (56 * 56, 60 * 60), (28 * 28, 28 * 28)])  # fmt: skip
def test_the_resized_pixels_bound_holds_for_every_size(min_pixels, max_pixels):
    """No image of an allowed aspect ratio is resized to more pixels than resized_pixels_bound: the m0 admission bound
    of an image's tokens. With small limits the resize goes past max_pixels (a side raised to one factor, or both
    rounded up past min_pixels), so max_pixels alone was not a bound."""
    bound = resized_pixels_bound(28, min_pixels, max_pixels)
    most = 0
    sides = sorted({int(x) for x in np.geomspace(1, 6000, 160)} | {27, 28, 29, 55, 56, 57})
    for h in sides:
        for w in sides:
            if max(h, w) / min(h, w) <= 200:
                rh, rw = smart_resize(h, w, 28, min_pixels, max_pixels)
                most = max(most, rh * rw)
    assert most <= bound
    if max_pixels <= 3136:
        assert most > max_pixels  # the case the bound is for


def test_max_pixels_option_changes_token_count():
    img = make_image(1000, 1000)
    assert patches_of(img, max_pixels=602112).grid[1:] != patches_of(img, max_pixels=100_000).grid[1:]
    t, h, w = patches_of(img, max_pixels=100_000).grid
    assert h * w * 196 <= 100_000


def test_sources_all_load_the_same_pixels(tmp_path):
    img = make_image(80, 60, 3)
    raw = encode(img)
    path = tmp_path / "a.png"
    path.write_bytes(raw)
    b64 = base64.b64encode(raw).decode()
    sources = [img, str(path), data_uri(img), b64, raw, "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))]
    arrays = [np.asarray(load_image(s, LIMITS, "x")) for s in sources]
    for a in arrays[1:]:
        assert np.array_equal(a, arrays[0])


def test_rgba_and_palette_become_rgb():
    for mode in ("RGBA", "P", "L"):
        img = load_image(encode(make_image(40, 40, mode=mode)), LIMITS, "x")
        assert img.mode == "RGB"


def test_exif_orientation_is_applied_for_encoded_images():
    img = make_image(60, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue(), LIMITS, "x").size == (30, 60)


@pytest.mark.parametrize(
    "source, limits, message",
    [
        (b"not an image at all", LIMITS, "not a PNG/JPEG/WEBP/GIF/BMP/TIFF image"),
        (encode(make_image(50, 50))[:60], LIMITS, "does not decode"),
        (encode(make_image(50, 50)), ImageLimits(max_image_bytes=100), "over the limit of 100"),
        (encode(make_image(200, 100)), ImageLimits(max_image_pixels=10_000), "20000 pixels, over the limit of 10000"),
        ("data:text/plain;base64,aGVsbG8=", LIMITS, "data URI must look like"),
        ("/no/such/file.png", LIMITS, "is not an http(s) URL, a data: URI, an existing file or base64"),
        ("ftp://example.com/a.png", LIMITS, "is not an http(s) URL"),
        ("@@@@not base64 at all@@@@", LIMITS, "is not an http(s) URL"),
        (12345, LIMITS, "unsupported image source of type int"),
    ],
)
def test_bad_images_give_clear_errors(source, limits, message):
    with pytest.raises(InputError) as e:
        load_image(source, limits, "documents[3].image")
    assert message in str(e.value)
    assert str(e.value).startswith("documents[3].image: ")


def test_extreme_aspect_ratio_is_an_error():
    with pytest.raises(InputError, match="aspect ratio"):
        patches_of(make_image(2000, 5))


def test_pixel_limit_checked_before_decoding():
    """A 20000x20000 PNG (a few KB compressed) is refused from its header; decoding it would take 1.2 GB."""
    big = Image.new("L", (20000, 20000))
    raw = encode(big)
    assert len(raw) < 2_000_000
    with pytest.raises(InputError, match="over the limit of 100000000"):
        load_image(raw, LIMITS, "x")


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802
        if self.path == "/missing.png":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if self.path != "/nolength.png":
            self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def image_server():
    _Handler.payload = encode(make_image(64, 48, 9))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_url_images_fetch_with_limits(image_server):
    img = load_image(f"{image_server}/a.png", LIMITS, "x")
    assert img.size == (64, 48)
    small = ImageLimits(max_image_bytes=100)
    with pytest.raises(InputError, match="over the limit of 100"):
        load_image(f"{image_server}/a.png", small, "x")
    with pytest.raises(InputError, match="over the limit of 100 bytes"):  # counted while downloading
        load_image(f"{image_server}/nolength.png", small, "x")
    with pytest.raises(InputError, match="HTTP 404"):
        load_image(f"{image_server}/missing.png", LIMITS, "x")
    with pytest.raises(InputError, match="not allowed"):
        load_image(f"{image_server}/a.png", ImageLimits(allow_urls=False), "x")


def test_decoded_bytes_are_held_within_the_budget():
    """Decompression bombs: what decoding takes is counted against one budget; decodes wait for room (here about
    three 100x100 images at once out of 16 decoding on 8 threads) and an image needing more than all of it is a
    400 naming the field."""
    from concurrent.futures import ThreadPoolExecutor

    from rerankd.inputs.images import DecodeBudget, decoded_bytes

    each = decoded_bytes(100, 100, "RGB")
    limits = ImageLimits(decode_budget=DecodeBudget(3 * each + 10))
    data = encode(make_image(100, 100))
    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(lambda i: load_image(data, limits, f"documents[{i}]"), range(16)))
    assert all(img.size == (100, 100) for img in images)
    assert 0 < limits.decode_budget.peak <= 3 * each + 10 and limits.decode_budget.in_use == 0
    with pytest.raises(InputError, match=r"documents\[0\].*--max-decoded-bytes"):
        load_image(encode(make_image(300, 200)), limits, "documents[0]")


MEASURE = """
import sys
from rerankd.inputs.images import ImageLimits, decoded_bytes, load_image

def status(key):  # kB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

data = open(sys.argv[1], "rb").read()
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from what is in use now
before = status("VmRSS:")
img = load_image(data, ImageLimits(max_image_pixels=10**9), "x")
print((status("VmHWM:") - before) * 1024 / decoded_bytes(*img.size, *sys.argv[2:]))
"""


@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("L", "PNG"), ("I;16", "PNG"), ("CMYK", "JPEG"), ("RGB", "WEBP")])
def test_the_decode_budget_counts_what_decoding_really_takes(tmp_path, mode, fmt):
    """--max-decoded-bytes bounds memory only if each decode is counted as Pillow stores it: a 2000 x 2000 image's
    decode (in a fresh process) grows its peak memory by what decoded_bytes counts, within a few percent."""
    import subprocess
    import sys

    import numpy as np

    path = tmp_path / f"img.{fmt.lower()}"
    small = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(small).resize((2000, 2000)).convert(mode).save(path, fmt)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), mode, fmt], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert 0.85 < float(out.stdout) < 1.1, out.stdout  # peak growth / counted


def test_the_decode_budget_is_first_come_first_served_and_held_through_preprocessing():
    """A large decode waiting for room is not overtaken by small ones arriving after it, and a decode's bytes stay
    counted until what is made of the image (its patches) is done."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from rerankd.inputs.images import DecodeBudget, decoded_bytes

    small, large = decoded_bytes(50, 50, "RGB"), decoded_bytes(100, 100, "RGB")
    budget = DecodeBudget(large)
    limits = ImageLimits(decode_budget=budget)
    order = []

    def slow_then(tag):
        def then(img):
            order.append(tag)
            time.sleep(0.2)
            assert budget.in_use >= decoded_bytes(*img.size, "RGB")  # still held while preprocessing
            return img.size
        return then

    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(load_image, encode(make_image(50, 50)), limits, "a", slow_then("small-1"))
        time.sleep(0.05)
        big = pool.submit(load_image, encode(make_image(100, 100)), limits, "b", slow_then("large"))
        time.sleep(0.05)
        late = pool.submit(load_image, encode(make_image(50, 50)), limits, "c", slow_then("small-2"))
        assert [f.result(10) for f in (first, big, late)] == [(50, 50), (100, 100), (50, 50)]
    assert order == ["small-1", "large", "small-2"], order
    assert budget.in_use == 0 and budget.peak <= large and small < large


def test_a_file_swapped_after_the_check_for_a_fifo_or_a_link_out_is_refused(tmp_path, monkeypatch):
    """_read_local opens what it checked without following links or blocking: a FIFO (which would block a plain
    open forever) and a link pointing out of the folder (swapped in after the path was resolved: realpath is made
    to miss it here) are refused at once."""
    import os
    import time

    from rerankd.inputs import images
    from rerankd.inputs.images import _read_local

    folder, outside = tmp_path / "media", tmp_path / "secret.png"
    folder.mkdir()
    outside.write_bytes(encode(make_image(10, 10)))
    os.mkfifo(folder / "pipe.png")
    limits = ImageLimits(local_media_root=str(folder))
    start = time.monotonic()
    with pytest.raises(InputError, match="no readable image file at this path"):
        _read_local(str(folder / "pipe.png"), limits, "documents[0].image")
    assert time.monotonic() - start < 2
    (folder / "link.png").symlink_to(outside)
    monkeypatch.setattr(images.os.path, "realpath", lambda p: str(p))  # the link appears after the check
    with pytest.raises(InputError, match="no readable image file at this path"):
        _read_local(str(folder / "link.png"), limits, "documents[0].image")
    monkeypatch.undo()
    (folder / "ok.png").write_bytes(outside.read_bytes())
    assert _read_local(str(folder / "ok.png"), limits, "x") == outside.read_bytes()

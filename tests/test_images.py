"""scott.data.images.open_image: every test writes a real file and checks the decoded pixels."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from scott.config import RecipeError, resolve_recipe
from scott.data.datasets import BadImageError, ImageFileDataset, convert_channels
from scott.data.images import DEFAULT_MAX_PIXELS, convert_mode, open_image


def _pixels(img) -> np.ndarray:
    return np.asarray(img).astype(int)


def _png(path, width: int, height: int, bit_depth: int, colour_type: int, data: bytes) -> None:
    """Write a PNG by hand (PIL cannot write 16-bit colour); ``data``: filtered scanlines."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data))
                     + chunk(b"IEND", b""))


# -- transparency on white ---------------------------------------------------------------------


def test_rgba_composited_on_white(tmp_path):
    arr = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128]]], dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(arr, "RGBA").save(path)
    img = open_image(path, 3)
    assert img.mode == "RGB"
    got = _pixels(img)[0]
    assert got[0].tolist() == [255, 0, 0]  # opaque: itself
    assert got[1].tolist() == [255, 255, 255]  # fully transparent: the white background
    assert np.abs(got[2] - [127, 127, 255]).max() <= 1  # half blue over white
    assert open_image(path, None).mode == "RGB"
    grey = _pixels(open_image(path, 1))[0]
    assert grey[1] == 255 and abs(grey[0] - 76) <= 1  # luminance of red (0.299 * 255)


def test_la_composited_on_white_stays_grey(tmp_path):
    arr = np.array([[[0, 255], [0, 0], [0, 128], [200, 255]]], dtype=np.uint8)
    path = tmp_path / "la.png"
    Image.fromarray(arr, "LA").save(path)
    img = open_image(path, None)
    assert img.mode == "L"
    got = _pixels(img)[0]
    assert got[0] == 0 and got[1] == 255 and abs(got[2] - 127) <= 1 and got[3] == 200
    rgb = _pixels(open_image(path, 3))[0]
    assert (rgb == got[:, None]).all()  # replicated channels


def test_palette_with_transparency_on_white(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([10, 20, 30, 200, 0, 0, 0, 200, 0])
    img.putpixel((1, 0), 1)
    img.putpixel((2, 0), 2)
    path = tmp_path / "p.png"
    img.save(path, transparency=0)  # palette entry 0 transparent (tRNS)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    got = _pixels(open_image(path, 3))[0]
    assert got.tolist() == [[255, 255, 255], [200, 0, 0], [0, 200, 0]]


def test_palette_gif_with_transparency_on_white(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 0, 0, 255])
    img.putpixel((1, 0), 1)
    path = tmp_path / "t.gif"
    img.save(path, transparency=0)
    assert _pixels(open_image(path, 3))[0].tolist() == [[255, 255, 255], [0, 0, 255]]


# -- palette, 1-bit ------------------------------------------------------------------------------


def test_palette_without_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 128, 255, 255, 255, 0])
    img.putpixel((1, 0), 1)
    path = tmp_path / "p.png"
    img.save(path)
    rgb = open_image(path, None)
    assert rgb.mode == "RGB" and _pixels(rgb)[0].tolist() == [[0, 128, 255], [255, 255, 0]]
    grey = _pixels(open_image(path, 1))[0]
    expected = [round(0.299 * r + 0.587 * g + 0.114 * b) for r, g, b in ([0, 128, 255], [255, 255, 0])]
    assert np.abs(grey - expected).max() <= 1


def test_grey_palette_is_a_grey_source(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 90, 90, 90])
    img.putpixel((1, 0), 1)
    path = tmp_path / "g.png"
    img.save(path)
    got = open_image(path, None)
    assert got.mode == "L" and _pixels(got)[0].tolist() == [0, 90]


def test_one_bit(tmp_path):
    img = Image.new("1", (3, 1))
    img.putpixel((1, 0), 1)
    path = tmp_path / "b.png"
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == "1"
    grey = open_image(path, None)
    assert grey.mode == "L" and _pixels(grey)[0].tolist() == [0, 255, 0]
    assert _pixels(open_image(path, 3))[0].tolist() == [[0, 0, 0], [255, 255, 255], [0, 0, 0]]


# -- CMYK ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_colours(tmp_path, suffix):
    img = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    img.paste((0, 255, 0, 0), (8, 0, 16, 8))  # magenta
    img.paste((0, 0, 0, 255), (0, 8, 8, 16))  # black
    img.paste((0, 0, 0, 0), (8, 8, 16, 16))  # white (no ink)
    path = tmp_path / f"c{suffix}"
    img.save(path, **({"quality": 95} if suffix == ".jpg" else {}))
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    got = _pixels(open_image(path, 3))
    tol = 4 if suffix == ".jpg" else 0
    for (y, x), colour in {(3, 3): (0, 255, 255), (3, 12): (255, 0, 255), (12, 3): (0, 0, 0),
                           (12, 12): (255, 255, 255)}.items():
        assert np.abs(got[y, x] - colour).max() <= tol, (y, x, got[y, x])
    assert open_image(path, None).mode == "RGB"
    grey = _pixels(open_image(path, 1))
    assert abs(grey[3, 3] - round(0.587 * 255 + 0.114 * 255)) <= tol + 1  # luminance of cyan


# -- high bit depth ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_grey_scaled_by_65535(tmp_path, suffix):
    values = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / f"g16{suffix}"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I")
    img = open_image(path, None)
    assert img.mode == "L"
    # v / 65535 * 255 rounded: 1000 -> 3.89 -> 4 (no per-image stretch: 1000 stays dark)
    assert _pixels(img)[0].tolist() == [0, 1, 4, 128, 255]
    rgb = _pixels(open_image(path, 3))[0]
    assert rgb.tolist() == [[v] * 3 for v in [0, 1, 4, 128, 255]]


def test_thirty_two_bit_int_tiff(tmp_path):
    path = tmp_path / "i32.tif"
    Image.fromarray(np.array([[0, 1000, 65535, -5]], dtype=np.int32)).save(path)
    with Image.open(path) as check:
        assert check.mode == "I"
    assert _pixels(open_image(path, 1))[0].tolist() == [0, 4, 255, 0]  # max <= 65535: 16-bit range
    path2 = tmp_path / "i32big.tif"
    Image.fromarray(np.array([[0, 100000, 200000]], dtype=np.int32)).save(path2)
    assert _pixels(open_image(path2, 1))[0].tolist() == [0, 128, 255]  # beyond 16 bit: scaled by max


def test_float_tiff_unit_range_times_255(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0, -0.5, np.nan]], dtype=np.float32)).save(path)
    with Image.open(path) as check:
        assert check.mode == "F"
    img = open_image(path, None)
    assert img.mode == "L"
    assert _pixels(img)[0].tolist() == [0, 64, 128, 255, 0, 0]  # negatives and NaN -> 0


def test_float_tiff_beyond_one_scaled_by_max_not_min_max(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[100.0, 200.0, 400.0]], dtype=np.float32)).save(path)
    # scaled by the maximum (400), the minimum (100) is NOT mapped to 0
    assert _pixels(open_image(path, 1))[0].tolist() == [64, 128, 255]
    dim = tmp_path / "dim.tif"
    Image.fromarray(np.array([[0.1, 0.2]], dtype=np.float32)).save(dim)
    assert _pixels(open_image(dim, 1))[0].tolist() == [26, 51]  # in [0, 1]: not stretched to 255


def test_sixteen_bit_rgb_png(tmp_path):
    pixels = np.array([[[0, 32768, 65535], [4660, 65535, 1000]]], dtype=">u2")
    path = tmp_path / "rgb16.png"
    _png(path, 2, 1, 16, 2, b"\x00" + pixels[0].tobytes())
    try:
        with Image.open(path) as check:
            check.load()
    except OSError as exc:  # pragma: no cover - depends on the PIL build
        pytest.skip(f"this PIL cannot read 16-bit RGB PNG ({exc})")
    got = _pixels(open_image(path, 3))[0]
    expected = pixels[0].astype(float) / 65535 * 255
    assert np.abs(got - expected).max() <= 1  # PIL keeps the high byte: within 1 of v / 65535 * 255
    assert got[0, 2] == 255 and got[0, 0] == 0


# -- orientation, channels, sizes ------------------------------------------------------------------


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (16, 8), (255, 0, 0))  # stored: left half red, right half blue
    img.paste((0, 0, 255), (8, 0, 16, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "o.jpg"
    img.save(path, exif=exif, quality=95)
    got = open_image(path, 3)
    assert got.size == (8, 16)  # width x height turned
    arr = _pixels(got)
    assert np.abs(arr[3, 4] - [255, 0, 0]).max() <= 4  # left edge -> top
    assert np.abs(arr[12, 4] - [0, 0, 255]).max() <= 4  # right edge -> bottom


def test_grey_in_rgb_recipe_and_rgb_in_grey_recipe(tmp_path):
    grey = tmp_path / "g.png"
    Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8)).save(grey)
    assert open_image(grey, None).mode == "L"
    assert _pixels(open_image(grey, 3))[0].tolist() == [[0] * 3, [77] * 3, [255] * 3]
    colour = tmp_path / "c.png"
    Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 10, 10]]], dtype=np.uint8)).save(colour)
    assert open_image(colour, None).mode == "RGB"
    assert _pixels(open_image(colour, 1))[0].tolist() == [76, 150, 29, 10]  # ITU-R 601-2 luma


def test_mixed_sizes_decode(tmp_path):
    small, large = tmp_path / "s.png", tmp_path / "l.jpg"
    Image.new("RGB", (5, 7), (1, 2, 3)).save(small)
    Image.new("L", (300, 40), 9).save(large)
    assert open_image(small, 3).size == (5, 7)
    assert open_image(large, 3).size == (300, 40)


# -- size limit --------------------------------------------------------------------------------------


def _huge_png_header(path, width, height):
    """A PNG whose header claims ``width x height`` (grey 8 bit) but holds one scanline."""
    _png(path, width, height, 8, 0, b"\x00" + bytes(16))


def test_size_limit_from_header_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    _huge_png_header(path, 20000, 20000)  # 400 M pixels, over PIL's own hard limit too
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImageError) as info:
        open_image(path, 3, DEFAULT_MAX_PIXELS)
    message = str(info.value)
    assert str(path) in message and "20000 x 20000" in message and "400000000 pixels" in message
    assert str(DEFAULT_MAX_PIXELS) in message and "data.max_image_pixels" in message
    assert "\n" not in message and "decompression bomb" not in message.lower()
    assert Image.MAX_IMAGE_PIXELS == limit_before  # PIL's global untouched


def test_size_limit_comes_before_pils_warning(tmp_path):
    path = tmp_path / "big.png"
    _huge_png_header(path, 10000, 10000)  # 100 M pixels: PIL would warn (DecompressionBombWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadImageError, match="10000 x 10000 = 100000000 pixels, over the limit of 50000000"):
            open_image(path, 1, 50_000_000)


def test_size_limit_small(tmp_path):
    path = tmp_path / "s.png"
    Image.new("L", (100, 60), 3).save(path)
    with pytest.raises(BadImageError, match="100 x 60 = 6000 pixels, over the limit of 5999 pixels"):
        open_image(path, 1, 5999)
    assert open_image(path, 1, 6000).size == (100, 60)


def test_limit_independent_of_pils_global(tmp_path, monkeypatch):
    path = tmp_path / "s.png"
    Image.new("L", (100, 60), 3).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone would refuse 6000 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = open_image(path, 1, None)
        assert img.size == (100, 60) and _pixels(img).max() == 3
        assert open_image(path, 3, 6000).size == (100, 60)
    with pytest.raises(BadImageError, match="over the limit of 5000"):
        open_image(path, 1, 5000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL without a limit: ours still holds
    with pytest.raises(BadImageError, match="over the limit of 5000"):
        open_image(path, 1, 5000)


def test_bad_arguments():
    with pytest.raises(ValueError, match="in_chans"):
        open_image("x.png", 2)
    with pytest.raises(ValueError, match="max_pixels"):
        open_image("x.png", 3, 0)


# -- unreadable files ----------------------------------------------------------------------------------


def test_truncated_and_garbage_files(tmp_path):
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (20, 30, 40)).save(good)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "junk.png"
    garbage.write_bytes(b"not an image at all")
    missing = tmp_path / "missing.png"
    for path in (truncated, garbage, missing):
        with pytest.raises(BadImageError) as info:
            open_image(path, 3)
        message = str(info.value)
        assert message.startswith(f"{path}: cannot read image (") and "\n" not in message


def test_header_larger_than_data_raises_bad_image(tmp_path):
    path = tmp_path / "big.png"
    _huge_png_header(path, 3000, 3000)
    with pytest.raises(BadImageError, match="cannot read image"):
        open_image(path, 1, None)


# -- one conversion rule; the dataset uses it -------------------------------------------------------


def test_convert_channels_is_convert_mode():
    rgba = Image.fromarray(np.array([[[0, 0, 0, 0], [10, 20, 30, 255]]], dtype=np.uint8), "RGBA")
    assert _pixels(convert_channels(rgba, 3)).tolist() == _pixels(convert_mode(rgba, 3)).tolist() == [
        [[255, 255, 255], [10, 20, 30]]]
    f = Image.fromarray(np.array([[0.5, 2.0]], dtype=np.float32))
    assert _pixels(convert_channels(f, None)).tolist() == [[64, 255]]
    with pytest.raises(ValueError, match="in_chans"):
        convert_channels(rgba, 2)


def test_image_file_dataset_uses_open_image(tmp_path, caplog):
    paths = []
    for i, (w, h) in enumerate([(10, 10), (30, 20), (200, 200)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((h, w), 1000 * (i + 1), dtype=np.uint16)).save(path)
        paths.append(path)
    ds = ImageFileDataset(paths, [0, 0, 1], ["a", "b"], in_chans=3, max_image_pixels=1000)
    img, label = ds[1]
    assert img.mode == "RGB" and img.size == (30, 20) and _pixels(img)[0, 0].tolist() == [8, 8, 8]
    with pytest.raises(BadImageError, match=r"200 x 200 = 40000 pixels, over the limit of 1000 pixels.*on_bad_image"):
        ds[2]
    skipping = ImageFileDataset(paths, [0, 0, 1], ["a", "b"], in_chans=1, on_bad_image="skip",
                                max_image_pixels=1000)
    assert len(skipping) == 2 and "over the limit" in caplog.text


# -- recipe key ----------------------------------------------------------------------------------------


def test_recipe_key_default_and_null():
    assert resolve_recipe({}, source="<t>", check_data=False)["data"]["max_image_pixels"] == DEFAULT_MAX_PIXELS
    assert resolve_recipe({"data": {"max_image_pixels": None}}, source="<t>", check_data=False)[
        "data"]["max_image_pixels"] is None
    assert resolve_recipe({"data": {"max_image_pixels": 5000}}, source="<t>", check_data=False)[
        "data"]["max_image_pixels"] == 5000


@pytest.mark.parametrize("bad", [0, -1, "big", 1.5])
def test_recipe_key_bad_values(bad):
    with pytest.raises(RecipeError, match="data.max_image_pixels"):
        resolve_recipe({"data": {"max_image_pixels": bad}}, source="<t>", check_data=False)


def test_build_dataset_passes_the_recipe_limit(tmp_path):
    from scott.data.datasets import build_dataset

    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (40, 30), (5, 6, 7)).save(tmp_path / split / "a" / "x.png")
    data = {"name": "imagefolder", "root": str(tmp_path)}
    ds = build_dataset(resolve_recipe({"data": {**data, "max_image_pixels": 1000}}, source="<t>")["data"], "train")
    assert ds.max_image_pixels == 1000
    with pytest.raises(BadImageError, match="40 x 30 = 1200 pixels, over the limit of 1000"):
        ds[0]
    ds = build_dataset(resolve_recipe({"data": data}, source="<t>")["data"], "train")
    assert ds.max_image_pixels == DEFAULT_MAX_PIXELS and ds[0][0].size == (40, 30)


def test_cielab_tiff_to_srgb(tmp_path):
    img = Image.new("LAB", (4, 2), (128, 128, 128))  # L* 50, a* 0, b* 0: mid grey
    img.paste((138, 209, 198), (2, 0, 4, 2))  # L* 54, a* 81, b* 70: sRGB red
    path = tmp_path / "lab.tif"
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == "LAB"
    got = _pixels(open_image(path, 3))
    assert np.abs(got[0, 0] - [119, 119, 119]).max() <= 2
    assert np.abs(got[0, 3] - [255, 0, 0]).max() <= 8
    assert abs(_pixels(open_image(path, 1))[0, 0] - 119) <= 2

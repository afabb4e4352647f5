"""Image loading: every format the datasets use gives the same grey image; bad files name themselves."""
import numpy as np
import pytest
from PIL import Image

from cxpmrg_lib.util.errors import DataError
from cxpmrg_lib.data.images import ImageLoadError, load_image


@pytest.fixture()
def grey():
    y, x = np.mgrid[0:64, 0:96]
    return ((x * 2 + y) % 256).astype(np.uint8)  # non-square on purpose


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P"])
def test_8bit_modes_match(tmp_path, grey, mode):
    p = tmp_path / f"x_{mode}.png"
    img = Image.fromarray(grey)
    img = img.convert(mode) if mode != "P" else img.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    img.save(p)
    a = load_image(p)
    assert a.dtype == np.float32 and a.shape == (64, 96)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    np.testing.assert_allclose(a, grey / 255.0, atol=1e-6 if mode != "P" else 2 / 255)


def test_16bit_scaled_by_depth_not_max(tmp_path):
    a16 = np.full((32, 32), 1000, np.uint16)
    a16[0, 0] = 2000
    Image.fromarray(a16).save(tmp_path / "x16.png")
    a = load_image(tmp_path / "x16.png")
    assert a.dtype == np.float32
    assert a[1, 1] == pytest.approx(1000 / 65535, rel=1e-6) and a[0, 0] == pytest.approx(2000 / 65535, rel=1e-6)
    # a 16-bit copy of an 8-bit image (v * 257) gives the same floats as the 8-bit one
    g = (np.arange(32 * 32) % 256).astype(np.uint8).reshape(32, 32)
    Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    Image.fromarray(g).save(tmp_path / "g8.png")
    np.testing.assert_allclose(load_image(tmp_path / "g16.png"), load_image(tmp_path / "g8.png"), atol=1e-6)
    np.testing.assert_allclose(load_image(tmp_path / "g16.png", 16), load_image(tmp_path / "g8.png", 16), atol=3e-3)


def test_jpeg_grey_and_rgb(tmp_path, grey):
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(grey).convert("RGB").save(tmp_path / "c.jpg", quality=95)
    a, b = load_image(tmp_path / "g.jpg"), load_image(tmp_path / "c.jpg")
    assert a.shape == b.shape == (64, 96)
    assert np.abs(a - grey / 255).mean() < 0.02 and np.abs(b - grey / 255).mean() < 0.02


def test_resize_square_and_antialiased(tmp_path):
    # A one-pixel checkerboard averages to mid-grey when shrunk with antialiasing (nearest would not).
    chk = (np.indices((256, 256)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(chk).save(tmp_path / "c.png")
    Image.fromarray(chk).save(tmp_path / "c.jpg", quality=100)
    for name in ("c.png", "c.jpg"):
        a = load_image(tmp_path / name, size=64)
        assert a.shape == (64, 64) and a.dtype == np.float32
        assert abs(float(a.mean()) - 0.5) < 0.03 and float(a.std()) < 0.1, name


def test_big_png_reduce(tmp_path):
    big = np.zeros((2000, 1600), np.uint8)
    big[:, 800:] = 200
    Image.fromarray(big).save(tmp_path / "big.png")
    a = load_image(tmp_path / "big.png", size=100)
    assert a.shape == (100, 100)
    assert a[:, :45].max() < 0.01 and a[:, 55:].min() > 0.77


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match=r"nope\.png: file not found") as e:
        load_image(tmp_path / "nope.png")
    assert isinstance(e.value, DataError) and e.value.path.endswith("nope.png")


def test_truncated_png(tmp_path):
    p = tmp_path / "t.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)  # incompressible
    Image.fromarray(noise).save(p)
    data = p.read_bytes()
    assert len(data) > 4000
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"t\.png: corrupt or truncated"):
        load_image(p)


def test_garbage_file(tmp_path):
    p = tmp_path / "g.png"
    p.write_bytes(b"\x89PNG but not really" * 10)
    with pytest.raises(ImageLoadError, match=r"g\.png"):
        load_image(p)
    q = tmp_path / "text.jpg"
    q.write_text("hello")
    with pytest.raises(ImageLoadError, match="not a recognised image format"):
        load_image(q)


def test_bad_size(tmp_path, grey):
    Image.fromarray(grey).save(tmp_path / "x.png")
    with pytest.raises(ValueError):
        load_image(tmp_path / "x.png", size=0)

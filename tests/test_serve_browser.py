"""The search page and the upgrade report in a real browser: headless Chromium (Debian `chromium` and
`chromium-driver`) driven by selenium.

The page is loaded from a real uvicorn server: open, with --closed-read (the page asks for the token and
fetches thumbnails with it), and during a migration with the old model beside the served one. Each run
types or uploads a query, waits for the results, checks that every thumbnail loaded (naturalWidth > 0)
and that the browser console holds no error, and saves a screenshot. A report.html written by the
project's report code for a tiny real evaluation is opened too, and every figure must load.

Screenshots go to a temporary folder (printed); set XBT_SCREENSHOTS to also copy them there."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from gallery_support import running_server, save_tiny_openclip

from xbt import load_model
from xbt.gallery.ingest import GalleryItem, GalleryRetriever, ingest
from xbt.gallery.store import Gallery
from xbt.serve.app import ServeConfig, create_app
from xbt.serve.media import resolve_roots

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN = "browser-token-123"
COLOURS = {"red": (220, 50, 47), "green": (60, 160, 70), "blue": (38, 110, 210), "yellow": (240, 200, 40),
           "purple": (130, 70, 170), "orange": (245, 130, 30)}
SHAPES = ("circle", "square", "triangle", "star")
K = 8

webdriver = pytest.importorskip("selenium.webdriver")
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("needs Debian's chromium and chromium-driver (./run.sh setup installs them)", allow_module_level=True)


def _draw(path: Path, colour: tuple[int, int, int], shape: str, seed: int) -> None:
    """A picture of a coloured shape on a light background (distinct, and legible in a screenshot)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (160, 160), tuple(int(v) for v in rng.integers(225, 255, 3)))
    d = ImageDraw.Draw(img)
    c, r = 80 + int(rng.integers(-12, 12)), 44 + int(rng.integers(-8, 10))
    box = (c - r, c - r, c + r, c + r)
    if shape == "circle":
        d.ellipse(box, fill=colour, outline=(40, 40, 40), width=3)
    elif shape == "square":
        d.rectangle(box, fill=colour, outline=(40, 40, 40), width=3)
    elif shape == "triangle":
        d.polygon([(c, c - r), (c + r, c + r), (c - r, c + r)], fill=colour, outline=(40, 40, 40))
    else:
        pts = [(c + (r if i % 2 == 0 else r / 2.3) * np.cos(np.pi / 2 + i * np.pi / 5),
                c - (r if i % 2 == 0 else r / 2.3) * np.sin(np.pi / 2 + i * np.pi / 5)) for i in range(10)]
        d.polygon(pts, fill=colour, outline=(40, 40, 40))
    img.save(path)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """24 pictures (6 colours x 4 shapes) with captions, a tiny open_clip model, and a gallery of them."""
    root = tmp_path_factory.mktemp("browser")
    photos = root / "photos"
    photos.mkdir()
    items = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        for j, shape in enumerate(SHAPES):
            path = photos / f"{name}-{shape}.png"
            _draw(path, rgb, shape, seed=10 * i + j)
            items.append(GalleryItem(path.stem, {"image": str(path), "caption": f"a {name} {shape}"}))
    spec = save_tiny_openclip(root / "model", seed=0)
    model = load_model(spec)
    gallery = Gallery.create(root / "gallery", model.space, modality="image")
    ingest(gallery, model, items)
    yield {"root": root, "photos": photos, "items": items, "model": model, "gallery": gallery}
    gallery.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots: {folder}")
    yield folder
    extra = os.environ.get("XBT_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        for png in folder.glob("*.png"):
            shutil.copy2(png, Path(extra) / png.name)
        print(f"screenshots copied to {extra}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1360,1000", "--hide-scrollbars",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


# ----- helpers -------------------------------------------------------------------------------------
def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _leave(driver) -> None:
    """Away from the page before its server stops (the page polls /info), and the console emptied."""
    driver.get("about:blank")
    driver.get_log("browser")


def _wait(driver, condition, what: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message=what)


LOADED = """return Array.from(document.querySelectorAll(arguments[0])).map(
    img => img.complete && img.naturalWidth > 0 ? img.naturalWidth : 0);"""


def _thumbnails_loaded(driver, n: int, selector: str = ".grid img.thumb-img") -> list[int]:
    """Waits until n thumbnails are shown and every one has decoded; returns their natural widths."""
    _wait(driver, lambda d: len(d.execute_script(LOADED, selector)) == n and all(d.execute_script(LOADED, selector)),
          f"{n} loaded thumbnails")
    return driver.execute_script(LOADED, selector)


def _search_text(driver, query: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "query")
    box.clear()
    box.send_keys(query, Keys.ENTER)
    _wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done"
          and query in d.find_element(By.ID, "status").text, f"results for {query!r}")


def _search_image(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "file").send_keys(str(path))
    _wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done"
          and path.name in d.find_element(By.ID, "status").text, f"results for the image {path.name}")


def _set_k(driver, k: int) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "k")
    box.clear()
    box.send_keys(str(k))


def _fact(driver, name: str) -> str:
    return driver.execute_script(
        "const d = Array.from(document.querySelectorAll('#facts div')).find(x => x.querySelector('dt').textContent === arguments[0]);"
        "return d ? d.querySelector('dd').textContent : null;", name)


# ----- the page ----------------------------------------------------------------------------------------
def test_the_page_searches_by_text_and_by_image(pictures, browser, shots):
    from selenium.webdriver.common.by import By

    retriever = GalleryRetriever(pictures["gallery"], pictures["model"])
    app = create_app(retriever, ServeConfig(token=TOKEN, open_info=True), resolve_roots([pictures["photos"]]))
    with running_server(app) as url:
        browser.get(f"{url}/")
        _wait(browser, lambda d: _fact(d, "items") == "24", "the gallery's facts")
        assert _fact(browser, "space") == pictures["model"].space.id.replace(str(pictures["root"] / "model"), "model")
        assert _fact(browser, "model") == "openclip:local-dir:model"
        _set_k(browser, K)
        _search_text(browser, "a red circle")
        widths = _thumbnails_loaded(browser, K)
        assert all(w == 160 for w in widths), widths  # 160x160 originals, under the 256-pixel thumbnail size
        captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".grid .caption")]
        assert len(captions) == K and all(c.startswith("a ") for c in captions)
        scores = [float(e.text.split("·")[1]) for e in browser.find_elements(By.CSS_SELECTOR, ".grid .score")]
        assert scores == sorted(scores, reverse=True)
        browser.save_screenshot(str(shots / "page-text-query.png"))
        assert _console_errors(browser) == []

        query = pictures["photos"] / "blue-star.png"
        _search_image(browser, query)
        _thumbnails_loaded(browser, K)
        first = browser.find_element(By.CSS_SELECTOR, ".grid .card").get_attribute("title")
        assert first == "blue-star"  # the same picture is its own nearest neighbour
        browser.save_screenshot(str(shots / "page-image-query.png"))
        assert _console_errors(browser) == []
        _leave(browser)


def test_the_page_says_how_many_rows_are_still_transformed(pictures, browser, shots, tmp_path):
    """A gallery `xbt gallery transform` made (here by the identity map, the served model's space on both
    sides): the facts say how many of its rows are not native yet."""
    import numpy as np

    from xbt.compat.maps import LinearMap
    from xbt.gallery.store import Gallery
    from xbt.gallery.transform import GalleryMap, transform_gallery

    space = pictures["model"].space
    identity = GalleryMap(LinearMap.from_arrays(np.eye(space.dim, dtype=np.float32)), space, space, "identity")
    transform_gallery(pictures["gallery"], tmp_path / "transformed", identity)
    with Gallery.open(tmp_path / "transformed") as transformed:
        transformed.delete([transformed.ids()[0]])
        app = create_app(GalleryRetriever(transformed, pictures["model"]), ServeConfig(token=TOKEN, open_info=True),
                         resolve_roots([pictures["photos"]]))
        with running_server(app) as url:
            browser.get(f"{url}/")
            _wait(browser, lambda d: _fact(d, "items") == "23", "the gallery's facts")
            assert _fact(browser, "transformed") == "23 of 23"
            assert _console_errors(browser) == []
            _leave(browser)


def test_the_page_with_the_default_access_searches_without_the_token(pictures, browser, shots):
    """The default: a token for writing, open reading, /info closed. The page searches without asking and
    makes no request that would be refused (a refused request is a console error)."""
    from selenium.webdriver.common.by import By

    retriever = GalleryRetriever(pictures["gallery"], pictures["model"])
    app = create_app(retriever, ServeConfig(token=TOKEN), resolve_roots([pictures["photos"]]))
    with running_server(app) as url:
        browser.get(f"{url}/")
        _wait(browser, lambda d: _fact(d, "gallery") == "details need the token", "the note about /info")
        assert browser.find_element(By.ID, "token-button").is_displayed()
        assert not browser.find_element(By.ID, "token-panel").is_displayed()
        _set_k(browser, 5)
        _search_text(browser, "an orange star")
        _thumbnails_loaded(browser, 5)
        assert _console_errors(browser) == []
        _leave(browser)


def test_the_page_with_closed_reading_asks_for_the_token(pictures, browser, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    retriever = GalleryRetriever(pictures["gallery"], pictures["model"])
    app = create_app(retriever, ServeConfig(token=TOKEN, open_read=False), resolve_roots([pictures["photos"]]))
    with running_server(app) as url:
        browser.get(f"{url}/")
        panel = browser.find_element(By.ID, "token-panel")
        _wait(browser, lambda d: panel.is_displayed(), "the token prompt")
        assert browser.execute_script("return sessionStorage.getItem('xbt-token')") is None
        browser.save_screenshot(str(shots / "page-closed-read-token-prompt.png"))
        browser.find_element(By.ID, "token-input").send_keys(TOKEN, Keys.ENTER)
        _wait(browser, lambda d: _fact(d, "items") == "24", "the gallery's facts, read with the token")
        assert not panel.is_displayed()
        assert browser.execute_script("return sessionStorage.getItem('xbt-token')") == TOKEN
        _set_k(browser, K)
        _search_text(browser, "a green square")
        _thumbnails_loaded(browser, K)  # fetched with the Authorization header, shown as blob: URLs
        sources = browser.execute_script("return Array.from(document.querySelectorAll('.grid img')).map(i => i.src)")
        assert all(s.startswith("blob:") for s in sources)
        browser.save_screenshot(str(shots / "page-closed-read.png"))
        assert _console_errors(browser) == []
        browser.execute_script("sessionStorage.clear()")
        _leave(browser)


def test_the_page_during_a_migration_beside_the_old_model(pictures, browser, shots, tmp_path):
    """Progress of the backfill at the top; per result, the gallery it came from; the old model beside."""
    import torch
    from selenium.webdriver.common.by import By

    from xbt.compat.maps import Projection
    from xbt.compat.model import CompatibleModel
    from xbt.gallery.migrating import MigratingRetriever
    from xbt.gallery.migration import Migration

    old_model = pictures["model"]
    new_model = load_model(save_tiny_openclip(tmp_path / "new", seed=1, embed_dim=48, width=48))
    torch.manual_seed(0)
    compat = CompatibleModel(new_model, Projection(48, old_model.space.dim, "linear"), old_model.space)
    with Gallery.create(tmp_path / "old", old_model.space, modality="image") as g:
        ingest(g, old_model, pictures["items"])
        migration = Migration.start(tmp_path / "mig", g, new_model.space)
    migration.run(new_model, max_items=12)
    retriever = MigratingRetriever(Migration(tmp_path / "mig"), compat, new_model)
    old = GalleryRetriever(retriever.old, old_model)
    app = create_app(retriever, ServeConfig(token=TOKEN, open_info=True), resolve_roots([pictures["photos"]]), old=old)
    try:
        with running_server(app) as url:
            browser.get(f"{url}/")
            _wait(browser, lambda d: d.find_element(By.ID, "migration").is_displayed(), "the migration's progress")
            assert "12 / 24 (50%)" in browser.find_element(By.ID, "migration-text").text
            assert _fact(browser, "mode") == "migrating"
            _set_k(browser, K)
            _search_text(browser, "a yellow triangle")
            _thumbnails_loaded(browser, K)
            browser.find_element(By.ID, "compare").click()  # the same query again, beside the old model
            _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".column")) == 2, "two columns")
            _thumbnails_loaded(browser, 2 * K)
            headings = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".column h2")]
            assert len(headings) == 2 and headings[1].startswith("old model")
            columns = browser.find_elements(By.CSS_SELECTOR, ".column")
            badges = {e.text for e in columns[0].find_elements(By.CSS_SELECTOR, ".badge")}
            assert badges and badges <= {"old gallery", "new gallery"}
            assert not columns[1].find_elements(By.CSS_SELECTOR, ".badge")  # the old model searches the old gallery only
            browser.save_screenshot(str(shots / "page-migration-compare.png"))
            assert _console_errors(browser) == []
            _leave(browser)
    finally:
        retriever.close()


# ----- the report -------------------------------------------------------------------------------------
def test_the_report_renders_every_figure(pictures, browser, shots, tmp_path, monkeypatch):
    """A report.html from `write_report` on a tiny real evaluation (two tiny open_clip models, 24 pairs)."""
    from selenium.webdriver.common.by import By

    from xbt.data.pairs import Pair
    from xbt.eval.report import write_report
    from xbt.eval.runner import run_evaluation

    monkeypatch.setenv("XBT_HOME", str(tmp_path / "home"))
    pairs = [Pair(it.payload["image"], it.payload["caption"], it.id) for it in pictures["items"]]
    new_model = load_model(save_tiny_openclip(tmp_path / "new", seed=2, embed_dim=48, width=48))
    run = run_evaluation(pictures["model"], new_model, pairs[::2], ["procrustes-text", "affine"],
                         fit_texts=[p.caption for p in pairs[1::2]], fit_pairs=pairs[1::2], ks=(1, 5),
                         n_resamples=50, cost_batch_sizes=(1,), data_efficiency=[4, 8])
    paths = write_report(run.to_results(), tmp_path / "report")
    n_figures = paths["html"].read_text().count("<figure>")
    assert n_figures == 3
    browser.get(paths["html"].as_uri())
    widths = _thumbnails_loaded(browser, n_figures, selector="figure img")
    assert all(w > 300 for w in widths), widths
    browser.set_window_size(1360, browser.execute_script("return document.documentElement.scrollHeight") + 120)
    browser.save_screenshot(str(shots / "report.png"))
    browser.set_window_size(1360, 1000)
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Upgrade report")
    assert _console_errors(browser) == []

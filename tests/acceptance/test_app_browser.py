"""The web app in a real browser (headless Chromium through Selenium): pick an image, run analyses,
see the figure, the neighbour list, the SAE features and the server's error messages."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

BROWSER, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
if not (BROWSER and DRIVER) and os.environ.get("CLIP_LENS_REQUIRE_BROWSER") == "1":  # CI installs them
    raise RuntimeError("CLIP_LENS_REQUIRE_BROWSER=1 but chromium or chromedriver is not on PATH.")
if not (BROWSER and DRIVER):
    pytest.skip("the browser test needs chromium and chromedriver on PATH (Debian: apt-get install chromium "
                "chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402 - only once the browser is known to exist
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

import torch  # noqa: E402

from clip_lens import HookedCLIP  # noqa: E402
from clip_lens.app import demo_workspace, make_server  # noqa: E402
from clip_lens.sae import SAE, SAEConfig  # noqa: E402
from clip_lens.toy.world import ShapesWorld  # noqa: E402
from tests.helpers import serving  # noqa: E402

# a real browser against a real server: 9 s for the module, so it runs in CI's slow step (the default suite
# stays under 5 minutes)
pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def server(one_torch_thread, tmp_path_factory):
    model = HookedCLIP.from_pretrained("toy-shapes")
    workspace = demo_workspace(model, tmp_path_factory.mktemp("app"), n_scenes=120)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=128, d_sae=32, hook_name="blocks.3.hook_resid_post"))  # random: the page, not the SAE
    server = make_server(model, workspace.store, workspace.labels, thumbnails=workspace.thumbnails, saes={"random": sae})
    with serving(server):
        yield server


@pytest.fixture(scope="module")
def browser(server):
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.get(server.url)
    wait(driver).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbnails img")) == 24)
    yield driver
    driver.quit()


def wait(driver, seconds: float = 30):
    return WebDriverWait(driver, seconds)


def open_tab(driver, name: str):
    driver.find_element(By.CSS_SELECTOR, f'#tabs button[data-tab="{name}"]').click()
    return driver.find_element(By.ID, f"form-{name}")


def figure_shown(driver, tab: str) -> bool:
    figures = driver.find_elements(By.CSS_SELECTOR, f"#result-{tab} img.figure")
    loaded = "return arguments[0].complete && arguments[0].naturalWidth"
    return bool(figures) and driver.execute_script(loaded, figures[0]) > 0


def set_value(form, name: str, value: str) -> None:
    field = form.find_element(By.NAME, name)
    field.clear()
    field.send_keys(value)


def test_page_fills_its_controls_from_the_server(browser):
    assert "toy-shapes" in browser.find_element(By.ID, "model-line").text
    properties = Select(browser.find_element(By.CSS_SELECTOR, "#form-property_neighbors select[name=property]"))
    assert "colour" in [o.get_attribute("value") for o in properties.options]
    heads = Select(browser.find_element(By.CSS_SELECTOR, "#form-image_neighbors select[name=head]"))
    assert len(heads.options) == 16 and any("(colour)" in o.get_attribute("textContent") for o in heads.options)


def test_head_neighbours_of_a_store_image(browser):
    form = open_tab(browser, "image_neighbors")
    browser.find_element(By.CSS_SELECTOR, '#thumbnails img[data-row="5"]').click()
    assert browser.find_element(By.ID, "preview-caption").text == "store image #5"
    Select(form.find_element(By.NAME, "head")).select_by_value("L1H2")
    set_value(form, "k", "4")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(browser).until(lambda d: figure_shown(d, "image_neighbors"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#result-image_neighbors table.neighbours tbody tr")
    assert len(rows) == 4
    scores = [float(row.find_elements(By.TAG_NAME, "td")[3].text) for row in rows]
    assert scores == sorted(scores, reverse=True)


def test_property_search_on_an_uploaded_image(browser, tmp_path):
    path = tmp_path / "query.png"
    Image.fromarray(ShapesWorld(seed=1000, image_size=64).scene(4).image).save(path)
    browser.find_element(By.ID, "upload").send_keys(str(path))
    wait(browser).until(lambda d: d.find_element(By.ID, "preview-caption").text == "query.png")
    form = open_tab(browser, "property_neighbors")
    Select(form.find_element(By.NAME, "property")).select_by_value("colour")
    assert Select(form.find_element(By.NAME, "metric")).first_selected_option.text == "concepts"  # the page's default
    form.find_element(By.NAME, "texts").send_keys("a red shape\na blue shape\na green shape\na yellow shape")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(browser).until(lambda d: figure_shown(d, "property_neighbors"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#result-property_neighbors table.neighbours tbody tr")) == 8
    assert "(concepts)" in browser.find_element(By.ID, "result-property_neighbors").text
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert np.asarray(Image.open(tmp_path / "page.png")).std() > 10  # the screenshot is not blank


def test_segmentation_tabs_show_heatmaps(browser):
    browser.find_element(By.CSS_SELECTOR, '#thumbnails img[data-row="2"]').click()
    for tab in ("topic_segmentation", "contrastive_segmentation"):
        open_tab(browser, tab).find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait(browser).until(lambda d, tab=tab: figure_shown(d, tab))


def test_server_errors_are_shown_on_the_page(browser):
    form = open_tab(browser, "text_neighbors")
    set_value(form, "text", " ")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    error = wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#result-text_neighbors .error"))[0]
    assert "400" in error.text and "text must be a non-empty string" in error.text
    set_value(form, "text", "a red shape")
    set_value(form, "k", "0")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(browser).until(lambda d: "k must be a whole number" in d.find_element(By.ID, "result-text_neighbors").text)


def test_features_tab_lists_shows_and_searches_features(browser):
    open_tab(browser, "features")  # opening it lists the features (computed over the store on first use)
    rows = wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#feature-list tr.pick"))
    assert len(rows) == 32
    assert "32 features at blocks.3.hook_resid_post" in browser.find_element(By.ID, "features-note").text
    assert all(row.find_elements(By.TAG_NAME, "td")[3].text != "—" for row in rows)  # named through the read-out
    rows[4].click()
    wait(browser).until(lambda d: figure_shown(d, "features"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#result-features table.neighbours tbody tr")) == 5  # names
    browser.find_element(By.CSS_SELECTOR, '#thumbnails img[data-row="3"]').click()
    browser.find_element(By.CSS_SELECTOR, "#form-features-image button[type=submit]").click()
    wait(browser).until(lambda d: figure_shown(d, "features-image"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#result-features-image tbody tr")) == 8
    set_value(browser.find_element(By.ID, "form-features"), "text", "a red shape")
    browser.find_element(By.CSS_SELECTOR, "#form-features button[type=submit]").click()
    wait(browser).until(lambda d: "cos with text" in d.find_element(By.ID, "feature-list").text)
    scores = [float(row.find_elements(By.TAG_NAME, "td")[4].text)
              for row in browser.find_elements(By.CSS_SELECTOR, "#feature-list tr.pick")]
    assert len(scores) == 32 and scores == sorted(scores, reverse=True)


def test_no_console_errors(browser):
    severe = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"
              and "/api/" not in entry["message"]]  # the refused requests above are logged as failed loads
    assert not severe

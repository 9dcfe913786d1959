"""A run folder is data, never code: `ovdet report` over a run folder whose every field holds markup must give a
page where that markup is shown as text, runs nothing, and whose Content-Security-Policy would stop it if it did.

The run folders are written by hand (no model): run.json, predictions.jsonl and errors.jsonl as another program or
a person with a text editor could leave them, next to real images whose file and folder names are payloads too.
run.json's kind must be one ovdet writes (load_run checks it); the page is also rendered with a hostile kind, so
render() and the script stay safe whatever reaches them.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import shlex
import time
from pathlib import Path

import pytest
from PIL import Image
from test_report import _open, _wait_render, browser  # noqa: F401  (browser: the module's Chromium fixture)

from ovdet.report import write_report
from ovdet.report.data import build_data
from ovdet.report.page import render
from ovdet.runs.folder import load_run

# Every payload records which field it came from in window.pwned, and most also rename the page.
KIND = ("annotate<img src=x onerror=\"window.pwned='kind';document.title='pwned'\">\n\t"
        "</script><script>window.pwned='kind-script'</script>\r\x0b\x1b\u2028end")
KIND_TITLE = ("annotate<img src=x onerror=\"window.pwned='kind';document.title='pwned'\"> "
              "</script><script>window.pwned='kind-script'</script> end")  # control characters: one space
CLASS_A = "\"><svg onload=\"window.pwned='class';alert(1)\">$(touch pwned) 'quoted'"
CLASS_B = "</script><script>window.pwned='class-script'</script><img src=x onerror=window.pwned='class-img'>"
IMAGE_A = "<img src=x onerror=\"window.pwned='image';document.title='pwned'\">.png"  # file names: no "/"
IMAGE_B = "\"><svg onload=window.pwned='image2'>\nline.jpg"
RUN = "run<img src=x onerror=window.pwned='run'>"
ERROR = {"image": "<iframe srcdoc=\"<script>parent.pwned='error-iframe'</script>\">",
         "path": "/data/<img src=x onerror=window.pwned='error-path'>.jpg",
         "reason": "</script><img src=x onerror=\"window.pwned='error'\">\nsecond <b>line</b>"}
MODEL = "<img src=x onerror=\"window.pwned='setting'\">"
SOURCE = "src<svg onload=window.pwned='source'>"  # the images' folder, shown in the settings
RELABEL_FROM = "<img src=x onerror=\"window.pwned='relabel'\">"
RESULT_CLASS = "<img src=x onerror=\"window.pwned='result'\">"
RESULT_IMAGES = "<svg onload=window.pwned='result-images'>"


def _hostile_run(root: Path, kind: str) -> Path:
    """A run folder of kind `kind` over two real images, every string in it markup that would run if parsed."""
    src = root / SOURCE
    src.mkdir()
    run = root / RUN
    run.mkdir()
    records = []
    for i, (name, size) in enumerate([(IMAGE_A, (64, 48)), (IMAGE_B, (40, 60))]):
        Image.new("RGB", size, (40 + 100 * i, 90, 160)).save(src / name)
        w, h = size
        dets = [{"class_id": 0, "class_name": CLASS_A, "score": 0.62, "bbox": [2, 3, w / 2, h / 2]},
                {"class_id": 1, "class_name": CLASS_B, "score": 0.31 + 0.1 * i, "bbox": [w / 3, h / 3, w - 2, h - 2]}]
        rec = {"image": name, "path": str(src / name), "key": Path(name).stem, "width": w, "height": h,
               "detections": dets}
        if kind == "eval":
            rec["gt"] = [{"class_id": 0, "bbox": [2, 3, w / 2, h / 2]}]
        records.append(rec)
    classes = [{"name": CLASS_A, "prompts": [CLASS_A], "conf": None},
               {"name": CLASS_B, "prompts": [CLASS_B], "conf": 0.3}]
    manifest = {"version": 1, "kind": kind,
                "settings": {"classes": {"classes": classes}, "conf": 0.2, "model": MODEL, "source": str(src),
                             "imgsz": "<b>640</b>"},
                "relabel": {"from": RELABEL_FROM},
                "result": {"map50": "<b>1</b>", "images": RESULT_IMAGES, "instances": 2,
                           "classes": [{"name": RESULT_CLASS, "instances": "<i>2</i>", "ap50": 0.5, "ap50_95": 0.25}]}}
    (run / "run.json").write_text(json.dumps(manifest), encoding="utf-8")
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (run / "errors.jsonl").write_text(json.dumps(ERROR) + "\n", encoding="utf-8")
    return run


def _report(run: Path, kind: str | None = None) -> Path:
    """`ovdet report RUN` (write_report, without importing the model code); with `kind`, the page is rendered again
    from the same data claiming that kind, which run.json itself may not name."""
    out = write_report(run, quiet=True)
    if kind is not None:
        data = build_data(load_run(run), run / "thumbs", {})
        data["kind"] = kind
        out.write_text(render(data), encoding="utf-8")
    return out


def _text(browser, css: str) -> list[str]:  # noqa: F811
    """The DOM text (textContent) of every element matching `css`: what the page holds as text, not markup."""
    return browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent)", css)


def _policy(page: str) -> dict[str, list[str]]:
    """The page's Content-Security-Policy meta tag as {directive: [sources]}."""
    metas = re.findall(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', page)
    assert len(metas) == 1, "the report has no (or more than one) Content-Security-Policy meta tag"
    policy = {}
    for directive in html.unescape(metas[0]).split(";"):
        name, *sources = directive.split()
        assert name not in policy
        policy[name] = sources
    return policy


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def _inline(page: str, tag: str) -> list[str]:
    """The text of every inline <script> (without a type: the ones that run) or <style> of the page."""
    return re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)


# ----------------------------------------------------------------------------- the written page, without a browser


def test_title_is_one_escaped_line_and_data_cannot_close_its_script(tmp_path):
    page = _report(_hostile_run(tmp_path, "annotate"), KIND).read_text(encoding="utf-8")
    expected = html.escape(f"ovdet {KIND_TITLE} report: {RUN}")
    assert page.count(f"<title>{expected}</title>") == 1 and page.count(f'<h1 id="title">{expected}</h1>') == 1
    head = page[:page.index("</title>")]
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]", page)  # none of KIND's control characters
    assert "\n" not in head[head.index("<title>"):]
    # the JSON block is the page's first script, closed by its own tag: no string in it holds "<"
    block = page[page.index('<script id="ovdet-data" type="application/json">'):]
    data = json.loads(block[block.index(">") + 1:block.index("</script>")])
    assert data["kind"] == KIND and [c["name"] for c in data["classes"]] == [CLASS_A, CLASS_B]
    assert [im["n"] for im in data["images"]] == [IMAGE_A, IMAGE_B]
    assert page.count("</script>") == 2 and page.count("<script") == 2
    assert "<img" not in page and "<svg" not in page and "<iframe" not in page  # every payload escaped


def test_policy_allows_only_the_page_own_script_and_style_by_hash(tmp_path):
    page = write_report(_hostile_run(tmp_path, "annotate"), quiet=True).read_text(encoding="utf-8")
    policy = _policy(page)
    scripts, styles = _inline(page, "script"), _inline(page, "style")
    assert len(scripts) == 1 and len(styles) == 1
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == [_sha256(scripts[0])]  # fails if render() changes the script, not the hash
    assert policy["style-src"] == [_sha256(styles[0])]
    assert sorted(policy["img-src"]) == ["'self'", "data:", "file:"]
    assert policy["base-uri"] == ["'none'"] and policy["form-action"] == ["'none'"]
    assert policy["require-trusted-types-for"] == ["'script'"]
    # nothing else may load, connect or embed: those directives fall back to default-src 'none'
    assert not {"connect-src", "frame-src", "object-src", "child-src", "worker-src", "font-src"} & set(policy)
    assert page.index("Content-Security-Policy") < min(page.index("<style>"), page.index("<script"))
    markup = re.sub(r"<(script|style)[^>]*>.*?</\1>", "", page, flags=re.S)
    tags = re.findall(r"<[a-zA-Z][^>]*>", markup)  # the page's own elements (escaped text has no "<")
    assert "<body>" in tags and not [t for t in tags if re.search(r"\s(on\w+|style)=", t)]  # no handler or style


# ----------------------------------------------------------------------------- in a real browser


@pytest.mark.parametrize("kind, shown_kind", [("annotate", KIND), ("relabel", None), ("eval", None)],
                         ids=["hostile-kind", "relabel", "eval"])
def test_browser_shows_every_payload_as_text_and_runs_none(browser, tmp_path, kind, shown_kind):  # noqa: F811
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    run = _hostile_run(tmp_path, kind)
    _report(run, shown_kind)
    _open(browser, run / "report.html")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018
    title_kind = KIND_TITLE if shown_kind else kind
    assert browser.execute_script("return window.pwned") is None
    assert browser.title == f"ovdet {title_kind} report: {RUN}"
    # nothing the payloads hold became an element: two scripts, no handlers, every <img> a thumbnail that loaded
    assert browser.execute_script("return document.scripts.length") == 2
    assert browser.execute_script("return document.querySelectorAll('[onerror],[onload],[srcdoc],iframe').length") == 0
    images = browser.execute_script("return [...document.images].map((i) => [i.src, i.complete, i.naturalWidth])")
    assert len(images) == 2 and all(ok and width > 0 and "/thumbs/" in src for src, ok, width in images), images
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]  # no CSP report, no missing file

    # every payload is on the page as text, character for character
    assert _text(browser, "#title") == [f"ovdet {title_kind} report: {RUN}"]
    assert f"{shown_kind or kind} run {run.resolve()}" in _text(browser, "#summary")[0]
    assert [t.strip() for t in _text(browser, "#classes tr[data-class] td:first-child")] == [CLASS_A, CLASS_B]
    assert [o for o in _text(browser, "#filter option") if "only its boxes" in o] == [
        f"images with {CLASS_A} (only its boxes)", f"images with {CLASS_B} (only its boxes)"]
    assert _text(browser, "#gallery .cap .name") == [IMAGE_A, IMAGE_B]
    assert _text(browser, "#errors li")[0] == f"{ERROR['image']}: {ERROR['reason']}"
    settings = dict(zip(_text(browser, "#settings th"), _text(browser, "#settings td")))
    assert settings["model"] == MODEL and settings["source"] == str(run.parent / SOURCE)
    if kind == "relabel":
        assert settings["relabelled from"] == RELABEL_FROM
    if kind == "eval":
        assert _text(browser, "#ap-table td:first-child") == [RESULT_CLASS]
        assert RESULT_IMAGES in _text(browser, "#eval-summary")[0]
        assert [t.split(" (")[0] for t in _text(browser, "#pr-curves figcaption")] == [CLASS_A, CLASS_B]
    else:
        assert [t.strip() for t in _text(browser, "#legend .legend-item")] == [CLASS_A, CLASS_B]
    # and visible: open the two collapsed boxes; the rendered text shows the markup
    for box in ("settings-box", "errors-box"):
        browser.find_element(By.CSS_SELECTOR, f"#{box} summary").click()
    assert MODEL in browser.find_element(By.ID, "settings").text
    assert ERROR["image"] in browser.find_element(By.ID, "errors").text
    assert CLASS_B in browser.find_element(By.ID, "classes").text

    # the page still works: a slider redraws, the copied command quotes the names for the shell, the viewer opens
    drawn = browser.execute_script("return document.querySelectorAll('#gallery rect.det').length")
    assert drawn == 4
    slider = browser.find_element(By.ID, "thr-0")
    before = browser.execute_script("return window.ovdetReport.renders")
    slider.send_keys(Keys.END)  # threshold 1: both of CLASS_A's boxes (0.62) go
    _wait_render(browser, before)
    assert browser.execute_script("return document.querySelectorAll('#gallery rect.det').length") == 2
    browser.find_element(By.ID, "copy").click()
    argv = shlex.split(browser.find_element(By.ID, "relabel-cmd").text)
    assert argv == ["ovdet", "relabel", str(run.resolve()), "--conf",
                    f"{CLASS_A}={float(slider.get_attribute('value')):g},{CLASS_B}=0.3",
                    "--out", f"{run.resolve()}-relabel"]
    before = browser.execute_script("return window.ovdetReport.renders")
    Select(browser.find_element(By.ID, "filter")).select_by_value("class:0")
    _wait_render(browser, before)
    assert _text(browser, "#gallery .cap .name") == []  # CLASS_A's boxes are all under its threshold now
    before = browser.execute_script("return window.ovdetReport.renders")
    Select(browser.find_element(By.ID, "filter")).select_by_value("class:1")
    _wait_render(browser, before)
    assert _text(browser, "#gallery .cap .name") == [IMAGE_A, IMAGE_B]
    browser.find_elements(By.CSS_SELECTOR, "#gallery .card")[0].click()
    assert browser.find_element(By.ID, "viewer").is_displayed()
    assert _text(browser, "#viewer-name")[0].startswith(IMAGE_A)
    assert browser.execute_script("return document.querySelector('#viewer-stage img').naturalWidth") == 64
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    assert not browser.find_element(By.ID, "viewer").is_displayed()
    assert browser.execute_script("return window.pwned") is None and browser.title.startswith("ovdet ")


def test_browser_policy_stops_markup_that_slipped_into_the_page(browser, tmp_path):  # noqa: F811
    """If some future change let a payload into the page's markup, the policy would still not let it run."""
    from selenium.webdriver.common.by import By

    run = _hostile_run(tmp_path, "annotate")
    page = write_report(run, quiet=True).read_text(encoding="utf-8")
    planted = page.replace('<div id="summary"></div>', (
        '<div id="summary"></div><img id="planted-img" src="x" onerror="window.pwned=\'onerror\'">'
        '<svg onload="window.pwned=\'onload\'"></svg><script>window.pwned="inline-script"</script>'
        '<div id="planted" style="display: none">planted</div><style>#title { display: none }</style>'), 1)
    assert planted != page
    (run / "planted.html").write_text(planted, encoding="utf-8")
    _open(browser, run / "planted.html")  # the page's own script runs: its hash is allowed
    assert browser.execute_script("return window.pwned") is None
    assert browser.find_element(By.ID, "planted").is_displayed()  # the injected style attribute was refused
    assert browser.find_element(By.ID, "title").is_displayed()  # and so was the injected <style>
    refused = [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]
    assert refused, "the browser reported no policy violation for the planted markup"
    # a string reaching innerHTML throws (Trusted Types), so such a bug breaks the page instead of running
    assert browser.execute_script(
        "try { document.createElement('div').innerHTML = '<b>x</b>'; return 'allowed'; }"
        " catch (e) { return e.name; }") == "TypeError"

    # the page's script changed without its hash: refused, so render() must hash exactly what it inlines
    script = _inline(page, "script")[0]
    tampered = page.replace(f"<script>{script}</script>", f"<script>window.tampered=1;{script}</script>", 1)
    (run / "tampered.html").write_text(tampered, encoding="utf-8")
    browser.get((run / "tampered.html").resolve().as_uri())
    deadline = time.time() + 5
    while browser.execute_script("return document.readyState") != "complete":
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    assert browser.execute_script("return [window.tampered, window.ovdetReport]") == [None, None]



"""deepmetric.serve: the error-code matrix (in-process), a real uvicorn server process, and the web page
in headless Chromium."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric.index import Index
from deepmetric.index.build import build_index
from test_index import make_checkpoint

torch.set_num_threads(1)

K = 10
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny checkpoint (digits, untrained small CNN) and an index of its test split with thumbnails."""
    root = tmp_path_factory.mktemp("serve")
    checkpoint = make_checkpoint(root / "model.pt")
    index = build_index(checkpoint, backend="flat")
    index.save(root / "idx")
    query = root / "query.png"
    Image.fromarray(index.thumbnail(17)[0]).save(query)  # item 17's image (label index.get(17).label)
    return {"root": root, "checkpoint": checkpoint, "index": root / "idx", "query": query}


@pytest.fixture(scope="module")
def client(served: dict[str, Path]) -> Iterator[object]:
    from fastapi.testclient import TestClient

    from deepmetric.serve import create_app

    app = create_app(served["index"], max_upload_bytes=64 * 1024, num_threads=1)
    with TestClient(app) as c:
        yield c


def _png_bytes(size: tuple[int, int] = (20, 20), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=128 if mode == "L" else (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- in-process: behaviour and errors
def test_search_by_image_vector_and_item(client: object, served: dict[str, Path]) -> None:
    index = Index.load(served["index"])
    label = index.get(17).label
    r = client.post("/search", files={"file": ("q.png", served["query"].read_bytes(), "image/png")},
                    data={"k": "5", "label": str(label)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["rank"] for x in body["results"]] == [1, 2, 3, 4, 5]
    assert body["results"][0]["id"] == 17 and body["results"][0]["distance"] < 1e-3
    assert body["results"][0]["correct"] is True and body["query"]["label"] == label
    assert all(x["correct"] == (x["label"] == label) for x in body["results"])
    distances = [x["distance"] for x in body["results"]]
    assert distances == sorted(distances)

    vector = index.get(40).vector.tolist()
    r = client.post("/search", json={"vector": vector, "k": 3})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == 40
    assert all(x["correct"] is None for x in r.json()["results"])  # no query label given

    r = client.post("/search", json={"id": 40, "k": 4})
    ids = [x["id"] for x in r.json()["results"]]
    assert r.status_code == 200 and len(ids) == 4 and 40 not in ids  # the item itself is left out
    assert ids == index.search(index.get(40).vector, 5).ids[0, 1:].tolist()


def test_items_thumbnails_samples_and_docs(client: object) -> None:
    item = client.get("/items/5").json()
    assert item["id"] == 5 and item["thumbnail_url"] == "/items/5/thumbnail.png"
    assert item["metadata"] == {"dataset_index": 5, "split": "test"}
    png = client.get("/items/5/thumbnail.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (8, 8)
    samples = client.get("/samples?n=10").json()
    assert len(samples) == 10 and len({s["label"] for s in samples}) == 10  # one per class
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/search" in spec["paths"] and "/items/{item_id}" in spec["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "app.js" in page.text


@pytest.mark.parametrize(
    "kwargs,status,message",
    [
        ({"content": b"x" * 70_000, "headers": {"content-type": "application/json"}}, 413, "exceeds"),
        ({"files": {"file": ("big.png", b"\0" * 70_000, "image/png")}}, 413, "exceeds"),
        ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported content type"),
        ({"content": b"hello"}, 415, "unsupported content type"),
        ({"json": {"vector": [0.1] * 3}}, 422, "dimension 16"),
        ({"json": {"vector": "0.1, 0.2"}}, 422, "must be a list"),
        ({"json": {"vector": [[0.1] * 16]}}, 422, "must be a list of 16|has 1 values"),
        ({"json": {"vector": ["a"] * 16}}, 422, "not a number"),
        ({"content": json.dumps({"vector": [float("nan")] * 16}), "headers": {"content-type": "application/json"}},
         422, "non-finite"),
        ({"json": {"vector": [1e39] * 16}}, 422, "non-finite"),
        ({"json": {"vector": [0.1] * 16, "k": 0}}, 422, "between 1 and 100"),
        ({"json": {"vector": [0.1] * 16, "k": 101}}, 422, "between 1 and 100"),
        ({"json": {"vector": [0.1] * 16, "k": "ten"}}, 422, "between 1 and 100"),
        ({"json": {"vector": [0.1] * 16, "colour": 1}}, 422, "unknown field"),
        ({"json": {"k": 3}}, 422, "exactly one of"),
        ({"json": [1, 2]}, 422, "must be an object"),
        ({"json": {"id": 123456}}, 404, "no item"),
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"files": {"file": ("q.png", b"definitely not an image", "image/png")}}, 400, "cannot decode"),
        ({"files": {"file": ("q.png", b"", "image/png")}}, 400, "empty"),
        ({"files": {"photo": ("q.png", _png_bytes(), "image/png")}}, 422, "unknown form field"),
        ({"data": {"k": "3"}, "files": {"file": ("q.png", _png_bytes(), "image/png"), "k2": ("a", b"1")}}, 400,
         "Too many files"),
        ({"data": {"k": "3", "colour": "red"}, "files": {"file": ("q.png", _png_bytes(), "image/png")}}, 422,
         "unknown form field"),
        ({"files": {"file": ("q.png", _png_bytes(), "image/png")}, "data": {"k": "500"}}, 422, "between 1 and 100"),
        ({"files": {"file": ("q.png", _png_bytes(), "image/png")}, "data": {"label": "cat"}}, 422, "label"),
        ({"content": b"--xyz\r\nbroken", "headers": {"content-type": "multipart/form-data"}}, 400, "multipart"),
    ],
)
def test_error_matrix(client: object, kwargs: dict, status: int, message: str) -> None:
    import re

    r = client.post("/search", **kwargs)
    assert r.status_code == status, r.text
    assert re.search(message, r.json()["detail"]), r.json()


def test_other_errors_and_any_image_format(client: object) -> None:
    assert client.get("/items/999999").status_code == 404
    assert client.get("/items/abc").status_code == 422
    assert client.get("/items/999999/thumbnail.png").status_code == 404
    assert client.get("/samples?n=0").status_code == 422
    # RGB, large and odd-sized images are converted to the model's 1×8×8 input
    for data in (_png_bytes((300, 120)), _png_bytes((3, 3), "L")):
        r = client.post("/search", files={"file": ("q.png", data, "image/png")})
        assert r.status_code == 200 and len(r.json()["results"]) == 10


def test_image_search_without_model_is_503(served: dict[str, Path], tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from deepmetric.index import SearchIndexError
    from deepmetric.serve import create_app

    moved = tmp_path / "gone.pt"
    index = build_index(served["checkpoint"], backend="flat", thumbnails=False)
    index.provenance["checkpoint"] = str(moved)  # recorded checkpoint no longer exists
    index.save(tmp_path / "idx")
    with TestClient(create_app(tmp_path / "idx")) as c:
        r = c.post("/search", files={"file": ("q.png", _png_bytes(), "image/png")})
        assert r.status_code == 503 and "does not exist" in r.json()["detail"]
        assert c.post("/search", json={"id": 3}).status_code == 200  # vectors and items still work
        assert c.get("/items/3").json()["thumbnail_url"] is None
        assert c.get("/items/3/thumbnail.png").status_code == 404
    other = make_checkpoint(tmp_path / "other.pt", seed=3)
    with pytest.raises(SearchIndexError, match="another model"):
        create_app(served["index"], checkpoint=other)


# ----------------------------------------------------------------------------- a real server process
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(index_dir: Path, log: Path, extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``python -m deepmetric.serve`` on 127.0.0.1 and wait for /health (the caller must stop it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for _ in range(3):
        port = _free_port()
        handle = open(log, "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "deepmetric.serve", str(index_dir), "--host", "127.0.0.1", "--port", str(port),
             "--threads", "1", "--log-level", "warning", "--no-access-log", *(extra or [])],
            stdout=handle, stderr=subprocess.STDOUT, env=env,
        )
        handle.close()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        stop_server(proc)
    raise RuntimeError(f"the server did not start; log:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def server(served: dict[str, Path]) -> Iterator[str]:
    proc, url = start_server(served["index"], served["root"] / "server.log")
    try:
        yield url
    finally:
        stop_server(proc)
    assert proc.returncode is not None


def test_real_server_process(server: str, served: dict[str, Path]) -> None:
    with httpx.Client(base_url=server, timeout=30) as http:
        health = http.get("/health").json()
        assert health == {"status": "ok", "items": 359, "dim": 16, "metric": "euclidean", "backend": "flat",
                          "image_search": True}
        r = http.post("/search", files={"file": ("q.png", served["query"].read_bytes(), "image/png")},
                      data={"k": str(K)})
        assert r.status_code == 200 and len(r.json()["results"]) == K and r.json()["results"][0]["id"] == 17
        vector = Index.load(served["index"]).get(7).vector.tolist()
        r = http.post("/search", json={"vector": vector, "k": 2})
        assert r.status_code == 200 and r.json()["results"][0]["id"] == 7
        big = http.post("/search", content=b"0" * (6 * 1024 * 1024), headers={"content-type": "application/json"})
        assert big.status_code == 413
        assert http.post("/search", json={"vector": [1, 2]}).status_code == 422
        assert http.get("/items/3/thumbnail.png").headers["content-type"] == "image/png"
        assert http.get("/").status_code == 200 and http.get("/static/app.js").status_code == 200


def test_serve_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deepmetric.serve.cli import main

    assert main([str(tmp_path / "missing"), "--port", "0"]) == 1
    assert "no index directory" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the page in headless Chromium
def _chrome(tmp_path: Path) -> object:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"headless browser test needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium "
                    "chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def _wait_for_thumbnails(driver: object, selector: str, count: int, timeout: float = 60) -> list:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def loaded(d: object) -> list | bool:
        images = d.find_elements(By.CSS_SELECTOR, selector)
        ok = len(images) == count and all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img) for img in images)
        return images if ok else False

    return WebDriverWait(driver, timeout).until(loaded)


def test_page_in_headless_chromium(server: str, served: dict[str, Path], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    label = Index.load(served["index"]).get(17).label
    driver = _chrome(tmp_path)
    try:
        driver.set_page_load_timeout(60)
        driver.get(server + "/")
        _wait_for_thumbnails(driver, "#samples img", 12)
        # upload a query image with its true label: K result thumbnails, marked correct/incorrect
        Select(driver.find_element(By.ID, "label-select")).select_by_value(str(label))
        driver.find_element(By.ID, "file-input").send_keys(str(served["query"]))
        thumbs = _wait_for_thumbnails(driver, "#results img.result-thumb", K)
        assert len(thumbs) == K
        tiles = driver.find_elements(By.CSS_SELECTOR, "#results figure.result")
        assert tiles[0].get_attribute("data-id") == "17" and "correct" in tiles[0].get_attribute("class").split()
        marks = [t.get_attribute("data-correct") for t in tiles]
        assert set(marks) <= {"true", "false"} and marks[0] == "true"
        assert "d = 0.0000" in tiles[0].text
        status = driver.find_element(By.ID, "status").text
        assert f"{K} nearest of 359 items" in status
        # pick a sample item: it is left out of its own K results
        sample = driver.find_elements(By.CSS_SELECTOR, "#samples figure.sample")[2]
        sample_id = sample.get_attribute("data-id")
        sample.click()
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.ID, "query-caption").text.startswith(f"sample id {sample_id}")
            and "nearest" in d.find_element(By.ID, "status").text
            and all(f.get_attribute("data-correct") in ("true", "false")
                    for f in d.find_elements(By.CSS_SELECTOR, "#results figure.result")))
        ids = [f.get_attribute("data-id") for f in driver.find_elements(By.CSS_SELECTOR, "#results figure.result")]
        assert len(ids) == K and sample_id not in ids
        _wait_for_thumbnails(driver, "#results img.result-thumb", K)
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chrome-profile", ignore_errors=True)


def test_openapi_docs_page_is_served_offline(client: object) -> None:
    """/docs uses the swagger-ui files of the installed swagger-ui-bundle package, not a CDN."""
    pytest.importorskip("swagger_ui_bundle")
    page = client.get("/docs")
    assert page.status_code == 200 and "/_swagger/swagger-ui-bundle.js" in page.text
    assert "cdn.jsdelivr" not in page.text
    assert client.get("/_swagger/swagger-ui-bundle.js").status_code == 200
    assert client.get("/openapi.json").json()["paths"]["/search"]

"""The dashboard in a real headless Chromium against a real ``hilora coordinator`` process.

A federation of 9 clients in 3 planted groups (fake workers, no torch; their probe uploads move
along their group's direction, so LSAC finds the groups) is run to serving and 2 unseen clients are
onboarded. Then: log in, open the federation, see its clusters and an n x n affinity heatmap,
recluster from the page, and a wrong token is sent back to the login page with an error.

Needs ``playwright`` (the test extra) and Chromium at /usr/bin/chromium (``apt-get install
chromium``; never ``playwright install``). Skipped without them unless HILORA_TEST_BROWSER=required
(``.ci/run``). Screenshots go to the test's tmp dir; with HILORA_UPDATE_SCREENSHOT=1 the federation
page is also saved as docs/dashboard.png for the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ADMIN_TOKEN, create_federation

import support.fake_worker as fake_worker
from hilora.launcher import free_port
from support.fake_worker import FakeWorker
from shared.tensors import pack_tensors

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("HILORA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
GROUPS = {"alpine": 0, "coast": 1, "desert": 2}
TRAIN = [f"{g}-{i}" for g in GROUPS for i in range(3)]
LATE = ["alpine-late", "desert-late"]
default_body = fake_worker.deterministic_body


def _require_browser():
    required = os.environ.get("HILORA_TEST_BROWSER", "").lower() == "required"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if required:
            pytest.fail("HILORA_TEST_BROWSER=required but playwright is not installed", pytrace=False)
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        if required:
            pytest.fail(f"HILORA_TEST_BROWSER=required but {CHROMIUM} is missing", pytrace=False)
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")


def grouped_body(manifest, client: str, task) -> bytes:
    """Fake uploads whose probes carry a planted group structure (other stages: the default)."""
    if task.stage != "probe":
        return default_body(manifest, client, task)
    group = GROUPS[client.split("-")[0]]
    rng = np.random.default_rng(fake_worker.task_seed(client, task))
    out = {}
    for name, shape in sorted(manifest.tier_shapes(task.train_tier, tuple(task.upload)).items()):
        shared = np.random.default_rng(fake_worker._seed("shared", name)).standard_normal(shape)
        if name.endswith("lora_B"):
            direction = np.random.default_rng(fake_worker._seed("direction", group, name)).standard_normal(shape)
            value = direction + 0.15 * rng.standard_normal(shape)
        elif name.endswith("lora_A"):
            value = shared + 0.02 * rng.standard_normal(shape)
        else:
            value = 0.1 * shared + 0.05 * group + 0.01 * rng.standard_normal(shape)
        out[name] = value.astype(np.float32)
    return pack_tensors(out)


def run_fake_workers(url: str, fid: int, secret: str, hosts: list[list[str]], timeout: float = 120) -> None:
    workers = [FakeWorker(coordinator=url, federation_id=fid, secret=secret, clients=names, max_seconds=timeout,
                          poll_interval=0.05, emit=lambda _e: None, worker_id=f"gpu-box-{chr(97 + i)}")
               for i, names in enumerate(hosts)]
    codes: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i, w=w: codes.__setitem__(i, w.run()), daemon=True)
               for i, w in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    assert codes == {i: 0 for i in range(len(workers))}, codes


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real coordinator (JSON logs) with a federation trained to serving and 2 onboarded clients."""
    _require_browser()
    work = tmp_path_factory.mktemp("coordinator")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, HILORA_DATABASE_URL=f"sqlite:///{work / 'coordinator.db'}",
               HILORA_BLOB_DIR=str(work / "blobs"), HILORA_ADMIN_TOKEN=ADMIN_TOKEN, HILORA_DEV="0",
               HILORA_HOST="127.0.0.1", HILORA_PORT=str(port), HILORA_SCHEDULER_INTERVAL="0.1",
               HILORA_LOG_FORMAT="json", HILORA_LOG_LEVEL="info")
    log_path = work / "coordinator.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "hilora.cli", "coordinator"], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=url, timeout=10) as api:
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    if api.get("/v1/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the coordinator did not become ready"
                time.sleep(0.2)
            fid, secret = create_federation(
                api, name="three-valleys",
                schedule={"min_clients": len(TRAIN), "root_rounds": 3, "cluster_rounds": 2, "leaf_rounds": 2,
                          "unseen_leaf_rounds": 1, "lease_seconds": 30},
                clustering={"k_max": 5, "knn": 2})
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(fake_worker, "deterministic_body", grouped_body)
                run_fake_workers(url, fid, secret, [TRAIN[0::2], TRAIN[1::2]])
                run_fake_workers(url, fid, secret, [LATE])
            status = api.get(f"/v1/federations/{fid}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
            assert status["state"] == "serving" and status["onboarding_pending"] == 0, status
        yield {"url": url, "fid": fid, "k": status["clustering"]["k"], "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser(served):
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    try:
        yield chromium
    finally:
        chromium.close()
        pw.stop()


def _page(browser):
    context = browser.new_context(viewport={"width": 1366, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    return context, page, errors


def _log_in(page, url: str, token: str) -> None:
    page.goto(f"{url}/dashboard")
    page.wait_for_selector("#login:not([hidden])")
    page.fill("#token-input", token)
    page.click("#login-submit")


def test_log_in_see_clusters_and_heatmap_then_recluster(served, browser, tmp_path):
    from playwright.sync_api import expect

    context, page, errors = _page(browser)
    try:
        _log_in(page, served["url"], ADMIN_TOKEN)
        link = page.locator(f'a[data-federation-id="{served["fid"]}"]')
        link.wait_for()
        assert link.inner_text() == "three-valleys"
        assert page.locator("#fed-list tbody tr").count() == 1
        page.screenshot(path=str(tmp_path / "federations.png"))
        link.click()

        n = len(TRAIN)
        expect(page.locator("svg[data-chart=affinity] rect.cell")).to_have_count(n * n, timeout=20000)
        assert page.locator("svg[data-chart=affinity]").get_attribute("data-n") == str(n)
        assert served["k"] == 3  # the planted groups
        assert page.locator("#clusters-table tr[data-cluster-label]").count() == served["k"]
        members = sorted(page.locator("#clusters-table tr[data-cluster-label] td:nth-child(3)").all_inner_texts())
        assert members == ["alpine-0, alpine-1, alpine-2, alpine-late", "coast-0, coast-1, coast-2",
                           "desert-0, desert-1, desert-2, desert-late"]
        assert page.locator("svg[data-chart=eigengaps] rect.bar.chosen").get_attribute("data-k") == "3"
        assert page.locator("svg[data-chart=accuracy] path.line").count() == 6  # 3 tiers x (mean, p10)
        assert page.locator("svg[data-chart=distribution] circle").count() == 3 * (n + len(LATE))
        assert page.locator("#clients tbody tr").count() == n + len(LATE)
        assert page.locator("#unseen-table tbody tr").count() == len(LATE)
        # the workers table: each worker's median task time by phase (the fake workers report "compute")
        times = page.locator("#workers-table tbody tr td:nth-child(6)").all_inner_texts()
        assert len(times) >= 2 and all(t.startswith("compute 0.") and t[len("compute "):].replace(".", "").isdigit()
                                       for t in times), times
        assert page.locator("#stat-online .value").inner_text().endswith(f"/ {n + len(LATE)}")
        assert page.locator("#sec-timeline rect.stage").count() == 6  # enrolling ... serving
        # search and sort the clients table
        page.fill("#client-search", "late")
        assert page.locator("#clients tbody tr").count() == len(LATE)
        page.fill("#client-search", "")
        page.click("#clients th button.sort >> text=+Leaf")
        assert page.locator("#clients th[aria-sort]").get_attribute("aria-sort") == "ascending"
        page.screenshot(path=str(tmp_path / "federation.png"), full_page=True)
        if os.environ.get("HILORA_UPDATE_SCREENSHOT") == "1":  # the README's picture: down to the accuracy
            page.locator("#btn-recluster").focus()
            page.evaluate("window.scrollTo(0, 0)")
            box = page.locator("#sec-accuracy").bounding_box()
            page.screenshot(path=str(REPO / "docs" / "dashboard.png"), full_page=True,
                            clip={"x": 0, "y": 0, "width": 1366, "height": box["y"] + box["height"] + 16})

        # recluster from the page, through the confirm dialog
        assert page.locator("#runs tbody tr").count() == 1
        page.click("#btn-recluster")
        page.wait_for_selector("#confirm[open]")
        page.fill("#field-force_k", "4")
        page.fill("#field-reason", "split a group to see what happens")
        page.screenshot(path=str(tmp_path / "recluster-dialog.png"))
        page.click("#confirm-ok")
        expect(page.locator("#runs tbody tr")).to_have_count(2, timeout=20000)
        assert page.locator("#runs tbody tr").first.get_attribute("data-run-id") == "2"
        assert "admin" in page.locator("#runs tbody tr").first.inner_text()
        page.wait_for_selector("svg[data-chart=affinity][data-run-id='2']", timeout=20000)
        assert page.locator("svg[data-chart=affinity] rect.cell").count() == n * n
        assert page.locator("#clusters-table tr[data-cluster-label]").count() == 4
        assert page.locator("#moves [data-transition='2']").count() == 1
        assert "Run #2" in page.locator("#toast").inner_text()
        expect(page.locator("#audit-table tbody")).to_contain_text("recluster", timeout=20000)
        page.screenshot(path=str(tmp_path / "after-recluster.png"), full_page=True)

        # pause with a reason: the banner says why; resume: it goes
        assert page.locator("#paused-reason").count() == 0
        page.click("#btn-pause")
        page.wait_for_selector("#confirm[open]")
        page.fill("#field-reason", "checking a site's data")
        page.click("#confirm-ok")
        expect(page.locator("#paused-reason")).to_have_text("Paused: checking a site's data", timeout=20000)
        page.click("#btn-pause")
        page.wait_for_selector("#confirm[open]")
        page.click("#confirm-ok")
        expect(page.locator("#paused-reason")).to_have_count(0, timeout=20000)
        assert errors == []
    finally:
        context.close()
    # the coordinator logged JSON lines with request ids and the federation of each request
    lines = [json.loads(line) for line in served["log"].read_text().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    recluster_lines = [x for x in lines if x["logger"] == "hilora.coordinator.clustering"]
    assert recluster_lines and recluster_lines[0]["federation_id"] == served["fid"] and recluster_lines[0]["request_id"]


def test_a_wrong_token_sees_the_login_page_with_an_error(served, browser, tmp_path):
    from playwright.sync_api import expect

    context, page, _errors = _page(browser)
    try:
        _log_in(page, served["url"], "not-the-admin-token-000000")
        expect(page.locator("#login-error")).to_contain_text("refused", timeout=20000)
        assert page.locator("#login").is_visible()
        assert page.locator("#main").is_hidden()
        assert page.evaluate("sessionStorage.getItem('hilora.adminToken')") is None
        page.screenshot(path=str(tmp_path / "wrong-token.png"))
    finally:
        context.close()

"""The operators' dashboard in a real headless Chromium (Debian's, driven by Playwright; no browser
download): sign in, find an unmapped booking, see why, fix the map, replay it once; see the bookings
held for their patient, refuse one, release one once its patient is in the org. Gateway on a real
port, real Redis, the Health Cloud sandbox over real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from gateway.settings import IdentitySettings
from tests.conftest import ADMIN_KEY, CONFIG, PHI_KEY, VIDEO_VISIT, auth, corpus, make_settings, serve_gateway
from tests.test_code_rules import epic_book

SERVICE_TYPE_CODE = "2572307911"  # the Video Visit's Millennium appointment type
ISSUE_PATH = "Appointment.serviceType[0].coding[0]"
PATIENT = "12724066"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
TIMEOUT_MS = 10_000
# held bookings are tried again only when an operator releases them (the holds' worker looks every 0.1 s)
HOLD_BY_HAND = IdentitySettings(hold_retry_seconds=600, hold_retry_max_seconds=600, hold_poll_seconds=0.1)
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SLOW_MS = 30_000  # what waits on the gateway's background work (the log's flush, the holds' worker) and a tick


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium; CI must have it (.ci/run installs it), elsewhere the test says how."""
    path = shutil.which("chromium")
    try:
        import playwright  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        why = ("needs Debian's Chromium (scripts/install-debian chromium, or apt-get install chromium) and the "
               "playwright package (scripts/setup --dev)")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return path


def config_dir(tmp_path: Path) -> Path:
    """The shipped config with maps looked at every 0.1 s, so a fixed file is picked up at once."""
    target = tmp_path / "config"
    shutil.copytree(CONFIG, target)
    (target / "gateway.toml").write_text((target / "gateway.toml").read_text() + "\n[codemaps]\nreload_seconds = 0.1\n")
    return target


def without_code(map_json: str, code: str) -> str:
    """The ConceptMap with every element for `code` removed: the booking becomes unmapped."""
    concept_map = json.loads(map_json)
    for group in concept_map["group"]:
        group["element"] = [e for e in group["element"] if e["code"] != code]
    return json.dumps(concept_map, indent=2)


@asynccontextmanager
async def browser_page(executable: str, base_url: str,
                       *answers: tuple[int, str]) -> AsyncIterator[tuple[object, object, list[str]]]:
    """(context, page, problems): problems collects console errors, CSP violations and page errors.
    Chromium also logs every 4xx the page fetches; `answers` are the (status, path) the test expects,
    beside the 401 of the first look at the session while signed out."""
    base_url = base_url.rstrip("/")
    expected = {(401, "/admin/api/session"), *answers}
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, headless=True)
        try:
            context = await browser.new_context(base_url=base_url, viewport={"width": 1440, "height": 900})
            context.set_default_timeout(TIMEOUT_MS)
            page = await context.new_page()
            problems: list[str] = []

            def on_console(message) -> None:
                url = message.location.get("url", "")
                if message.type == "error" and not any(
                    f"status of {status} " in message.text and url == base_url + path for status, path in expected
                ):
                    problems.append(f"console: {message.text} ({url})")

            page.on("console", on_console)
            page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
            yield context, page, problems
        finally:
            await browser.close()


async def sign_in(page, key: str) -> None:
    from playwright.async_api import expect

    response = await page.goto("/admin/")
    assert response is not None and response.status == 200
    assert response.headers["content-security-policy"] == CSP
    await expect(page.get_by_test_id("signin-view")).to_be_visible()
    await page.get_by_label("Admin key").fill(key)
    await page.get_by_test_id("signin-submit").click()
    await expect(page.get_by_test_id("dashboard")).to_be_visible()


async def test_operator_finds_an_unmapped_booking_fixes_the_map_and_replays_it(redis_url, prefix, sandbox, tmp_path,
                                                                               chromium):
    from playwright.async_api import expect

    cfg = config_dir(tmp_path)
    map_file = cfg / "codemaps" / "cerner" / "appointment-types.json"
    fixed = map_file.read_text()
    map_file.write_text(without_code(fixed, SERVICE_TYPE_CODE))
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=cfg)
    async with serve_gateway(settings) as gw:
        refused = await gw.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT),
                                headers=auth(**{"Idempotency-Key": "dashboard-1"}))
        assert refused.status_code == 422, refused.text

        async with browser_page(chromium, str(gw.base_url)) as (context, page, problems):
            await sign_in(page, ADMIN_KEY)
            await expect(page.get_by_test_id("role")).to_have_attribute("data-role", "admin")
            cookie = next(c for c in await context.cookies() if c["name"] == "ehrgw_admin")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin"

            # the request log, narrowed to unmapped bookings: the one refused above
            await page.get_by_test_id("filter-outcome").select_option("unmapped")
            rows = page.locator('[data-testid="request-row"]')
            await expect(rows).to_have_count(1)
            await expect(rows.first).to_have_attribute("data-outcome", "unmapped")
            original = await rows.first.get_attribute("data-id")
            await rows.first.click()

            # why: the issue names the code and the element it sits at
            detail = page.get_by_test_id("detail")
            await expect(detail.get_by_test_id("detail-outcome")).to_have_attribute("data-outcome", "unmapped")
            issues = detail.get_by_test_id("issue")
            await expect(issues.first).to_be_visible()
            assert ISSUE_PATH in await detail.get_by_test_id("detail-issues").inner_text()
            assert SERVICE_TYPE_CODE in await issues.first.inner_text()
            await expect(detail.get_by_test_id("detail-phi")).to_have_count(0)  # an admin key sees no patient data
            assert PATIENT not in await page.content()

            # a cookie-authenticated action without the CSRF header is refused (and replays nothing)
            forged = await page.request.post(f"/admin/api/requests/{original}/replay")
            assert forged.status == 403 and "X-CSRF-Token" in await forged.text()

            # fix the map: the gateway picks it up live, and the detail says the maps changed since
            map_file.write_text(fixed)
            await expect(detail.get_by_test_id("maps-changed")).to_be_visible()

            await detail.get_by_test_id("replay").click()
            await expect(detail.get_by_test_id("replay-result")).to_be_visible()
            await expect(detail.get_by_test_id("detail-outcome")).to_have_attribute("data-outcome", "booked")
            sf_id = (await detail.get_by_test_id("detail-sf-id").inner_text()).strip()
            appointments = sandbox.app.state.sandbox.appointments()
            assert [a.id for a in appointments] == [sf_id]
            await page.screenshot(path=str(tmp_path / "dashboard.png"))  # for a person to look at; not kept

            # the log shows the replay booked, and the original can no longer be replayed
            await page.get_by_test_id("filter-outcome").select_option("")
            booked = page.locator(f'[data-testid="request-row"][data-outcome="booked"]:has-text("{sf_id}")')
            await expect(booked).to_have_count(1)
            await page.locator(f'[data-testid="request-row"][data-id="{original}"]').click()
            await expect(detail.get_by_test_id("detail-replayed-by")).to_be_visible()
            await expect(detail.get_by_test_id("replay")).to_have_count(0)

            await page.get_by_test_id("detail-close").click()
            await expect(detail).to_be_hidden()
            assert problems == []


async def test_phi_operator_sees_the_input_and_sign_out_forgets_it(redis_url, prefix, sandbox, tmp_path, chromium):
    from playwright.async_api import expect

    cfg = config_dir(tmp_path)
    map_file = cfg / "codemaps" / "cerner" / "appointment-types.json"
    map_file.write_text(without_code(map_file.read_text(), SERVICE_TYPE_CODE))
    settings = make_settings(redis_url, prefix, sandbox.url, config_dir=cfg)
    async with serve_gateway(settings) as gw:
        refused = await gw.post("/fhir/cerner/Appointment", content=corpus(VIDEO_VISIT), headers=auth())
        assert refused.status_code == 422, refused.text

        translate_refused = (422, "/admin/api/translate/cerner")
        async with browser_page(chromium, str(gw.base_url), translate_refused) as (context, page, problems):
            await sign_in(page, PHI_KEY)
            await expect(page.get_by_test_id("role")).to_have_attribute("data-role", "phi")
            await page.locator('[data-testid="request-row"][data-outcome="unmapped"]').first.click()
            phi = page.get_by_test_id("detail-phi")
            await expect(phi).to_contain_text(PATIENT)

            # the playground: the same payload, translated against the maps in use
            await page.get_by_test_id("tab-codemaps").click()
            await expect(page.locator('[data-testid="codemap"][data-source="cerner"]')).to_be_visible()
            await page.get_by_test_id("translate-source").select_option("cerner")
            await page.get_by_test_id("translate-input").fill(corpus(VIDEO_VISIT).decode())
            await page.get_by_test_id("translate-submit").click()
            await expect(page.get_by_test_id("translate-issues")).to_contain_text(ISSUE_PATH)
            # a category with no map for its system, beside one that maps: translated, the warning shown
            await page.get_by_test_id("translate-source").select_option("epic")
            await page.get_by_test_id("translate-input").fill(epic_book().decode())
            await page.get_by_test_id("translate-submit").click()
            await expect(page.get_by_test_id("translate-warnings")).to_contain_text("serviceCategory[0]")
            await expect(page.get_by_test_id("translate-request")).to_contain_text("40111223")
            await page.screenshot(path=str(tmp_path / "codemaps.png"), full_page=True)

            sid = next(c["value"] for c in await context.cookies() if c["name"] == "ehrgw_admin")
            session = {"Cookie": f"ehrgw_admin={sid}"}
            assert (await gw.get("/admin/api/session", headers=session)).status_code == 200
            await page.get_by_test_id("sign-out").click()
            await expect(page.get_by_test_id("signin-view")).to_be_visible()
            assert PATIENT not in await page.content()
            assert [c for c in await context.cookies() if c["name"] == "ehrgw_admin" and c["value"]] == []
            # the session is gone on the server too, not only from the browser
            assert (await gw.get("/admin/api/session", headers=session)).status_code == 401
            assert problems == []


# -- held bookings -----------------------------------------------------------------------------------


def visit_of(patient: str, key: str) -> bytes:
    """The corpus's video visit for another patient, as another appointment (its own identifier)."""
    body = json.loads(corpus(VIDEO_VISIT))
    for p in body["participant"]:
        if p.get("actor", {}).get("reference", "").startswith("Patient/"):
            p["actor"]["reference"] = f"Patient/{patient}"
    body["identifier"] = [{"system": "urn:test", "value": key}]
    return json.dumps(body).encode()


async def hold(gw, patient: str, key: str) -> None:
    r = await gw.post("/fhir/cerner/Appointment", content=visit_of(patient, key),
                      headers=auth(**{"Idempotency-Key": key}))
    assert r.status_code == 202, r.text  # held: the org does not know the patient


async def until(check: Callable[[], Awaitable[object]], seconds: float = 30.0) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if found := await check():
            return found
        await asyncio.sleep(0.1)
    raise AssertionError("not within the time given")


async def holds_by_patient(gw) -> dict[str, str]:
    """{patient reference: hold id} of the held bookings, as a PHI key sees each of them (a list never
    names patients)."""
    phi = {"Authorization": f"Bearer {PHI_KEY}"}
    rows = (await gw.get("/admin/api/held", headers=phi)).json()["sources"].get("cerner", [])
    assert all("patient" not in r for r in rows)
    ones = [(await gw.get(f"/admin/api/held/cerner/{r['hold']}", headers=phi)).json() for r in rows]
    return {one["patient"]: one["hold"] for one in ones}


async def test_operator_refuses_a_held_booking_and_releases_another_once_its_patient_is_known(
        redis_url, prefix, sandbox, tmp_path, chromium):
    from playwright.async_api import expect

    settings = make_settings(redis_url, prefix, sandbox.url, identity=HOLD_BY_HAND)
    async with serve_gateway(settings) as gw:
        await hold(gw, "12999999", "held-1")
        await hold(gw, "12999997", "held-3")  # another operator refuses this one while the page shows it
        holds = await holds_by_patient(gw)
        first, stale = holds["Patient/12999999"], holds["Patient/12999997"]
        # a gap in configuration, beside them: unmatched, which needs attention
        gap = json.loads(visit_of("12724066", "gap-1"))
        for p in gap["participant"]:
            if p["actor"]["reference"].startswith("Location/"):
                p["actor"]["reference"] = "Location/not-a-place"
        r = await gw.post("/fhir/cerner/Appointment", content=json.dumps(gap).encode(), headers=auth())
        assert r.status_code == 422, r.text

        async def logged() -> bool:
            entries = (await gw.get("/admin/api/requests?limit=100", headers=ADMIN)).json()["requests"]
            return {e["outcome"] for e in entries} == {"held", "unmatched"} and len(entries) == 3

        await until(logged)

        gone = (404, f"/admin/api/held/cerner/{stale}/release")
        async with browser_page(chromium, str(gw.base_url), gone) as (context, page, problems):
            await sign_in(page, ADMIN_KEY)
            # the request log knows the new outcomes; unmatched needs attention, held does not
            await expect(page.get_by_test_id("kpi-attention")).to_have_text("1", timeout=SLOW_MS)
            rows = page.locator('[data-testid="request-row"]')
            detail = page.get_by_test_id("detail")
            await page.get_by_test_id("filter-outcome").select_option("unmatched")
            await expect(rows).to_have_count(1)
            await expect(rows.first.locator(".badge")).to_have_class("badge o-unmatched")
            await rows.first.click()  # its detail offers to forget the cached records, once the org is fixed
            await expect(detail.get_by_test_id("detail-unmatched").get_by_test_id("detail-forget")).to_be_visible()
            await page.get_by_test_id("filter-outcome").select_option("held")
            await expect(rows).to_have_count(2)
            await expect(rows.locator('.badge[data-outcome="held"]')).to_have_count(2)
            await expect(rows.first.locator(".badge")).to_have_class("badge o-held")
            await rows.first.click()  # its detail leads to the held bookings
            await detail.get_by_test_id("detail-held").get_by_role("button", name="Open held bookings").click()
            await expect(page.get_by_test_id("panel-held")).to_be_visible()
            await page.get_by_test_id("detail-close").click()
            await expect(page.get_by_test_id("held-count")).to_have_text("2")
            entries = page.locator('[data-testid="held-source"][data-source="cerner"] [data-testid="held-entry"]')
            await expect(entries).to_have_count(2)
            one = entries.and_(page.locator(f'[data-hold="{first}"]'))
            await expect(one).to_have_attribute("data-state", "held")
            await expect(one.get_by_test_id("held-why")).to_have_text("patient-unknown")
            # an admin key sees no patient: the API sends none, and the page has no place for one
            await expect(page.get_by_test_id("held-patient")).to_have_count(0)
            content = await page.content()
            assert "12999999" not in content and "12999997" not in content

            # updates paused: what changes now is the page's own refresh after each action
            await page.get_by_test_id("pause").click()
            await expect(page.get_by_test_id("pause")).to_have_attribute("aria-pressed", "true")

            # Refuse asks once more, then the booking is refused and stays listed as such
            await one.get_by_test_id("held-refuse").click()
            await expect(one.get_by_test_id("held-refuse")).to_have_text("Confirm refuse")
            await one.get_by_test_id("held-refuse").click()
            await expect(one).to_have_attribute("data-state", "refused")
            await expect(one.get_by_test_id("held-why")).to_have_text("refused-by-operator")
            await expect(one.get_by_test_id("held-release")).to_have_count(0)
            await expect(page.get_by_test_id("held-count")).to_have_text("1")
            listed = (await gw.get("/admin/api/held", headers=ADMIN)).json()["sources"]["cerner"]
            assert {(r["hold"], r["state"]) for r in listed} == {(first, "refused"), (stale, "held")}

            # another operator refuses a booking while this page still offers to release it: the
            # release is answered 404, said so, and the list shows it refused
            async def refused_meanwhile(route) -> None:
                answer = await gw.post(f"/admin/api/held/cerner/{stale}/refuse", headers=ADMIN)
                assert answer.status_code == 200, answer.text
                await route.continue_()

            await page.route(f"**/admin/api/held/cerner/{stale}/release", refused_meanwhile)
            other = entries.and_(page.locator(f'[data-hold="{stale}"]'))
            await other.get_by_test_id("held-release").click()
            await expect(page.get_by_test_id("toast").filter(has_text="no longer held")).to_be_visible()
            await expect(other).to_have_attribute("data-state", "refused")
            await expect(page.get_by_test_id("held-count")).to_be_hidden()
            await page.unroute(f"**/admin/api/held/cerner/{stale}/release")
            await page.get_by_test_id("pause").click()  # updates again

            # another booking is held: the page shows it at its next look
            await hold(gw, "12999998", "held-2")
            waiting = entries.and_(page.locator('[data-state="held"]'))
            await expect(waiting).to_have_count(1, timeout=SLOW_MS)
            second = await waiting.get_attribute("data-hold")
            assert second not in (first, stale)
            # its patient is registered in the org; the operator does not wait ten minutes for the next try
            org = sandbox.app.state.sandbox.org
            made = org.add_patient("cerner", "12999998", first_name="Late", last_name="Arrival")
            await waiting.get_by_test_id("held-release").click()
            await expect(page.get_by_test_id("toast").filter(has_text="Released")).to_be_visible()
            await expect(page.locator(f'[data-testid="held-entry"][data-hold="{second}"]')).to_have_count(0,
                                                                                                       timeout=SLOW_MS)
            await expect(entries).to_have_count(2)  # the two refused
            (stored,) = sandbox.app.state.sandbox.appointments()
            assert {"reference": f"Patient/{made.account}"} in stored.request["participants"]

            # the request log shows the release that booked it
            await page.get_by_test_id("tab-activity").click()
            await page.get_by_test_id("filter-outcome").select_option("")
            released = page.locator('[data-testid="request-row"][data-op="release"]')
            await expect(released).to_have_count(1, timeout=SLOW_MS)
            await expect(released).to_have_attribute("data-outcome", "booked")
            await expect(released.get_by_test_id("row-sf-id")).to_have_text(stored.id)

            # forget the cached records (the people of the bookings above), after a confirmation
            await page.get_by_test_id("tab-held").click()
            forget = page.get_by_test_id("identity-forget")
            await forget.click()
            await expect(forget).to_have_text("Confirm forget")
            await forget.click()
            await expect(page.get_by_test_id("toast").filter(has_text="cached record")).to_be_visible()
            await expect(forget).to_have_text("Forget cached records")
            await page.screenshot(path=str(tmp_path / "held.png"), full_page=True)  # for a person to look at
            audit = (await gw.get("/admin/api/audit", headers=ADMIN)).json()["audit"]
            assert {"held-refuse", "held-release", "identity-forget"} <= {a["action"] for a in audit}
            assert problems == []
    assert sandbox.app.state.sandbox.counters().book_calls == 1


async def test_phi_operator_sees_whom_a_held_booking_waits_for_and_sign_out_forgets_it(
        redis_url, prefix, sandbox, chromium):
    from playwright.async_api import expect

    settings = make_settings(redis_url, prefix, sandbox.url, identity=HOLD_BY_HAND)
    async with serve_gateway(settings) as gw:
        await hold(gw, "12999999", "held-phi")
        async with browser_page(chromium, str(gw.base_url)) as (context, page, problems):
            await sign_in(page, PHI_KEY)
            await page.get_by_test_id("tab-held").click()
            entry = page.get_by_test_id("held-entry")
            await expect(entry).to_have_count(1)
            await expect(entry.get_by_test_id("held-patient")).to_have_count(0)  # not until asked for
            hold_id = await entry.get_attribute("data-hold")
            await entry.get_by_test_id("held-show-patient").click()
            await expect(entry.get_by_test_id("held-patient")).to_have_text("Patient/12999999")
            audit = (await gw.get("/admin/api/audit", headers=ADMIN)).json()["audit"]
            assert [a["action"] for a in audit if a.get("entry") == f"held:{hold_id}"] == ["view-phi"]

            await page.get_by_test_id("sign-out").click()
            await expect(page.get_by_test_id("signin-view")).to_be_visible()
            await expect(page.get_by_test_id("held-entry")).to_have_count(0)
            assert "12999999" not in await page.content()
            assert problems == []

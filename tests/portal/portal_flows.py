#!/usr/bin/env python3
"""The developer portal in a real browser (Debian's chromium, driven by Playwright; no browser
download). Run by tests/e2e/portal.rs against a live ward-server; exits non-zero on the first
failed expectation, naming it.

Usage: portal_flows.py CONFIG.json, where the JSON names the portal URL, the gRPC address,
the CA, the certificate and key of a granted identity (admin), of a verifier (app) and of an
identity without grants, and a folder for screenshots.

A key read from the page travels to grpcurl on stdin (`-d @`), never on a command line.
"""

import json
import subprocess
import sys
import time

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}", flush=True)


class Flows:
    def __init__(self, cfg, browser):
        self.cfg = cfg
        self.url = cfg["portal"]
        self.browser = browser
        self.shots = cfg["screenshots"]

    def context(self, who):
        certs = []
        if who is not None:
            c = self.cfg["identities"][who]
            certs = [{"origin": self.url, "certPath": c["cert"], "keyPath": c["key"]}]
        return self.browser.new_context(
            client_certificates=certs,
            ignore_https_errors=True,
            viewport={"width": 1280, "height": 900},
        )

    def shot(self, page, name, mask=None):
        page.screenshot(
            path=f"{self.shots}/{name}.png", full_page=True, mask=mask or []
        )

    def verify(self, key, client_ip=""):
        """VerifyKey over gRPC as the verifier identity; returns the response (JSON)."""
        c = self.cfg["identities"]["app"]
        body = json.dumps({"apiKey": key, "clientIp": client_ip})
        out = subprocess.run(
            [
                "grpcurl", "-max-time", "20",
                "-cacert", self.cfg["ca"], "-cert", c["cert"], "-key", c["key"],
                "-d", "@", self.cfg["grpc"], "ward.v1.Keys/VerifyKey",
            ],
            input=body.encode(),
            capture_output=True,
            check=False,
        )
        if out.returncode != 0:
            raise AssertionError(f"grpcurl failed: {out.stderr.decode()}")
        return json.loads(out.stdout)

    def read_new_key(self, page):
        page.wait_for_selector("#new-key")
        key = page.inner_text("#new-key").strip()
        check(key.startswith("ward_"), "the new key is shown")
        return key

    def main_flow(self):
        ctx = self.context("admin")
        page = ctx.new_page()
        resp = page.goto(f"{self.url}/keys")
        check(resp.status == 200, "My keys answers 200 with a client certificate")
        h = resp.headers
        check("frame-ancestors 'none'" in h["content-security-policy"], "CSP forbids framing")
        check("unsafe-inline" not in h["content-security-policy"], "CSP has no unsafe-inline")
        check(h["cache-control"] == "no-store", "pages are not cached")
        check(page.inner_text("#identity") == "admin", "the page names the certificate's identity")

        # Create: the key is shown once.
        page.click("text=Create key")
        page.fill("input[name=name]", "portal/partner")
        page.fill("input[name=scopes]", "orders:read")
        page.fill("input[name=expires_days]", "30")
        self.shot(page, "portal-create")
        page.click("#create button[type=submit]")
        page.wait_for_url("**/reveal", timeout=15000)
        check(page.url.endswith("/reveal"), "create redirects to the one-time reveal")
        check("/reveal?" not in page.url and "ward_" not in page.url, "no secret in the URL")
        key1 = self.read_new_key(page)
        self.shot(page, "portal-reveal", mask=[page.locator("#new-key")])
        page.reload()
        check(page.locator("#gone").count() == 1, "a reload does not show the key again")
        check(key1 not in page.content(), "the key is not in the reloaded page")

        v = self.verify(key1, "203.0.113.7")
        check(v.get("result") == "VERIFY_RESULT_VALID", "the created key verifies VALID over gRPC")
        v = self.verify(key1, "2001:db8:1:2::9")
        check(v.get("result") == "VERIFY_RESULT_VALID", "and again from an IPv6 client")

        # The list shows it, with its last use.
        page.goto(f"{self.url}/keys")
        row = page.locator("tr[data-name='portal/partner']")
        check(row.count() == 1, "My keys lists the new key")
        check("203.0.113.7" in row.inner_text() or "2001:db8" in row.inner_text(),
              "My keys shows the last client IP")
        self.shot(page, "portal-keys")

        # Roll with 1 h grace: both keys valid, the old one listed with its window and the
        # networks that used it.
        row.locator("a").click()
        page.check("input[name=grace][value='3600']")
        page.click("#roll button[type=submit]")
        key2 = self.read_new_key(page)
        check(key2 != key1, "rolling shows a different key")
        v1, v2 = self.verify(key1), self.verify(key2)
        check(v1.get("result") == "VERIFY_RESULT_VALID", "the old key is VALID during its grace")
        check("graceUntil" in v1, "the old key reports its grace window")
        check(v2.get("result") == "VERIFY_RESULT_VALID", "the new key is VALID")
        page.click("text=Done")
        old = page.locator("#versions tr[data-version='1']")
        check(old.get_attribute("data-state") == "ACTIVE", "the old version is ACTIVE")
        text = old.inner_text()
        check("valid until" in text and "left" in text, "the old version shows its window")
        check("203.0.113.0/24" in text, "the old version lists the IPv4 network that used it")
        check("2001:db8:1:2::/64" in text, "and the IPv6 network")
        check(page.locator("#versions tr[data-version='2']").get_attribute("data-state")
              == "PRIMARY", "the new version is PRIMARY")
        check(page.locator("figure.chart svg").count() == 2, "the usage charts are drawn")
        self.shot(page, "portal-key")

        # Restriction preview (htmx swaps the verdict in): allowing only 10/8 would have
        # refused both of the last day's successful verifications of the old key... and every
        # other one remembered.
        page.fill("#edit input[name=cidrs]", "10.0.0.0/8")
        page.click("#edit button[value=preview]")
        page.wait_for_selector("#refused")
        refused = int(page.inner_text("#refused"))
        check(refused >= 2, f"the preview counts refusals ({refused})")
        self.shot(page, "portal-preview")

        # Revoke the old version: REVOKED over gRPC; the new key still VALID.
        page.goto(f"{self.url}/key?name=portal/partner")
        page.select_option("#revoke select[name=version]", "1")
        page.fill("#revoke input[name=reason]", "rolled in the portal")
        page.click("#revoke button[type=submit]")
        check(page.locator("#versions tr[data-version='1']").get_attribute("data-state")
              == "REVOKED", "the page shows version 1 REVOKED")
        check(self.verify(key1).get("result") == "VERIFY_RESULT_REVOKED",
              "the old key is REVOKED over gRPC")
        check(self.verify(key2).get("result") == "VERIFY_RESULT_VALID",
              "the new key is still VALID")

        # Saving restrictions goes through UpdateKeyPolicy.
        page.fill("#edit input[name=cidrs]", "10.0.0.0/8")
        page.click("#edit button[value=save]")
        check(self.verify(key2, "203.0.113.7").get("result") == "VERIFY_RESULT_FORBIDDEN_IP",
              "the saved CIDR restriction is enforced")
        check(self.verify(key2, "10.1.2.3").get("result") == "VERIFY_RESULT_VALID",
              "inside the range it verifies")

        # The key's audit trail from the hash chain, and the chain check.
        page.goto(f"{self.url}/key?name=portal/partner")
        page.click("#audit-link")
        methods = {m for m in page.locator("#trail tr").evaluate_all(
            "rows => rows.map(r => r.getAttribute('data-method'))") if m}
        for m in ["IssueKey", "RotateSecret", "RevokeSecret", "UpdateKeyPolicy"]:
            check(m in methods, f"the audit trail lists {m}")
        check(key1 not in page.content() and key2 not in page.content(), "no key in the trail")
        page.click("#verify-chain button")
        page.wait_for_selector("#chain-ok")
        check("Chain intact" in page.inner_text("#chain-ok"), "the chain verifies")
        self.shot(page, "portal-audit")

        # Expiry beyond max_key_lifetime is refused.
        page.goto(f"{self.url}/new")
        page.fill("input[name=name]", "portal/too-long")
        page.eval_on_selector("input[name=expires_days]", "e => e.removeAttribute('max')")
        page.fill("input[name=expires_days]", "4000")
        page.click("#create button[type=submit]")
        check("max_key_lifetime" in page.inner_text("#error"), "an expiry past max_key_lifetime is refused")
        ctx.close()

    def cross_site_post(self):
        """A page on another origin posts the create form: refused, nothing created."""
        ctx = self.context("admin")
        page = ctx.new_page()
        page.goto(f"{self.url}/new")
        token = page.get_attribute("input[name=csrf]", "value")
        evil = "https://evil.example/"
        form = (
            f'<form id="f" method="post" action="{self.url}/keys">'
            f'<input name="csrf" value="{token}"><input name="name" value="portal/evil">'
            '<input name="expires_days" value="30"></form>'
            '<script>document.getElementById("f").submit()</script>'
        )
        page.route(evil, lambda route: route.fulfill(status=200, content_type="text/html", body=form))
        with page.expect_response(lambda r: r.url.startswith(self.url) and r.request.method == "POST") as info:
            page.goto(evil)
        check(info.value.status == 403, "a cross-site POST is refused (403)")
        page.goto(f"{self.url}/keys")
        check(page.locator("tr[data-name='portal/evil']").count() == 0, "and created nothing")
        ctx.close()

    def no_grants(self):
        ctx = self.context("nobody")
        page = ctx.new_page()
        page.goto(f"{self.url}/keys")
        check(page.locator("#keys").count() == 0, "an identity without grants sees no keys")
        self.shot(page, "portal-no-grants")
        page.goto(f"{self.url}/new")
        page.fill("input[name=name]", "portal/nobody")
        page.fill("input[name=expires_days]", "30")
        page.click("#create button[type=submit]")
        check(page.locator("#error").count() == 1, "and cannot create one")
        resp = page.goto(f"{self.url}/key?name=portal/partner")
        check(resp.status in (403, 404), f"nor open another's key ({resp.status})")
        check("ward_" not in page.content(), "nothing of the key leaks")
        ctx.close()

    def no_certificate(self):
        ctx = self.context(None)
        page = ctx.new_page()
        try:
            page.goto(f"{self.url}/keys", timeout=15000)
            refused = False
        except PlaywrightError:
            refused = True
        check(refused, "without a client certificate the connection is refused")
        ctx.close()


def main():
    cfg = json.load(open(sys.argv[1]))
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=cfg.get("chromium", "/usr/bin/chromium"),
            args=CHROMIUM_FLAGS,
        )
        f = Flows(cfg, browser)
        started = time.time()
        f.main_flow()
        f.cross_site_post()
        f.no_grants()
        f.no_certificate()
        browser.close()
        print(f"all portal flows passed in {time.time() - started:.1f}s", flush=True)


if __name__ == "__main__":
    main()

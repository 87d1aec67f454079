"""Browser check of the dashboard: `make test-browser`.

Starts eventserver.py with a fixture, opens the page in headless Chromium
(Debian's `chromium` package: `apt-get install chromium`), reads the DOM the
page built from the JSON API, and saves a screenshot. Kept out of `make test`
so the core suite needs nothing but Python; skips, saying why, when Chromium
is not installed."""

import html
import http.server
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import unittest
import urllib.parse

from test_eventserver import PASSWORD, USER, Client, Process, envelope, main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
XSS = "<img src=x onerror=alert(1)>"
SCREENSHOT = os.environ.get("SCREENSHOT", os.path.join(tempfile.gettempdir(), "eventserver-dashboard.png"))


@unittest.skipUnless(CHROMIUM, "Chromium is not installed: apt-get install chromium (Debian) to run the browser check")
class DashboardInBrowserTest(unittest.TestCase):

    flags = ()  # the server's; the page must work the same against --compat go

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        fixtures = os.path.join(cls.tmp.name, "fixtures.ndjson")
        lines = ([{"stream": "orders", "producerId": "shop-1", "envelope": envelope("OrderPlaced", payload={"n": n})}
                  for n in range(12)]
                 + [{"stream": "orders", "producerId": "shop-1", "envelope": envelope("OrderShipped")}] * 5
                 + [{"stream": "billing", "producerId": "acct", "envelope": envelope("InvoiceSent")}] * 7
                 + [{"stream": XSS, "producerId": "mallory", "envelope": envelope("Boom")}])
        with open(fixtures, "w", encoding="utf-8") as out:
            out.write("\n".join(json.dumps(line) for line in lines) + "\n")
        db = os.path.join(cls.tmp.name, "events.db")
        cls.server = Process("--port", "0", "--user", USER, "--password", PASSWORD, "--quiet",
                             "--fixtures", fixtures, db=db)
        cls.server.wait_listening()
        client = Client(cls.server.port)
        assert client.request("POST", "/api/v1/orders/mailer/OrderPlaced/change/9").status == 200
        cls.first_order = client.read("orders", "OrderPlaced", limit=1, consumer="nobody").json[0]
        client.close()
        if cls.flags:  # the same database, served in the other dialect
            cls.server.stop()
            cls.server = Process("--port", "0", "--user", USER, "--password", PASSWORD, "--quiet", *cls.flags, db=db)
            cls.server.wait_listening()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        cls.tmp.cleanup()

    def chromium(self, path, *extra):
        url = f"http://{USER}:{PASSWORD}@127.0.0.1:{self.server.port}{path}" if path.startswith("/") else path
        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--hide-scrollbars", f"--user-data-dir={tempfile.mkdtemp(dir=self.tmp.name)}",
                   "--virtual-time-budget=5000", "--window-size=1280,900", *extra, url]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def dom(self, path):
        result = self.chromium(path, "--dump-dom")
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn('<span id="status" class="">live · updated', result.stdout)  # every API call answered
        return result.stdout

    def rows(self, dom, section):
        """The text of each table row in a section of the page."""
        body = re.search(rf'<section id="{section}".*?</section>', dom, re.S).group(0)
        return [[html.unescape(re.sub("<[^>]+>", "", cell)) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
                for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)[1:]]

    def test_overview_shows_streams_and_both_charts(self):
        dom = self.dom("/")
        self.assertEqual(self.rows(dom, "streams"), [[XSS, "mallory", "1", "0", "0"],
                                                    ["billing", "acct", "7", "0", "0"],
                                                    ["orders", "shop-1", "17", "1", "3"]])
        per_stream = re.search(r'<section id="per-stream".*?</section>', dom, re.S).group(0)
        self.assertEqual(re.findall(r"<title>(.*?)</title>", per_stream),
                         ["orders: 17", "billing: 7", html.escape(XSS, quote=False) + ": 1"])
        self.assertIn(">stream</text>", per_stream)
        self.assertIn(">events</text>", per_stream)
        per_day = re.search(r'<section id="per-day".*?</section>', dom, re.S).group(0)
        titles = re.findall(r"<title>(\d{4}-\d\d-\d\d): (\d+)</title>", per_day)
        self.assertGreaterEqual(len(titles), 28)
        self.assertEqual(sum(int(count) for _, count in titles), 25)
        self.assertIn(">day of month</text>", per_day)

    def test_names_are_shown_as_text_never_as_html(self):
        for path in ("/", "/admin/streams/" + urllib.parse.quote(XSS, safe="") + "/events"):
            with self.subTest(path=path):
                dom = self.dom(path)
                self.assertIn(html.escape(XSS, quote=False), dom)
                self.assertNotIn("<img", dom)

    def test_stream_view_shows_consumers_events_and_an_envelope(self):
        event_id = self.first_order["eventId"]
        dom = self.dom(f"/admin/streams/orders/events?eventId={event_id}")
        self.assertEqual(self.rows(dom, "consumers"),
                         [["mailer", "OrderPlaced", "9", "3", "75.00 %", self.rows(dom, "consumers")[0][5]]])
        events = self.rows(dom, "events")
        self.assertEqual(len(events), 17)
        self.assertEqual([row[1] for row in events], ["OrderShipped"] * 5 + ["OrderPlaced"] * 12)
        self.assertEqual(events[-1][3], "mailer")  # the oldest OrderPlaced is consumed
        self.assertEqual(events[0][3], "—")
        self.assertIn(f"Envelope of {event_id}", dom)
        shown = json.loads(html.unescape(re.search(r"<pre>(.*?)</pre>", dom, re.S).group(1)))
        shown.pop("eventId", None)  # the Go server's payload answer has it
        self.assertEqual(shown, {key: value for key, value in self.first_order.items() if key != "eventId"})

    def test_search_result_links_open_the_matching_view(self):
        dom = self.dom("/#/search?q=order")
        results = self.rows(dom, "results")
        self.assertIn(["events", "orders/OrderPlaced"], results)
        self.assertIn(["streams", "orders"], results)
        self.assertIn('href="#/admin/streams/orders/events?eventName=OrderPlaced"', dom)
        view = self.dom("/#/admin/streams/orders/events?eventName=OrderShipped")
        self.assertEqual({row[1] for row in self.rows(view, "events")}, {"OrderShipped"})

    def test_unreachable_server_is_said_plainly(self):
        page = os.path.join(self.tmp.name, "offline.html")
        client = Client(self.server.port)
        with open(page, "wb") as out:  # the page without its server: every request fails
            out.write(client.request("GET", "/").body)
        client.close()
        result = self.chromium("file://" + page, "--dump-dom")
        self.assertIn('class="down">Cannot reach the server', result.stdout)
        self.assertNotIn('class="">live · updated', result.stdout)

    def test_screenshot(self):
        result = self.chromium("/", f"--screenshot={SCREENSHOT}")
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        with open(SCREENSHOT, "rb") as png:
            self.assertEqual(png.read(8), b"\x89PNG\r\n\x1a\n")
        print(f"\nscreenshot: {SCREENSHOT}")


class DashboardInBrowserGoTest(DashboardInBrowserTest):
    flags = ("--compat", "go")


@unittest.skipUnless(CHROMIUM, "Chromium is not installed: apt-get install chromium (Debian) to run the browser check")
class DashboardLimitsInBrowserTest(DashboardInBrowserTest):
    """The browser side of SPEC 6: streams a URL path cannot name, malformed
    links, and a page of another origin that tries to change something."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        fixtures = os.path.join(cls.tmp.name, "fixtures.ndjson")
        lines = ([{"stream": ".", "producerId": "dot", "envelope": envelope("Dot")}] * 2
                 + [{"stream": "..", "producerId": "dots", "envelope": envelope("Dots")}] * 3
                 + [{"stream": "orders", "producerId": "shop-1", "envelope": envelope("OrderPlaced")}] * 5)
        with open(fixtures, "w", encoding="utf-8") as out:
            out.write("\n".join(json.dumps(line) for line in lines) + "\n")
        cls.server = Process("--port", "0", "--user", USER, "--password", PASSWORD, "--quiet",
                             "--fixtures", fixtures, db=":memory:")
        cls.server.wait_listening()
        client = Client(cls.server.port)
        assert client.request("POST", "/api/v1/orders/mailer/OrderPlaced/change/3").status == 200
        client.close()

    # the inherited tests are for the other fixture
    test_overview_shows_streams_and_both_charts = test_names_are_shown_as_text_never_as_html = None
    test_stream_view_shows_consumers_events_and_an_envelope = test_search_result_links_open_the_matching_view = None
    test_unreachable_server_is_said_plainly = test_screenshot = None

    def offset(self):
        client = Client(self.server.port)
        try:
            return {row["consumerId"]: row["offset"] for row in client.request("GET", "/api/v1/consumers/orders").json}
        finally:
            client.close()

    def test_streams_named_dot_and_dot_dot_open(self):
        for name, link, events in ((".", "%2E", "Dot"), ("..", "%2E%2E", "Dots"), (".", ".", "Dot")):
            with self.subTest(name=name, link=link):
                dom = self.dom(f"/#/admin/streams/{link}/events")
                self.assertEqual({row[1] for row in self.rows(dom, "events")}, {events})
                self.assertIn(f"<strong>{name}</strong>", dom)

    def test_a_malformed_link_does_not_stop_the_refresh(self):
        for link in ("#%", "#/admin/streams/%E0%A4%A/events", "#/search?q=%"):
            with self.subTest(link=link):
                result = self.chromium("/" + link, "--dump-dom")
                self.assertNotIn("connecting…", result.stdout)  # refresh() ran to its end, and goes on
                self.assertRegex(result.stdout, r'<span id="status" class="(down)?">(live|The server answered)')

    def test_a_page_on_another_local_port_cannot_seek(self):
        page = (f'<form id="f" method="POST" action="http://{USER}:{PASSWORD}@127.0.0.1:{self.server.port}'
                '/api/v1/orders/mailer/OrderPlaced/change/0"><input name="x" value="1"></form>'
                '<script>document.getElementById("f").submit()</script>').encode()

        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args):
                pass

        other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        threading.Thread(target=other.serve_forever, daemon=True).start()
        try:
            result = self.chromium(f"http://127.0.0.1:{other.server_address[1]}/", "--dump-dom")
        finally:
            other.shutdown()
            other.server_close()
        self.assertIn("Forbidden - cross-origin request", result.stdout)  # the form was sent, and refused
        self.assertEqual(self.offset(), {"mailer": 3})


if __name__ == "__main__":
    main()

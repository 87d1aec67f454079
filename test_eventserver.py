"""Tests of eventserver against SPEC.md: a real server on port 0, real HTTP,
a real SQLite file in a temporary folder. Run with `make test`.

Most tests share one in-process server per test class and keep apart by
using fresh stream names; tests of the command line, signals and crashes run
the server as a subprocess."""

import base64
import calendar
import collections
import datetime
import concurrent.futures
import contextlib
import gc
import gzip
import http.client
import importlib.util
import io
import itertools
import json
import os
import pathlib
import platform
import re
import shlex
import shutil
import signal
import socket
import ssl
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
import urllib.parse
import uuid
import warnings

import eventserver

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "eventserver.py")
USER, PASSWORD = "tester", "s3cret-pass"
UUID_LOWER = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def basic(user=USER, password=PASSWORD):
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Basic {token}"


def envelope(name="OrderPlaced", **extra):
    value = {"event": {"name": name, "version": 1},
             "system": {"id": "alv123", "name": "codello alvine", "time": "2017-09-06 13:58:12",
                        "timezone": "Europe/Berlin"},
             "trigger": {"type": "system", "name": "/path/to/script.php"},
             "payload": {}}
    value.update(extra)
    return value


_names = iter(range(10 ** 9))


def fresh(prefix="stream"):
    """A stream name no other test uses."""
    return f"{prefix}-{next(_names)}-{uuid.uuid4().hex[:6]}"


def _read_reply(stream):
    """(status, body) of one HTTP/1.1 response read from a binary file."""
    status = int(stream.readline().split()[1])
    length = 0
    for line in iter(stream.readline, b"\r\n"):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, stream.read(length)


def _wait_for(condition, seconds=10):
    """Poll condition until it holds (or fail after seconds): no fixed sleeps."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def raw_publish(stream, headers, body=""):
    """The text of a publish request, as a client would send it, for tests
    that speak HTTP at the byte level: the usual headers, then these."""
    return (f"POST /api/v1/streams/{stream}/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: {basic()}\r\n"
            f"Content-Type: application/json\r\nX-Producer-ID: p\r\n{headers}\r\n{body}")


def with_client(port, action, **credentials):
    """Run action(client) on a fresh connection, then close it."""
    client = Client(port, **credentials)
    try:
        return action(client)
    finally:
        client.close()


def quote(name):
    return urllib.parse.quote(name, safe="")


def open_database(path, **options):
    """A connection to a database file, for a `with` block that commits and
    then closes it (sqlite3's own `with` commits but leaves it open: Python
    3.13 warns of every connection never closed)."""
    return _committed_and_closed(sqlite3.connect(path, **options))


@contextlib.contextmanager
def _committed_and_closed(conn):
    try:
        with conn:
            yield conn
    finally:
        conn.close()


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.body[:200]!r}>"


class Client:
    """A keep-alive HTTP client for one server."""

    def __init__(self, port, host="127.0.0.1", user=USER, password=PASSWORD):
        self.host, self.port = host, port
        self.authorization = basic(user, password)
        self.conn = http.client.HTTPConnection(host, port, timeout=15)

    def request(self, method, path, body=None, headers=None, auth=True):
        all_headers = {"Authorization": self.authorization} if auth else {}
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            all_headers["Content-Type"] = "application/json"
        if isinstance(body, str):
            body = body.encode("utf-8")
        all_headers.update(headers or {})
        all_headers = {k: v for k, v in all_headers.items() if v is not None}
        try:
            self.conn.request(method, path, body=body, headers=all_headers)
            response = self.conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            self.conn.close()
            self.conn.request(method, path, body=body, headers=all_headers)
            response = self.conn.getresponse()
        data = response.read()
        return Response(response.status, response.headers, data)

    def publish(self, stream, value=None, producer="producer-1", headers=None):
        all_headers = {"X-Producer-ID": producer}
        all_headers.update(headers or {})
        return self.request("POST", f"/api/v1/streams/{quote(stream)}/events",
                            envelope() if value is None else value, all_headers)

    def read(self, stream, event_name="OrderPlaced", limit=100, consumer="consumer-1", extra=""):
        query = urllib.parse.urlencode({"eventName": event_name, "limit": limit})
        return self.request("GET", f"/api/v1/streams/{quote(stream)}/events?{query}{extra}",
                            headers={"X-Consumer-ID": consumer})

    def ack(self, stream, event_id, consumer="consumer-1", body="action=ACK",
            content_type="application/x-www-form-urlencoded"):
        return self.request("POST", f"/api/v1/streams/{quote(stream)}/events/{event_id}", body,
                            {"X-Consumer-ID": consumer, "Content-Type": content_type})

    def close(self):
        self.conn.close()


class LiveServer:
    """An eventserver in this process (eventserver.RunningServer, as
    eventserver.running() starts it), on port 0, over a fresh database file."""

    def __init__(self, *flags):
        self.tmp = tempfile.TemporaryDirectory()
        self.db = os.path.join(self.tmp.name, "events.db")
        argv = ["--port", "0", "--db", self.db, "--user", USER, "--password", PASSWORD, "--quiet",
                *flags]
        self.running = eventserver.RunningServer(eventserver.parse_config(argv, {}))
        self.config, self.store, self.server = self.running.config, self.running.store, self.running.httpd
        self.port = self.running.port

    def client(self):
        return Client(self.port)

    def stop(self):
        self.running.stop()
        self.tmp.cleanup()


class ServerTest(unittest.TestCase):
    """Base: one live server for the class, one client per test."""

    flags = ()

    @classmethod
    def setUpClass(cls):
        cls.live = LiveServer(*cls.flags)

    @classmethod
    def tearDownClass(cls):
        cls.live.stop()

    def setUp(self):
        self.client = self.live.client()
        self.addCleanup(self.client.close)

    def publish_ok(self, stream, value=None, producer="producer-1"):
        response = self.client.publish(stream, value, producer)
        self.assertEqual(response.status, 200, response)
        return response.json

    def assert_error(self, response, status, text=None, starts=None):
        self.assertEqual(response.status, status, response)
        self.assertEqual(response.headers["Content-Type"], "application/json; charset=utf-8")
        body = response.json
        self.assertIsInstance(body, str)
        if text is not None:
            self.assertEqual(body, text)
        if starts is not None:
            self.assertTrue(body.startswith(starts), body)
        return body

    def assert_stream_absent(self, stream):
        self.assert_error(self.client.read(stream), 404, f"Not Found - stream {stream} not found")

    def db_rows(self, sql, *args):
        """Look at the database file directly (read-only), as an operator would."""
        with open_database(f"file:{self.live.db}?mode=ro", uri=True) as conn:
            return conn.execute(sql, args).fetchall()


class FreshServerTest(ServerTest):
    """Base: an empty server for every test, for exact global figures: the
    class's server, reset before each test (POST /api/v1/reset, SPEC 8)."""

    flags = ("--allow-reset",)

    def setUp(self):
        super().setUp()
        response = self.client.request("POST", "/api/v1/reset")
        self.assertEqual(response.status, 200, response)

    def get(self, path, **kwargs):
        response = self.client.request("GET", "/api/v1" + path, **kwargs)
        return response

    def get_json(self, path):
        response = self.get(path)
        self.assertEqual(response.status, 200, response)
        self.assertEqual(response.headers["Content-Type"], "application/json; charset=utf-8")
        return response.json

    def seek(self, stream, consumer, name, offset):
        return self.client.request(
            "POST", f"/api/v1/{quote(stream)}/{quote(consumer)}/{quote(name)}/change/{offset}")


class NewServerTest(FreshServerTest):
    """Base: a new server and database for every test, for tests that break them."""

    @classmethod
    def setUpClass(cls):
        pass

    @classmethod
    def tearDownClass(cls):
        pass

    def setUp(self):
        self.live = LiveServer(*self.flags)
        self.addCleanup(self.live.stop)
        ServerTest.setUp(self)


# Publish (SPEC 3.1) ###########################################################

class PublishTest(ServerTest):

    def test_publish_returns_lowercase_uuid_and_read_returns_envelope_as_sent(self):
        stream = fresh()
        sent = {"event": {"name": "OrderPlaced", "version": 1}, "custom": [1, "zwei", None],
                "system": {"id": "alv123", "name": "codello alvine"},
                "trigger": {"type": "system", "name": "/path/to/script.php"},
                "payload": {"total": 12.5, "items": ["a", "ü"]}, "eventId": "client-made"}
        event_id = self.publish_ok(stream, sent)
        self.assertRegex(event_id, UUID_LOWER)
        response = self.client.read(stream)
        self.assertEqual(response.status, 200)
        expected = {"eventId": event_id, **{k: v for k, v in sent.items() if k != "eventId"}}
        self.assertEqual(response.json, [expected])
        self.assertEqual(list(response.json[0]), ["eventId", "event", "custom", "system", "trigger", "payload"])
        # stored compactly, as sent
        self.assertIn(b'"payload":{"total":12.5,"items":["a","\xc3\xbc"]}', response.body)

    def test_publish_minimal_envelope(self):
        stream = fresh()
        event_id = self.publish_ok(stream, {"event": {"name": "Ping"}})
        self.assertEqual(self.client.read(stream, "Ping").json, [{"eventId": event_id, "event": {"name": "Ping"}}])

    def test_publish_needs_producer_id(self):
        for producer in (None, ""):
            with self.subTest(producer=producer):
                stream = fresh()
                response = self.client.request("POST", f"/api/v1/streams/{stream}/events", envelope(),
                                               {"X-Producer-ID": producer})
                self.assert_error(response, 400, starts="Bad Request - X-Producer-ID")
                self.assert_stream_absent(stream)

    def test_publish_rejects_bad_producer_ids(self):
        for producer in ("tab\there", "x" * 256):
            with self.subTest(producer=producer[:20]):
                stream = fresh()
                self.assert_error(self.client.publish(stream, producer=producer), 400,
                                  starts="Bad Request - X-Producer-ID")
                self.assert_stream_absent(stream)

    def test_publish_accepts_any_printable_producer_id_read_as_utf8(self):
        stream = fresh()
        producer = "prodüçer-Ω " + "x" * 240
        raw = producer.encode("utf-8").decode("latin-1")  # http.client sends header text as latin-1
        self.publish_ok(stream, producer=raw)
        self.assertEqual(self.db_rows("SELECT producer_id FROM streams WHERE name = ?", stream),
                         [(producer,)])
        self.assert_error(self.client.publish(stream, producer="other"), 423)

    def test_publish_rejects_malformed_bodies_naming_the_field(self):
        def with_event(**event):
            return json.dumps({"event": event})

        cases = [
            ("not json", b"{oops", "JSON"),
            ("invalid utf-8", b'{"event":{"name":"\xff\xfe"}}', "UTF-8"),
            ("empty", b"", "empty"),
            ("array of non-objects", b"[1]", "object"),
            ("string", b'"x"', "object"),
            ("number", b"5", "object"),
            ("null", b"null", "object"),
            ("no event", b'{"payload":{}}', "event"),
            ("event not object", b'{"event":"OrderPlaced"}', "event"),
            ("no name", with_event(version=1), "event.name"),
            ("empty name", with_event(name=""), "event.name"),
            ("name not string", with_event(name=5), "event.name"),
            ("name with control", with_event(name="a\u0007b"), "event.name"),
            ("name with C1 control", with_event(name="a\u0085b"), "event.name"),
            ("name with slash", with_event(name="a/b"), "event.name"),
            ("name too long", with_event(name="n" * 256), "event.name"),
            ("version string", with_event(name="A", version="1"), "event.version"),
            ("version float", b'{"event":{"name":"A","version":1.0}}', "event.version"),
            ("version bool", with_event(name="A", version=True), "event.version"),
            ("version over int64", with_event(name="A", version=2 ** 63), "event.version"),
            ("version under int64", with_event(name="A", version=-2 ** 63 - 1), "event.version"),
            ("system array", json.dumps({"event": {"name": "A"}, "system": []}), "system"),
            ("trigger string", json.dumps({"event": {"name": "A"}, "trigger": "x"}), "trigger"),
            ("payload null", json.dumps({"event": {"name": "A"}, "payload": None}), "payload"),
            ("NaN", b'{"event":{"name":"A"},"payload":{"x":NaN}}', "JSON"),
            ("Infinity", b'{"event":{"name":"A"},"payload":{"x":-Infinity}}', "JSON"),
            ("huge float", b'{"event":{"name":"A"},"payload":{"x":1e999}}', "JSON"),
            ("lone surrogate", b'{"event":{"name":"A"},"payload":{"x":"\\ud800"}}', "surrogate"),
            ("lone surrogate, and in the dropped eventId", b'{"eventId":"\\ud800","event":{"name":"A"},'
             b'"payload":{"x":"\\udc00"}}', "field payload contains a lone surrogate"),
            ("deep nesting", b'{"event":{"name":"A"},"payload":' + b"[" * 100000 + b"]" * 100000 + b"}",
             "JSON"),
        ]
        for label, body, field in cases:
            with self.subTest(label):
                stream = fresh()
                response = self.client.request("POST", f"/api/v1/streams/{stream}/events", body,
                                               {"X-Producer-ID": "p", "Content-Type": "application/json"})
                text = self.assert_error(response, 400, starts="Bad Request - ")
                self.assertIn(field, text)
                self.assert_stream_absent(stream)
        self.assertEqual(self.client.request("GET", "/api/v1/health").status, 200)

    def test_publish_accepts_int64_bounds_for_version(self):
        stream = fresh()
        for version in (2 ** 63 - 1, -2 ** 63, 0):
            self.publish_ok(stream, {"event": {"name": "V", "version": version}})
        versions = [item["event"]["version"] for item in self.client.read(stream, "V").json]
        self.assertEqual(versions, [2 ** 63 - 1, -2 ** 63, 0])

    def test_publish_requires_json_content_type(self):
        body = json.dumps(envelope())
        for content_type in (None, "text/plain", "application/x-www-form-urlencoded",
                             "application/json; charset=latin-1", "application/jsonx"):
            with self.subTest(content_type=content_type):
                stream = fresh()
                response = self.client.request("POST", f"/api/v1/streams/{stream}/events", body,
                                               {"X-Producer-ID": "p", "Content-Type": content_type})
                self.assert_error(response, 400, starts="Bad Request - ")
                self.assert_stream_absent(stream)
        for content_type in ("application/json", "application/json; charset=utf-8",
                             "Application/JSON;charset=UTF-8"):
            with self.subTest(content_type=content_type):
                response = self.client.request("POST", f"/api/v1/streams/{fresh()}/events", body,
                                               {"X-Producer-ID": "p", "Content-Type": content_type})
                self.assertEqual(response.status, 200, response)

    def test_publish_second_producer_is_locked_out_and_nothing_stored(self):
        stream = fresh()
        self.publish_ok(stream, producer="owner")
        response = self.client.publish(stream, producer="intruder")
        self.assert_error(response, 423, "Locked - Second writers not allowed")
        self.assertEqual(len(self.client.read(stream).json), 1)
        self.publish_ok(stream, producer="owner")
        self.assertEqual(len(self.client.read(stream).json), 2)

    def test_publish_sequences_count_per_event_name(self):
        stream = fresh()
        first_a = self.publish_ok(stream, envelope("A"))
        first_b = self.publish_ok(stream, envelope("B"))
        second_a = self.publish_ok(stream, envelope("A"))
        self.assertEqual(self.db_rows("SELECT event_name, sequence FROM events e JOIN streams s USING (stream_id)"
                                      " WHERE s.name = ? ORDER BY event_pk", stream),
                         [("A", 1), ("B", 1), ("A", 2)])
        # B's first event is sequence 1 of B: acknowledging it needs no A
        self.assertEqual(self.client.ack(stream, first_b).status, 200)
        self.assert_error(self.client.ack(stream, second_a), 400,
                          "Bad Request - consumer offset mismatch: expected sequence 1, got 2")
        self.assertEqual(self.client.ack(stream, first_a).status, 200)
        self.assertEqual(self.client.ack(stream, second_a).status, 200)

    def test_default_limits_are_1000_events_and_1_mib(self):
        stream = fresh()
        self.publish_ok(stream, [{"event": {"name": "A"}}] * 1000)
        self.publish_ok(stream, {"event": {"name": "A"}})
        self.assertEqual(len(self.client.read(stream, "A", limit=5000).json), 1000)
        padding = "x" * (1048576 - len(json.dumps(envelope(payload={"p": ""}))))
        self.assertEqual(self.client.publish(stream, envelope(payload={"p": padding})).status, 200)
        self.assert_error(self.client.publish(stream, envelope(payload={"p": padding + "x"})), 413,
                          "Payload Too Large - 1048576")

    def test_publish_sql_is_parameterised(self):
        stream = "x'; DROP TABLE events;--"
        event_id = self.publish_ok(stream, envelope("Robert'); DROP TABLE streams;--"))
        items = self.client.read(stream, "Robert'); DROP TABLE streams;--").json
        self.assertEqual([i["eventId"] for i in items], [event_id])
        self.assertEqual(self.client.read(fresh() + "' OR '1'='1").status, 404)

    def test_publish_unicode_stream_names_round_trip(self):
        for stream in ("Bestellungen-äöü", "заказы", "注文✓", "emoji-🎉", "a b+c%d", "n" * 255):
            with self.subTest(stream=stream[:20]):
                event_id = self.publish_ok(stream)
                self.assertEqual([e["eventId"] for e in self.client.read(stream).json], [event_id])


# Atomic batch publish (README: For development and CI) ######################

class BatchPublishTest(ServerTest):

    def test_batch_publish_stores_all_in_order_and_answers_ids(self):
        stream = fresh()
        batch = [envelope("A", payload={"i": i}) for i in range(5)]
        ids = self.publish_ok(stream, batch)
        self.assertEqual(len(ids), 5)
        self.assertTrue(all(UUID_LOWER.match(i) for i in ids))
        events = self.client.read(stream, "A").json
        self.assertEqual([e["eventId"] for e in events], ids)
        self.assertEqual([e["payload"]["i"] for e in events], list(range(5)))

    def test_batch_publish_is_all_or_nothing_and_names_the_bad_index(self):
        stream = fresh()
        batch = [envelope("A"), envelope("A"), {"event": {"name": ""}}, envelope("A")]
        text = self.assert_error(self.client.publish(stream, batch), 400)
        self.assertIn("[2]", text)
        self.assert_stream_absent(stream)

    def test_batch_publish_size_limits(self):
        self.assert_error(self.client.publish(fresh(), []), 400)
        stream = fresh()
        self.assertEqual(len(self.publish_ok(stream, [{"event": {"name": "A"}}] * 1000)), 1000)
        self.assert_error(self.client.publish(fresh(), [{"event": {"name": "A"}}] * 1001), 400)


# Read (SPEC 3.2) ##############################################################

class ReadTest(ServerTest):

    flags = ("--max-limit", "5")

    def test_read_with_deprecation_warnings_as_errors(self):
        # Python 3.12 warns on numbered placeholders ("?1") bound to a sequence: under -W error
        # every read was a 500. Both ways of reading: all the events, and within a byte budget.
        stream = fresh()
        ids = [self.publish_ok(stream) for _ in range(3)]
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            for consumer, max_bytes in (("all", 10 ** 9), ("budget", 1)):
                with self.subTest(max_bytes=max_bytes):
                    events = json.loads(self.live.store.read(stream, "OrderPlaced", consumer, 3, max_bytes))
                    self.assertEqual([e["eventId"] for e in events], ids if max_bytes > 1 else ids[:1])

    def test_read_returns_oldest_first_up_to_limit_only_that_name(self):
        stream = fresh()
        ids = [self.publish_ok(stream, envelope("A", payload={"n": n})) for n in range(4)]
        self.publish_ok(stream, envelope("B"))
        response = self.client.read(stream, "A", limit=3)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["Content-Type"], "application/json; charset=utf-8")
        self.assertEqual([e["eventId"] for e in response.json], ids[:3])
        self.assertEqual(self.client.read(stream, "C").json, [])

    def test_read_again_sees_new_events(self):
        stream = fresh()
        first = self.publish_ok(stream)
        self.assertEqual([e["eventId"] for e in self.client.read(stream, limit=3).json], [first])
        second = self.publish_ok(stream)  # a read of the same offset and limit must not answer from before
        self.assertEqual([e["eventId"] for e in self.client.read(stream, limit=3).json], [first, second])
        self.assertEqual([e["eventId"] for e in self.client.read(stream, limit=1).json], [first])
        self.assertEqual(self.client.ack(stream, first).status, 200)
        self.assertEqual([e["eventId"] for e in self.client.read(stream, limit=1).json], [second])

    def test_read_does_not_move_the_offset(self):
        stream = fresh()
        event_id = self.publish_ok(stream)
        for _ in range(3):
            self.assertEqual([e["eventId"] for e in self.client.read(stream).json], [event_id])

    def test_read_offsets_are_per_consumer(self):
        stream = fresh()
        first, second = self.publish_ok(stream), self.publish_ok(stream)
        self.assertEqual(self.client.ack(stream, first, consumer="c-a").status, 200)
        self.assertEqual([e["eventId"] for e in self.client.read(stream, consumer="c-a").json], [second])
        self.assertEqual([e["eventId"] for e in self.client.read(stream, consumer="c-b").json], [first, second])

    def test_read_limit_above_maximum_is_lowered(self):
        stream = fresh()
        self.publish_ok(stream, [envelope() for _ in range(7)])
        self.assertEqual(len(self.client.read(stream, limit=100).json), 5)
        self.assertEqual(len(self.client.read(stream, limit=10 ** 30).json), 5)

    def test_read_unknown_stream_is_404(self):
        self.assert_error(self.client.read("never-written"), 404, "Not Found - stream never-written not found")

    def test_read_rejects_bad_parameters(self):
        stream = fresh()
        self.publish_ok(stream)
        base = f"/api/v1/streams/{stream}/events"
        cases = {
            "no consumer": (f"{base}?eventName=OrderPlaced&limit=1", {}),
            "empty consumer": (f"{base}?eventName=OrderPlaced&limit=1", {"X-Consumer-ID": ""}),
            "no eventName": (f"{base}?limit=1", {"X-Consumer-ID": "c"}),
            "empty eventName": (f"{base}?eventName=&limit=1", {"X-Consumer-ID": "c"}),
            "eventName with control": (f"{base}?eventName=a%00b&limit=1", {"X-Consumer-ID": "c"}),
            "no limit": (f"{base}?eventName=OrderPlaced", {"X-Consumer-ID": "c"}),
            "limit zero": (f"{base}?eventName=OrderPlaced&limit=0", {"X-Consumer-ID": "c"}),
            "limit negative": (f"{base}?eventName=OrderPlaced&limit=-1", {"X-Consumer-ID": "c"}),
            "limit text": (f"{base}?eventName=OrderPlaced&limit=ten", {"X-Consumer-ID": "c"}),
            "limit float": (f"{base}?eventName=OrderPlaced&limit=1.5", {"X-Consumer-ID": "c"}),
            "limit empty": (f"{base}?eventName=OrderPlaced&limit=", {"X-Consumer-ID": "c"}),
        }
        for label, (path, headers) in cases.items():
            with self.subTest(label):
                self.assert_error(self.client.request("GET", path, headers=headers), 400, starts="Bad Request - ")

    def test_read_bad_input_wins_over_missing_stream(self):
        response = self.client.request("GET", "/api/v1/streams/nope/events?eventName=A&limit=1")
        self.assert_error(response, 400, starts="Bad Request - X-Consumer-ID")



class ReadFromMemoryTest(ServerTest):
    """The newest events of each (stream, event name) are answered from memory (Store.tails):
    reads on either side of what memory holds must agree with what is stored."""

    def seek(self, stream, consumer, offset, name="A"):
        response = self.client.request("POST", f"/api/v1/{stream}/{consumer}/{name}/change/{offset}")
        self.assertEqual(response.status, 200, response)

    def assert_reads(self, stream, ids, offsets, name="A", limit=7):
        for offset in offsets:
            consumer = f"c{offset}-{uuid.uuid4().hex[:6]}"
            self.seek(stream, consumer, offset, name)
            with self.subTest(offset=offset):
                events = self.client.read(stream, name, limit=limit, consumer=consumer).json
                self.assertEqual([e["eventId"] for e in events], ids[offset:offset + limit])
                self.assertEqual({e["event"]["name"] for e in events}, {name} if events else set())

    def test_reads_around_the_events_kept_in_memory_agree_with_the_database(self):
        kept = eventserver.TAIL_EVENTS
        stream, ids = fresh(), []
        for size in (kept, kept, 5):  # the tail grows to 2 * kept, is cut to kept, then grows again
            ids += self.publish_ok(stream, [envelope("A")] * size)
            self.publish_ok(stream, envelope("B"))
        self.assert_reads(stream, ids, [0, kept - 1, kept, kept + 1, 2 * kept - 2, 2 * kept, 2 * kept + 4, 2 * kept + 5])
        consumer = "acker"
        self.seek(stream, consumer, 2 * kept + 3)
        self.assertEqual(self.client.ack(stream, ids[2 * kept + 3], consumer=consumer).status, 200)
        self.assert_error(self.client.ack(stream, ids[2 * kept + 5 - 1], consumer="late"), 400,
                          starts="Bad Request - consumer offset mismatch")
        self.assertEqual(self.client.read(stream, "A", limit=10, consumer=consumer).json[0]["eventId"], ids[2 * kept + 4])

    def test_large_events_past_the_memory_budget_are_read_from_the_database(self):
        streams, payload = [fresh() for _ in range(12)], {"blob": "x" * 100_000}
        ids = {stream: self.publish_ok(stream, [envelope("A", payload=payload)] * 9) for stream in streams}
        for stream in streams:  # the first ones' tails were dropped to keep memory within TAIL_BYTES
            self.assert_reads(stream, ids[stream], [0, 4, 9], limit=3)


class BoundedMemoryTest(NewServerTest):
    """What the server keeps beside the committed state stays bounded however
    many clients come (README: Decisions, Memory)."""

    def open_database_files(self):
        folder = "/proc/self/fd"
        return sum(1 for fd in os.listdir(folder)
                   if os.path.realpath(os.path.join(folder, fd)) == os.path.realpath(self.live.db))

    def test_reads_from_many_connections_at_once_share_one_reader_connection(self):
        stream = fresh()
        for size in (1000, 1000, 500):  # the first events are past what memory keeps of the stream
            self.publish_ok(stream, [envelope()] * size)
        for number in range(32):
            response = self.client.request("POST", f"/api/v1/{stream}/c{number}/OrderPlaced/change/{number * 10}")
            self.assertEqual(response.status, 200, response)
        before = self.open_database_files()  # the writer's and the lock's, maybe a reader's
        start = threading.Barrier(32)

        def reads(number):  # no two reads alike: none is answered from the cache of answers
            client = self.live.client()
            try:
                start.wait()
                return [client.read(stream, limit=limit, consumer=f"c{number}").status for limit in range(1, 21)]
            finally:
                client.close()

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            statuses = [status for done in pool.map(reads, range(32)) for status in done]
        self.assertEqual(set(statuses), {200})
        self.assertLessEqual(self.open_database_files(), before + 1)  # one per thread before

    def test_a_batch_waiting_for_its_commit_does_not_keep_its_parsed_json(self):
        # Its envelopes' text is all it needs: the parsed body (some 2 MB of objects for 1,000
        # events) kept alive by each waiting batch raised the peak RSS of a bulk load by 6-8 MB.
        marker, store = os.urandom(8).hex(), self.live.store
        text = json.dumps([envelope(payload={"marker": marker, "n": n}) for n in range(1000)])  # no list kept here

        def parsed_bodies():
            return [o for o in gc.get_objects() if isinstance(o, list) and len(o) == 1000
                    and isinstance(o[0], dict) and (o[0].get("payload") or {}).get("marker") == marker]

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            store.writes.lock.acquire()  # the batch waits in the queue for the next commit
            try:
                batch = pool.submit(with_client, self.live.port, lambda c: c.publish(
                    fresh(), text, "p", {"Content-Type": "application/json"}))
                _wait_for(lambda: store.writes.queued() == 1)
                self.assertEqual(parsed_bodies(), [])
            finally:
                store.writes.lock.release()
            response = batch.result(timeout=15)
        self.assertEqual((response.status, len(response.json)), (200, 1000), response)

    def test_the_writer_thread_lets_go_of_its_last_writes(self):
        # Its last batch (tickets, envelopes, prepared replies: some 0.3 MB for 1,000 events)
        # was kept until the next write came, however long that took.
        response = self.client.publish(fresh(), [envelope(payload={"n": n}) for n in range(1000)])
        self.assertEqual((response.status, len(response.json)), (200, 1000), response)

        def tickets_alive():
            gc.collect()  # what a cycle alone keeps is not kept: only what something still holds
            return [o for o in gc.get_objects() if isinstance(o, eventserver._Ticket)]

        _wait_for(lambda: not tickets_alive())

    @unittest.skipUnless(platform.libc_ver()[0] == "glibc" and os.path.exists("/proc/self/maps")
                         and sys.maxsize > 2 ** 32, "glibc's arenas on a 64-bit machine, seen in /proc")
    def test_a_server_process_keeps_to_two_malloc_arenas_unless_told_otherwise(self):
        # glibc gives each new thread an arena of its own (up to 8 per core) and keeps what is
        # freed in each: memory that grew with the connections that had come.
        def extra_arenas(env):
            process = _listening_process(self, env=env)
            connections = [_connect(process.port) for _ in range(32)]
            try:
                for connection in connections:  # 32 connection threads at once, each answering
                    connection.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                for connection in connections:
                    self.assertEqual(_read_reply(connection.makefile("rb"))[0], 200)
                return _malloc_heaps(process.proc.pid)
            finally:
                for connection in connections:
                    connection.close()

        self.assertEqual(extra_arenas({"MALLOC_ARENA_MAX": None}), 1)  # the main arena, and one more
        self.assertGreater(extra_arenas({"MALLOC_ARENA_MAX": "8"}), 1)  # the user's own setting stands

    def test_the_cache_of_answers_and_of_recent_events_stays_within_its_bounds(self):
        cache, text = eventserver.ReadCache(), "x" * 40_000
        for offset in range(1000):  # 40 MB of answers, 100,000 events
            listed = [(str(offset * 100 + i), f"id-{offset}-{i}") for i in range(100)]
            cache.keep((1, "A", offset, 100, 1 << 20), True, 100_000, text, listed)
        self.assertLessEqual(sum(len(kept[2]) for kept in cache._answers.values()), eventserver.ANSWER_BYTES)
        self.assertGreater(len(cache._answers), 0)
        self.assertEqual(cache.answer((1, "A", 999, 100, 1 << 20), 100_000), text)
        self.assertLessEqual(len(cache._events), eventserver.RECENT_EVENTS + 100)
        self.assertEqual(cache.event("id-999-7"), (1, "A", 99907))


# Acknowledge (SPEC 3.3) #######################################################

class AckTest(ServerTest):

    def test_ack_moves_offset_with_form_body(self):
        stream = fresh()
        first, second = self.publish_ok(stream), self.publish_ok(stream)
        response = self.client.ack(stream, first)
        self.assertEqual((response.status, response.json), (200, "OK"))
        self.assertEqual([e["eventId"] for e in self.client.read(stream).json], [second])

    def test_ack_accepts_json_body(self):
        stream = fresh()
        event_id = self.publish_ok(stream)
        response = self.client.ack(stream, event_id, body='{"action": "ACK"}', content_type="application/json")
        self.assertEqual((response.status, response.json), (200, "OK"))
        self.assertEqual(self.client.read(stream).json, [])

    def test_ack_accepts_uppercase_event_id(self):
        stream = fresh()
        event_id = self.publish_ok(stream)
        self.assertEqual(self.client.ack(stream, event_id.upper()).status, 200)
        self.assertEqual(self.client.read(stream).json, [])

    def test_ack_retry_is_ok_and_changes_nothing(self):
        stream = fresh()
        first, second = self.publish_ok(stream), self.publish_ok(stream)
        self.assertEqual(self.client.ack(stream, first).status, 200)
        self.assertEqual(self.client.ack(stream, second).status, 200)
        moved_at = self.db_rows("SELECT moved_at FROM consumer_offsets")
        response = self.client.ack(stream, first)
        self.assertEqual((response.status, response.json), (200, "OK"))
        self.assertEqual(self.db_rows("SELECT moved_at FROM consumer_offsets"), moved_at)
        self.assertEqual(self.client.read(stream).json, [])

    def test_ack_ahead_of_offset_is_400_and_changes_nothing(self):
        stream = fresh()
        ids = [self.publish_ok(stream) for _ in range(3)]
        self.assert_error(self.client.ack(stream, ids[2]), 400,
                          "Bad Request - consumer offset mismatch: expected sequence 1, got 3")
        self.assertEqual(len(self.client.read(stream).json), 3)
        self.assertEqual(self.client.ack(stream, ids[0]).status, 200)
        self.assert_error(self.client.ack(stream, ids[2]), 400,
                          "Bad Request - consumer offset mismatch: expected sequence 2, got 3")

    def test_ack_rejects_bad_actions_and_content_types(self):
        stream = fresh()
        event_id = self.publish_ok(stream)
        cases = [
            ("action=NACK", "application/x-www-form-urlencoded"),
            ("action=ack", "application/x-www-form-urlencoded"),
            ("", "application/x-www-form-urlencoded"),
            ("other=ACK", "application/x-www-form-urlencoded"),
            ('{"action": "NACK"}', "application/json"),
            ('{"action": "ACK"}', "application/json; charset=latin-1"),
            ('{"action": ["ACK"]}', "application/json"),
            ('["ACK"]', "application/json"),
            ("{bad", "application/json"),
            ("action=ACK", "text/plain"),
            ("action=ACK", None),
        ]
        for body, content_type in cases:
            with self.subTest(body=body, content_type=content_type):
                self.assert_error(self.client.ack(stream, event_id, body=body, content_type=content_type),
                                  400, starts="Bad Request - ")
        self.assertEqual(len(self.client.read(stream).json), 1)

    def test_ack_needs_consumer_id(self):
        stream = fresh()
        event_id = self.publish_ok(stream)
        response = self.client.request("POST", f"/api/v1/streams/{stream}/events/{event_id}", "action=ACK",
                                       {"Content-Type": "application/x-www-form-urlencoded"})
        self.assert_error(response, 400, starts="Bad Request - X-Consumer-ID")

    def test_ack_non_uuid_event_id_is_400(self):
        stream = fresh()
        self.publish_ok(stream)
        for event_id in ("123", "not-a-uuid", "0" * 32, str(uuid.uuid4()) + "0", "{%s}" % uuid.uuid4()):
            with self.subTest(event_id=event_id):
                self.assert_error(self.client.ack(stream, quote(event_id)), 400, starts="Bad Request - ")

    def test_ack_unknown_stream_or_event_is_404(self):
        stream, other = fresh(), fresh()
        self.publish_ok(stream)
        elsewhere = self.publish_ok(other)
        self.assertEqual(len(self.client.read(other).json), 1)  # just read: the server remembers it
        self.assert_error(self.client.ack(fresh(), elsewhere), 404, starts="Not Found - ")
        self.assert_error(self.client.ack(stream, elsewhere), 404, starts="Not Found - ")
        self.assert_error(self.client.ack(stream, str(uuid.uuid4())), 404, starts="Not Found - ")


# Concurrency: group commit, the writer thread, racing clients (README: What a 200 promises) ###

class ConcurrencyTest(ServerTest):

    def test_publish_concurrent_producers_get_gapless_sequences(self):
        stream = fresh()

        def worker(_):
            client = self.live.client()
            try:
                return [client.publish(stream, envelope("Tick")) for _ in range(25)]
            finally:
                client.close()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = [r for batch in pool.map(worker, range(8)) for r in batch]
        self.assertTrue(all(r.status == 200 for r in responses), [r for r in responses if r.status != 200][:3])
        published = {r.json for r in responses}
        self.assertEqual(len(published), 200)
        events = self.client.read(stream, "Tick", limit=1000).json
        self.assertEqual(len(events), 200)
        self.assertEqual({e["eventId"] for e in events}, published)
        # the read order acknowledges one by one: sequence n+1 always follows n
        for item in events:
            self.assertEqual(self.client.ack(stream, item["eventId"]).status, 200)
        self.assertEqual(self.client.read(stream, "Tick").json, [])
        sequences = self.db_rows("SELECT sequence FROM events JOIN streams USING (stream_id)"
                                 " WHERE name = ? ORDER BY sequence", stream)
        self.assertEqual([s for (s,) in sequences], list(range(1, 201)))

    def test_publish_pipelined_requests_are_answered_in_order_under_load(self):
        # Under load, the thread that commits a publish usually answers it, not the
        # connection's own thread: a connection's answers must still keep its order.
        stream, busy, stop = fresh(), fresh(), threading.Event()

        def load():
            client = self.live.client()
            try:
                while not stop.is_set():
                    client.publish(busy, envelope("Load"), producer="loader")
            finally:
                client.close()

        loaders = [threading.Thread(target=load) for _ in range(6)]
        for loader in loaders:
            loader.start()
        body = json.dumps(envelope("Piped")).encode()
        head = f"Host: localhost\r\nAuthorization: {basic()}\r\n"
        publish = (f"POST /api/v1/streams/{stream}/events HTTP/1.1\r\n{head}Content-Type: application/json\r\n"
                   f"X-Producer-ID: piper\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        read = (f"GET /api/v1/streams/{stream}/events?eventName=Piped&limit=1000 HTTP/1.1\r\n{head}"
                f"X-Consumer-ID: reader\r\n\r\n").encode()
        try:
            with socket.create_connection(("127.0.0.1", self.live.port), timeout=15) as sock:
                answers = sock.makefile("rb")
                published = []
                for _ in range(10):
                    sock.sendall(publish * 20 + read)
                    replies = [_read_reply(answers) for _ in range(21)]
                    self.assertEqual([status for status, _ in replies], [200] * 21, replies[:3])
                    published += [json.loads(reply) for _, reply in replies[:20]]
                    self.assertEqual([e["eventId"] for e in json.loads(replies[20][1])], published)
        finally:
            stop.set()
            for loader in loaders:
                loader.join()

    def test_writes_queued_behind_a_held_up_commit_are_committed_after_it(self):
        # A publish's commit is held up (another connection holds SQLite's write lock); a seek
        # and a publish queue behind it. Once the first commits, the writer takes them both.
        stream, store, port = fresh(), self.live.store, self.live.port
        self.publish_ok(stream)
        blocker = sqlite3.connect(self.live.db, isolation_level=None)
        self.addCleanup(blocker.close)
        blocker.execute("BEGIN IMMEDIATE")
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            try:
                held = pool.submit(with_client, port, lambda c: c.publish(stream))
                _wait_for(lambda: store.writes.lock.locked() and not store.writes.queued())  # its batch is taken
                seek = pool.submit(with_client, port, lambda c: c.request(
                    "POST", f"/api/v1/{stream}/reader/OrderPlaced/change/1"))
                later = pool.submit(with_client, port, lambda c: c.publish(stream))
                _wait_for(lambda: store.writes.queued() == 2)
            finally:
                blocker.execute("COMMIT")
            responses = [future.result(timeout=15) for future in (held, seek, later)]
        self.assertEqual([r.status for r in responses], [200, 200, 200], responses)
        events = self.client.read(stream, limit=10, consumer="reader").json
        self.assertEqual([e["eventId"] for e in events], [responses[0].json, responses[2].json])

    def test_a_large_answer_of_a_queued_write_arrives_whole(self):
        # A batch queued behind a commit, answered through a small send buffer: all of it arrives.
        listener, size = self.live.server.socket, socket.SO_SNDBUF
        self.addCleanup(listener.setsockopt, socket.SOL_SOCKET, size, listener.getsockopt(socket.SOL_SOCKET, size))
        listener.setsockopt(socket.SOL_SOCKET, size, 4096)  # connections accepted from now on inherit it
        store, stream = self.live.store, fresh()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            store.writes.lock.acquire()  # the writer waits for it with the first publish; the batch queues
            try:
                first = pool.submit(with_client, self.live.port, lambda c: c.publish(fresh()))
                _wait_for(lambda: store.writes.queued() == 1)
                batch = pool.submit(with_client, self.live.port,
                                    lambda c: c.publish(stream, [envelope("E")] * 1000))
                _wait_for(lambda: store.writes.queued() == 2)
            finally:
                store.writes.lock.release()
            self.assertEqual(first.result(timeout=15).status, 200)
            response = batch.result(timeout=15)
        self.assertEqual(response.status, 200, response)
        self.assertEqual(len(response.json), 1000)
        self.assertEqual([e["eventId"] for e in self.client.read(stream, "E", limit=1000).json], response.json)

    def test_publish_racing_producers_leave_exactly_one_owner(self):
        stream = fresh()
        barrier = threading.Barrier(12)

        def racer(index):
            client = self.live.client()
            try:
                client.request("GET", "/api/v1/health")  # connect before the race
                barrier.wait()
                return index, client.publish(stream, envelope(payload={"by": index}), producer=f"racer-{index}")
            finally:
                client.close()

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(racer, range(12)))
        winners = [(index, r) for index, r in results if r.status == 200]
        self.assertEqual(len(winners), 1, results)
        self.assertTrue(all(r.status == 423 for _, r in results if r.status != 200))
        events = self.client.read(stream).json
        self.assertEqual([e["payload"]["by"] for e in events], [winners[0][0]])
        self.assertEqual(self.db_rows("SELECT producer_id FROM streams WHERE name = ?", stream),
                         [(f"racer-{winners[0][0]}",)])

    def test_read_does_not_wait_for_the_write_lock(self):
        stream = fresh()
        event_id = self.publish_ok(stream)
        store = self.live.store
        store.writes.lock.acquire()
        try:
            blocked = concurrent.futures.ThreadPoolExecutor(1)
            pending = blocked.submit(with_client, self.live.port, lambda c: c.publish(stream))
            started = time.monotonic()
            response = self.client.read(stream)
            self.assertLess(time.monotonic() - started, 5)
            self.assertEqual([e["eventId"] for e in response.json], [event_id])
            self.assertFalse(pending.done())  # the publish is the one waiting
        finally:
            store.writes.lock.release()
        self.assertEqual(pending.result(timeout=10).status, 200)
        blocked.shutdown()


# Conventions for every endpoint (SPEC 2) ######################################

class ConventionsTest(ServerTest):

    flags = ("--max-body", "2000")

    def raw(self, data, read_until_close=False):
        """Send raw bytes, return what the server answers (one response)."""
        with socket.create_connection(("127.0.0.1", self.live.port), timeout=10) as sock:
            sock.sendall(data)
            return self._read_response(sock)

    @staticmethod
    def _read_response(sock):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body

    def test_health_needs_no_auth(self):
        response = self.client.request("GET", "/api/v1/health", auth=False)
        self.assertEqual((response.status, response.json), (200, {"status": "OK"}))
        self.assertEqual(response.headers["Content-Type"], "application/json; charset=utf-8")

    def test_auth_is_required_everywhere_else(self):
        stream = fresh()
        self.publish_ok(stream)
        bad_credentials = [None, basic(USER, "wrong"), basic("wrong", PASSWORD), basic(USER, PASSWORD + "x"),
                           "Basic !!!notbase64", "Bearer " + PASSWORD, basic(USER, ""),
                           "Basic " + base64.b64encode(USER.encode()).decode()]
        requests = [("POST", f"/api/v1/streams/{stream}/events"),
                    ("GET", f"/api/v1/streams/{stream}/events?eventName=OrderPlaced&limit=1"),
                    ("POST", f"/api/v1/streams/{stream}/events/{uuid.uuid4()}")]
        for credentials in bad_credentials:
            for method, path in requests:
                with self.subTest(credentials=credentials, path=path):
                    response = self.client.request(method, path, auth=False,
                                                   headers={"Authorization": credentials})
                    self.assert_error(response, 401, "Unauthorized")
                    self.assertEqual(response.headers["WWW-Authenticate"], 'Basic realm="eventserver"')
        self.assertEqual(len(self.client.read(stream).json), 1)

    def test_unknown_path_is_404_before_auth(self):
        for path in ("/nope", "/api/v1", "/api/v1/stream", "/api/v1/streams/x", "/api/v2/health",
                     "/api/v1/streams/x/events/y/z", "/api/v1/streams//events"):
            with self.subTest(path=path):
                self.assert_error(self.client.request("GET", path, auth=False), 404, "Not Found")

    def test_wrong_method_is_405_with_allow_before_auth(self):
        cases = [("DELETE", "/api/v1/streams/x/events", "GET, POST"),
                 ("PUT", "/api/v1/health", "GET"),
                 ("GET", f"/api/v1/streams/x/events/{uuid.uuid4()}", "POST"),
                 ("PATCH", "/api/v1/streams/x/events", "GET, POST")]
        for method, path, allow in cases:
            with self.subTest(method=method, path=path):
                response = self.client.request(method, path, auth=False)
                self.assert_error(response, 405, "Method Not Allowed")
                self.assertEqual(response.headers["Allow"], allow)

    def test_auth_wins_over_size_and_bad_input(self):
        response = self.client.request("POST", "/api/v1/streams/x/events", b"x" * 5000, auth=False,
                                       headers={"Content-Type": "text/plain"})
        self.assert_error(response, 401, "Unauthorized")

    def test_body_over_limit_is_413_before_400(self):
        stream = fresh()
        response = self.client.request("POST", f"/api/v1/streams/{stream}/events", b"{" * 2001,
                                       {"X-Producer-ID": "p", "Content-Type": "text/plain"})
        self.assert_error(response, 413, "Payload Too Large - 2000")
        self.assert_stream_absent(stream)
        body = json.dumps(envelope(payload={"pad": ""}))
        body = json.dumps(envelope(payload={"pad": "x" * (2000 - len(body))}))
        self.assertEqual(len(body), 2000)
        self.assertEqual(self.client.publish(stream, json.loads(body)).status, 200)

    def test_body_over_limit_is_refused_without_reading_it(self):
        # Headers promise 50 MB and no byte of it is sent: the 413 must come anyway.
        head = raw_publish("x", "Content-Length: 50000000\r\n")
        answer = self.raw(head.encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIn(b'"Payload Too Large - 2000"', answer)

    def test_a_client_that_sends_a_refused_body_anyway_is_not_reset(self):
        # Closing a socket with unread data resets the connection, which can take the 413
        # with it: the server reads and drops the rest of a refused body before it closes.
        with socket.create_connection(("127.0.0.1", self.live.port), timeout=10) as sock:
            sock.sendall(raw_publish("x", "Content-Length: 4000000\r\n").encode())
            status, body = _read_reply(sock.makefile("rb"))
            self.assertEqual((status, body), (413, b'"Payload Too Large - 2000"'))
            sock.sendall(b"x" * 4000000)
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(sock.recv(100), b"")

    def test_expect_100_continue_gets_413_instead_of_continue(self):
        head = raw_publish("x", "Content-Length: 3000\r\nExpect: 100-continue\r\n")
        answer = self.raw(head.encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)

    def test_expect_100_continue_within_limit_continues(self):
        stream = fresh()
        body = json.dumps(envelope()).encode()
        head = raw_publish(stream, f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n")
        with socket.create_connection(("127.0.0.1", self.live.port), timeout=10) as sock:
            sock.sendall(head.encode())
            self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(body)
            answer = self._read_response(sock)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)

    def test_chunked_body_is_411(self):
        head = raw_publish("x", "Transfer-Encoding: chunked\r\n", "2\r\n{}\r\n0\r\n\r\n")
        answer = self.raw(head.encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 411 "), answer)
        self.assertIn(b'"Length Required"', answer)

    def test_bad_content_length_is_400(self):
        for length in ("-1", "abc", "1.5", "0x10"):
            with self.subTest(length=length):
                head = raw_publish("x", f"Content-Length: {length}\r\n")
                answer = self.raw(head.encode())
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
                self.assertIn(b'"Bad Request', answer)
        self.assert_stream_absent("x")

    def test_garbage_request_lines_get_json_400_and_server_keeps_serving(self):
        for garbage in (b"\x00\x01\x02\r\n\r\n", b"HELLO\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                        b"GET /api/v1/health HTTP/1.1 extra\r\n\r\n", b"\xff\xfe garbage \xfa\r\n\r\n"):
            with self.subTest(garbage=garbage):
                answer = self.raw(garbage)
                self.assertRegex(answer, rb"^HTTP/1\.[01] (400|505) ")
                self.assertIn(b"application/json", answer)
        self.assertEqual(self.client.request("GET", "/api/v1/health").status, 200)

    def test_stream_names_are_validated(self):
        cases = {"too long": "n" * 256, "control": "a\x01b", "DEL": "a\x7fb", "C1 control": "a\x85b",
                 "slash": "a/b", "newline": "a\nb"}
        for label, name in cases.items():
            with self.subTest(label):
                self.assert_error(self.client.publish(name), 400, starts="Bad Request - stream name")
                self.assert_error(self.client.read(name), 400, starts="Bad Request - stream name")
        response = self.client.request("POST", "/api/v1/streams/%FF%FE/events", envelope(),
                                       {"X-Producer-ID": "p"})
        self.assert_error(response, 400, starts="Bad Request - ")

    def test_auth_and_size_win_over_a_malformed_path(self):
        response = self.client.request("GET", "/api/v1/streams/%FF/events?eventName=a&limit=1", auth=False)
        self.assert_error(response, 401, "Unauthorized")
        response = self.client.request("POST", "/api/v1/streams/%FF/events", b"x" * 2001,
                                       {"X-Producer-ID": "p", "Content-Type": "application/json"})
        self.assert_error(response, 413, "Payload Too Large - 2000")

    def test_bad_input_wins_over_locked(self):
        stream = fresh()
        self.publish_ok(stream, producer="owner")
        self.assert_error(self.client.publish(stream, {"event": {}}, producer="intruder"), 400,
                          starts="Bad Request - ")

    def test_header_values_are_read_as_utf8(self):
        stream = fresh()
        for producer in ("voilà", "Å-team"):  # UTF-8 ending in bytes 0xA0 and 0x85
            with self.subTest(producer=producer):
                raw = producer.encode("utf-8").decode("latin-1")
                self.publish_ok(fresh(), producer=raw)
        self.assert_error(self.client.publish(stream, producer="caf\xe9"), 400,  # a lone Latin-1 byte
                          "Bad Request - header X-Producer-ID is not valid UTF-8")
        self.assert_stream_absent(stream)

    def test_huge_numbers_are_not_500s(self):
        stream = fresh()
        self.publish_ok(stream)
        self.assertEqual(len(self.client.read(stream, limit="1" + "0" * 5000).json), 1)  # lowered to the maximum
        head = raw_publish("x", f"Content-Length: {'9' * 5001}\r\n")
        self.assertTrue(self.raw(head.encode()).startswith(b"HTTP/1.1 413 "))
        response = self.client.request("POST", f"/api/v1/{stream}/c/OrderPlaced/change/{'9' * 5001}")
        self.assert_error(response, 400, starts="Bad Request - offset")

    def test_request_target_must_be_ascii(self):
        answer = self.raw("POST /api/v1/streams/ü/events HTTP/1.1\r\nHost: localhost\r\n\r\n".encode("utf-8"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        self.assertEqual(self.client.request("GET", "/api/v1/streams").status, 200)
        self.assertNotIn("Ã", self.client.request("GET", "/api/v1/streams").body.decode())

    def test_head_gets_no_body_and_the_connection_goes_on(self):
        with socket.create_connection(("127.0.0.1", self.live.port), timeout=10) as sock:
            sock.sendall(b"HEAD /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\nGET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data = b""
            while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        first, second = data.split(b"HTTP/1.1 ")[1:]
        self.assertTrue(first.startswith(b"405 ") and first.endswith(b"\r\n\r\n"), first)
        self.assertTrue(second.startswith(b"200 ") and second.endswith(b'{"status": "OK"}'), second)

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        self.client.request("GET", "/api/v1/health")
        sock = self.client.conn.sock
        for _ in range(5):
            self.assertEqual(self.client.request("GET", "/api/v1/health").status, 200)
        self.assertIs(self.client.conn.sock, sock)

    def test_error_responses_keep_the_connection_when_the_body_was_read(self):
        self.client.request("GET", "/api/v1/health")
        sock = self.client.conn.sock
        self.assertEqual(self.client.publish(fresh(), {"no": "event"}).status, 400)
        self.assertEqual(self.client.request("GET", "/api/v1/health").status, 200)
        self.assertIs(self.client.conn.sock, sock)

    def test_slow_and_idle_clients_do_not_block_others(self):
        partial = [b"GET /api/v1/hea", b"POST /api/v1/streams/x/events HTTP/1.1\r\nContent-Length: 100\r\n\r\n{",
                   b"POST /api/v1/streams/x/events HTTP/1.1\r\nHost: localhost\r\n"]
        sockets = []
        try:
            for index in range(60):
                sock = socket.create_connection(("127.0.0.1", self.live.port), timeout=10)
                sock.sendall(partial[index % len(partial)])
                sockets.append(sock)
            started = time.monotonic()
            client = self.live.client()
            self.assertEqual(client.request("GET", "/api/v1/health").status, 200)
            stream = fresh()
            self.assertEqual(client.publish(stream).status, 200)
            self.assertLess(time.monotonic() - started, 5)
            client.close()
        finally:
            for sock in sockets:
                sock.close()


class TimeoutTest(ServerTest):

    flags = ("--timeout", "0.5")

    def test_a_body_that_stops_short_is_dropped_without_an_answer(self):
        stream = fresh()
        head = raw_publish(stream, "Content-Length: 100\r\n")
        with self.assertLogs("eventserver", level="DEBUG") as logs:
            eventserver.log.debug("marker")  # assertNoLogs is Python 3.10+: check the records instead
            with socket.create_connection(("127.0.0.1", self.live.port), timeout=10) as sock:
                sock.sendall(head.encode() + b'{"event": {"name"')
                self.assertEqual(sock.recv(100), b"")  # closed by the server after the timeout
        self.assertEqual([r.levelname for r in logs.records if r.levelno >= 40], [])
        self.assert_stream_absent(stream)

    def test_idle_and_half_sent_connections_are_closed_after_the_timeout(self):
        for sent in (b"", b"GET /api/v1/health HTTP/1.1\r\nHost:"):
            with self.subTest(sent=sent):
                with socket.create_connection(("127.0.0.1", self.live.port), timeout=10) as sock:
                    sock.sendall(sent)
                    started = time.monotonic()
                    self.assertEqual(sock.recv(100), b"")  # closed by the server
                    self.assertLess(time.monotonic() - started, 5)


class InternalErrorTest(ServerTest):

    def test_internal_error_is_a_json_500_without_traceback_and_stores_nothing(self):
        stream = fresh()
        self.publish_ok(stream)
        with open_database(self.live.db) as conn:  # break the database under the running server
            conn.execute("CREATE TRIGGER broken BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'broken'); END")
        self.addCleanup(self._restore)
        with self.assertLogs("eventserver", level="ERROR"):
            response = self.client.publish(stream)
        body = self.assert_error(response, 500, starts="Internal Server Error")
        self.assertNotIn("Traceback", body)
        self.assertEqual(len(self.client.read(stream).json), 1)
        self.assertEqual(self.client.request("GET", "/api/v1/health").status, 200)

    def _restore(self):
        with open_database(self.live.db) as conn:
            conn.execute("DROP TRIGGER broken")

    def test_a_request_whose_write_fails_spares_the_others_in_its_commit(self):
        with open_database(self.live.db) as conn:  # events named Poison cannot be stored
            conn.execute("CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.event_name = 'Poison'"
                         " BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
        self.addCleanup(self._drop_trigger)
        poisoned, healthy = fresh(), [fresh() for _ in range(5)]
        store = self.live.store
        with self.assertLogs("eventserver", level="ERROR"):
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                store.writes.lock.acquire()  # let all six queue up for one commit
                try:
                    # the poisoned publish creates its stream (a write), then its event fails at commit
                    futures = [pool.submit(with_client, self.live.port, lambda c: c.publish(poisoned, envelope("Poison")))]
                    futures += [pool.submit(with_client, self.live.port, lambda c, s=s: c.publish(s)) for s in healthy]
                    _wait_for(lambda: store.writes.queued() == 6)
                finally:
                    store.writes.lock.release()
                responses = [f.result(timeout=10) for f in futures]
        self.assert_error(responses[0], 500, starts="Internal Server Error")
        self.assertEqual([r.status for r in responses[1:]], [200] * 5)
        self.assert_stream_absent(poisoned)
        for stream, response in zip(healthy, responses[1:]):
            self.assertEqual([e["eventId"] for e in self.client.read(stream).json], [response.json])

    def _drop_trigger(self):
        with open_database(self.live.db) as conn:
            conn.execute("DROP TRIGGER poison")


class HealthFailureTest(ServerTest):

    def test_health_is_503_when_the_database_does_not_answer(self):
        self.assertEqual(self.client.request("GET", "/api/v1/health").status, 200)
        os.rename(self.live.db, self.live.db + ".moved")  # gone from under the server
        response = self.client.request("GET", "/api/v1/health", auth=False)
        self.assertEqual(response.status, 503, response)
        self.assertEqual(response.json["status"], "ERROR")
        self.assertIn("removed", response.json["error"])
        os.rename(self.live.db + ".moved", self.live.db)
        self.assertEqual(self.client.request("GET", "/api/v1/health").status, 200)


# Limits and the browser (SPEC 6) ##############################################

def _connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _answer_and_close(sock):
    """What the server sends until it closes the connection (b"" if it just closes)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _served_at_once(port):
    """Whether a new client gets its answer within a second (the issue's bar)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/api/v1/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class HeadLimitsTest(ServerTest):
    """A request's head arrives whole within a deadline and a byte budget."""

    flags = ("--head-timeout", "0.3", "--timeout", "5")

    def test_a_head_over_the_budget_is_431_and_closed_before_it_is_all_read(self):
        header = b"X-Filler: " + b"a" * 30000 + b"\r\n"  # 3 of them: within the line limit, over 64 KiB in all
        socks = [_connect(self.live.port) for _ in range(20)]
        try:
            for sock in socks:
                sock.sendall(b"GET /api/v1/streams HTTP/1.1\r\nHost: localhost\r\n" + header * 3)
            self.assertTrue(_served_at_once(self.live.port))
            for sock in socks:  # never finished, yet answered and closed: the budget is for the head in all
                answer = _answer_and_close(sock)
                self.assertTrue(answer.startswith(b"HTTP/1.1 431 "), answer[:100])
                self.assertIn(b"larger than 65536 bytes", answer)
        finally:
            for sock in socks:
                sock.close()

    def test_a_head_within_the_budget_is_served(self):
        response = self.client.request("GET", "/api/v1/health", headers={"X-Filler": "a" * 60000})
        self.assertEqual(response.status, 200)

    def test_heads_dripped_byte_by_byte_are_408_at_the_deadline_and_others_are_served(self):
        head = b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"a" * 1000
        socks = [_connect(self.live.port) for _ in range(100)]
        try:
            answers, sent = {}, 0
            for sock in socks:
                sock.setblocking(False)
            while len(answers) < len(socks) and sent < len(head):
                for sock in socks:  # a byte per connection every 20 ms: never idle for --timeout
                    if sock in answers:
                        continue
                    try:
                        answers[sock] = sock.recv(65536)  # the server answered, or closed
                    except BlockingIOError:
                        with contextlib.suppress(OSError):
                            sock.send(head[sent:sent + 1])
                sent += 1
                if sent == 3:
                    self.assertTrue(_served_at_once(self.live.port))  # while all of them drip
                time.sleep(0.02)
            self.assertEqual(len(answers), len(socks), "connections still held past the head deadline")
            self.assertEqual({answer[:13] for answer in answers.values()}, {b"HTTP/1.1 408 "})
        finally:
            for sock in socks:
                sock.close()

    def test_an_idle_keep_alive_connection_waits_for_timeout_not_the_head_deadline(self):
        self.assertEqual(self.client.request("GET", "/api/v1/health").status, 200)
        sock = self.client.conn.sock
        time.sleep(0.4)  # longer than --head-timeout: the next head has not begun, so it is not late
        self.assertEqual(self.client.request("GET", "/api/v1/health").status, 200)
        self.assertIs(self.client.conn.sock, sock)


class ConnectionCapTest(ServerTest):

    flags = ("--max-connections", "5")

    def test_past_the_cap_a_new_connection_gets_503_at_once_and_is_served_when_one_closes(self):
        held = [_connect(self.live.port) for _ in range(5)]
        try:
            _wait_for(lambda: self.live.server._connections == 5)
            with self.assertLogs("eventserver", "WARNING") as logs, _connect(self.live.port) as sock:
                sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                answer = _answer_and_close(sock)
            self.assertIn("new ones get 503", logs.output[0])
            self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
            self.assertIn(b"X-Content-Type-Options: nosniff", answer)
            self.assertIn(b'"Service Unavailable - the server has 5 connections, its most: try again"', answer)
            held.pop().close()
            _wait_for(lambda: self.live.server._connections == 4)
            self.assertTrue(_served_at_once(self.live.port))
        finally:
            for sock in held:
                sock.close()


class DescriptorLimitTest(unittest.TestCase):
    """Under `prlimit --nofile=256`, more connections than descriptors."""

    def test_out_of_descriptors_the_accept_loop_waits_and_serves_again_once_they_close(self):
        process = _listening_process(self, prefix=["prlimit", "--nofile=256"])
        socks = []
        try:
            for _ in range(300):  # idle: each holds a descriptor (and a thread) for --timeout
                socks.append(_connect(process.port))
            _wait_for(lambda: len(os.listdir(f"/proc/{process.proc.pid}/fd")) >= 250)
            started, cpu = time.monotonic(), _cpu_seconds(process.proc.pid)
            time.sleep(0.5)  # the accept loop meets EMFILE all along
            busy = (_cpu_seconds(process.proc.pid) - cpu) / (time.monotonic() - started)
            self.assertLess(busy, 0.5, "the accept loop spins on EMFILE")
        finally:
            for sock in socks:
                sock.close()
        _wait_for(lambda: _served_at_once(process.port))


def _listening_process(test, env=None, prefix=()):
    """eventserver.py as a subprocess on a database of its own, listening;
    stopped and removed when the test ends."""
    tmp = tempfile.TemporaryDirectory()
    test.addCleanup(tmp.cleanup)
    process = Process("--port", "0", "--user", USER, "--password", PASSWORD, "--quiet",
                      db=os.path.join(tmp.name, "events.db"), env=env, prefix=prefix)
    test.addCleanup(process.stop)
    process.wait_listening()
    return process


def _cpu_seconds(pid):
    """CPU time (user + system) a process has used, from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RequestLineTest(ServerTest):

    def raw(self, data):
        with _connect(self.live.port) as sock:
            sock.sendall(data)
            return _answer_and_close(sock)

    def test_only_a_space_separates_the_parts_of_the_request_line(self):
        for line in (b"GET\t/api/v1/health\tHTTP/1.1", b"GET\xa0/api/v1/health\xa0HTTP/1.1",
                     b"GET\x0b/api/v1/health\x0cHTTP/1.1", b"GET  /api/v1/health HTTP/1.1",
                     b"GET /api/v1/health HTTP/1.1 ", b"GET /api/v1/\x1b[31mhealth HTTP/1.1"):
            with self.subTest(line=line):
                answer = self.raw(line + b"\r\nHost: localhost\r\n\r\n")
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        answer = self.raw(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)

    def test_http_1_1_without_host_is_400_and_http_1_0_without_host_is_served(self):
        answer = self.raw(b"GET /api/v1/health HTTP/1.1\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        self.assertIn(b"Host header", answer)
        answer = self.raw(b"GET /api/v1/health HTTP/1.0\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)

    def test_absolute_form_targets_are_accepted_and_their_host_is_checked(self):
        port = self.live.port
        answer = self.raw(f"GET http://localhost:{port}/api/v1/health HTTP/1.1\r\nHost: localhost\r\n"
                          f"Connection: close\r\n\r\n".encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        answer = self.raw(f"GET HTTP://127.0.0.1:{port}?x=1 HTTP/1.1\r\nHost: localhost\r\n"
                          f"Authorization: {basic()}\r\nConnection: close\r\n\r\n".encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)  # the dashboard, at "/"
        answer = self.raw(b"GET http://evil.example/api/v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer)

    def test_expect_100_continue_on_http_1_0_gets_no_100(self):
        body = json.dumps(envelope()).encode()
        head = raw_publish(fresh(), f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n")
        answer = self.raw(head.replace(" HTTP/1.1\r\n", " HTTP/1.0\r\n", 1).encode() + body)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)  # no "100 Continue" first

    def test_every_answer_says_nosniff(self):
        for method, path, auth in (("GET", "/api/v1/streams", True), ("GET", "/api/v1/health", False),
                                   ("GET", "/api/v1/nope", True), ("GET", "/api/v1/streams", False),
                                   ("GET", "/", True)):
            with self.subTest(path=path, auth=auth):
                response = self.client.request(method, path, auth=auth)
                self.assertEqual(response.headers["X-Content-Type-Options"], "nosniff")
        answer = self.raw(b"GET\t/ HTTP/1.1\r\n\r\n")
        self.assertIn(b"\r\nX-Content-Type-Options: nosniff\r\n", answer)

    def test_the_dashboard_may_not_be_framed(self):
        response = self.client.request("GET", "/")
        self.assertEqual(response.headers["X-Frame-Options"], "DENY")
        self.assertIn("frame-ancestors 'none'", response.headers["Content-Security-Policy"])


class CrossOriginTest(ServerTest):
    """A browser's request from a page of another site changes nothing;
    a page of another site under a name pointed at loopback reads nothing."""

    FORM = {"Content-Type": "application/x-www-form-urlencoded"}

    def setUp(self):
        super().setUp()
        self.stream = fresh()
        for _ in range(6):
            self.publish_ok(self.stream)
        self.seek_to(5)

    def seek_to(self, offset, **headers):
        return self.client.request("POST", f"/api/v1/{quote(self.stream)}/victim/OrderPlaced/change/{offset}",
                                   "", {**self.FORM, **headers})

    def offset(self):
        rows = self.client.request("GET", f"/api/v1/consumers/{quote(self.stream)}").json
        return [row["offset"] for row in rows if row["consumerId"] == "victim"][0]

    def test_a_cross_site_form_post_cannot_seek(self):
        own = f"http://127.0.0.1:{self.live.port}"
        for headers in ({"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site", "Referer": "http://evil.example/"},
                        {"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"},
                        {"Origin": "http://127.0.0.1:1", "Sec-Fetch-Site": "same-site"},  # another local port
                        {"Origin": "https://127.0.0.1"}, {"Origin": own + ".evil.example"}):
            with self.subTest(headers=headers):
                response = self.seek_to(0, **{k.replace("_", "-"): v for k, v in headers.items()})
                self.assert_error(response, 403, starts="Forbidden - cross-origin request")
                self.assertEqual(self.offset(), 5)
        self.assertEqual(self.seek_to(4, Origin=own, **{"Sec-Fetch-Site": "same-origin"}).status, 200)
        self.assertEqual(self.offset(), 4)
        self.assertEqual(self.seek_to(3).status, 200)  # no Origin: curl, SDKs
        self.assertEqual(self.offset(), 3)

    def test_a_cross_site_ack_or_publish_is_refused(self):
        event = self.client.read(self.stream, consumer="victim").json[0]["eventId"]
        response = self.client.request("POST", f"/api/v1/streams/{quote(self.stream)}/events/{event}", "action=ACK",
                                       {**self.FORM, "X-Consumer-ID": "victim", "Origin": "http://evil.example"})
        self.assert_error(response, 403)
        self.assertEqual(self.offset(), 5)
        response = self.client.publish(self.stream, headers={"Sec-Fetch-Site": "cross-site"})
        self.assert_error(response, 403)
        self.assertEqual(len(self.client.read(self.stream, limit=100, consumer="new").json), 6)

    def test_reads_from_another_origin_are_answered(self):
        response = self.client.request("GET", "/api/v1/streams", headers={"Origin": "http://evil.example",
                                                                         "Sec-Fetch-Site": "cross-site"})
        self.assertEqual(response.status, 200)

    def test_a_rebinding_host_is_403_and_loopback_names_are_served(self):
        port = self.live.port
        for host in ("evil.example", f"evil.example:{port}", "attacker.test:80", "127.0.0.1.evil.example"):
            with self.subTest(host=host):
                self.assert_error(self.client.request("GET", "/api/v1/streams", headers={"Host": host}), 403,
                                  starts="Forbidden - Host")
                self.assertEqual(self.client.request("GET", "/api/v1/health", headers={"Host": host}).status, 403)
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost", "LOCALHOST.",
                     "127.0.0.2:1", "app.localhost"):
            with self.subTest(host=host):
                self.assertEqual(self.client.request("GET", "/api/v1/streams", headers={"Host": host}).status, 200)


class AllowedHostsTest(ServerTest):

    flags = ("--allowed-hosts", "events.test, Other.Test")

    def test_allowed_hosts_are_answered_besides_loopback(self):
        for host, status in (("events.test:8000", 200), ("other.test", 200), ("localhost", 200),
                             ("evil.example", 403)):
            with self.subTest(host=host):
                self.assertEqual(self.client.request("GET", "/api/v1/streams", headers={"Host": host}).status, status)

    def test_hosts_are_checked_on_other_addresses_only_when_named(self):
        def config(*flags):
            return eventserver.parse_config(["--user", USER, "--password", PASSWORD, "--host", "0.0.0.0", *flags], {})

        open_app = eventserver.App(config(), self.live.store)  # serving a network, no names given: any Host
        open_app.check_host("events-server:8000")
        named = eventserver.App(config("--allowed-hosts", "events.test"), self.live.store)
        named.check_host("events.test:8000")
        with self.assertRaises(eventserver.HTTPError) as refused:
            named.check_host("events-server:8000")
        self.assertEqual(refused.exception.status, 403)


class AnswerLimitsTest(ServerTest):
    """Answers are bounded: a read by --max-answer bytes, lists by --max-list items."""

    flags = ("--max-answer", "20000")

    def read_all(self, stream, limit=100):
        """Every event, as a consumer gets them: reads of at most limit, each acknowledged."""
        counts, ids = [], []
        while True:
            response = self.client.read(stream, "Big", limit=limit, consumer="reader")
            self.assertEqual(response.status, 200, response)
            if not response.json:
                return counts, ids
            counts.append(len(response.json))
            self.assertLessEqual(len(response.body), 20000 if len(response.json) > 1 else 40000)
            for event in response.json:
                ids.append(event["eventId"])
                self.assertEqual(self.client.ack(stream, event["eventId"], consumer="reader").status, 200)

    def test_a_read_of_large_events_returns_fewer_events_never_an_error(self):
        stream = fresh()
        sizes = [8000] * 5 + [30000] + [100] * 50  # 30000: alone over the budget, still read
        published = [self.publish_ok(stream, envelope("Big", payload={"blob": "x" * size})) for size in sizes]
        counts, ids = self.read_all(stream)
        self.assertEqual(ids, published)  # every event, in order, none twice
        self.assertEqual(counts, [2, 2, 1, 1, 50])

    def test_events_stored_before_a_restart_are_bounded_too(self):
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "events.db")
            store = eventserver.Store(path)
            big = eventserver.Envelope(envelope("Big", payload={"blob": "x" * 8000}))
            store.publish("s", "p", [big] * 10)
            store.close()
            store = eventserver.Store(path)  # the sizes of those events are not known in memory now
            try:
                self.assertEqual(json.loads(store.read("s", "Big", "c", 10, 20000)).__len__(), 2)
                self.assertEqual(len(json.loads(store.read("s", "Big", "c", 10, 10 ** 6))), 10)
            finally:
                store.close()


class ListLimitsTest(FreshServerTest):

    flags = ("--max-list", "3", "--max-answer", "700", "--allow-reset")

    def test_lists_hold_at_most_max_list_items(self):
        for name in ("a", "b", "c", "d"):
            self.publish_ok(name, [envelope("A")] * 5)
        for consumer in ("w", "x", "y", "z"):
            self.assertEqual(self.seek("a", consumer, "A", 5).status, 200)
        self.assertEqual([s["streamName"] for s in self.get_json("/streams")], ["a", "b", "c"])
        self.assertEqual([s["streamName"] for s in self.get_json("/stats/stream-data")], ["a", "b", "c"])
        self.assertEqual([c["consumerId"] for c in self.get_json("/consumers/a")], ["w", "x", "y"])
        events = self.get_json("/event-period-search/a?period=1month")
        self.assertEqual(len(events), 3)
        self.assertEqual([e["consumerIds"] for e in events], [["w", "x", "y"]] * 3)

    def test_period_search_with_thousands_of_consumers_is_capped(self):
        self.publish_ok("a", [envelope("A")] * 2)
        self.assertEqual(self.seek("a", "behind", "A", 0).status, 200)
        consumers = [f"consumer-{n:04d}" for n in range(2000)]
        with open_database(self.live.db) as conn:  # as 2000 seeks would, faster
            stream_id = conn.execute("SELECT stream_id FROM streams WHERE name = 'a'").fetchone()[0]
            conn.executemany("INSERT INTO consumer_offsets VALUES (?, 'A', ?, 2, '2020-01-01T00:00:00.000000+00:00')",
                             [(stream_id, consumer) for consumer in consumers])
        events = self.get_json("/event-period-search/a?period=1month")
        self.assertEqual([e["consumerIds"] for e in events], [consumers[:3]] * 2)

    def test_lists_hold_at_most_max_answer_bytes(self):
        names = [letter * 200 for letter in "abc"]
        for name in names:
            self.publish_ok(name)
        response = self.client.request("GET", "/api/v1/streams")
        self.assertLessEqual(len(response.body), 700)
        self.assertEqual([s["streamName"] for s in response.json], names[:2])


class StorageFaultTest(NewServerTest):
    """Storage faults are reported to writers, never hidden behind a 200."""

    def test_writes_are_503_once_the_database_file_is_removed(self):
        stream = fresh()
        event = self.publish_ok(stream)
        os.remove(self.live.db)
        self.assert_error(self.client.publish(stream), 503,
                          f"Service Unavailable - the database file {self.live.db} was removed: writes are refused "
                          "until a restart, nothing was stored")
        for response in (self.client.ack(stream, event),
                         self.client.request("POST", f"/api/v1/{stream}/c/OrderPlaced/change/1")):
            self.assert_error(response, 503, starts=f"Service Unavailable - the database file {self.live.db} was")
        health = self.client.request("GET", "/api/v1/health")
        self.assertEqual((health.status, health.json["status"]), (503, "ERROR"))
        self.assertIn("was removed", health.json["error"])

    def test_a_write_committed_as_the_file_is_removed_is_not_acknowledged(self):
        writer = self.live.store._writer  # removed in the middle of the commit, by a trigger of its INSERT
        writer.create_function("remove_database", 0, lambda: os.remove(self.live.db))
        writer.execute("CREATE TEMP TRIGGER remove_database AFTER INSERT ON events BEGIN SELECT remove_database(); END")
        self.assert_error(self.client.publish(fresh()), 503,
                          f"Service Unavailable - the database file {self.live.db} was removed while this write "
                          "was committed: it may be lost")

    def test_a_full_disk_is_507_and_writes_resume_once_space_is_freed(self):
        stream = fresh()
        self.publish_ok(stream)
        writer = self.live.store._writer  # the file may not grow: what a full disk does to SQLite
        pages = writer.execute("PRAGMA page_count").fetchone()[0]
        writer.execute(f"PRAGMA max_page_count = {pages}")
        big = envelope(payload={"blob": "x" * 50000})
        with self.assertLogs("eventserver", "ERROR"):
            self.assert_error(self.client.publish(stream, big), 507, starts="Insufficient Storage - the disk is full")
        health = self.client.request("GET", "/api/v1/health")
        self.assertEqual(health.status, 503)
        self.assertIn("is full", health.json["error"])
        self.assertEqual(len(self.client.read(stream).json), 1)  # nothing stored
        writer.execute("PRAGMA max_page_count = 1073741823")
        self.publish_ok(stream, big)
        self.assertEqual(self.client.request("GET", "/api/v1/health").status, 200)


def _python_for(prefix):
    """This Python, if it starts under prefix (a user without the rights of
    its owner: a pyenv Python in a private home cannot), else the system's."""
    if not prefix or subprocess.run([*prefix, sys.executable, "-c", "import sqlite3"],
                                    capture_output=True).returncode == 0:
        return sys.executable
    return shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or sys.executable


class StorageFaultProcessTest(unittest.TestCase):

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.folder = tmp.name
        self.db = os.path.join(tmp.name, "events.db")

    def start(self, prefix=()):
        process = Process("--port", "0", "--user", USER, "--password", PASSWORD, "--quiet", db=self.db, prefix=prefix)
        self.addCleanup(process.stop)
        return process

    def test_writes_are_503_once_the_wal_is_removed_and_what_was_acknowledged_survives_kill_9(self):
        process = self.start()
        process.wait_listening()
        client = Client(process.port)
        self.addCleanup(client.close)
        acknowledged = [client.publish("s").json for _ in range(10)]
        os.remove(self.db + "-wal")
        response = client.publish("s")
        self.assertEqual(response.status, 503, response)
        self.assertIn("WAL file", response.json)
        self.assertEqual(client.request("GET", "/api/v1/health").status, 503)
        process.kill()
        store = eventserver.Store(self.db)
        try:
            stored = json.loads(store.read("s", "OrderPlaced", "c", 100, 1 << 20))
            self.assertEqual([event["eventId"] for event in stored], acknowledged)
        finally:
            store.close()

    def test_a_read_only_database_is_said_at_start_and_in_health(self):
        store = eventserver.Store(self.db)
        store.publish("s", "p", [eventserver.Envelope(envelope())])
        store.close()
        os.chmod(self.db, 0o444)
        os.chmod(self.folder, 0o777)  # the -wal and -shm files may still be made beside it
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        process = Process("--port", "0", "--user", USER, "--password", PASSWORD, "--quiet", db=self.db, prefix=as_nobody,
                          python=_python_for(as_nobody))
        self.addCleanup(process.stop)
        process.wait_listening()
        client = Client(process.port)
        self.addCleanup(client.close)
        health = client.request("GET", "/api/v1/health")
        self.assertEqual(health.status, 503)
        self.assertIn("is read-only", health.json["error"])
        self.assertEqual(len(client.read("s").json), 1)  # reads are served
        response = client.publish("s", producer="p")
        self.assertEqual((response.status, response.json),
                         (503, "Service Unavailable - the database is read-only: nothing was stored"))
        process.proc.terminate()
        _, _, err = process.finish()
        self.assertIn(f"eventserver: the database {self.db} is read-only", err)


class ExactNumbersTest(ServerTest):

    NUMBERS = ("12345678901234567.89", "3.141592653589793238462643383279", "1e5", "1E-7", "1.50", "2.5e-400",
               "-0.0", "0.1", "123456789012345678901234567890", "-17")

    def test_numbers_are_kept_exactly_as_sent(self):
        stream = fresh()
        payload = "{" + ",".join(f'"n{index}":{number}' for index, number in enumerate(self.NUMBERS)) + "}"
        body = '{"event": {"name": "Measured"}, "payload": ' + payload.replace(",", ", ") + "}"
        response = self.client.publish(stream, body, headers={"Content-Type": "application/json"})  # the text as sent
        self.assertEqual(response.status, 200, response)
        event_id = response.json
        stored = self.client.request("GET", f"/api/v1/events/{event_id}/payload").body.decode()
        self.assertEqual(stored, '{"event":{"name":"Measured"},"payload":' + payload + "}")
        read = self.client.read(stream, "Measured").body.decode()
        self.assertEqual(read, f'[{{"eventId":"{event_id}","event":{{"name":"Measured"}},"payload":{payload}}}]')
        found = self.client.request("GET", "/api/v1/search?_q=" + quote("12345678901234567.89")).json
        self.assertEqual([r["search_result"]["url"] for r in found],
                         [f"/admin/streams/{quote(stream)}/events?eventId={event_id}"])

    def test_a_string_like_the_stored_form_of_a_number_stays_a_string(self):
        stream = fresh()
        body = {"event": {"name": "S"}, "payload": {"s": "\u0000a1b2c3d4e5f6a7b8:1.5", "n": 1e5}}
        event_id = self.publish_ok(stream, body)
        stored = self.client.request("GET", f"/api/v1/events/{event_id}/payload").json
        self.assertEqual(stored["payload"], {"s": "\u0000a1b2c3d4e5f6a7b8:1.5", "n": 100000.0})


class LogEscapesTest(unittest.TestCase):

    def test_log_lines_are_written_with_control_characters_escaped(self):
        lines, written = eventserver.LogLines(), io.StringIO()
        stderr, sys.stderr = sys.stderr, written
        try:
            lines.write("GET /\x1b[2J\x9b\ttab\n")
            lines.flush(timeout=5)
        finally:
            sys.stderr = stderr
        self.assertEqual(written.getvalue(), "GET /\\x1b[2J\\x9b\\x09tab\n")

    def test_control_characters_from_requests_reach_the_log_escaped(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        process = Process("--port", "0", "--user", USER, "--password", PASSWORD, db=os.path.join(tmp.name, "e.db"))
        self.addCleanup(process.stop)
        process.wait_listening()
        for line in (b"GET /api/v1/health\x1b[31mRED\x1b[0m\x07 HTTP/1.1", b"GET\t/\x9b2J HTTP/1.1"):
            with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
                sock.sendall(line + b"\r\nHost: localhost\r\n\r\n")
                self.assertTrue(_answer_and_close(sock).startswith(b"HTTP/1.1 400 "))
        process.proc.terminate()
        _, _, err = process.finish()
        self.assertNotRegex(err, "[\x00-\x09\x0b-\x1f\x7f-\x9f]")
        self.assertIn(r"\x1b[31mRED\x1b[0m\x07", err)
        self.assertIn(r"\x9b2J", err)


class StreamInQueryTest(ServerTest):
    """A browser cannot send a path segment "." or ".." (nor %2E): the
    dashboard names the stream in the query instead."""

    def test_streams_named_dot_and_dot_dot_are_read_with_the_name_in_the_query(self):
        for name in (".", ".."):
            with self.subTest(name=name):
                self.assertEqual(self.client.request("POST", f"/api/v1/streams/{name}/events", envelope(name + "E"),
                                                     {"X-Producer-ID": "p"}).status, 200)
                self.assertEqual(self.client.request("POST", f"/api/v1/{name}/c/{name}E/change/1").status, 200)
                consumers = self.client.request("GET", f"/api/v1/consumers?stream={quote(name)}").json
                self.assertEqual([(c["consumerId"], c["eventName"]) for c in consumers], [("c", name + "E")])
                for method in ("GET", "POST"):
                    events = self.client.request(method, f"/api/v1/event-period-search?stream={quote(name)}&period=1month")
                    self.assertEqual([e["eventName"] for e in events.json], [name + "E"])
        self.assert_error(self.client.request("GET", "/api/v1/consumers"), 400, "Bad Request - stream name is missing")


# The Go server's other endpoints (SPEC 4) #####################################

class ParityAuthTest(ServerTest):

    def test_every_parity_endpoint_needs_auth_and_knows_its_methods(self):
        event_id = uuid.uuid4()
        for method, path in [("GET", "/api/v1/metrics"), ("GET", "/api/v1/consumers/s"),
                             ("GET", "/api/v1/stats/events-per-stream"), ("GET", "/api/v1/stats/stream-data"),
                             ("GET", "/api/v1/stats/events-current-month"), ("GET", "/api/v1/search?_q=x"),
                             ("POST", "/api/v1/search?_q=x"), ("GET", "/api/v1/event-period-search/s?period=6hour"),
                             ("POST", "/api/v1/event-period-search/s?period=6hour"),
                             ("POST", "/api/v1/s/c/e/change/0"), ("GET", f"/api/v1/events/{event_id}/payload")]:
            with self.subTest(method=method, path=path):
                self.assert_error(self.client.request(method, path, auth=False), 401, "Unauthorized")
                self.assertEqual(self.client.request("DELETE", path, auth=False).status, 405)


class MetricsTest(FreshServerTest):

    def test_metrics_empty_database(self):
        response = self.get("/metrics")
        self.assertEqual(response.status, 200)
        self.assertTrue(response.headers["Content-Type"].startswith("text/plain; version=0.0.4"))
        text = response.body.decode()
        for family, kind in [("streams_total", "gauge"), ("events_total", "counter"), ("consumers_total", "gauge"),
                             ("consumer_offset", "gauge"), ("consumer_lag", "gauge")]:
            self.assertIn(f"# HELP {family} ", text)
            self.assertIn(f"# TYPE {family} {kind}\n", text)
        self.assertIn("\nstreams_total 0\n", text)
        self.assertTrue(text.endswith("\n"))

    def test_metrics_values_and_escaped_labels(self):
        weird = 'we"ird\\name'
        self.publish_ok("orders", [envelope("A"), envelope("A"), envelope("B")], producer="p1")
        self.publish_ok(weird, envelope('Na"me'), producer='pro"d\\')
        ids = [e["eventId"] for e in self.client.read("orders", "A", consumer="c1").json]
        self.assertEqual(self.client.ack("orders", ids[0], consumer="c1").status, 200)
        self.assertEqual(self.seek(weird, 'c"2\\', 'Na"me', 1).status, 200)
        samples = _parse_prometheus(self.get("/metrics").body.decode())
        self.assertEqual(samples[("streams_total", ())], 2)
        self.assertEqual(samples[("events_total", (("producerId", "p1"), ("stream", "orders")))], 3)
        self.assertEqual(samples[("events_total", (("producerId", 'pro"d\\'), ("stream", weird)))], 1)
        self.assertEqual(samples[("consumers_total", (("stream", "orders"),))], 1)
        self.assertEqual(samples[("consumers_total", (("stream", weird),))], 1)
        key = (("stream", "orders"), ("consumerId", "c1"), ("eventName", "A"))
        self.assertEqual(samples[("consumer_offset", key)], 1)
        self.assertEqual(samples[("consumer_lag", key)], 1)
        key = (("stream", weird), ("consumerId", 'c"2\\'), ("eventName", 'Na"me'))
        self.assertEqual(samples[("consumer_offset", key)], 1)
        self.assertEqual(samples[("consumer_lag", key)], 0)
        self.assertEqual(samples[("log_lines_dropped_total", ())], eventserver.LOG_LINES.dropped)
        self.assertEqual(samples[("long_polls_waiting", ())], 0)
        self.assertEqual(len(samples), 11)

    def test_metrics_count_the_long_polls_waiting(self):
        self.publish_ok("orders", envelope("A"))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            polls = [pool.submit(with_client, self.live.port, lambda c: c.read("orders", "B", extra="&wait=20"))
                     for _ in range(2)]
            _wait_for(lambda: self.live.store.waiters.count() == 2)
            samples = _parse_prometheus(self.get("/metrics").body.decode())
            self.assertEqual(samples[("long_polls_waiting", ())], 2)
            self.publish_ok("orders", envelope("B"))
            self.assertEqual([len(poll.result(timeout=10).json) for poll in polls], [1, 1])
        samples = _parse_prometheus(self.get("/metrics").body.decode())
        self.assertEqual(samples[("long_polls_waiting", ())], 0)


def _parse_prometheus(text):
    """{(family, ((label, value), ...)): number}, undoing the format's escapes strictly."""
    samples = {}
    line_pattern = re.compile(r'([a-z_]+)(?:\{(.*)\})? (-?\d+)\Z')
    label_pattern = re.compile(r'([A-Za-z_]+)="((?:[^"\\\n]|\\[\\"n])*)"(,|\Z)')
    for line in text.split("\n"):
        if not line or line.startswith("#"):
            continue
        match = line_pattern.match(line)
        assert match, line
        family, label_text, value = match.groups()
        labels, position = [], 0
        while label_text and position < len(label_text):
            label = label_pattern.match(label_text, position)
            assert label, (line, position)
            raw = label.group(2)
            unescaped = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), raw)
            labels.append((label.group(1), unescaped))
            position = label.end()
        samples[(family, tuple(labels))] = int(value)
    return samples


class ConsumersTest(FreshServerTest):

    def test_consumers_lists_offsets_ordered_with_percentages(self):
        self.publish_ok("orders", [envelope("B")] * 3 + [envelope("A")] * 7)
        before = eventserver.utc_now()
        for consumer, name, offset in [("zed", "A", 7), ("amy", "A", 1), ("bob", "B", 2), ("amy", "B", 0)]:
            self.assertEqual(self.seek("orders", consumer, name, offset).status, 200)
        rows = self.get_json("/consumers/orders")
        self.assertEqual([(r["eventName"], r["consumerId"], r["offset"], r["consumedPercentage"], r["behind"])
                          for r in rows],
                         [("A", "amy", 1, 14.29, 6), ("A", "zed", 7, 100, 0),
                          ("B", "amy", 0, 0, 3), ("B", "bob", 2, 66.67, 1)])
        self.assertEqual(list(rows[0]), ["consumerId", "offset", "movedAt", "eventName",
                                         "consumedPercentage", "behind"])
        for row in rows:
            self.assertRegex(row["movedAt"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")
            self.assertGreaterEqual(row["movedAt"], before)

    def test_consumers_percentage_rounds_half_away_from_zero(self):
        self.assertEqual(eventserver.percentage(1, 8), 12.5)
        self.assertEqual(eventserver.percentage(1, 16), 6.25)
        self.assertEqual(eventserver.percentage(1, 32), 3.13)  # 3.125 rounds up, not to even
        self.assertEqual(eventserver.percentage(5, 8000), 0.06)  # 0.0625
        self.assertEqual(eventserver.percentage(2, 3), 66.67)
        self.assertEqual(eventserver.percentage(0, 0), 0)
        self.publish_ok("s", [envelope("A")] * 32)
        self.assertEqual(self.seek("s", "c", "A", 1).status, 200)
        self.assertEqual(self.get_json("/consumers/s")[0]["consumedPercentage"], 3.13)

    def test_consumers_empty_and_unknown_streams(self):
        self.publish_ok("quiet")
        self.assertEqual(self.get_json("/consumers/quiet"), [])
        self.assert_error(self.get("/consumers/nope"), 404, "Not Found - stream nope not found")
        self.assert_error(self.get("/consumers/a%01b"), 400, starts="Bad Request - ")


class StatsTest(FreshServerTest):

    def test_stats_empty_database(self):
        self.assertEqual(self.get_json("/stats/events-per-stream"), [])
        self.assertEqual(self.get_json("/stats/stream-data"), [])
        days = self.get_json("/stats/events-current-month")
        self.assertTrue(all(d["eventCount"] == 0 and d["progress"] == "" for d in days))

    def test_stats_events_per_stream_top_ten_most_first(self):
        for index in range(12):
            self.publish_ok(f"s{index:02d}", [envelope("A")] * (index + 1) + [envelope("B")])
        rows = self.get_json("/stats/events-per-stream")
        self.assertEqual(rows, [{"label": f"s{i:02d}", "value": i + 2} for i in range(11, 1, -1)])

    def test_stats_events_per_stream_breaks_ties_by_name(self):
        for stream in ("b", "c", "a"):
            self.publish_ok(stream, envelope("A"))
        self.assertEqual([r["label"] for r in self.get_json("/stats/events-per-stream")], ["a", "b", "c"])

    def test_stats_stream_data_counts_consumed_and_ranking(self):
        self.publish_ok("big", [envelope("A")] * 10)
        self.publish_ok("mid", [envelope("A")] * 5 + [envelope("B")])
        self.publish_ok("tiny", envelope("A"))
        self.assertEqual(self.seek("big", "c1", "A", 4).status, 200)
        self.assertEqual(self.seek("big", "c2", "A", 10).status, 200)
        self.assertEqual(self.seek("mid", "c1", "B", 1).status, 200)
        rows = self.get_json("/stats/stream-data")
        self.assertEqual(rows, [
            {"streamName": "big", "eventsCount": 10, "consumedEvents": 14, "ranking": "✭✭✭✭✭"},
            {"streamName": "mid", "eventsCount": 6, "consumedEvents": 1, "ranking": "✭✭✭"},
            {"streamName": "tiny", "eventsCount": 1, "consumedEvents": 0, "ranking": "✭"},
        ])

    def test_stats_events_current_month_one_row_per_day_with_progress(self):
        today = eventserver.utc_now()[:10]
        year, month, today_number = int(today[:4]), int(today[5:7]), int(today[8:])
        days_in_month = calendar.monthrange(year, month)[1]
        self.publish_ok("s", [envelope("A")] * 3)
        # other days of the month, as the running server would have counted them
        other_days = [day for day in range(1, days_in_month + 1) if day != today_number][:3]
        counts = dict(zip(other_days, (5, 2, 2)))
        counts[today_number] = 3
        with open_database(self.live.db) as conn:
            conn.executemany("INSERT INTO daily_counts (day, count) VALUES (?, ?)",
                             [(f"{today[:8]}{day:02d}", count) for day, count in counts.items() if day != today_number]
                             + [(f"{year - 1}-{month:02d}-{today_number:02d}", 99)])
        rows = self.get_json("/stats/events-current-month")
        self.assertEqual([r["date"] for r in rows], [f"{today[:8]}{day:02d}" for day in range(1, days_in_month + 1)])
        self.assertEqual([r["eventCount"] for r in rows], [counts.get(day, 0) for day in range(1, days_in_month + 1)])
        self.assertEqual(rows[0]["progress"], "")
        for before, row in zip(rows, rows[1:]):
            change = row["eventCount"] - before["eventCount"]
            self.assertEqual(row["progress"], "" if change == 0 else f"{change:+d}")
        self.assertTrue(any(r["progress"].startswith("-") for r in rows))


class SearchTest(FreshServerTest):

    def results(self, term, method="GET"):
        response = self.client.request(method, "/api/v1/search?" + urllib.parse.urlencode({"_q": term}))
        self.assertEqual(response.status, 200, response)
        return [(r["search_result"]["category"], r["search_result"]["label"], r["search_result"]["url"])
                for r in response.json]

    def test_search_finds_events_streams_and_consumers(self):
        order_id = self.publish_ok("Orders EU", envelope("OrderPlaced", payload={"sku": "XK-42"}), producer="shop-1")
        self.publish_ok("Orders EU", envelope("OrderShipped"), producer="shop-1")
        self.publish_ok("billing", envelope("Invoice", system={"note": "xk-42 in system only"}), producer="acct")
        self.assertEqual(self.client.ack("Orders EU", order_id, consumer="mailer").status, 200)
        self.assertEqual(self.results("order"), [
            ("events", "Orders EU/OrderPlaced", "/admin/streams/Orders%20EU/events?eventName=OrderPlaced"),
            ("events", "Orders EU/OrderShipped", "/admin/streams/Orders%20EU/events?eventName=OrderShipped"),
            ("streams", "Orders EU", "/admin/streams/Orders%20EU/events"),
        ])
        self.assertEqual(self.results("xk-42"), [
            ("events", "Orders EU/OrderPlaced", f"/admin/streams/Orders%20EU/events?eventId={order_id}")])
        self.assertEqual(self.results(order_id), [
            ("events", "Orders EU/OrderPlaced", f"/admin/streams/Orders%20EU/events?eventId={order_id}")])
        self.assertEqual(self.results("shop-1"), [("streams", "Orders EU", "/admin/streams?producerId=shop-1")])
        self.assertEqual(self.results("SHOP-1"), [])  # equals is exact
        self.assertEqual(self.results("mailer", "POST"), [
            ("consumers", "Orders EU/mailer", "/admin/streams/Orders%20EU/consumers?consumerId=mailer")])
        self.assertEqual(self.results("nothing-like-it"), [])

    def test_search_looks_in_the_payload_alone_wherever_it_stands(self):
        first = self.publish_ok("s", {"payload": {"k": "first-payload"}, "event": {"name": "A"}, "note": "after-it"})
        middle = self.publish_ok("s", {"event": {"name": "B"}, "payload": {"k": "mid-payload"}, "x": "tail-field"})
        self.assertEqual(self.results("first-payload"), [("events", "s/A", f"/admin/streams/s/events?eventId={first}")])
        self.assertEqual(self.results("mid-payload"), [("events", "s/B", f"/admin/streams/s/events?eventId={middle}")])
        for outside in ("after-it", "tail-field", '"payload":{', '"mid-payload"},"x"', '{"k":"first-payload"},'):
            self.assertEqual(self.results(outside), [], outside)
        self.assertEqual(self.results('{"k":"mid-payload"}'), [("events", "s/B", f"/admin/streams/s/events?eventId={middle}")])

    def test_search_contains_folds_ascii_case_only_and_wildcards_are_literal(self):
        self.publish_ok("ÄRGER-stream", envelope("Ünïcode"))
        self.publish_ok("per%cent_x", envelope("A"))
        self.assertEqual([label for _, label, _ in self.results("stream")], ["ÄRGER-stream"])
        self.assertEqual([label for _, label, _ in self.results("ärger")], [])  # not ASCII: case matters
        self.assertEqual([label for _, label, _ in self.results("%c")], ["per%cent_x"])
        self.assertEqual([label for _, label, _ in self.results("t_x")], ["per%cent_x"])
        self.assertEqual(self.results("_"), [("streams", "per%cent_x", "/admin/streams/per%25cent_x/events")])

    def test_search_caps_each_category_at_100(self):
        self.publish_ok("many", [envelope(f"Name{i:03d}", payload={"k": "needle"}) for i in range(120)])
        found = self.results("needle")
        self.assertEqual(len(found), 100)
        self.assertEqual(len(self.results("name")), 100)

    def test_search_caps_streams_and_consumers_at_100_and_lists_a_stream_once(self):
        for index in range(105):
            stream = f"needle-{index:03d}"
            self.publish_ok(stream, envelope("A"), producer="needle")
            self.assertEqual(self.seek(stream, "needle", "A", 1).status, 200)
        found = self.results("needle")
        self.assertEqual(sum(1 for category, _, _ in found if category == "streams"), 100)
        self.assertEqual(sum(1 for category, _, _ in found if category == "consumers"), 100)
        self.assertEqual(len({label for category, label, _ in found if category == "streams"}), 100)
        self.assertTrue(all(url.endswith("/events") for category, _, url in found if category == "streams"))

    def test_search_escapes_url_parts_and_ignores_nul(self):
        self.publish_ok("a b?c&d", envelope("A"))
        self.assertEqual(self.seek("a b?c&d", "con sumer/1", "A", 1).status, 200)
        self.assertEqual(self.results("con sumer/1"), [
            ("consumers", "a b?c&d/con sumer/1",
             "/admin/streams/a%20b%3Fc%26d/consumers?consumerId=con%20sumer%2F1")])
        self.assertEqual(self.results("a\x00zzz"), [])
        self.assertEqual(len(self.results("x" * 60000)), 0)

    def test_search_needs_a_term(self):
        for path in ("/api/v1/search", "/api/v1/search?_q=", "/api/v1/search?q=x"):
            with self.subTest(path=path):
                self.assert_error(self.client.request("GET", path), 400, starts="Bad Request - ")

    def test_search_empty_database(self):
        self.assertEqual(self.results("anything"), [])

    def test_search_with_deprecation_warnings_as_errors(self):
        # Python 3.12 warns on numbered placeholders ("?1") bound to a sequence;
        # under -W error that warning made every search a 500.
        self.publish_ok("warned", envelope("A"), producer="warned-producer")
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            self.assertEqual(self.results("warned"), [
                ("streams", "warned", "/admin/streams/warned/events")])
            self.assertEqual(self.results("warned-producer"), [
                ("streams", "warned", "/admin/streams?producerId=warned-producer")])


class PeriodSearchTest(FreshServerTest):

    def test_period_search_newest_first_with_consumers_past_each_event(self):
        ids = [self.publish_ok("s", envelope("A")) for _ in range(3)]
        other = self.publish_ok("s", envelope("B"))
        self.assertEqual(self.seek("s", "zeta", "A", 2).status, 200)
        self.assertEqual(self.seek("s", "alpha", "A", 3).status, 200)
        self.assertEqual(self.seek("s", "beta", "B", 1).status, 200)
        for period in ("6hour", "24hour", "2day", "7day", "14day", "1month"):
            for method in ("GET", "POST"):
                with self.subTest(period=period, method=method):
                    response = self.client.request(method, f"/api/v1/event-period-search/s?period={period}")
                    self.assertEqual(response.status, 200, response)
                    rows = response.json
                    self.assertEqual([r["eventId"] for r in rows], [other, *reversed(ids)])
                    self.assertEqual([r["consumerIds"] for r in rows],
                                     [["beta"], ["alpha"], ["alpha", "zeta"], ["alpha", "zeta"]])
                    self.assertEqual(list(rows[0]), ["eventId", "eventName", "createdAt", "consumerIds"])
                    self.assertEqual(rows[0]["eventName"], "B")
                    self.assertRegex(rows[0]["createdAt"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")

    def test_period_search_excludes_older_events_and_stops_at_1000(self):
        self.publish_ok("s", [envelope("A")] * 1000)
        self.publish_ok("s", [envelope("A")] * 5)
        with open_database(self.live.db) as conn:  # age three events by 3 days
            conn.execute("UPDATE events SET created_at = '2000-01-01T00:00:00.000000+00:00'"
                         " WHERE event_pk IN (SELECT event_pk FROM events ORDER BY event_pk DESC LIMIT 3)")
        self.assertEqual(len(self.get_json("/event-period-search/s?period=1month")), 1000)
        self.publish_ok("t", envelope("A"))
        with open_database(self.live.db) as conn:
            conn.execute("UPDATE events SET created_at = ? WHERE event_id = (SELECT max(event_id) FROM events"
                         " JOIN streams USING (stream_id) WHERE name = 't')",
                         (eventserver.utc_now().replace(eventserver.utc_now()[:4], "2001"),))
        self.assertEqual(self.get_json("/event-period-search/t?period=1month"), [])

    def test_period_search_lengths(self):
        ages = {"5 hours": 5, "7 hours": 7, "25 hours": 25, "47 hours": 47, "3 days": 72, "8 days": 192,
                "15 days": 360, "29 days": 696, "31 days": 744}
        ids = dict(zip(ages, self.publish_ok("s", [envelope(name) for name in ages])))
        now = datetime.datetime.now(datetime.timezone.utc)
        with open_database(self.live.db) as conn:
            for name, hours in ages.items():
                created = (now - datetime.timedelta(hours=hours)).isoformat(timespec="microseconds")
                conn.execute("UPDATE events SET created_at = ? WHERE event_id = ?", (created, ids[name]))
        expected = {"6hour": ["5 hours"], "24hour": ["5 hours", "7 hours"],
                    "2day": ["5 hours", "7 hours", "25 hours", "47 hours"],
                    "7day": ["5 hours", "7 hours", "25 hours", "47 hours", "3 days"],
                    "14day": ["5 hours", "7 hours", "25 hours", "47 hours", "3 days", "8 days"],
                    "1month": ["5 hours", "7 hours", "25 hours", "47 hours", "3 days", "8 days", "15 days", "29 days"]}
        for period, names in expected.items():
            with self.subTest(period=period):
                self.assertEqual([r["eventName"] for r in self.get_json(f"/event-period-search/s?period={period}")],
                                 names)

    def test_period_search_errors(self):
        self.publish_ok("s")
        for period in ("", "1hour", "6HOUR", "30day"):
            with self.subTest(period=period):
                self.assert_error(self.get(f"/event-period-search/s?period={period}"), 400,
                                  "Bad Request - period is not supported or invalid")
        self.assert_error(self.get("/event-period-search/s"), 400, "Bad Request - period is not supported or invalid")
        self.assert_error(self.get("/event-period-search/nope?period=6hour"), 404, "Not Found - stream nope not found")


class SeekTest(FreshServerTest):

    def test_seek_sets_and_creates_offsets(self):
        self.publish_ok("s", [envelope("A")] * 3)
        response = self.seek("s", "c1", "A", 2)
        self.assertEqual((response.status, response.json), (200, "successfully updated offset to 2 for consumer c1"))
        self.assertEqual(len(self.client.read("s", "A", consumer="c1").json), 1)
        self.assertEqual(self.seek("s", "c1", "A", 0).status, 200)  # back to the start
        self.assertEqual(len(self.client.read("s", "A", consumer="c1").json), 3)
        self.assertEqual(self.seek("s", "c1", "A", 3).status, 200)
        self.assertEqual(self.client.read("s", "A", consumer="c1").json, [])

    def test_seek_rejects_out_of_range_and_bad_input(self):
        self.publish_ok("s", [envelope("A")] * 3)
        for offset in ("4", "-1", "x", "1.0"):
            with self.subTest(offset=offset):
                self.assert_error(self.seek("s", "c1", "A", offset), 400, starts="Bad Request - ")
        self.assert_error(self.seek("s", "c1", "NoSuchName", 1), 400, starts="Bad Request - ")
        self.assertEqual(self.seek("s", "c1", "NoSuchName", 0).status, 200)
        self.assert_error(self.seek("s", "bad\tid", "A", 1), 400, starts="Bad Request - ")
        self.assert_error(self.seek("nope", "c1", "A", 0), 404, "Not Found - stream nope not found")
        self.assertEqual([r["offset"] for r in self.get_json("/consumers/s")], [0])

    def test_seek_with_names_that_need_escaping(self):
        self.publish_ok("a b/c?"[:3] + "%", envelope("E v"))
        response = self.seek("a b%", "c/1?", "E v", 1)
        self.assertEqual(response.status, 200, response)
        self.assertEqual(response.json, "successfully updated offset to 1 for consumer c/1?")


class PayloadTest(FreshServerTest):

    def test_payload_returns_the_stored_envelope(self):
        sent = envelope("A", payload={"x": [1, 2]}, extra="kept")
        event_id = self.publish_ok("s", sent)
        self.assertEqual(self.get_json(f"/events/{event_id}/payload"), sent)
        self.assertEqual(self.get_json(f"/events/{event_id.upper()}/payload"), sent)

    def test_payload_errors(self):
        self.assert_error(self.get("/events/not-a-uuid/payload"), 400, starts="Bad Request - ")
        self.assert_error(self.get(f"/events/{uuid.uuid4()}/payload"), 404, starts="Not Found - ")


class StreamsListTest(FreshServerTest):

    def test_streams_lists_owner_events_consumers_and_lag(self):
        self.assertEqual(self.get_json("/streams"), [])
        self.publish_ok("orders", [envelope("A")] * 4 + [envelope("B")] * 2, producer="shop")
        self.publish_ok("<img src=x onerror=alert(1)>", envelope("A"), producer="evil")
        self.assertEqual(self.seek("orders", "c1", "A", 3).status, 200)
        self.assertEqual(self.seek("orders", "c1", "B", 0).status, 200)
        self.assertEqual(self.seek("orders", "c2", "A", 4).status, 200)
        rows = self.get_json("/streams")
        for row in rows:
            self.assertRegex(row.pop("createdAt"), r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")
        self.assertEqual(rows, [
            {"streamName": "<img src=x onerror=alert(1)>", "producerId": "evil", "eventsCount": 1,
             "consumers": 0, "lag": 0},
            {"streamName": "orders", "producerId": "shop", "eventsCount": 6, "consumers": 2, "lag": 1 + 2 + 0},
        ])


class DashboardTest(ServerTest):

    def test_dashboard_needs_auth_with_the_browser_prompt(self):
        response = self.client.request("GET", "/", auth=False)
        self.assert_error(response, 401, "Unauthorized")
        self.assertEqual(response.headers["WWW-Authenticate"], 'Basic realm="eventserver"')

    def test_dashboard_is_one_self_contained_page(self):
        for path in ("/", "/admin", "/admin/streams?producerId=x", "/admin/streams/a%20b/events?eventName=A",
                     "/admin/streams/s/consumers?consumerId=c"):
            with self.subTest(path=path):
                response = self.client.request("GET", path)
                self.assertEqual(response.status, 200)
                self.assertEqual(response.headers["Content-Type"], "text/html; charset=utf-8")
                self.assertIn("default-src 'none'", response.headers["Content-Security-Policy"])
                page = response.body.decode()
                self.assertTrue(page.startswith("<!doctype html>"))
                self.assertNotRegex(page, r"(src|href)=\"(https?:)?//")  # nothing loaded from elsewhere
                self.assertNotIn("@import", page)
                self.assertNotIn("innerHTML", page)  # names only ever go in as text
                for endpoint in ("/streams", "/stats/events-per-stream", "/stats/events-current-month",
                                 "/consumers?stream=", "/event-period-search?stream=", "/search?_q=", "/payload"):
                    self.assertIn(endpoint, page)
        self.assertEqual(self.client.request("POST", "/").status, 405)


# Go compatibility mode (SPEC 7) ###############################################
#
# A server started with --compat go answers as the Go server (github
# pavbis/eventserver) does; these expectations come from its source: router
# api/server.go, api/middlewares.go, api/handlers/, api/input/, the validation
# tags in application/types/, and the SQL it answers with.

GO_TYPE = "application/json; charset=utf-8"  # what its middleware demands
GO_HEADERS = {"Content-Type": GO_TYPE, "Accept": GO_TYPE}
PRODUCER, PRODUCER_2 = "52a454e8-a111-4e5c-a715-2e46fedd8c47", "52a454e8-a111-4e5c-a715-2e46fedd8c48"
CONSUMER, CONSUMER_2 = "2480b859-e08a-4414-9c7d-003bc1a4b555", "2480b859-e08a-4414-9c7d-003bc1a4b556"


def go_fresh(prefix="s"):
    """A stream name no other test uses, that the Go server can store (an SQL identifier)."""
    return f"{prefix}{next(_names)}_{uuid.uuid4().hex[:6]}"


def go_error(text):
    """The body of the Go server's errors, as encoding/json writes it."""
    return json.dumps({"error": text}, separators=(",", ":"), ensure_ascii=False).replace(
        "<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


class GoModeTest(ServerTest):
    """Base: one --compat go server for the class."""

    flags = ("--compat", "go")

    def go(self, method, path, body=None, headers=None, auth=True):
        """A request as the Go server wants it: its exact Content-Type and Accept."""
        all_headers = dict(GO_HEADERS, **(headers or {}))
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        return self.client.request(method, "/api/v1" + path, body, all_headers, auth=auth)

    def go_publish(self, stream, value=None, producer=PRODUCER):
        return self.go("POST", f"/streams/{quote(stream)}/events", envelope() if value is None else value,
                       {"X-Producer-ID": producer})

    def go_publish_ok(self, stream, value=None, producer=PRODUCER):
        response = self.go_publish(stream, value, producer)
        self.assertEqual(response.status, 201, response)
        return response.json["uuid"]

    def go_read(self, stream, name="OrderPlaced", limit=100, consumer=CONSUMER):
        query = urllib.parse.urlencode({"eventName": name, "limit": limit})
        return self.go("GET", f"/streams/{quote(stream)}/events?{query}", headers={"X-Consumer-ID": consumer})

    def go_ack(self, stream, event_id, consumer=CONSUMER, body=None):
        return self.go("POST", f"/streams/{quote(stream)}/events/{event_id}", body, {"X-Consumer-ID": consumer})

    def go_seek(self, stream, consumer, name, offset):
        return self.go("POST", f"/{quote(stream)}/{consumer}/{quote(name)}/change/{offset}")

    def assert_go_error(self, response, status, text):
        self.assertEqual((response.status, response.body), (status, go_error(text)))
        self.assertEqual(response.headers["Content-Type"], "application/json")

    def assert_go_json(self, response, body, status=200):
        """The exact bytes of an answer, and its Content-Type."""
        self.assertEqual((response.status, response.body.decode()), (status, body))
        self.assertEqual(response.headers["Content-Type"], "application/json")


class GoRoutingTest(GoModeTest):

    def test_go_router_404_405_301_as_gorilla_mux(self):
        response = self.go("GET", "/nope")
        self.assertEqual((response.status, response.body), (404, b"404 page not found\n"))
        self.assertEqual(response.headers["Content-Type"], "text/plain; charset=utf-8")
        self.assertEqual(self.go("GET", "/health/").status, 404)  # no trailing slash stripped
        for method, path in [("PUT", "/health"), ("HEAD", "/health"), ("GET", "/search?_q=x"),
                             ("GET", "/event-period-search/s?period=6hour"), ("DELETE", "/streams/s/events"),
                             ("GET", "/streams/s/events/x"), ("GET", f"/s/{CONSUMER}/e/change/0")]:
            with self.subTest(method=method, path=path):
                response = self.go(method, path)
                self.assertEqual((response.status, response.body), (405, b""))
                self.assertNotIn("Content-Type", response.headers)
                self.assertNotIn("Allow", response.headers)
        response = self.go("GET", "/streams/a/../b//events?eventName=x")
        self.assertEqual((response.status, response.headers["Location"]), (301, "/api/v1/streams/b/events?eventName=x"))

    def test_go_content_type_and_accept_checked_exactly_before_auth(self):
        path = "/api/v1/streams/s/events"
        for headers, text in [({}, "Content-Type header must be application/json; charset=utf-8"),
                              ({"Content-Type": "application/json"}, "Content-Type header must be application/json; charset=utf-8"),
                              ({"Content-Type": "application/json;charset=utf-8"}, "Content-Type header must be application/json; charset=utf-8"),
                              ({"Content-Type": GO_TYPE}, "accept header must be application/json; charset=utf-8"),
                              ({"Content-Type": GO_TYPE, "Accept": "*/*"}, "accept header must be application/json; charset=utf-8")]:
            with self.subTest(headers=headers):
                response = self.client.request("GET", path, headers=headers, auth=False)  # checked before auth
                self.assertEqual((response.status, response.body.decode()), (400, text))  # plain, not JSON
                self.assertEqual(response.headers["Content-Type"], "application/json")
        response = self.client.request("GET", path, headers=GO_HEADERS, auth=False)
        self.assertEqual((response.status, response.body), (401, b"Unauthorized"))
        self.assertEqual(response.headers["Content-Type"], "application/json")
        self.assertNotIn("WWW-Authenticate", response.headers)
        response = self.client.request("GET", "/api/v1/health", auth=False)  # no middleware at all
        self.assert_go_json(response, '{"status":"OK"}')

    def test_go_every_route_of_its_router(self):
        stream, event_id = go_fresh(), None
        event_id = self.go_publish_ok(stream)
        for method, path, status in [
                ("POST", f"/streams/{stream}/events/{event_id}", 200), ("GET", f"/streams/{stream}/events?eventName=OrderPlaced&limit=1", 200),
                ("POST", f"/{stream}/{CONSUMER}/OrderPlaced/change/1", 200), ("GET", f"/events/{event_id}/payload", 200),
                ("GET", f"/consumers/{stream}", 200), ("GET", "/stats/events-per-stream", 200),
                ("GET", "/stats/stream-data", 200), ("GET", "/stats/events-current-month", 200),
                ("POST", "/search?_q=x", 200), ("POST", f"/event-period-search/{stream}?period=6hour", 200)]:
            with self.subTest(method=method, path=path):
                response = self.go(method, path, headers={"X-Consumer-ID": CONSUMER})
                self.assertEqual(response.status, status, response)
                self.assertEqual(response.headers["Content-Type"], "application/json")
                self.assertEqual(self.go(method, path, auth=False).body, b"Unauthorized")

    def test_go_extras_off_stream_list_and_dashboard_stay(self):
        stream = go_fresh()
        response = self.go_publish(stream, [envelope()])  # no batches
        self.assert_go_error(response, 400, "json: cannot unmarshal array into Go value of type types.Event")
        key = {"Idempotency-Key": "k1"}
        first = self.go("POST", f"/streams/{stream}/events", envelope(), dict(key, **{"X-Producer-ID": PRODUCER}))
        again = self.go("POST", f"/streams/{stream}/events", envelope(), dict(key, **{"X-Producer-ID": PRODUCER}))
        self.assertEqual((first.status, again.status), (201, 201))
        self.assertNotEqual(first.json["uuid"], again.json["uuid"])  # the key means nothing to it
        started = time.monotonic()
        response = self.go("GET", f"/streams/{stream}/events?eventName=Other&limit=1&wait=20",
                           headers={"X-Consumer-ID": CONSUMER})
        self.assert_go_json(response, "[]")
        self.assertLess(time.monotonic() - started, 10)  # wait= is no long poll here: answered at once
        streams = self.client.request("GET", "/api/v1/streams")
        self.assertEqual(streams.headers["Content-Type"], "application/json; charset=utf-8")
        self.assertIn(stream, [s["streamName"] for s in streams.json])
        self.assertEqual(self.client.request("GET", "/").status, 200)
        response = self.client.request("GET", "/", auth=False)
        self.assertEqual(response.headers["WWW-Authenticate"], 'Basic realm="eventserver"')  # the browser prompt
        dashboard = self.client.request("GET", "/api/v1/stats/stream-data", headers=dict(GO_HEADERS, **{
            "X-Eventserver-Dashboard": "1"}), auth=False)
        self.assertEqual((dashboard.status, dashboard.body), (401, b"Unauthorized"))
        self.assertEqual(dashboard.headers["WWW-Authenticate"], 'Basic realm="eventserver"')

    def test_go_chunked_body_is_read(self):
        stream, body = go_fresh(), json.dumps(envelope()).encode()
        with socket.create_connection(("127.0.0.1", self.live.port)) as sock:
            sock.sendall(f"POST /api/v1/streams/{stream}/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: {basic()}\r\n"
                         f"Content-Type: {GO_TYPE}\r\nAccept: {GO_TYPE}\r\nX-Producer-ID: {PRODUCER}\r\n"
                         f"Transfer-Encoding: chunked\r\n\r\n".encode()
                         + b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
                         + b"0\r\n\r\n")
            status, reply = _read_reply(sock.makefile("rb"))
        self.assertEqual(status, 201, reply)
        self.assertEqual(len(self.go_read(stream).json), 1)


class GoPublishTest(GoModeTest):

    def test_go_publish_answers_201_and_the_uuid(self):
        response = self.go_publish(go_fresh())
        self.assertEqual(response.status, 201)
        self.assertEqual(response.headers["Content-Type"], "application/json")
        self.assertRegex(response.body.decode(), r'\A\{"uuid":"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"\}\Z')

    def test_go_publish_error_texts(self):
        stream = go_fresh()
        self.assert_go_error(self.go("POST", f"/streams/{stream}/events", envelope()), 400,
                             "Key: 'ReceiveEventRequest.XProducerID' Error:Field validation for 'XProducerID' "
                             "failed on the 'required' tag")
        for body, text in [
                (b"", "EOF"), (b"  \n", "EOF"), (b'{"event":', "unexpected EOF"), (b"-", "unexpected EOF"),
                (b"{}", "Key: 'Event.EventData.Name' Error:Field validation for 'Name' failed on the 'required' tag"),
                (b"null", "Key: 'Event.EventData.Name' Error:Field validation for 'Name' failed on the 'required' tag"),
                (b'{"event":{"name":"a"},}', "invalid character '}' looking for beginning of object key string"),
                (b'{"event" 1}', "invalid character '1' after object key"),
                (b'{"a":1 "b"}', "invalid character '\"' after object key:value pair"),
                (b"[1 2]", "invalid character '2' after array element"),
                (b'{"a":"\x01"}', "invalid character '\\x01' in string literal"),
                (b'{"a":"\\x"}', "invalid character 'x' in string escape code"),
                (b'{"a":"\\u12g4"}', "invalid character 'g' in \\u hexadecimal character escape"),
                (b'{"a":-x}', "invalid character 'x' in numeric literal"),
                (b'{"a":1.x}', "invalid character 'x' after decimal point in numeric literal"),
                (b'{"a":1ex}', "invalid character 'x' in exponent of numeric literal"),
                (b'{"a":tru}', "invalid character '}' in literal true (expecting 'e')"),
                (b'{"a":nul}', "invalid character '}' in literal null (expecting 'l')"),
                (b"\xff", "invalid character '\u00ff' looking for beginning of value"),
                (b"{'a':1}", "invalid character '\\'' looking for beginning of object key string"),
                (b"[1]", "json: cannot unmarshal array into Go value of type types.Event"),
                (b'"x"', "json: cannot unmarshal string into Go value of type types.Event"),
                (b"5", "json: cannot unmarshal number into Go value of type types.Event"),
                (b'{"event":"x"}', "json: cannot unmarshal string into Go struct field Event.event of type types.EventData"),
                (b'{"event":{"name":5}}', "json: cannot unmarshal number into Go struct field EventData.event.name of type string"),
                (b'{"event":{"name":"a","version":1.5}}',
                 "json: cannot unmarshal number 1.5 into Go struct field EventData.event.version of type int"),
                (b'{"event":{"name":"a","version":9223372036854775808}}',
                 "json: cannot unmarshal number 9223372036854775808 into Go struct field EventData.event.version of type int"),
                (b'{"event":{"name":"a","version":true},"system":5}',  # the first error wins
                 "json: cannot unmarshal bool into Go struct field EventData.event.version of type int"),
                (b'{"event":{"name":"a"},"system":{"id":1}}', "json: cannot unmarshal number into Go struct field System.system.id of type string"),
                (b'{"event":{"name":"a"},"trigger":[]}', "json: cannot unmarshal array into Go struct field Event.trigger of type types.Trigger"),
                (b'{"event":{"name":"a"},"payload":[1]}', "json: cannot unmarshal array into Go struct field Event.payload of type types.Payload"),
                (b'{"event":{"name":"a"},"payload":{"n":[1e400]}}', "json: cannot unmarshal number 1e400 into Go struct field Event.payload of type float64"),
                (b'{"eventId":5,"event":{"name":"a"}}', "json: cannot unmarshal number into Go struct field Event.eventId of type string")]:
            with self.subTest(body=body):
                self.assert_go_error(self.go("POST", f"/streams/{stream}/events", body, {"X-Producer-ID": PRODUCER}),
                                     400, text)
        self.assertNotIn(stream, [s["streamName"] for s in self.client.request("GET", "/api/v1/streams").json])
        other = go_fresh()
        self.go_publish_ok(other)
        self.assert_go_error(self.go_publish(other, producer=PRODUCER_2), 400,
                             f"stream is reserved for another producer {PRODUCER}")

    def test_go_envelope_as_its_struct_keeps_it(self):
        stream = go_fresh()
        self.go_publish_ok(stream, b'{"EVENT":{"Name":"Folded","x":1},"extra":true,"system":{"id":"a"},'
                                   b'"trigger":{"NAME":"n","type":null},"eventId":"mine"} what follows is not read')
        event_id = self.go_publish_ok(stream, {"event": {"name": "Bare"}})
        self.assert_go_json(self.go_read(stream, "Folded"), '[{"eventId":"%s","event":{"name":"Folded","version":0},'
                            '"system":{"id":"a","name":"","time":"","timezone":""},"trigger":{"type":"","name":"n"},'
                            '"payload":null}]' % self.go_read(stream, "Folded").json[0]["eventId"])
        self.assert_go_json(self.go_read(stream, "Bare"), '[{"eventId":"%s","event":{"name":"Bare","version":0},'
                            '"system":{"id":"","name":"","time":"","timezone":""},"trigger":{"type":"","name":""},'
                            '"payload":null}]' % event_id)

    def test_go_json_written_as_encoding_json_writes_it(self):
        stream = go_fresh()
        payload = {"z": 1, "b": [1.0, 2.5, 1e21, 1e-7, 12345678901234567890, 123456789012345678901234], "a": {"y": None, "x": "<&>\u2028\b\f\x01é"}}
        event_id = self.go_publish_ok(stream, envelope(payload=payload))
        body = self.go_read(stream).body.decode()
        self.assertIn('"payload":{"a":{"x":"\\u003c\\u0026\\u003e\\u2028\\b\\f\\u0001é","y":null},'
                      '"b":[1,2.5,1e+21,1e-7,12345678901234567000,1.2345678901234569e+23],"z":1}}]', body)
        self.assertTrue(body.startswith('[{"eventId":"%s","event":{"name":"OrderPlaced","version":1},' % event_id))
        stored = self.db_rows("SELECT envelope FROM events WHERE event_id = ?", event_id)[0][0]
        self.assertIn("12345678901234567890", stored)  # stored as sent: only the answer is float64


class GoConsumeTest(GoModeTest):

    def test_go_read_checks_and_texts(self):
        stream = go_fresh()
        self.go_publish_ok(stream)
        path = f"/streams/{stream}/events"
        for query, consumer, text in [
                ("eventName=OrderPlaced&limit=1", "not-a-uuid", "missing or invalid consumer id provided"),
                ("eventName=OrderPlaced&limit=1", "", "missing or invalid consumer id provided"),
                ("eventName=OrderPlaced", CONSUMER, "limit argument is not valid"),
                ("eventName=OrderPlaced&limit=+1", CONSUMER, "limit argument is not valid"),  # + is a space
                ("eventName=OrderPlaced&limit=1;", CONSUMER, "limit argument is not valid"),  # the pair is dropped
                ("eventName=OrderPlaced&limit=1.0", CONSUMER, "limit argument is not valid"),
                ("limit=1", CONSUMER, "Key: 'ReceiveEvents.EventName' Error:Field validation for 'EventName' failed on the 'required' tag"),
                ("limit=0", CONSUMER, "Key: 'ReceiveEvents.EventName' Error:Field validation for 'EventName' failed on the 'required' tag\n"
                                      "Key: 'ReceiveEvents.Limit' Error:Field validation for 'Limit' failed on the 'required' tag")]:
            with self.subTest(query=query, consumer=consumer):
                self.assert_go_error(self.go("GET", f"{path}?{query}", headers={"X-Consumer-ID": consumer}), 400, text)
        for consumer in (CONSUMER.upper(), "{%s}" % CONSUMER, "urn:uuid:" + CONSUMER, CONSUMER.replace("-", "")):
            self.assertEqual(len(self.go("GET", f"{path}?eventName=OrderPlaced&limit=%2B1",
                                         headers={"X-Consumer-ID": consumer}).json), 1)
        self.assert_go_json(self.go_read(go_fresh()), "[]")  # a stream never written to

    def test_go_ack_semantics(self):
        stream = go_fresh()
        first, second = self.go_publish_ok(stream), self.go_publish_ok(stream)
        self.assert_go_error(self.go_ack(stream, second), 400, "Consumer offset mismatch: 1->2")
        response = self.go_ack(stream, first.upper(), consumer="{%s}" % CONSUMER.upper(), body="action=NOPE")
        self.assert_go_json(response, f'"Successfully moved offset to 1 for cosumer id {CONSUMER}"')  # its typo
        self.assert_go_error(self.go_ack(stream, first), 400, "Consumer offset mismatch: 2->1")  # a retry
        self.assert_go_error(self.go_ack(stream, "zzz", consumer="zzz"), 400, "missing or invalid consumer id provided")
        self.assert_go_error(self.go_ack(stream, "zzz"), 400, "missing or invalid event id provided")
        unknown = str(uuid.uuid4())
        self.assert_go_error(self.go_ack(stream, unknown), 400, f"event not found in stream {stream}/{unknown}")
        self.assert_go_error(self.go_ack("nowhere", second), 400, f"event not found in stream nowhere/{second}")
        self.assertEqual(self.go_ack(stream, second, body='{"whatever": 1}').status, 200)
        self.assert_go_json(self.go_read(stream), "[]")

    def test_go_seek_moves_only_an_offset_the_consumer_has(self):
        stream = go_fresh()
        first = self.go_publish_ok(stream)
        self.go_publish_ok(stream)
        response = self.go_seek(stream, CONSUMER_2.upper(), "OrderPlaced", 0)  # no offset yet: a no-op
        self.assert_go_json(response, f'"successfully updated offset to 0 for consumer {CONSUMER_2}"')
        self.assert_go_error(self.go_seek(stream, CONSUMER_2, "OrderPlaced", 1), 500,
                             "offset can not be greater than event count")
        self.assert_go_json(self.go("GET", f"/consumers/{stream}"), "[]")
        self.assertEqual(self.go_ack(stream, first, consumer=CONSUMER_2).status, 200)
        self.assert_go_json(self.go_seek(stream, CONSUMER_2, "OrderPlaced", "002"),
                            f'"successfully updated offset to 2 for consumer {CONSUMER_2}"')
        self.assert_go_error(self.go_seek(stream, CONSUMER_2, "OrderPlaced", 3), 500,
                             "offset can not be greater than event count")
        self.assertEqual(self.go("GET", f"/consumers/{stream}").json[0]["offset"], 2)
        self.assert_go_error(self.go_seek(stream, "bad", "OrderPlaced", "x"), 400, "missing or invalid consumer id provided")
        self.assert_go_error(self.go_seek(stream, CONSUMER_2, "OrderPlaced", "x"), 400, "offset argument is not valid")

    def test_go_payload_is_its_jsonb_column(self):
        stream = go_fresh()
        event_id = self.go_publish_ok(stream, envelope(payload={"bb": 1e21, "a": [1, "<x>"], "ccc": {}}))
        expected = ('{"event": {"name": "OrderPlaced", "version": 1}, "system": {"id": "alv123", "name": "codello alvine", '
                    '"time": "2017-09-06 13:58:12", "timezone": "Europe/Berlin"}, "eventId": "%s", "payload": {"a": '
                    '[1, "<x>"], "bb": 1000000000000000000000, "ccc": {}}, "trigger": {"name": "/path/to/script.php", '
                    '"type": "system"}}' % event_id)
        for form in (event_id, event_id.upper(), "{%s}" % event_id, "urn:uuid:" + event_id, event_id.replace("-", "")):
            self.assert_go_json(self.go("GET", f"/events/{form}/payload"), expected)
        self.assert_go_error(self.go("GET", "/events/nope/payload"), 400, "missing or invalid event id provided")
        self.assert_go_error(self.go("GET", f"/events/{uuid.uuid4()}/payload"), 404, "event id not found")

    def test_go_consumers_as_its_sql_writes_them(self):
        stream = go_fresh()
        ids = [self.go_publish_ok(stream, envelope(name)) for name in ("B", "B", "B", "A", "A")]
        self.assertEqual(self.go_ack(stream, ids[0]).status, 200)
        self.assertEqual(self.go_ack(stream, ids[3], consumer=CONSUMER_2).status, 200)
        self.assertEqual(self.go_ack(stream, ids[1]).status, 200)
        rows = self.go("GET", f"/consumers/{stream}")
        moved = [row["movedAt"] for row in rows.json]
        self.assertTrue(all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d*[1-9])?\+00:00", t) for t in moved))
        self.assert_go_json(rows, (
            '[{"consumerId":"%s","offset":1,"movedAt":"%s","eventName":"A","consumedPercentage":50.00,"behind":1}, \n'
            ' {"consumerId":"%s","offset":2,"movedAt":"%s","eventName":"B","consumedPercentage":66.67,"behind":1}]'
            % (CONSUMER_2, moved[0], CONSUMER, moved[1])))
        self.assert_go_json(self.go("GET", "/consumers/nowhere"), "[]")


class GoFreshTest(FreshServerTest):
    """Base: an empty --compat go server for every test, for exact global figures."""

    flags = ("--compat", "go", "--allow-reset")
    go, go_publish, go_publish_ok, go_read, go_ack, go_seek = (
        GoModeTest.go, GoModeTest.go_publish, GoModeTest.go_publish_ok, GoModeTest.go_read, GoModeTest.go_ack,
        GoModeTest.go_seek)
    assert_go_error, assert_go_json = GoModeTest.assert_go_error, GoModeTest.assert_go_json


class GoStatsTest(GoFreshTest):

    def test_go_events_per_stream_and_stream_data(self):
        for stream, count in [("alpha", 4), ("beta", 3), ("Gamma", 3), ("delta", 0)]:
            for _ in range(count):
                self.go_publish_ok(stream)
        ids = [event["eventId"] for event in self.go_read("beta").json]
        self.assertEqual(self.go_ack("beta", ids[0]).status, 200)
        self.assertEqual(self.go_ack("beta", ids[1]).status, 200)
        self.assert_go_json(self.go("GET", "/stats/events-per-stream"),
                            '[{"label":"alpha","value":4}, \n {"label":"Gamma","value":3}, \n {"label":"beta","value":3}]')
        # by name, descending; the ranking as its SQL function computes it (not "of the largest")
        self.assert_go_json(self.go("GET", "/stats/stream-data"), (
            '[{"streamName":"beta","eventsCount":3,"consumedEvents":2,"ranking":"✭"}, \n'
            ' {"streamName":"alpha","eventsCount":4,"consumedEvents":0,"ranking":"✭✭"}, \n'
            ' {"streamName":"Gamma","eventsCount":3,"consumedEvents":0,"ranking":"✭"}]'))
        self.assertEqual(eventserver.go_ranking([5, 199, 22, 157, 80, 175, 91, 73, 16, 68]),
                         [1, 5, 2, 4, 3, 5, 4, 3, 1, 2])  # the Go repository's own fixture figures
        self.assertEqual(eventserver.go_ranking([0, 0, 0]), [None, None, None])  # its "ranking": null

    def test_go_events_current_month_eventcount_and_padded_progress(self):
        today = eventserver.utc_now()[:10]
        days = calendar.monthrange(int(today[:4]), int(today[5:7]))[1]
        others = [day for day in range(1, days + 1) if day != int(today[8:])]
        counts = dict(zip(others[:4], (1, 1, 124, 3)))
        with open_database(self.live.db) as conn:
            conn.executemany("INSERT INTO daily_counts (day, count) VALUES (?, ?)",
                             [(f"{today[:8]}{day:02d}", count) for day, count in counts.items()])
        self.go_publish_ok("s")
        counts[int(today[8:])] = 1
        rows = self.go("GET", "/stats/events-current-month")
        self.assertTrue(rows.body.startswith(b'[{"date":"%s-01","eventcount":' % today[:7].encode()))
        rows = rows.json
        self.assertEqual([row["eventcount"] for row in rows], [counts.get(day, 0) for day in range(1, days + 1)])
        expected = [""] + [f"{'+' if b > a else '-'}{abs(b - a):>3}" if b != a else "" for a, b in
                           zip([counts.get(d, 0) for d in range(1, days)], [counts.get(d, 0) for d in range(2, days + 1)])]
        self.assertEqual([row["progress"] for row in rows], expected)
        self.assertIn("+123", expected)
        self.assertTrue(any(p.startswith(("+  ", "-  ")) for p in expected), expected)  # FORMAT('%3s') pads

    def test_go_search_with_deprecation_warnings_as_errors(self):
        # As the default search (SearchTest): no numbered placeholders ("?1") bound to a sequence.
        self.go_publish_ok("warned", envelope("Warned"))
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            response = self.go("POST", "/search?_q=warned")
        self.assertEqual(response.status, 200, response)
        self.assertEqual([r["search_result"]["category"] for r in response.json], ["events", "streams"])

    def test_go_search_ilike_with_its_wildcards(self):
        self.go_publish_ok("orders", envelope("Order_Placed", payload={"note": "50% off", "n": 1}))
        self.go_publish_ok("orders", envelope("OrderXPlaced"))
        event_id = self.go_publish_ok("billing", envelope("Invoice", payload={"k": "v"}), producer=PRODUCER_2)
        self.assertEqual(self.go_ack("billing", event_id).status, 200)

        def results(term):
            response = self.go("POST", "/search?" + urllib.parse.urlencode({"_q": term}))
            self.assertEqual(response.headers["Content-Type"], "application/json")
            return [(r["search_result"]["category"], r["search_result"]["label"], r["search_result"]["url"])
                    for r in response.json]

        self.assertEqual(results("ORDER_"), [  # _ is any character: both names match
            ("events", "orders/OrderXPlaced", "/admin/streams/orders/events?eventName=OrderXPlaced"),
            ("events", "orders/Order_Placed", "/admin/streams/orders/events?eventName=Order_Placed"),
            ("streams", "orders", "/admin/streams/orders/events")])
        self.assertEqual([r[1] for r in results("%")], ["billing/Invoice", "orders/OrderXPlaced", "orders/Order_Placed",
                                                        "orders", "billing"])
        self.assertEqual(results('"k": "v"'), [  # the payload as PostgreSQL's jsonb writes it
            ("events", "billing/Invoice", f"/admin/streams/billing/events?eventId={event_id}")])
        self.assertEqual(results('"k":"v"'), [])
        self.assertEqual(results(PRODUCER_2), [("streams", "billing", f"/admin/streams?producerId={PRODUCER_2}")])
        self.assertEqual(results(CONSUMER), [("consumers", f"billing/{CONSUMER}",
                                              f"/admin/streams/billing/consumers?consumerId={CONSUMER}")])
        self.assertTrue(self.go("POST", "/search?_q=nothing-like-it").body == b"[]")
        self.assert_go_error(self.go("POST", "/search"), 400,
                             "Key: 'SearchTermRequest.Term' Error:Field validation for 'Term' failed on the 'required' tag")
        body = self.go("POST", "/search?_q=Invoice").body.decode()
        self.assertEqual(body, '[{"search_result":{"label":"billing/Invoice","category":"events",'
                               '"url":"/admin/streams/billing/events?eventName=Invoice"}}]')

    def test_go_period_search_with_consumerids(self):
        ids = [self.go_publish_ok("s") for _ in range(3)]
        self.assertEqual(self.go_ack("s", ids[0]).status, 200)
        response = self.go("POST", "/event-period-search/s?period=1month")
        rows = response.json
        self.assertEqual([row["eventId"] for row in rows], ids[::-1])
        self.assertEqual([row["consumerids"] for row in rows], [[], [], [CONSUMER]])
        self.assertTrue(response.body.decode().startswith('[{"eventId":"%s","eventName":"OrderPlaced","createdAt":"' % ids[2]))
        self.assertIn('"consumerids":[]}, \n {"eventId"', response.body.decode())
        for period in ("6hour", "24hour", "2day", "7day", "14day"):
            self.assertEqual(len(self.go("POST", f"/event-period-search/s?period={period}").json), 3)
        for period in ("", "1year", "30day", "6HOUR"):
            self.assert_go_error(self.go("POST", f"/event-period-search/s?period={period}"), 400,
                                 "period is not supported or invalid")
        self.assert_go_json(self.go("POST", "/event-period-search/nowhere?period=6hour"), "[]")

    def test_go_metrics_its_families_without_auth_any_method(self):
        ids = [self.go_publish_ok("orders", envelope(name)) for name in ("A", "A", "B")]
        self.go_publish_ok("billing", producer=PRODUCER_2)
        self.assertEqual(self.go_ack("orders", ids[0]).status, 200)
        expected = (
            "# HELP consumer_offset Current offset of consumers per stream and event\n"
            "# TYPE consumer_offset gauge\n"
            f'consumer_offset{{consumerId="{CONSUMER}",eventName="A",stream="orders"}} 1\n'
            "# HELP consumers_total Total amount of registered consumers per stream\n"
            "# TYPE consumers_total counter\n"
            'consumers_total{stream="orders"} 1\n'
            "# HELP events_total Total amount of events per stream\n"
            "# TYPE events_total counter\n"
            f'events_total{{producerId="{PRODUCER}",stream="orders"}} 3\n'
            f'events_total{{producerId="{PRODUCER_2}",stream="billing"}} 1\n'
            "# HELP streams_total Total number of streams\n"
            "# TYPE streams_total counter\n"
            "streams_total 2\n")
        for method in ("GET", "POST", "DELETE"):
            response = self.client.request(method, "/api/v1/metrics", auth=False)
            self.assertEqual((response.status, response.body.decode()), (200, expected))
            self.assertEqual(response.headers["Content-Type"], "text/plain; version=0.0.4; charset=utf-8; escaping=underscores")
        response = self.client.request("GET", "/api/v1/metrics", headers={"Accept-Encoding": "gzip"}, auth=False)
        self.assertEqual(response.headers["Content-Encoding"], "gzip")
        self.assertEqual(gzip.decompress(response.body).decode(), expected)
        self.assertEqual(eventserver._go_g(1000000), "1e+06")  # how its client writes big values


class GoDeparturesTest(GoModeTest):
    """Where the Go server loses, corrupts or leaks data, or races: the safe outcome, in its wire format."""

    def test_go_first_publish_race_has_one_owner_and_no_failures(self):
        stream = go_fresh()
        producers = [str(uuid.uuid4()) for _ in range(8)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda producer: with_client(self.live.port, lambda c: c.request(
                "POST", f"/api/v1/streams/{stream}/events", json.dumps(envelope()),
                dict(GO_HEADERS, **{"X-Producer-ID": producer})).status), producers))
        self.assertEqual(sorted(statuses), [201] + [400] * 7)
        other = go_fresh()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # one producer's concurrent first publishes
            statuses = list(pool.map(lambda _: with_client(self.live.port, lambda c: c.request(
                "POST", f"/api/v1/streams/{other}/events", json.dumps(envelope()),
                dict(GO_HEADERS, **{"X-Producer-ID": PRODUCER})).status), range(8)))
        self.assertEqual(statuses, [201] * 8)
        self.assertEqual(self.db_rows("SELECT count(*), max(sequence) FROM events e JOIN streams s USING (stream_id)"
                                      " WHERE s.name = ?", other), [(8, 8)])

    def test_go_names_are_data(self):
        self.go_publish_ok(go_fresh())
        for stream in ("x' OR ''='", "x' --"):  # spliced into its SQL, these return other streams' events
            with self.subTest(stream=stream):
                self.assert_go_json(self.go("POST", f"/event-period-search/{quote(stream)}?period=1month"), "[]")
                self.assert_go_json(self.go_read(stream), "[]")

    def test_go_sequences_per_stream_and_event_name(self):
        suffix = uuid.uuid4().hex[:6]
        first = self.go_publish_ok("ab" + suffix, envelope("cX"))  # its sequence name: abSUFFIXcx ...
        second = self.go_publish_ok("a", envelope("b" + suffix + "cX"))  # ... this one's too
        self.assert_go_json(self.go_ack("ab" + suffix, first), f'"Successfully moved offset to 1 for cosumer id {CONSUMER}"')
        self.assertEqual(self.go_ack("a", second).status, 200)  # sequence 1, not 2: no gap to block it

    def test_go_names_it_cannot_store_are_refused_storing_nothing(self):
        suffix = uuid.uuid4().hex[:6]
        for stream, name, rule in [("s-" + suffix, "E", "a letter or _ first, then letters, digits, _ or $"),
                                   ("1s" + suffix, "E", "a letter or _ first, then letters, digits, _ or $"),
                                   ("u", "ser", "not a reserved word of PostgreSQL"),
                                   ("Äs" + suffix, "E", "no uppercase letter outside A-Z"),
                                   ("ok" + suffix, "a b", "a letter or _ first, then letters, digits, _ or $")]:
            with self.subTest(stream=stream, name=name):
                response = self.go_publish(stream, envelope(name))
                self.assertEqual(response.status, 400)
                self.assertTrue(response.json["error"].endswith(rule), response)
                self.assertIn("must form an SQL identifier", response.json["error"])
        listed = [s["streamName"] for s in self.client.request("GET", "/api/v1/streams").json]
        self.assertFalse([name for name in listed if name.endswith(suffix)], listed)  # nothing stored, none reserved
        self.go_publish_ok("ok" + suffix, producer=PRODUCER_2)  # the stream was not kept for the first producer
        self.assert_go_error(self.go_publish("long" + suffix, envelope("E" * 256)), 400,
                             "pq: value too long for type character varying(255)")
        self.assert_go_error(self.go_publish("nul" + suffix, envelope(payload={"a": "\x00"})), 400,
                             "pq: unsupported Unicode escape sequence")
        self.go_publish_ok("nul" + suffix, producer=PRODUCER_2)
        self.go_publish_ok("äß_" + suffix, envelope("Ok"))  # lowercase non-ASCII letters are fine

    def test_go_producer_id_must_be_a_uuid(self):
        stream = go_fresh()
        for producer in ("producer-1", PRODUCER + "x", "{%s}" % PRODUCER):
            self.assert_go_error(self.go_publish(stream, producer=producer), 400, eventserver.GO_PRODUCER_RULE)
        self.assert_go_json(self.go_read(stream), "[]")
        self.go_publish_ok(stream, producer=PRODUCER.upper())
        self.go_publish_ok(stream, producer=PRODUCER.upper())  # its owner is not locked out

    def test_go_negative_offsets_and_limits_are_refused(self):
        stream = go_fresh()
        self.assertEqual(self.go_ack(stream, self.go_publish_ok(stream)).status, 200)
        self.assert_go_error(self.go_seek(stream, CONSUMER, "OrderPlaced", -1), 400, "offset argument is not valid")
        self.assert_go_error(self.go_read(stream, limit=-1), 400, "limit argument is not valid")
        self.assertEqual(self.go("GET", f"/consumers/{stream}").json[0]["offset"], 1)


class GoFixtureRecipeTest(unittest.TestCase):

    def test_go_tables_as_the_readme_recipe_writes_them_import(self):
        """Lines shaped as the README's psql query writes them from a Go server's tables."""
        lines = [
            {"type": "stream", "stream": "orders", "producerId": PRODUCER, "createdAt": "2019-10-30T07:47:57.690832+00:00"},
            {"type": "event", "stream": "orders", "eventId": "c0dfd6ae-1657-42c1-9253-936a2339d0e6",
             "eventName": "OrderPlaced", "sequence": 1, "createdAt": "2019-11-03T08:22:40.384000+00:00",
             "envelope": {"event": {"name": "OrderPlaced", "version": 1}, "system": {"id": "", "name": "", "time": "",
                          "timezone": ""}, "trigger": {"name": "", "type": ""}, "eventId": "c0dfd6ae-1657-42c1-9253-936a2339d0e6",
                          "payload": {}}},
            {"type": "offset", "stream": "orders", "consumerId": CONSUMER, "eventName": "OrderPlaced", "offset": 1,
             "movedAt": "2019-10-30T07:47:57.690832+00:00"}]
        with tempfile.TemporaryDirectory() as folder:
            db = os.path.join(folder, "go.db")
            result = _run_tool("import", "--db", db, stdin=("\n".join(json.dumps(line) for line in lines) + "\n").encode())
            self.assertEqual(result.returncode, 0, result.stderr)
            result = _run_tool("export", "--db", db)
            exported = [json.loads(line) for line in result.stdout.decode().splitlines()]
        self.assertEqual([line["type"] for line in exported], ["stream", "event", "offset"])
        self.assertEqual(exported[1]["envelope"]["payload"], {})
        self.assertNotIn("eventId", exported[1]["envelope"])


# Long-poll reads (README: For development and CI) ###########################

class LongPollTest(ServerTest):

    flags = ("--max-wait", "3")

    def test_long_poll_answers_as_soon_as_an_event_is_committed(self):
        stream = fresh()
        self.publish_ok(stream, envelope("Other"))
        pending = concurrent.futures.ThreadPoolExecutor(1)
        started = time.monotonic()
        waiting = pending.submit(with_client, self.live.port, lambda c: c.read(stream, "A", extra="&wait=3"))
        time.sleep(0.3)
        self.assertFalse(waiting.done())
        self.publish_ok(stream, envelope("Other"))  # another name does not wake it
        time.sleep(0.2)
        self.assertFalse(waiting.done())
        event_id = self.publish_ok(stream, envelope("A"))
        response = waiting.result(timeout=5)
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertEqual([e["eventId"] for e in response.json], [event_id])
        pending.shutdown()

    def test_long_poll_times_out_with_empty_list(self):
        stream = fresh()
        self.publish_ok(stream)
        self.assertEqual(self.client.ack(stream, self.client.read(stream).json[0]["eventId"]).status, 200)
        started = time.monotonic()
        response = self.client.read(stream, extra="&wait=0.5")
        self.assertEqual((response.status, response.json), (200, []))
        self.assertGreaterEqual(time.monotonic() - started, 0.45)

    def test_long_poll_returns_at_once_when_events_are_there(self):
        stream = fresh()
        event_id = self.publish_ok(stream)
        started = time.monotonic()
        self.assertEqual([e["eventId"] for e in self.client.read(stream, extra="&wait=3").json], [event_id])
        self.assertLess(time.monotonic() - started, 1)

    def test_long_poll_wait_above_maximum_is_lowered(self):
        stream = fresh()
        self.publish_ok(stream, envelope("Other"))
        started = time.monotonic()
        self.assertEqual(self.client.read(stream, "A", extra="&wait=1000").json, [])
        self.assertLess(time.monotonic() - started, 6)
        self.assertGreaterEqual(time.monotonic() - started, 2.9)

    def test_long_poll_bad_wait_is_400(self):
        stream = fresh()
        self.publish_ok(stream)
        for wait in ("-1", "soon", "", "nan"):
            with self.subTest(wait=wait):
                self.assert_error(self.client.read(stream, extra=f"&wait={wait}"), 400, starts="Bad Request - wait")

    def test_long_poll_waiters_do_not_hold_up_publishing(self):
        stream = fresh()
        self.publish_ok(stream, envelope("Other"))
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            waiting = [pool.submit(with_client, self.live.port,
                                   lambda c: c.read(stream, "A", extra="&wait=3")) for _ in range(20)]
            _wait_for(lambda: self.live.store.waiters.count() == 20)
            for _ in range(10):
                self.publish_ok(stream, envelope("Other"))
            self.assertFalse(any(w.done() for w in waiting))  # the publishes went by while all 20 waited
            self.publish_ok(stream, envelope("A"))
            self.assertTrue(all(len(w.result(timeout=5).json) == 1 for w in waiting))


# Idempotent publish (README: For development and CI) ########################

class IdempotencyTest(ServerTest):

    def publish_with_key(self, stream, body, key, header="Idempotency-Key"):
        return self.client.publish(stream, body, headers={header: key})

    def test_retry_with_same_key_and_body_returns_original_id_and_stores_nothing(self):
        stream = fresh()
        first = self.publish_with_key(stream, envelope(), "order-42")
        self.assertEqual(first.status, 200)
        for header in ("Idempotency-Key", "ES-EventId", "Nats-Msg-Id"):
            with self.subTest(header=header):
                again = self.publish_with_key(stream, envelope(), "order-42", header)
                self.assertEqual((again.status, again.json), (200, first.json))
        self.assertEqual(len(self.client.read(stream).json), 1)

    def test_same_key_with_other_body_is_409(self):
        stream = fresh()
        self.assertEqual(self.publish_with_key(stream, envelope(payload={"n": 1}), "k").status, 200)
        self.assert_error(self.publish_with_key(stream, envelope(payload={"n": 2}), "k"), 409, starts="Conflict - ")
        self.assertEqual(len(self.client.read(stream).json), 1)

    def test_keys_are_per_stream_and_batches_return_all_ids(self):
        stream, other = fresh(), fresh()
        batch = [envelope(payload={"n": n}) for n in range(3)]
        ids = self.publish_with_key(stream, batch, "k").json
        self.assertEqual(len(ids), 3)
        self.assertEqual(self.publish_with_key(stream, batch, "k").json, ids)
        self.assertNotEqual(self.publish_with_key(other, batch, "k").json, ids)
        self.assertEqual(len(self.client.read(stream).json), 3)
        self.assertEqual(len(self.client.read(other).json), 3)

    def test_racing_retries_with_one_key_store_exactly_one_event(self):
        stream = fresh()
        self.publish_ok(stream, envelope("Warmup"))
        barrier = threading.Barrier(10)

        def retry(_):
            client = self.live.client()
            try:
                client.request("GET", "/api/v1/health")
                barrier.wait()
                return client.publish(stream, envelope(), headers={"Idempotency-Key": "same"})
            finally:
                client.close()

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            responses = list(pool.map(retry, range(10)))
        self.assertEqual({r.status for r in responses}, {200})
        self.assertEqual(len({r.json for r in responses}), 1)
        self.assertEqual(len(self.client.read(stream).json), 1)

    def test_bad_keys_are_400(self):
        for key in ("", "x" * 256, "tab\there"):
            with self.subTest(key=key[:10]):
                stream = fresh()
                self.assert_error(self.publish_with_key(stream, envelope(), key), 400,
                                  starts="Bad Request - Idempotency-Key")
                self.assert_stream_absent(stream)

    def test_key_survives_a_restart(self):
        with tempfile.TemporaryDirectory() as folder:  # a store closed and opened again on its file
            path = os.path.join(folder, "events.db")
            store = eventserver.Store(path)
            first = store.publish("s", "p", [eventserver.Envelope(envelope())], "durable")
            store.close()
            store = eventserver.Store(path)
            try:
                self.assertEqual(store.publish("s", "p", [eventserver.Envelope(envelope())], "durable"), first)
                self.assertEqual(store.read("s", "OrderPlaced", "c", 10, 1 << 20).count('"eventId"'), 1)
            finally:
                store.close()


# Throwaway databases, fixtures, export, import, backup (README: For development and CI) ###

def _run_tool(*args, stdin=None):
    return subprocess.run([sys.executable, SERVER, *args], input=stdin, capture_output=True, timeout=60)


class ToolsTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.path = lambda name: os.path.join(self.tmp.name, name)

    def start(self, *args):
        process = Process("--port", "0", "--user", USER, "--password", PASSWORD, *args)
        self.addCleanup(process.stop)
        process.wait_listening()
        return process

    def write_fixtures(self, lines):
        with open(self.path("fixtures.ndjson"), "w", encoding="utf-8") as out:
            out.write("\n".join(json.dumps(line) for line in lines) + "\n")
        return self.path("fixtures.ndjson")

    def test_memory_database_is_a_temporary_file_removed_at_exit(self):
        folder = tempfile.mkdtemp()  # its own temporary folder: other tests run side by side
        self.addCleanup(shutil.rmtree, folder, True)
        process = Process("--port", "0", "--user", USER, "--password", PASSWORD, "--db", ":memory:", "--quiet",
                          env={"TMPDIR": folder})
        self.addCleanup(process.stop)
        process.wait_listening()
        client = Client(process.port)
        self.assertEqual(client.publish("s").status, 200)
        self.assertEqual(len(client.read("s").json), 1)
        created = set(os.listdir(folder))
        self.assertTrue(any(name.startswith("eventserver-") for name in created), created)
        client.close()
        process.proc.send_signal(signal.SIGTERM)
        self.assertEqual(process.finish()[0], 0)
        self.assertFalse(os.path.exists(":memory:"))
        self.assertEqual(os.listdir(folder), [])

    def test_fixtures_are_loaded_at_start_once(self):
        fixtures = self.write_fixtures([
            {"stream": "orders", "producerId": "shop", "envelope": envelope("OrderPlaced", payload={"n": 1})},
            {"stream": "orders", "producerId": "shop", "envelope": envelope("OrderPlaced", payload={"n": 2})},
            {"stream": "billing", "producerId": "acct", "envelope": envelope("Invoice")},
        ])
        db = self.path("f.db")
        for _ in range(2):  # the second start finds streams and leaves them alone
            process = self.start("--db", db, "--fixtures", fixtures, "--quiet")
            client = Client(process.port)
            self.assertEqual([e["payload"]["n"] for e in client.read("orders").json], [1, 2])
            self.assertEqual(len(client.read("billing", "Invoice").json), 1)
            self.assertEqual(client.publish("orders", producer="intruder").status, 423)
            client.close()
            process.proc.send_signal(signal.SIGTERM)
            self.assertEqual(process.finish()[0], 0)

    def test_fixtures_of_many_chunks_load_whole_and_in_order(self):
        many = 2 * eventserver.LOAD_CHUNK + 3  # written a chunk at a time, committed once
        fixtures = self.write_fixtures(
            {"stream": "s%d" % (n % 2), "producerId": "p", "envelope": envelope(payload={"n": n})}
            for n in range(many))
        db = self.path("many.db")
        process = self.start("--db", db, "--fixtures", fixtures, "--quiet")
        client = Client(process.port)
        for stream in ("s0", "s1"):
            first = client.read(stream, limit=3).json
            self.assertEqual([e["payload"]["n"] for e in first], [n for n in range(6) if n % 2 == int(stream[1])])
        client.close()
        process.proc.send_signal(signal.SIGTERM)
        self.assertEqual(process.finish()[0], 0)
        with contextlib.closing(sqlite3.connect(db)) as conn:
            rows = conn.execute("SELECT s.name, e.sequence, e.envelope FROM events e JOIN streams s"
                                " USING (stream_id) ORDER BY s.name, e.sequence").fetchall()
        self.assertEqual(len(rows), many)
        for stream in ("s0", "s1"):
            mine = [(sequence, json.loads(text)["payload"]["n"]) for name, sequence, text in rows if name == stream]
            self.assertEqual(mine, [(i + 1, n) for i, n in enumerate(range(int(stream[1]), many, 2))])

    def test_bad_fixtures_are_a_one_line_start_up_error_and_load_nothing(self):
        cases = [
            ([{"stream": "s", "producerId": "p", "envelope": envelope()}, {"stream": "s", "producerId": "p"}],
             "line 2"),
            ([{"stream": "s", "producerId": "p", "envelope": envelope()},
              {"stream": "s", "producerId": "other", "envelope": envelope()}], "Locked"),
            (["not an object"], "line 1"),
            # past the events a load writes at a time: what was written already is rolled back too
            ([{"stream": "s", "producerId": "p", "envelope": envelope()}] * (eventserver.LOAD_CHUNK + 1)
             + ["not an object"], f"line {eventserver.LOAD_CHUNK + 2}"),
        ]
        for lines, message in cases:
            with self.subTest(message=message):
                db = self.path(f"bad-{message}.db")
                process = Process("--port", "0", "--user", USER, "--password", PASSWORD,
                                  "--fixtures", self.write_fixtures(lines), db=db)
                code, _, err = process.finish()
                self.assertNotEqual(code, 0)
                self.assertIn(message, err)
                self.assertNotIn("Traceback", err)
                self.assertEqual(_count_rows(db, "events"), 0)
        process = Process("--port", "0", "--fixtures", self.path("missing.ndjson"), db=self.path("m.db"))
        code, _, err = process.finish()
        self.assertNotEqual(code, 0)
        self.assertIn("cannot read fixtures", err)

    def _populated(self):
        db = self.path("source.db")
        process = self.start("--db", db, "--quiet")
        client = Client(process.port)
        ids = client.publish("orders", [envelope("A", payload={"ü": "✓", "n": n}) for n in range(5)]).json
        client.publish("orders", envelope("B"), headers={"Idempotency-Key": "k-1"})
        client.publish('we"ird\\', envelope("A"), producer="p2")
        client.ack("orders", ids[0], consumer="c1")
        client.ack("orders", ids[1], consumer="c1")
        client.ack("orders", ids[0], consumer="c2")
        client.close()
        return db, process, ids

    def test_export_import_round_trip_is_exact(self):
        db, process, ids = self._populated()
        exported = _run_tool("export", "--db", db)  # from a live database
        self.assertEqual(exported.returncode, 0, exported.stderr)
        lines = [json.loads(line) for line in exported.stdout.decode().splitlines()]
        self.assertEqual([line["type"] for line in lines],
                         ["stream"] * 2 + ["event"] * 7 + ["offset"] * 2 + ["idempotencyKey"])
        self.assertEqual([line["eventId"] for line in lines if line["type"] == "event"][:5], ids)
        self.assertEqual(lines[2]["envelope"]["payload"], {"ü": "✓", "n": 0})
        self.assertEqual(lines[2]["sequence"], 1)
        copy = self.path("copy.db")
        imported = _run_tool("import", "--db", copy, stdin=exported.stdout)
        self.assertEqual(imported.returncode, 0, imported.stderr)
        again = _run_tool("export", "--db", copy)
        self.assertEqual(again.stdout, exported.stdout)
        # the copy serves the same state: offsets, owners and idempotency keys
        served = self.start("--db", copy, "--quiet")
        client = Client(served.port)
        self.assertEqual([e["eventId"] for e in client.read("orders", "A", consumer="c1").json], ids[2:])
        self.assertEqual(client.publish("orders", producer="intruder").status, 423)
        retry = client.publish("orders", envelope("B"), headers={"Idempotency-Key": "k-1"})
        self.assertEqual(retry.json, [line for line in lines if line["type"] == "idempotencyKey"][0]["eventIds"][0])
        client.close()

    def test_import_refuses_a_non_empty_database_and_bad_lines_change_nothing(self):
        db, process, _ = self._populated()
        exported = _run_tool("export", "--db", db).stdout
        refused = _run_tool("import", "--db", db, stdin=exported)
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn(b"in use by another eventserver", refused.stderr)  # a live server's database
        process.proc.send_signal(signal.SIGTERM)
        self.assertEqual(process.finish()[0], 0)
        refused = _run_tool("import", "--db", db, stdin=exported)
        self.assertNotEqual(refused.returncode, 0)
        self.assertIn(b"not empty", refused.stderr)
        lines = exported.decode().splitlines()
        broken = [lines[:3] + ["{oops"] + lines[3:], lines[:2] + [lines[3]] + [lines[2]] + lines[4:],
                  [lines[2]] + lines]
        for number, text in enumerate(broken):
            with self.subTest(case=number):
                target = self.path(f"broken-{number}.db")
                result = _run_tool("import", "--db", target, stdin=("\n".join(text) + "\n").encode())
                self.assertNotEqual(result.returncode, 0)
                self.assertIn(b"line ", result.stderr)
                self.assertNotIn(b"Traceback", result.stderr)
                self.assertEqual(_count_rows(target, "events"), 0)

    def test_backup_copies_a_live_database(self):
        db, process, ids = self._populated()
        client = Client(process.port)
        stop = threading.Event()

        def keep_writing():
            while not stop.is_set():
                client.publish("orders", envelope("C"))

        writer = threading.Thread(target=keep_writing)
        writer.start()
        try:
            result = _run_tool("backup", "--db", db, self.path("backup.db"))
        finally:
            stop.set()
            writer.join()
            client.close()
        self.assertEqual(result.returncode, 0, result.stderr)
        with open_database(self.path("backup.db")) as conn:
            self.assertEqual(conn.execute("PRAGMA integrity_check").fetchone()[0], "ok")
            counted = dict(conn.execute("SELECT event_name, sum(count) FROM event_counts GROUP BY event_name"))
            stored = dict(conn.execute("SELECT event_name, count(*) FROM events GROUP BY event_name"))
        self.assertEqual(counted, stored)
        self.assertEqual(stored["A"], 6)

    def test_tools_report_missing_databases_in_one_line(self):
        for args in (("export", "--db", self.path("nope.db")), ("backup", "--db", self.path("nope.db"), "x")):
            with self.subTest(args=args[0]):
                result = _run_tool(*args)
                self.assertNotEqual(result.returncode, 0)
                self.assertEqual(len(result.stderr.decode().strip().splitlines()), 1, result.stderr)


def _count_rows(db, table):
    if not os.path.exists(db):
        return 0
    with open_database(db) as conn:
        try:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


# Access log and HTTPS (README: For development and CI) #######################

class OperationsTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def test_access_log_has_one_line_per_request_and_quiet_silences_it(self):
        for quiet in (False, True):
            with self.subTest(quiet=quiet):
                process = Process("--port", "0", "--user", USER, "--password", PASSWORD,
                                  *(["--quiet"] if quiet else []), db=os.path.join(self.tmp.name, f"{quiet}.db"))
                self.addCleanup(process.stop)
                process.wait_listening()
                client = Client(process.port)
                client.publish("logged", producer="prod-7")
                client.read("logged", consumer="cons-9")
                client.request("GET", "/nope")
                client.close()
                process.proc.send_signal(signal.SIGTERM)
                _, _, err = process.finish()
                lines = [line for line in err.splitlines() if "/api/v1" in line or "/nope" in line]
                if quiet:
                    self.assertEqual(lines, [])
                    continue
                self.assertEqual(len(lines), 3, err)
                self.assertRegex(lines[0], r"POST /api/v1/streams/logged/events 200 \d+ \d+\.\dms prod-7$")
                self.assertRegex(lines[1], r"GET /api/v1/streams/logged/events\?\S+ 200 \d+ \d+\.\dms cons-9$")
                self.assertRegex(lines[2], r"GET /nope 404 11 \d+\.\dms -$")

    def test_an_unread_stderr_pipe_does_not_stop_serving(self):
        # Nobody reads the server's stderr: the pipe fills after a few hundred access-log lines,
        # then the log queue; past that, lines are dropped and counted, and serving goes on.
        process = Process("--port", "0", "--user", USER, "--password", PASSWORD,
                          db=os.path.join(self.tmp.name, "unread.db"))
        self.addCleanup(process.stop)
        process.wait_listening()
        requests = eventserver.LOG_QUEUE_LINES + 2000
        with socket.create_connection(("127.0.0.1", process.port), timeout=15) as sock:
            answers = sock.makefile("rb")
            for _ in range(requests // 500):
                sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n" * 500)
                self.assertEqual({_read_reply(answers)[0] for _ in range(500)}, {200})
        metrics = with_client(process.port, lambda c: c.request("GET", "/api/v1/metrics")).body.decode()
        dropped = int(re.search(r"^log_lines_dropped_total (\d+)$", metrics, re.M).group(1))
        self.assertGreater(dropped, 0)
        process.proc.send_signal(signal.SIGTERM)
        code, _, err = process.finish()  # reading stderr at last lets the log drain
        self.assertEqual(code, 0)
        self.assertRegex(err, r"\d+ log lines dropped while stderr was not read")
        self.assertLess(err.count("GET /api/v1/health"), requests)

    def test_https_with_certfile_and_keyfile(self):
        if not shutil.which("openssl"):
            self.skipTest("openssl is not installed: cannot make a throwaway certificate")
        cert, key = os.path.join(self.tmp.name, "cert.pem"), os.path.join(self.tmp.name, "key.pem")
        made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                               "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert],
                              capture_output=True, timeout=60)
        self.assertEqual(made.returncode, 0, made.stderr)
        process = Process("--port", "0", "--user", USER, "--password", PASSWORD, "--quiet",
                          "--certfile", cert, "--keyfile", key, db=os.path.join(self.tmp.name, "tls.db"))
        self.addCleanup(process.stop)
        line = process.proc.stdout.readline()
        self.assertIn("https://127.0.0.1:", line)
        port = int(re.search(r":(\d+)/", line).group(1))
        context = ssl.create_default_context(cafile=cert)
        context.check_hostname = False
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        conn.request("POST", "/api/v1/streams/tls/events", json.dumps(envelope()),
                     {"Authorization": basic(), "Content-Type": "application/json", "X-Producer-ID": "p"})
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertRegex(json.loads(response.read()), UUID_LOWER)
        conn.close()
        # plain HTTP to the TLS port is refused without disturbing the server
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            sock.recv(100)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        conn.request("GET", "/api/v1/health")
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()
        process.proc.send_signal(signal.SIGTERM)
        code, _, err = process.finish()
        self.assertEqual(code, 0)
        self.assertNotIn("Traceback", err)

    def test_certfile_without_keyfile_or_unreadable_is_an_error(self):
        db = os.path.join(self.tmp.name, "x.db")
        for args in (["--certfile", "c.pem"], ["--certfile", "/nonexistent.pem", "--keyfile", "/nonexistent.key"]):
            with self.subTest(args=args):
                code, _, err = Process("--port", "0", *args, db=db).finish()
                self.assertNotEqual(code, 0)
                self.assertNotIn("Traceback", err)
                self.assertEqual(len(err.strip().splitlines()), 1, err)


# As a fixture in other people's tests (SPEC 8) ###############################

def client_of(server):
    """A Client for a server that eventserver.running() started, with its credentials."""
    return Client(server.port, user=server.user, password=server.password)


def with_client_of(server, action):
    """Run action(client) on a fresh connection to server, with its credentials, then close it."""
    return with_client(server.port, action, user=server.user, password=server.password)


def _threads_end(before):
    """Wait until every thread started since before has ended."""
    _wait_for(lambda: not set(threading.enumerate()) - before)


@contextlib.contextmanager
def captured_stderr():
    """What the log thread writes to sys.stderr meanwhile, as a list of lines."""
    lines, real = [], sys.stderr

    class Capture:
        def write(self, text):
            lines.extend(text.splitlines())

        def flush(self):
            pass

    eventserver.LOG_LINES.flush(timeout=5)
    sys.stderr = Capture()
    try:
        yield lines
        eventserver.LOG_LINES.flush(timeout=5)
    finally:
        sys.stderr = real


@contextlib.contextmanager
def private_tempdir():
    """tempfile's folder, for the block, an empty one of its own: what a server leaves there shows."""
    with tempfile.TemporaryDirectory() as folder:
        saved, tempfile.tempdir = tempfile.tempdir, folder
        try:
            yield folder
        finally:
            tempfile.tempdir = saved


class RunningTest(unittest.TestCase):
    """eventserver.running(): a server in the test's own process."""

    def test_running_serves_with_a_generated_password_over_a_temporary_database(self):
        before = set(threading.enumerate())
        with private_tempdir() as folder:
            with eventserver.running() as server:
                self.check_serving(server, folder)
            self.assertEqual(os.listdir(folder), [])  # the temporary database is gone
        _threads_end(before)

    def check_serving(self, server, folder):
        self.assertEqual(server.url, f"http://127.0.0.1:{server.port}/")
        self.assertEqual((server.host, server.user), ("127.0.0.1", "admin"))
        self.assertGreaterEqual(len(server.password), 16)
        self.assertTrue(os.path.isfile(server.db))
        self.assertTrue(server.db.startswith(folder))
        client = client_of(server)
        self.addCleanup(client.close)
        event_id = client.publish("orders").json
        self.assertEqual([e["eventId"] for e in client.read("orders").json], [event_id])
        self.assertEqual(with_client(server.port, lambda c: c.read("orders")).status, 401)
        with eventserver.running() as other:
            self.assertNotEqual(other.password, server.password)

    def test_running_two_at_once_are_apart(self):
        with eventserver.running() as first, eventserver.running() as second:
            self.assertNotEqual(first.port, second.port)
            self.assertNotEqual(first.db, second.db)
            a, b = client_of(first), client_of(second)
            self.addCleanup(a.close)
            self.addCleanup(b.close)
            self.assertEqual(a.publish("orders", producer="shop").status, 200)
            self.assertEqual(b.publish("orders", producer="billing").status, 200)  # no 423: another server
            first.reset()
            self.assert_reads(a, "orders", 404)
            self.assert_reads(b, "orders", 200)

    def assert_reads(self, client, stream, status):
        self.assertEqual(client.read(stream).status, status)

    def test_running_options_are_the_flags_names(self):
        with tempfile.TemporaryDirectory() as folder:
            db, seed = os.path.join(folder, "kept.db"), os.path.join(folder, "seed.ndjson")
            with open(seed, "w") as out:
                for number in range(3):
                    out.write(json.dumps({"stream": "seeded", "producerId": "shop",
                                          "envelope": envelope(payload={"n": number})}) + "\n")
            with eventserver.running(db=db, user="me", password="pw", fixtures=seed, max_limit=2,
                                     allow_reset=True, sync="normal") as server:
                self.assertEqual((server.db, server.user, server.password), (db, "me", "pw"))
                client = client_of(server)
                self.addCleanup(client.close)
                self.assertEqual(len(client.read("seeded", limit=10).json), 2)  # max_limit
                self.assertEqual(client.request("POST", "/api/v1/reset").status, 200)  # allow_reset
                self.assertEqual(client.publish("after-reset").status, 200)
            self.assertTrue(os.path.isfile(db))  # a database it was given stays
            with eventserver.running(db=pathlib.Path(db), allow_reset=False) as server:
                self.assertEqual(server.db, db)
                client = client_of(server)
                self.addCleanup(client.close)
                self.assertEqual(client.request("POST", "/api/v1/reset").status, 404)
                self.assertEqual(client.read("seeded").status, 404)  # the reset was committed
                for stream in ("new-1", "new-2"):  # new stream IDs, after those the file has
                    self.assertEqual(client.publish(stream).status, 200)
                self.assertEqual(len(client.request("GET", "/api/v1/streams").json), 3)
        with self.assertRaisesRegex(TypeError, "unknown option 'maxlimit'"):
            eventserver.running(maxlimit=2).__enter__()
        with self.assertRaisesRegex(eventserver.ConfigError, "positive integer"):
            eventserver.running(max_limit=0).__enter__()
        with self.assertRaisesRegex(eventserver.ConfigError, "user needs a password"):
            eventserver.running(user="me").__enter__()

    def test_running_does_not_read_the_environment(self):
        saved = dict(os.environ)
        os.environ.update({"AUTH_USER": "from-env", "AUTH_PASS": "env-pass", "EVENTSERVER_MAX_LIMIT": "1"})
        try:
            with eventserver.running() as server:
                self.assertEqual(server.user, "admin")
                client = client_of(server)
                self.addCleanup(client.close)
                client.publish("s", [envelope(), envelope()])
                self.assertEqual(len(client.read("s", limit=5).json), 2)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def test_running_is_quiet_unless_asked_and_can_log_json(self):
        for options, expect in (({}, None), ({"quiet": False}, "text"), ({"quiet": False, "log_format": "json"}, "json")):
            marker = fresh("logged")  # this server's lines, whatever else the process logs
            with self.subTest(options=options):
                with captured_stderr() as lines:
                    with eventserver.running(**options) as server:
                        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                            sock.sendall(f"GET /api/v1/{marker}\x1b HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
                            refused = _read_reply(sock.makefile("rb"))[0]  # a control character: refused
                        with_client_of(server, lambda c: c.read(marker, consumer="cons-1"))
                        with_client(server.port, lambda c: c.request("GET", f"/api/v1/health?{marker}", auth=False))
                # A line is written once its answer is sent: three connections' lines come in any order.
                access = sorted((line for line in lines if marker in line), key=lambda line: line.find("/streams/"))
                if expect is None:
                    self.assertEqual(access, [])
                    continue
                self.assertEqual(len(access), 3, lines)
                if expect == "text":
                    self.assertRegex(access[2], rf"GET /api/v1/streams/{marker}/events\?\S+ 404 \d+ \d+\.\dms cons-1$")
                    continue
                self.assertFalse(any("\x1b" in line for line in access))  # JSON escapes it
                records = sorted((json.loads(line) for line in access), key=lambda record: record["path"])
                self.assertEqual({key for record in records for key in record},
                                 {"time", "client", "method", "path", "status", "bytes", "ms", "clientId"})
                self.assertEqual([(r["method"], r["path"][:20], r["status"], r["clientId"]) for r in records],
                                 [("GET", f"/api/v1/health?{marker}"[:20], 200, None),
                                  ("GET", f"/api/v1/streams/{marker}"[:20], 404, "cons-1"),
                                  (None, f"GET /api/v1/{marker}"[:20], refused, None)])  # a line it refused
                self.assertEqual(records[2]["path"], f"GET /api/v1/{marker}\x1b HTTP/1.1")
                self.assertRegex(records[2]["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_running_stops_at_the_end_of_the_block_and_leaves_nothing(self):
        before = set(threading.enumerate())
        with private_tempdir() as folder:
            port_file = os.path.join(folder, "url")
            with eventserver.running(port_file=port_file) as server:
                with open(port_file) as written:
                    self.assertEqual(written.read(), server.url + "\n")
                idle = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                self.addCleanup(idle.close)
                idle.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                self.assertEqual(_read_reply(idle.makefile("rb"))[0], 200)  # then it stays open, idle
                client = client_of(server)
                self.addCleanup(client.close)
                client.publish("s")
                waiting = concurrent.futures.ThreadPoolExecutor(1)
                self.addCleanup(waiting.shutdown)
                poll = waiting.submit(lambda: client.read("s", "Other", extra="&wait=20"))
                _wait_for(lambda: server.store.waiters.count() == 1)
                port = server.port
            self.assertEqual(poll.result(timeout=10).json, [])  # answered at the stop
            self.assertEqual(idle.recv(1), b"")  # the idle connection was closed
            with self.assertRaises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=10).close()
            self.assertEqual(os.listdir(folder), [])  # no port file, no temporary database
        waiting.shutdown()
        _threads_end(before)

    def test_running_leaves_nothing_when_it_cannot_start(self):
        before = set(threading.enumerate())
        with private_tempdir() as folder:
            bad = os.path.join(folder, "bad.ndjson")
            with open(bad, "w") as out:
                out.write('{"stream": "s", "producerId": "p"}\n')
            with self.assertRaisesRegex(eventserver.ConfigError, "line 1"):
                eventserver.running(fixtures=bad).__enter__()
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                with self.assertRaises(OSError):
                    eventserver.running(port=taken.getsockname()[1]).__enter__()
            with self.assertRaisesRegex(eventserver.ConfigError, "cannot write --port-file"):
                eventserver.running(port_file=os.path.join(folder, "no", "such", "url")).__enter__()
            self.assertEqual(os.listdir(folder), ["bad.ndjson"])
        _threads_end(before)

    def test_running_keeps_a_port_file_another_server_has_taken(self):
        with tempfile.TemporaryDirectory() as folder:
            port_file = os.path.join(folder, "url")
            with eventserver.running(port_file=port_file):
                with open(port_file, "w") as out:
                    out.write("http://127.0.0.1:1/\n")  # a newer server wrote its own
            with open(port_file) as written:
                self.assertEqual(written.read(), "http://127.0.0.1:1/\n")


class ResetTest(ServerTest):
    """--allow-reset: POST /api/v1/reset and DELETE /api/v1/streams/<stream>."""

    flags = ("--allow-reset",)

    def setUp(self):
        super().setUp()
        self.reset()

    def reset(self, client=None):
        response = (client or self.client).request("POST", "/api/v1/reset")
        self.assertEqual((response.status, response.json), (200, "OK"), response)

    def remove(self, stream):
        return self.client.request("DELETE", f"/api/v1/streams/{quote(stream)}")

    def get_json(self, path):
        response = self.client.request("GET", path)
        self.assertEqual(response.status, 200, response)
        return response.json

    def test_reset_and_remove_are_unknown_routes_without_the_flag(self):
        plain = LiveServer()
        self.addCleanup(plain.stop)
        client = plain.client()
        self.addCleanup(client.close)
        event_id = client.publish("kept").json
        for method, path in (("POST", "/api/v1/reset"), ("DELETE", "/api/v1/streams/kept"),
                             ("GET", "/api/v1/streams/kept")):
            with self.subTest(method=method, path=path):
                self.assert_error(client.request(method, path), 404, "Not Found")
        self.assertEqual([e["eventId"] for e in client.read("kept").json], [event_id])

    def test_reset_and_remove_need_credentials_and_know_their_methods(self):
        self.publish_ok("kept")
        anonymous = Client(self.live.port)
        self.addCleanup(anonymous.close)
        for method, path in (("POST", "/api/v1/reset"), ("DELETE", "/api/v1/streams/kept")):
            with self.subTest(method=method, path=path):
                self.assert_error(anonymous.request(method, path, auth=False), 401, "Unauthorized")
                wrong = Client(self.live.port, password="wrong")
                self.addCleanup(wrong.close)
                self.assert_error(wrong.request(method, path), 401)
        response = self.client.request("GET", "/api/v1/reset")
        self.assert_error(response, 405, "Method Not Allowed")
        self.assertEqual(response.headers["Allow"], "POST")
        response = self.client.request("PUT", "/api/v1/streams/kept")
        self.assertEqual((response.status, response.headers["Allow"]), (405, "DELETE"))
        self.assertEqual(len(self.client.read("kept").json), 1)

    def test_reset_leaves_a_server_as_new(self):
        first = self.publish_ok("orders", producer="shop")
        self.publish_ok("orders", [envelope("OrderShipped")], producer="shop")
        keyed = self.client.publish("orders", envelope(), producer="shop", headers={"Idempotency-Key": "k"}).json
        self.assertEqual(len(self.client.read("orders", limit=1).json), 1)  # a full answer, cached for good
        self.assertEqual(self.client.ack("orders", first).status, 200)
        self.assertEqual(self.client.request("POST", "/api/v1/orders/auditor/OrderShipped/change/1").status, 200)
        self.reset()
        store = self.live.store  # what it keeps in memory went too
        self.assertEqual((store._streams, store._counts, store._offsets), ({}, {}, {}))
        for table in ("streams", "events", "event_counts", "daily_counts", "consumer_offsets", "idempotency_keys"):
            self.assertEqual(self.db_rows(f"SELECT count(*) FROM {table}"), [(0,)], table)
        self.assertEqual(self.get_json("/api/v1/streams"), [])
        self.assertIn("\nstreams_total 0\n", self.client.request("GET", "/api/v1/metrics").body.decode())
        self.assertEqual(self.get_json("/api/v1/stats/stream-data"), [])
        self.assertEqual({day["eventCount"] for day in self.get_json("/api/v1/stats/events-current-month")}, {0})
        self.assertEqual(self.get_json("/api/v1/search?_q=order"), [])
        self.assert_stream_absent("orders")
        self.assert_error(self.client.request("GET", f"/api/v1/events/{first}/payload"), 404)
        # ownership, sequences, offsets and keys start again
        second = self.publish_ok("orders", producer="billing")  # another producer: no 423
        self.assert_error(self.client.ack("orders", first), 404)  # the old event is not in the new stream
        self.assertEqual([e["eventId"] for e in self.client.read("orders", limit=1).json], [second])  # not the cached one
        self.assertEqual(self.client.ack("orders", second).status, 200)  # sequence 1, the consumer's offset 0
        again = self.client.publish("orders", envelope(payload={"other": 1}), producer="billing",
                                    headers={"Idempotency-Key": "k"})
        self.assertEqual(again.status, 200)  # not 409: the key went with the old stream
        self.assertNotEqual(again.json, keyed)
        self.assertEqual(self.get_json("/api/v1/consumers/orders")[0]["offset"], 1)
        self.assertEqual([s["producerId"] for s in self.get_json("/api/v1/streams")], ["billing"])

    def test_reset_between_writes_of_one_commit(self):
        # Writes queued behind one commit share the next transaction: those after the reset in
        # it see an empty store (no owner, no count, no offset), those before it are undone.
        owned = self.publish_ok("shared", producer="shop")
        unread = self.publish_ok("shared", producer="shop")
        self.assertEqual(self.client.ack("shared", owned).status, 200)
        self.publish_ok("other", producer="shop")
        store = self.live.store
        actions = [lambda c: c.publish("shared", producer="shop"),
                   lambda c: c.request("POST", "/api/v1/reset"),
                   lambda c: c.publish("shared", producer="billing"),
                   lambda c: c.ack("shared", unread),  # looked up before the reset: the stream is gone
                   lambda c: c.request("DELETE", "/api/v1/streams/other"),
                   lambda c: c.publish("other", producer="billing")]
        with concurrent.futures.ThreadPoolExecutor(len(actions)) as pool:
            store.writes.lock.acquire()
            try:
                futures = []
                for action in actions:  # queued one after the other, in this order
                    futures.append(pool.submit(with_client, self.live.port, action))
                    _wait_for(lambda: store.writes.queued() == len(futures))
            finally:
                store.writes.lock.release()
            responses = [future.result(timeout=10) for future in futures]
        self.assertEqual([r.status for r in responses], [200, 200, 200, 404, 404, 200], responses)
        self.assertEqual([(s["streamName"], s["producerId"], s["eventsCount"], s["consumers"])
                          for s in self.get_json("/api/v1/streams")],
                         [("other", "billing", 1, 0), ("shared", "billing", 1, 0)])
        self.assertEqual(self.db_rows("SELECT count(*) FROM events"), [(2,)])
        self.assertEqual(self.db_rows("SELECT count(*) FROM consumer_offsets"), [(0,)])
        self.assertEqual([e["eventId"] for e in self.client.read("shared").json], [responses[2].json])

    def test_reset_answers_waiting_long_polls(self):
        self.publish_ok("waited")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            polls = [pool.submit(with_client, self.live.port,
                                 lambda c: c.read("waited", "Later", extra="&wait=20")) for _ in range(2)]
            _wait_for(lambda: self.live.store.waiters.count() == 2)
            self.reset()
            answers = [poll.result(timeout=10) for poll in polls]
        self.assertEqual([(a.status, a.json) for a in answers], [(200, [])] * 2)

    def test_reset_is_one_transaction(self):
        event_id = self.publish_ok("orders")
        self.assertEqual(self.client.ack("orders", event_id).status, 200)
        self.publish_ok("orders")
        with open_database(self.live.db) as conn:  # the last of its deletes fails
            conn.execute("CREATE TRIGGER kept BEFORE DELETE ON streams BEGIN SELECT RAISE(ABORT, 'kept'); END")
        self.addCleanup(self._drop_trigger)
        with self.assertLogs("eventserver", level="ERROR"):
            self.assert_error(self.client.request("POST", "/api/v1/reset"), 500, starts="Internal Server Error")
        for table, rows in (("events", 2), ("consumer_offsets", 1), ("event_counts", 1), ("streams", 1)):
            self.assertEqual(self.db_rows(f"SELECT count(*) FROM {table}"), [(rows,)], table)
        self.assertEqual(len(self.client.read("orders").json), 1)  # past the offset, as before
        self.assertEqual(self.client.publish("orders", producer="other").status, 423)

    def _drop_trigger(self):
        with open_database(self.live.db) as conn:
            conn.execute("DROP TRIGGER kept")

    def test_remove_stream_removes_that_stream_only(self):
        gone = self.publish_ok("gone", producer="shop")
        self.publish_ok("gone", [envelope(), envelope("Other")], producer="shop")
        self.client.publish("gone", envelope(), producer="shop", headers={"Idempotency-Key": "k"})
        self.assertEqual(self.client.ack("gone", gone).status, 200)
        kept = self.publish_ok("kept", producer="shop")
        self.assertEqual(self.client.ack("kept", kept).status, 200)
        self.publish_ok("kept", producer="shop")
        today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()

        def events_today():
            return [d["eventCount"] for d in self.get_json("/api/v1/stats/events-current-month") if d["date"] == today]

        self.assertEqual(events_today(), [6])
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            on_gone = pool.submit(with_client, self.live.port, lambda c: c.read("gone", "Later", extra="&wait=20"))
            on_kept = pool.submit(with_client, self.live.port, lambda c: c.read("kept", "Later", extra="&wait=20"))
            _wait_for(lambda: self.live.store.waiters.count() == 2)
            response = self.remove("gone")
            self.assertEqual((response.status, response.json), (200, "OK"))
            self.assertEqual(on_gone.result(timeout=10).json, [])
            _wait_for(lambda: self.live.store.waiters.count() == 1)  # the other stream's poll waits on
            self.assertFalse(on_kept.done())
            later = self.publish_ok("kept", envelope("Later"), producer="shop")
            self.assertEqual([e["eventId"] for e in on_kept.result(timeout=10).json], [later])
        self.assert_stream_absent("gone")
        self.assertEqual(events_today(), [3])
        self.assertEqual([s["streamName"] for s in self.get_json("/api/v1/streams")], ["kept"])
        self.assertEqual(self.db_rows("SELECT count(*) FROM events"), [(3,)])
        self.assertEqual(self.db_rows("SELECT count(*) FROM idempotency_keys"), [(0,)])
        self.assertEqual(len(self.client.read("kept").json), 1)  # its offset kept
        self.publish_ok("gone", producer="billing")  # free for another producer
        self.assert_error(self.remove("never-there"), 404, "Not Found - stream never-there not found")
        self.assert_error(self.remove("bad\x7fname"), 400, starts="Bad Request - ")

    def test_reset_among_concurrent_writes_leaves_memory_and_database_agreeing(self):
        streams = [f"busy-{index}" for index in range(4)]
        stop = threading.Event()
        answers = collections.Counter()

        def publisher(stream):
            client = Client(self.live.port)
            try:
                for number in range(60):
                    if stop.is_set():
                        break
                    body = envelope(payload={"n": number}) if number % 2 else [envelope(), envelope("Other")]
                    answers[client.publish(stream, body, producer=f"owner-{stream}").status] += 1
            finally:
                client.close()

        threads = [threading.Thread(target=publisher, args=(stream,)) for stream in streams]
        for thread in threads:
            thread.start()
        try:
            for _ in range(4):
                published = sum(answers.values())
                _wait_for(lambda: sum(answers.values()) > published + 5 or not any(t.is_alive() for t in threads))
                self.reset()
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        self.assertEqual(set(answers), {200})  # never a 423: a stream's owner went with it
        for stream in streams:
            for name in ("OrderPlaced", "Other"):
                stored = self.db_rows("SELECT count(*) FROM events e JOIN streams s USING (stream_id)"
                                      " WHERE s.name = ? AND e.event_name = ?", stream, name)[0][0]
                response = self.client.read(stream, name, limit=1000)
                events = response.json if response.status == 200 else []
                self.assertEqual(len(events), stored, (stream, name))
                for item in events:  # sequences 1, 2, 3... as the database has them
                    self.assertEqual(self.client.ack(stream, item["eventId"]).status, 200)


class FixtureCommandLineTest(unittest.TestCase):
    """Out of process: the port file, the start-up line, the environment, JSON logs."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.db = os.path.join(self.tmp.name, "events.db")

    def test_port_file_holds_the_url_once_accepting_and_is_removed_at_exit(self):
        folder = os.path.join(self.tmp.name, "run")
        os.mkdir(folder)
        port_file = os.path.join(folder, "url")
        process = Process("--port", "0", "--port-file", port_file, "--user", USER, "--password", PASSWORD,
                          "--quiet", db=self.db)
        self.addCleanup(process.stop)
        _wait_for(lambda: os.path.exists(port_file) or process.proc.poll() is not None)
        with open(port_file) as written:
            url = written.read()
        self.assertRegex(url, r"^http://127\.0\.0\.1:\d+/\n$")
        port = int(url.rsplit(":", 1)[1].strip("/\n"))
        self.assertEqual(with_client(port, lambda c: c.request("GET", "/api/v1/health")).status, 200)
        self.assertEqual(process.proc.stdout.readline(), f"eventserver {eventserver.__version__} listening on {url}")
        self.assertEqual(os.listdir(folder), ["url"])  # written in place: no temporary file left
        process.proc.send_signal(signal.SIGTERM)
        self.assertEqual(process.finish()[0], 0)
        self.assertEqual(os.listdir(folder), [])

    def test_port_file_that_cannot_be_written_is_a_start_up_error(self):
        line = _refused(self, "--port", "0", "--db", self.db,
                        "--port-file", os.path.join(self.tmp.name, "missing", "url"))
        self.assertIn("cannot write --port-file", line)

    def test_empty_credentials_are_a_start_up_error(self):
        # A CI secret that is not set: AUTH_USER= AUTH_PASS= must not start with a made-up password.
        line = _refused(self, "--port", "0", "--db", self.db, env={"AUTH_USER": "", "AUTH_PASS": ""})
        self.assertEqual(line, "eventserver: AUTH_USER is empty")
        self.assertFalse(os.path.exists(self.db))
        for argv, env in (([], {"AUTH_USER": "ci", "AUTH_PASS": ""}), ([], {"EVENTSERVER_PASSWORD": ""}),
                          ([], {"EVENTSERVER_USER": "", "AUTH_USER": "ci", "AUTH_PASS": "p"}),
                          (["--user", "", "--password", "p"], {})):
            with self.subTest(argv=argv, env=env), self.assertRaisesRegex(eventserver.ConfigError, "is empty"):
                eventserver.parse_config(argv, env)

    def test_every_flag_has_its_environment_variable(self):
        given = {eventserver._text: "some-text", eventserver._port: "7", eventserver._positive_int: "7",
                 eventserver._seconds: "7", eventserver._switch: "yes"}
        environ = {}
        for name, kind, default, _ in eventserver.FLAGS:
            text = given.get(kind) or next(choice for choice in kind.__name__.split(" or ") if choice != default)
            environ[eventserver.environment_variable(name)] = text
        self.assertEqual(eventserver.environment_variable("max-limit"), "EVENTSERVER_MAX_LIMIT")
        config = eventserver.parse_config([], environ)
        for name, kind, default, _ in eventserver.FLAGS:
            with self.subTest(flag=name):
                text = environ[eventserver.environment_variable(name)]
                self.assertNotEqual(text, default)
                self.assertEqual(getattr(config, name.replace("-", "_")), kind(text))

    def test_switches_take_yes_and_no_in_the_environment(self):
        for text, value in (("1", True), ("true", True), ("YES", True), ("Yes", True),
                            ("0", False), ("false", False), ("no", False), ("NO", False)):
            with self.subTest(text=text):
                config = eventserver.parse_config([], {"EVENTSERVER_QUIET": text, "EVENTSERVER_ALLOW_RESET": text})
                self.assertEqual((config.quiet, config.allow_reset), (value, value))
        for text in ("maybe", "2", "on"):
            with self.subTest(text=text), self.assertRaisesRegex(eventserver.ConfigError, "EVENTSERVER_ALLOW_RESET"):
                eventserver.parse_config([], {"EVENTSERVER_ALLOW_RESET": text})
        self.assertTrue(eventserver.parse_config(["--allow-reset"], {"EVENTSERVER_ALLOW_RESET": "no"}).allow_reset)

    def test_log_format_json_makes_every_log_line_a_json_object(self):
        seeded = eventserver.Store(self.db)  # a database with a stream: the fixtures are not loaded, and it says so
        seeded.publish("s", "p", [eventserver.Envelope(envelope())])
        seeded.close()
        seed = os.path.join(self.tmp.name, "seed.ndjson")
        with open(seed, "w") as out:
            out.write(json.dumps({"stream": "t", "producerId": "p", "envelope": envelope()}) + "\n")
        process = Process("--port", "0", "--user", USER, "--password", PASSWORD, "--fixtures", seed,
                          env={"EVENTSERVER_LOG_FORMAT": "json"}, db=self.db)
        self.addCleanup(process.stop)
        process.wait_listening()
        with_client(process.port, lambda c: c.read("s", consumer="c-1"))
        process.proc.send_signal(signal.SIGTERM)
        code, _, err = process.finish()
        self.assertEqual(code, 0)
        records = [json.loads(line) for line in err.splitlines()]  # every line, or this fails
        self.assertEqual([(r["level"], r["message"][:17]) for r in records if "level" in r],
                         [("INFO", f"fixtures {seed}"[:17])])
        self.assertEqual([(r["method"], r["path"][:28], r["status"], r["clientId"]) for r in records if "method" in r],
                         [("GET", "/api/v1/streams/s/events?eve", 200, "c-1")])


def _refused(test, *args, env=None):
    """The one line a start that must fail writes on stderr (no traceback, a non-zero exit)."""
    process = Process(*args, env=env)
    code, _, err = process.finish()
    test.assertNotEqual(code, 0)
    test.assertNotIn("Traceback", err)
    lines = [line for line in err.splitlines() if line.strip()]
    test.assertEqual(len(lines), 1, err)
    return lines[0]


class TestPythonsTest(unittest.TestCase):
    """make test-pythons, on a pyenv folder of stand-in interpreters."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def interpreter(self, version, passes=True):
        folder = os.path.join(self.tmp.name, "versions", version, "bin")
        os.makedirs(folder)
        with open(os.path.join(folder, "python"), "w") as out:
            out.write(f'#!/bin/sh\necho "{version} ran with $*" >> "{self.tmp.name}/ran"\n'
                      f'echo "tests: 1 passed, {0 if passes else 1} failed, 0 skipped"\nexit {0 if passes else 1}\n')
        os.chmod(os.path.join(folder, "python"), 0o755)

    def make(self):
        result = subprocess.run(["make", "-s", "test-pythons"], cwd=HERE, capture_output=True, text=True,
                                env={**os.environ, "PYENV_ROOT": self.tmp.name, "MAKEFLAGS": ""}, timeout=60)
        ran = []
        if os.path.exists(os.path.join(self.tmp.name, "ran")):
            with open(os.path.join(self.tmp.name, "ran")) as lines:
                ran = lines.read().splitlines()
        return result.returncode, result.stdout + result.stderr, ran

    def test_make_test_pythons_runs_the_newest_of_each_and_names_the_missing(self):
        for version in ("3.9.1", "3.9.10", "3.11.2", "3.7.17", "pypy3.10-7.3.12", "3.13.0t"):
            self.interpreter(version)
        code, out, ran = self.make()
        self.assertEqual(code, 0, out)
        self.assertEqual(ran, ["3.9.10 ran with -W error test_eventserver.py",
                               "3.11.2 ran with -W error test_eventserver.py"])
        self.assertIn("not found under", out)
        self.assertIn(": 3.8 3.10 3.12 3.13\n", out)
        self.interpreter("3.12.4", passes=False)
        code, out, ran = self.make()
        self.assertNotEqual(code, 0)
        self.assertIn("the suite failed on 3.12.4", out)
        self.assertEqual(len(ran), 5)  # it still ran the others

    def test_make_test_pythons_without_any_is_not_a_failure(self):
        code, out, ran = self.make()
        self.assertEqual((code, ran), (0, []), out)
        self.assertIn("no CPython 3.8 or newer found", out)
        self.assertIn("3.8 3.9 3.10 3.11 3.12 3.13", out)


# The README's examples, run as written #######################################

README = os.path.join(HERE, "README.md")
_ANY_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ANY_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00")
_ANY_HTTP_DATE = re.compile(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT")


def readme_section(title):
    """The text of README.md's section "## title", up to the next "## "."""
    with open(README, encoding="utf-8") as readme:
        text = readme.read()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def fenced_blocks(text):
    """(language, body) of each ``` block of a markdown text, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M)


def shell_examples(text):
    """(command, output shown) of each `$ ` line of the text's ``` blocks, in order;
    a command goes on over the indented lines after it."""
    examples = []
    for _, body in fenced_blocks(text):
        current = None
        for line in body.splitlines():
            if line.startswith("$ "):
                current = [line[2:], []]
                examples.append(current)
            elif current and line.startswith(" ") and not current[1]:
                current[0] += "\n" + line
            elif current:
                current[1].append(line)
    return [(command, "\n".join(shown).strip()) for command, shown in examples]


class Workspace:
    """A folder as a user's checkout would be: eventserver.py in it, and python3
    on PATH being the Python that runs these tests. No AUTH_* or EVENTSERVER_* variables."""

    def __init__(self, test):
        self.tmp = tempfile.TemporaryDirectory()
        test.addCleanup(self.tmp.cleanup)
        self.path = os.path.join(self.tmp.name, "checkout")
        bin_folder = os.path.join(self.tmp.name, "bin")
        os.makedirs(self.path)
        os.makedirs(bin_folder)
        shutil.copy(SERVER, self.path)
        os.symlink(sys.executable, os.path.join(bin_folder, "python3"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTH_", "EVENTSERVER_", "PYTEST"))}
        self.env["PATH"] = bin_folder + os.pathsep + os.environ.get("PATH", "")

    def run(self, command, env=None, timeout=60):
        return subprocess.run(command, cwd=self.path, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout, start_new_session=True)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ReadmeTest(unittest.TestCase):
    """The README's examples: the API ones pasted in order into one shell,
    and the three of "Use it in CI" (a workflow, a conftest.py, a shell recipe)."""

    def test_readme_api_examples_work_pasted_in_order(self):
        api = readme_section("The API") + readme_section("For development and CI")
        words = shlex.split(re.search(r"run\s+against a new server, `([^`]+)`", api).group(1))
        assignments = list(itertools.takewhile(lambda word: re.match(r"\w+=", word), words))
        work = Workspace(self)
        log = open(os.path.join(work.tmp.name, "server.log"), "w")
        self.addCleanup(log.close)
        server = subprocess.Popen(words[len(assignments):] + ["--port", "0"], cwd=work.path, stderr=log, text=True,
                                  env={**work.env, **dict(word.split("=", 1) for word in assignments)},
                                  stdout=subprocess.PIPE)
        self.addCleanup(lambda: (server.poll() is None and server.kill(), server.wait(), server.stdout.close()))
        url = server.stdout.readline().split()[-1].rstrip("/")
        examples = shell_examples(api)
        self.assertGreater(len(examples), 15)
        exports = re.search(r"### Export, import and backup\n\n((?:    .*\n)+)", api).group(1)
        commands = [command for command, _ in examples] + [line.strip() for line in exports.splitlines()]
        script = "exec 2>&1\n" + "".join(f"printf '\\n@@@ {index}\\n'\n{command.replace('http://127.0.0.1:8000', url)}\n"
                                         for index, command in enumerate(commands))
        result = work.run(["bash", "-c", script])
        self.assertEqual(result.returncode, 0, result.stdout)
        answers = re.split(r"\n@@@ \d+\n", "\n" + result.stdout)[1:]
        self.assertEqual(len(answers), len(commands), result.stdout)
        ids = {}
        for (command, shown), answer in zip(examples, answers):
            with self.subTest(command=command[:120]):
                self.assert_same_answer(shown, answer.replace("\r\n", "\n").strip(), ids)
        for answer in answers[len(examples):]:  # export, import, backup: quiet
            self.assertEqual(answer.strip(), "")
        with open(os.path.join(work.path, "dump.ndjson")) as dump:
            self.assertGreater(len(dump.readlines()), 5)
        for copy in ("copy.db", "backup.db"):
            self.assertTrue(os.path.getsize(os.path.join(work.path, copy)) > 0)

    def test_readme_go_mode_example_answers_as_shown(self):
        # Against a --compat go server; the README shows the head of the answer in part.
        (command, shown), = shell_examples(readme_section("Go compatibility mode (`--compat go`)"))
        with eventserver.running(compat="go", user="admin", password="secret") as server:
            result = Workspace(self).run(["bash", "-c", command.replace("http://127.0.0.1:8000/", server.url)])
        answer = result.stdout.replace("\r\n", "\n").strip().splitlines()
        shown_lines = shown.splitlines()
        self.assertEqual(answer[0], shown_lines[0])  # the status line
        self.assertEqual(_ANY_UUID.sub("<id>", answer[-1]), _ANY_UUID.sub("<id>", shown_lines[-1]))
        self.assertEqual([line for line in answer if line in shown_lines[1:-1]], shown_lines[1:-1])

    def assert_same_answer(self, shown, answer, ids):
        """The answer is what the README shows, but for IDs (one README ID for
        each real one, the same every time it comes back) and times."""
        if "..." in shown:  # an elided list: the same fields in every item
            keys = {tuple(json.loads(item)) for item in re.findall(r"\{[^{}]*\}", shown)}
            self.assertEqual(len(keys), 1, shown)
            self.assertEqual({tuple(item) for item in json.loads(answer)}, keys)
            return
        shown_ids, real_ids = _ANY_UUID.findall(shown), _ANY_UUID.findall(answer)
        self.assertEqual(len(shown_ids), len(real_ids), answer)
        for real, written in zip(real_ids, shown_ids):
            self.assertEqual(ids.setdefault(real, written), written, f"{real} is shown as two IDs")
        self.assertEqual(len(set(ids.values())), len(ids), "two real IDs shown as one")
        answer = _ANY_UUID.sub(lambda match: ids[match.group()], answer)
        for pattern, placeholder in ((_ANY_TIME, "<time>"), (_ANY_HTTP_DATE, "<date>")):
            shown, answer = pattern.sub(placeholder, shown), pattern.sub(placeholder, answer)
        self.assertEqual(answer, shown)

    def ci_block(self, language, first_line=None):
        blocks = [body for lang, body in fenced_blocks(readme_section("Use it in CI")) if lang == language
                  and (first_line is None or body.startswith(first_line + "\n"))]
        self.assertEqual(len(blocks), 1, (language, first_line))
        return blocks[0]

    def test_readme_ci_pytest_fixture_runs_as_written(self):
        work = Workspace(self)
        for name in ("conftest.py", "test_orders.py"):
            with open(os.path.join(work.path, name), "w") as out:
                out.write(self.ci_block("python", f"# {name}"))
        if importlib.util.find_spec("pytest"):
            result = work.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "--rootdir", work.path, work.path])
        else:  # without pytest, the same fixtures and tests through a stand-in for it
            result = work.run([sys.executable, "-c", PYTEST_STAND_IN, work.path])
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertRegex(result.stdout, r"\b2 passed\b")

    def test_readme_ci_github_actions_workflow_runs_as_written(self):
        env, steps = github_actions_job(self.ci_block("yaml"))
        self.assertEqual([name for name, _ in steps], ["Start eventserver", "Integration tests", "Stop eventserver"])
        work = Workspace(self)
        runner_temp = os.path.join(work.tmp.name, "runner")
        os.mkdir(runner_temp)
        github_env = os.path.join(runner_temp, "github_env")
        open(github_env, "w").close()
        self.addCleanup(self._kill_listed_server, github_env)
        outputs = []
        for name, script in steps:
            with open(github_env) as exported:
                step_env = dict(line.rstrip("\n").split("=", 1) for line in exported if "=" in line)
            script_file = os.path.join(runner_temp, "step.sh")
            with open(script_file, "w") as out:
                out.write(script)
            result = work.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", script_file],
                              env={**env, "RUNNER_TEMP": runner_temp, "GITHUB_ENV": github_env, **step_env})
            self.assertEqual(result.returncode, 0, (name, result.stdout, result.stderr))
            outputs.append(result.stdout)
        self.assertEqual(outputs[1], "[]")
        port_file = os.path.join(runner_temp, "eventserver.url")
        _wait_for(lambda: not os.path.exists(port_file))  # removed at exit: it stopped cleanly
        with open(os.path.join(runner_temp, "eventserver.log")) as log:
            text = log.read()
        self.assertRegex(text, r"^eventserver \S+ listening on http://127\.0\.0\.1:\d+/\n")
        self.assertNotIn("Traceback", text)

    def _kill_listed_server(self, github_env):
        with open(github_env) as exported:
            for line in exported:
                if line.startswith("EVENTSERVER_PID="):
                    with contextlib.suppress(OSError, ValueError):
                        os.kill(int(line.split("=", 1)[1]), signal.SIGKILL)

    def test_readme_ci_shell_recipe_runs_as_written(self):
        recipe = self.ci_block("sh")
        work = Workspace(self)
        process = subprocess.Popen(["sh", "-c", recipe], cwd=work.path, env=work.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.addCleanup(lambda: process.poll() is None and os.killpg(process.pid, signal.SIGKILL))
        out, _ = process.communicate(timeout=60)
        self.assertEqual(process.returncode, 0, out)
        lines = out.splitlines()
        self.assertRegex(lines[0], r"^eventserver \S+ listening on http://127\.0\.0\.1:\d+/$")
        self.assertEqual(lines[1:], ['{"status": "OK"}"OK"'])  # curl adds no newline


def github_actions_job(workflow):
    """(env, [(name, script)]) of the one job of a GitHub Actions workflow:
    its env mapping and the steps that run a script (`uses:` steps are the
    runner's: checking out is the workspace itself). A reader of the YAML
    this README uses, not of every YAML."""
    env, steps, lines = {}, [], workflow.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        match = re.match(r"^(\s*)(- )?([\w-]+):\s*(.*?)\s*$", line)
        if not match:
            continue
        indent, key, value = len(match.group(1)) + len(match.group(2) or ""), match.group(3), match.group(4)
        if match.group(2):
            steps.append([None, None])
        if key == "env" and not steps:
            while index < len(lines) and len(lines[index]) - len(lines[index].lstrip()) > indent:
                name, _, text = lines[index].strip().partition(":")
                env[name] = text.split("#")[0].strip()
                index += 1
        elif key == "name" and steps:
            steps[-1][0] = value
        elif key == "run" and steps:
            if value == "|":
                body = []
                while index < len(lines) and (not lines[index].strip() or
                                              len(lines[index]) - len(lines[index].lstrip()) > indent):
                    body.append(lines[index])
                    index += 1
                steps[-1][1] = textwrap.dedent("\n".join(body)) + "\n"
            else:
                steps[-1][1] = value + "\n"
    return env, [tuple(step) for step in steps if step[1] is not None]


# What a conftest.py needs of pytest, for a machine without it: fixtures by
# parameter name, "session" or per-test scope, generator fixtures torn down after.
PYTEST_STAND_IN = r'''
import importlib, inspect, os, sys, types

folder = sys.argv[1]
sys.path.insert(0, folder)
pytest = types.ModuleType("pytest")


def fixture(function=None, *, scope="function"):
    def mark(function):
        function.fixture_scope = scope
        return function
    return mark(function) if function else mark


pytest.fixture = fixture
sys.modules["pytest"] = pytest
fixtures = {name: value for name, value in vars(importlib.import_module("conftest")).items()
            if hasattr(value, "fixture_scope")}
session, session_teardown = {}, []


def value_of(name, teardown):
    function = fixtures[name]
    if function.fixture_scope == "session" and name in session:
        return session[name]
    value = function(*[value_of(parameter, teardown) for parameter in inspect.signature(function).parameters])
    if inspect.isgenerator(value):
        generator, value = value, next(value)
        (session_teardown if function.fixture_scope == "session" else teardown).append(generator)
    if function.fixture_scope == "session":
        session[name] = value
    return value


passed = 0
for filename in sorted(os.listdir(folder)):
    if filename.startswith("test_") and filename.endswith(".py"):
        for name, test in vars(importlib.import_module(filename[:-3])).items():
            if name.startswith("test_") and inspect.isfunction(test):
                teardown = []
                test(*[value_of(parameter, teardown) for parameter in inspect.signature(test).parameters])
                for generator in reversed(teardown):
                    next(generator, None)
                passed += 1
for generator in reversed(session_teardown):
    next(generator, None)
print(f"{passed} passed")
'''


# Command line and process life (SPEC 1, 5) ####################################

class Process:
    """eventserver.py as a subprocess, as a user starts it."""

    def __init__(self, *args, env=None, db=None, prefix=(), python=sys.executable):
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTH_", "EVENTSERVER_"))}
        self.env.update(env or {})
        self.env = {name: value for name, value in self.env.items() if value is not None}  # None: unset
        command = [*prefix, python, SERVER, *args]  # prefix: e.g. prlimit, which execs it (same pid)
        if db:
            command += ["--db", db]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=self.env, text=True)
        self.port = None

    def wait_listening(self):
        line = self.proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if not match:
            self.proc.kill()
            raise AssertionError(f"no URL line: {line!r} {self.proc.stderr.read()!r}")
        self.port = int(match.group(1))
        return line

    def finish(self, timeout=15):
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def stop(self):
        """Stop it as a user would (SIGTERM), if it still runs, and close its pipes."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.communicate()

    def kill(self):
        """kill -9: no chance to finish anything."""
        self.proc.kill()
        self.proc.communicate()


class CommandLineTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.db = os.path.join(self.tmp.name, "events.db")

    def start(self, *args, env=None):
        process = Process("--port", "0", *args, env=env, db=self.db)
        self.addCleanup(process.stop)
        return process

    def test_cli_prints_url_and_generated_password_once(self):
        process = self.start()
        line = process.wait_listening()
        self.assertNotIn(":0/", line)
        credentials = process.proc.stdout.readline()
        match = re.search(r"user (\S+), password (\S+)", credentials)
        self.assertIsNotNone(match, credentials)
        user, password = match.groups()
        self.assertGreaterEqual(len(password), 16)
        client = Client(process.port)
        response = client.request("GET", "/api/v1/streams/x/events?eventName=A&limit=1",
                                  headers={"Authorization": basic(user, password), "X-Consumer-ID": "c"})
        self.assertEqual(response.status, 404)  # authenticated: the stream just does not exist
        self.assertEqual(client.request("GET", "/api/v1/streams/x/events?eventName=A&limit=1",
                                        headers={"X-Consumer-ID": "c"}).status, 401)
        client.close()
        process.proc.send_signal(signal.SIGTERM)
        code, out, _ = process.finish()
        self.assertEqual(code, 0)
        self.assertNotIn(password, out)
        other = self.start()
        other.wait_listening()
        self.assertNotIn(password, other.proc.stdout.readline())  # a new one each start

    def test_cli_reads_environment(self):
        port = _free_port()
        process = Process(env={"EVENTSERVER_PORT": str(port), "EVENTSERVER_DB": self.db,
                               "AUTH_USER": "envuser", "AUTH_PASS": "envpass", "EVENTSERVER_SYNC": "normal"})
        self.addCleanup(process.stop)
        process.wait_listening()
        self.assertEqual(process.port, port)
        client = Client(port)
        response = client.request("POST", "/api/v1/streams/s/events", envelope(),
                                  {"Authorization": basic("envuser", "envpass"), "X-Producer-ID": "p"})
        self.assertEqual(response.status, 200)
        client.close()
        process.proc.send_signal(signal.SIGTERM)
        self.assertEqual(process.finish()[0], 0)
        self.assertTrue(os.path.exists(self.db))

    def test_cli_flags_win_over_environment(self):
        process = self.start("--user", "flaguser", "--password", "flagpass",
                             env={"AUTH_USER": "envuser", "AUTH_PASS": "envpass", "EVENTSERVER_PORT": "1"})
        process.wait_listening()
        client = Client(process.port)
        self.assertEqual(client.request("GET", "/api/v1/streams/x/events?eventName=A&limit=1",
                                        headers={"Authorization": basic("flaguser", "flagpass"),
                                                 "X-Consumer-ID": "c"}).status, 404)
        client.close()

    def assert_refused(self, *args, env=None, message=None):
        process = Process(*args, env=env)
        code, out, err = process.finish()
        self.assertNotEqual(code, 0)
        self.assertNotIn("Traceback", err)
        lines = [line for line in err.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, err)
        if message:
            self.assertIn(message, lines[0])
        return lines[0]

    def test_cli_user_without_password_is_an_error(self):
        self.assert_refused("--port", "0", "--db", self.db, "--user", "u", message="password")
        self.assert_refused("--port", "0", "--db", self.db, "--password", "p", message="user")
        self.assert_refused("--port", "0", "--db", self.db, env={"AUTH_USER": "u"}, message="password")

    def test_cli_bad_flags_are_one_line_errors(self):
        for args in (["--port", "abc"], ["--port", "70000"], ["--sync", "sometimes"], ["--bogus"],
                     ["--max-body", "0"], ["--max-limit", "x"], ["stray"]):
            with self.subTest(args=args):
                self.assert_refused(*args, "--db", self.db)

    def test_cli_port_in_use_is_a_one_line_error(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            self.assert_refused("--port", str(port), "--db", self.db, message="cannot listen")

    def test_cli_database_that_is_not_sqlite_is_a_one_line_error(self):
        with open(self.db, "wb") as garbage:
            garbage.write(b"this is not a database, just some text\n" * 200)
        self.assert_refused("--port", "0", "--db", self.db, message="database")
        self.assert_refused("--port", "0", "--db", self.tmp.name, message="database")  # a folder
        self.assert_refused("--port", "0", "--db", os.path.join(self.tmp.name, "no", "such", "dir.db"),
                            message="database")

    def test_cli_second_server_on_the_same_database_is_refused(self):
        first = self.start("--user", USER, "--password", PASSWORD, "--quiet")
        first.wait_listening()
        self.assert_refused("--port", "0", "--db", self.db, "--user", USER, "--password", PASSWORD,
                            message="in use by another eventserver")
        client = Client(first.port)
        self.assertEqual(client.publish("still-serving").status, 200)
        client.close()

    def test_cli_creates_schema_with_user_version_in_wal_mode(self):
        process = self.start()
        process.wait_listening()
        with open_database(self.db) as conn:
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], eventserver.SCHEMA_VERSION)
            self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")

    def test_cli_sigterm_and_sigint_exit_0_and_data_survives(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=signum):
                process = self.start("--user", USER, "--password", PASSWORD)
                process.wait_listening()
                client = Client(process.port)
                event_id = client.publish(f"s{signum}").json
                client.close()
                process.proc.send_signal(signum)
                code, _, err = process.finish()
                self.assertEqual(code, 0, err)
                self.assertNotIn("Traceback", err)
                again = self.start("--user", USER, "--password", PASSWORD)
                again.wait_listening()
                client = Client(again.port)
                self.assertEqual([e["eventId"] for e in client.read(f"s{signum}").json], [event_id])
                client.close()
                again.proc.send_signal(signal.SIGTERM)
                self.assertEqual(again.finish()[0], 0)

    def test_cli_shutdown_waits_for_in_flight_requests(self):
        process = self.start("--user", USER, "--password", PASSWORD, "--quiet")
        process.wait_listening()
        stream = "slow"
        client = Client(process.port)
        self.addCleanup(client.close)
        client.publish(stream)
        client.read(stream)
        # a long-poll read is in flight; SIGTERM must answer it, then exit 0
        waiting = concurrent.futures.ThreadPoolExecutor(1).submit(
            with_client, process.port, lambda c: c.read(stream, "Other", extra="&wait=20"))
        _wait_for(lambda: re.search(r"^long_polls_waiting 1$", with_client(process.port, lambda c: c.request(
            "GET", "/api/v1/metrics").body.decode()), re.M))  # parked, in the other process
        started = time.monotonic()
        process.proc.send_signal(signal.SIGTERM)
        response = waiting.result(timeout=10)
        self.assertEqual((response.status, response.json), (200, []))
        self.assertEqual(process.finish()[0], 0)
        self.assertLess(time.monotonic() - started, 5)

    def test_cli_client_disconnects_are_not_tracebacks(self):
        process = self.start("--user", USER, "--password", PASSWORD)
        process.wait_listening()
        body = json.dumps(envelope()).encode()
        for index in range(20):
            sock = socket.create_connection(("127.0.0.1", process.port))
            request = raw_publish("d", f"Content-Length: {len(body)}\r\n")
            sock.sendall(request.encode() + (body if index % 2 else body[:10]))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST on close
            sock.close()
        time.sleep(0.5)
        client = Client(process.port)
        self.assertEqual(client.request("GET", "/api/v1/health").status, 200)
        client.close()
        process.proc.send_signal(signal.SIGTERM)
        code, _, err = process.finish()
        self.assertEqual(code, 0)
        self.assertNotIn("Traceback", err)


def _malloc_heaps(pid):
    """How many arenas glibc's malloc has made in a process beside its main
    one: each lives in a heap of its own, 64 MiB of address space aligned to
    64 MiB, mapped in pieces (what is in use, then what is reserved)."""
    size, regions = 64 << 20, []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(address, 16) for address in fields[0].split("-"))
            regions.append((start, end, len(fields) > 5))  # a sixth field: a file or [stack], not a heap
    heaps = 0
    for index, (start, end, named) in enumerate(regions):
        if named or start % size:
            continue
        for following, stop, also_named in regions[index + 1:]:
            if following != end or also_named or end - start >= size:
                break
            end = stop
        heaps += end - start == size
    return heaps


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Data safety (SPEC 5) #########################################################

class CrashTest(unittest.TestCase):

    def test_kill_9_under_concurrent_publishing_loses_and_duplicates_nothing(self):
        for sync in ("full", "normal"):
            with self.subTest(sync=sync):
                self._crash_and_check(sync)

    def _crash_and_check(self, sync):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        db = os.path.join(tmp.name, "events.db")
        args = ("--port", "0", "--user", USER, "--password", PASSWORD, "--quiet", "--sync", sync)
        process = Process(*args, db=db)
        process.wait_listening()
        acknowledged = []  # (stream, event_id) that got a 200
        lock = threading.Lock()
        stop = threading.Event()

        def producer(index):
            with contextlib.closing(Client(process.port)) as client:
                stream = f"crash-{index % 3}"
                while not stop.is_set():
                    try:
                        body = envelope("Tick") if index % 2 else [envelope("Tick"), envelope("Tock")]
                        response = client.publish(stream, body, producer=f"owner-{index % 3}")
                    except (OSError, http.client.HTTPException):
                        return
                    if response.status == 200:
                        ids = response.json if isinstance(response.json, list) else [response.json]
                        with lock:
                            acknowledged.extend((stream, i) for i in ids)

        threads = [threading.Thread(target=producer, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        _wait_for(lambda: len(acknowledged) >= 60, seconds=30)
        time.sleep(0.2)
        process.kill()
        stop.set()
        for thread in threads:
            thread.join()
        self.assertGreater(len(acknowledged), 50)

        again = Process(*args, db=db)
        again.wait_listening()
        self.addCleanup(again.stop)
        client = Client(again.port)
        stored = {}
        for stream in {s for s, _ in acknowledged}:
            for name in ("Tick", "Tock"):
                response = client.read(stream, name, limit=1000)
                items = response.json if response.status == 200 else []
                while items:
                    for item in items:
                        self.assertNotIn(item["eventId"], stored)  # no duplicates
                        stored[item["eventId"]] = stream
                        self.assertEqual(client.ack(stream, item["eventId"]).status, 200)  # no gaps
                    items = client.read(stream, name, limit=1000).json
        missing = [pair for pair in acknowledged if stored.get(pair[1]) != pair[0]]
        self.assertEqual(missing, [])
        client.close()
        with open_database(db) as conn:
            self.assertEqual(conn.execute("PRAGMA integrity_check").fetchone()[0], "ok")
            for stream_id, name, count, top, events in conn.execute(
                    "SELECT c.stream_id, c.event_name, c.count, max(e.sequence), count(e.event_pk)"
                    " FROM event_counts c JOIN events e USING (stream_id, event_name)"
                    " GROUP BY c.stream_id, c.event_name"):
                self.assertEqual((count, top), (events, events), (stream_id, name))
        again.proc.send_signal(signal.SIGTERM)
        self.assertEqual(again.finish()[0], 0)


SHARDS = 4  # test processes side by side: most tests wait on sockets and servers, not on a core


def main():
    """Run the suite: without arguments in SHARDS processes side by side,
    each taking every SHARDS-th test; with unittest's arguments (a test
    name, -k...) in this process. Closes with the plain "N passed, N
    failed" line that CI reads (unittest's own "OK" is not one it knows)."""
    shard = os.environ.get("EVENTSERVER_TEST_SHARD")
    this_suite = os.path.abspath(sys.modules["__main__"].__file__) == os.path.abspath(__file__)
    if shard is None and len(sys.argv) == 1 and this_suite:  # another suite (test_dashboard) runs here
        sys.exit(run_shards(SHARDS))
    if shard is None:
        result = unittest.main(module="__main__", exit=False, verbosity=2).result
    else:
        number, count = map(int, shard.split("/"))
        tests = list(_flatten(unittest.defaultTestLoader.loadTestsFromModule(sys.modules["__main__"])))
        result = unittest.TextTestRunner(verbosity=2).run(unittest.TestSuite(tests[number::count]))
    sys.exit(report(result))


def _flatten(suite):
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            yield from _flatten(test)
        else:
            yield test


def run_shards(count):
    """Run the suite in count processes (with this Python and its -W
    options), print their output one after the other, and the sum."""
    command = [sys.executable, *(f"-W{option}" for option in sys.warnoptions), os.path.abspath(__file__)]
    outputs, processes = [], []
    for number in range(count):
        output = tempfile.TemporaryFile()
        outputs.append(output)
        processes.append(subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                          env={**os.environ, "EVENTSERVER_TEST_SHARD": f"{number}/{count}"}))
    totals, codes = [0, 0, 0], []
    for process, output in zip(processes, outputs):
        codes.append(process.wait())
        output.seek(0)
        text = output.read().decode("utf-8", "replace")
        output.close()
        sys.stdout.write(text)
        found = re.search(r"^tests: (\d+) passed, (\d+) failed, (\d+) skipped$", text, re.M)
        for index, figure in enumerate(found.groups() if found else ()):
            totals[index] += int(figure)
        if not found:
            totals[1] += 1  # a shard that died before its result line
    print(f"tests: {totals[0]} passed, {totals[1]} failed, {totals[2]} skipped")
    return 0 if not any(codes) and totals[0] and not totals[1] else 1


def report(result):
    """Print the result line; the exit code. Under -W error (make
    test-pythons), a warning raised where nobody can catch it (a
    ResourceWarning for a file or connection never closed, in __del__) fails
    the run too: unittest cannot see it."""
    gc.collect()  # objects in reference cycles (sqlite3 connections) warn only when collected
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    print(f"tests: {result.testsRun - failed - skipped} passed, {failed} failed, {skipped} skipped")
    if UNRAISABLE:
        print(f"and {len(UNRAISABLE)} warnings or errors raised where no test could catch them "
              f"(see above): {sorted({type(error).__name__ for error in UNRAISABLE})}")
    return 0 if result.wasSuccessful() and result.testsRun and not UNRAISABLE else 1


UNRAISABLE = []


def _unraisable_hook(report, default_hook=sys.unraisablehook):
    UNRAISABLE.append(report.exc_value)
    default_hook(report)


sys.unraisablehook = _unraisable_hook


if __name__ == "__main__":
    main()

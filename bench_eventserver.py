#!/usr/bin/env python3
"""bench_eventserver.py -- throughput and latency of eventserver.py next to a do-nothing baseline.

In one run, on one machine, it starts two HTTP servers in their own processes:

- the event server (``eventserver.py`` beside this file) on a fresh SQLite file
  in a temporary directory, with ``--sync`` from the command line;
- a baseline: a ``ThreadingHTTPServer`` handler that does only the per-request
  work no server can avoid (read the body, parse the JSON or form, check Basic
  auth in constant time, write a small JSON answer in one write). It is this
  same file run as ``bench_eventserver.py --baseline-server``.

It drives both with the same keep-alive load client (worker processes, each
running several raw-socket HTTP/1.1 connections in a ``selectors`` loop, one
request in flight per connection) for a fixed time after a short warm-up, and
reports, per scenario and connection count, requests/s, p50 and p99 latency,
the ratio server / baseline and the server's peak RSS and CPU:

- publish: POSTs of a ~400-byte envelope spread over 16 streams;
- read:    GETs of ``limit=10`` from a stream preloaded with 100,000 events
           (the readers never acknowledge, so they read the same events);
- consume: every connection is a consumer that reads ``limit=100`` and
           acknowledges each event in order; the server figure is events/s and
           the ratio is events/s / baseline requests/s of the same request mix;
- mixed:   4 publishers and 4 consumers at once (one row each);
- waiters: only when named (``--scenarios waiters``, about a minute), not against
           the baseline: the publish load at 8 connections, alternately
           without and with 100 long-poll reads waiting (``--waiters``), for
           5 rounds (``--waiter-rounds``; the order flips each round, so drift
           falls on both alike). The waiters are another process: 100 more
           keep-alive connections, each holding a ``wait=30`` read of an event
           name nobody publishes on one of the publish streams, and reading
           again when one returns; they are not counted as requests. After
           each run one event of that name per stream releases them and they
           disconnect, so the next run starts without them (the server's
           thread count is checked both ways). It reports the median
           publishes/s of each and the change (issue 5: at most 10% slower).

With ``--scale`` it then loads 1,000,000 more events (100 streams) through the
batch API and runs publish and read again, to compare with the first figures.
It prints a table and writes every figure to a JSON file (``--json``).

Run it (``make bench`` runs the first line):

    python3 bench_eventserver.py                  # about 2 minutes on 2 cores
    python3 bench_eventserver.py --sync normal
    python3 bench_eventserver.py --scale          # adds the 1,000,000-event runs, about 5 minutes in all
    python3 bench_eventserver.py --scenarios waiters   # publishing with and without 100 long polls
    python3 bench_eventserver.py --repeat 3       # median of 3 per figure: steadier on a shared machine
    python3 bench_eventserver.py --duration 2 --connections 8 --scenarios publish,read
    python3 bench_eventserver.py --build-db big.db --events 1000000 --streams 100
    python3 bench_eventserver.py --endpoints big.db --requests 20

``--build-db`` only fills a database through the HTTP batch API and exits.
``--endpoints DB`` starts the server on that existing database and times, one
request at a time on one keep-alive connection, ``GET /api/v1/health`` (the
reference) and every endpoint of SPEC.md section 4 plus a ``limit=10`` read:
median and p90 wall time of ``--requests`` requests each (5 for an endpoint
whose first, untimed request took over 0.5 s) and each median's ratio to
health's. The endpoints take turns, so a burst of noise from the machine falls
on all of them alike. It finds a stream, an event name and an event ID through
the API; a search term matching nothing makes the search read every payload.
It leaves the data as it was except for consumer offsets: when the stream has
none it first creates three (seeks), and the timed seek sets the first one to
the offset it already has (only its movedAt changes).
``--client wrk`` uses ``wrk`` (when on PATH) for publish and read; the default
client is the standard-library one, which is also always used for consume and
mixed. ``python3 bench_eventserver.py --help`` lists every flag.

The client shares the machine with both servers: on 2 cores it takes about
30-45 us of CPU per request (mostly send/recv system calls), which lowers the
baseline's figure a little more than the server's. Figures from one run vary
by 10-20% on a shared virtual machine; compare ratios, and use ``--repeat``.
Standard library only; Linux (it reads ``/proc`` for RSS and CPU).
"""

import argparse
import array
import base64
import hmac
import http.client
import itertools
import json
import math
import multiprocessing
import os
import platform
import queue
import re
import selectors
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "1.0.0"

HERE = os.path.dirname(os.path.abspath(__file__))


class BenchError(Exception):
    """A failure that ends the run with one clear line (server did not start, load failed...)."""


# Configuration ###############################################################

SCENARIOS = ("publish", "read", "consume", "mixed", "waiters")
DEFAULT_SCENARIOS = ("publish", "read", "consume", "mixed")   # waiters takes about a minute more: asked for by name
PUBLISH_STREAMS = 16                 # the publish scenario spreads its POSTs over this many streams
READ_LIMIT = 10                      # limit= of the read scenario
CONSUME_LIMIT = 100                  # limit= of the consume scenario
MIXED_PUBLISHERS = 4
MIXED_CONSUMERS = 4
WAITERS_PUBLISHERS = 8               # publish connections of the waiters scenario
WAITERS_WAIT = 30                    # wait= of each long-poll read (the server's default --max-wait)
WAITERS_NAME = "BenchNobodyPublishes"   # the waiters' event name (+ a suffix per run); released by one event
LOAD_BATCH = 1000                    # envelopes per POST when preloading (the API's maximum)
LOAD_CONNECTIONS = 4                 # concurrent loader connections
EVENT_NAME = "OrderPlaced"
READ_STREAM = "bench-read"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench_eventserver.py",
        description="Benchmark eventserver.py against a do-nothing ThreadingHTTPServer baseline.")
    parser.add_argument("--server", default=os.path.join(HERE, "eventserver.py"),
                        help="path of eventserver.py (default: beside this script)")
    parser.add_argument("--sync", choices=("full", "normal"), default="full",
                        help="the server's --sync mode (default full)")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="measured seconds per run (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="unmeasured seconds before each run (default 1)")
    parser.add_argument("--connections", default="1,8,32",
                        help="comma-separated connection counts (default 1,8,32)")
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                        help="comma-separated subset of %s (default %s; waiters, about a minute with the "
                             "defaults, runs only when named)" % (",".join(SCENARIOS),
                                                                  ",".join(DEFAULT_SCENARIOS)))
    parser.add_argument("--waiters", type=int, default=100, metavar="N",
                        help="waiters scenario: long-poll reads held open during the 'with' runs "
                             "(default 100)")
    parser.add_argument("--waiter-rounds", type=int, default=5, metavar="N",
                        help="waiters scenario: rounds of one run without and one with the waiters, "
                             "alternating which goes first (default 5)")
    parser.add_argument("--client-procs", type=int, default=0,
                        help="load-client processes per run (default: min(connections, CPUs))")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each pair this many times and report the median ratio (default 1)")
    parser.add_argument("--client", choices=("stdlib", "wrk"), default="stdlib",
                        help="load client for publish and read (default stdlib; wrk must be on PATH)")
    parser.add_argument("--read-events", type=int, default=100_000,
                        help="events preloaded in the stream that read and consume use (default 100000)")
    parser.add_argument("--scale", action="store_true",
                        help="then load --scale-events more events and run publish and read again")
    parser.add_argument("--scale-events", type=int, default=1_000_000,
                        help="events loaded for --scale (default 1000000)")
    parser.add_argument("--scale-streams", type=int, default=100,
                        help="streams they are spread over (default 100)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="where to write the figures (default bench-results.json, with --endpoints "
                             "bench-results-endpoints.json; '' for none)")
    parser.add_argument("--build-db", metavar="PATH",
                        help="only build a database at PATH through the HTTP batch API, then exit")
    parser.add_argument("--events", type=int, default=1_000_000,
                        help="with --build-db: number of events (default 1000000)")
    parser.add_argument("--streams", type=int, default=100,
                        help="with --build-db: number of streams (default 100)")
    parser.add_argument("--endpoints", metavar="DB",
                        help="only time each API endpoint, one request at a time, on the existing "
                             "database DB (see above), then exit")
    parser.add_argument("--requests", type=int, default=20, metavar="N",
                        help="with --endpoints: timed requests per endpoint (default 20; at most 5 "
                             "for an endpoint whose first request takes over 0.5 s)")
    parser.add_argument("--event-name", default=EVENT_NAME,
                        help="with --endpoints: the event name to read and search for "
                             "(default %s, what --build-db writes)" % EVENT_NAME)
    args = parser.parse_args(argv)
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        parser.error("--connections takes comma-separated integers, e.g. 1,8,32")
    if not args.connections or min(args.connections) < 1:
        parser.error("--connections needs at least one count, each >= 1")
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown or not args.scenarios:
        parser.error("unknown scenario(s) %s; choose from %s" % (",".join(unknown), ",".join(SCENARIOS)))
    if args.duration <= 0 or args.warmup < 0 or args.repeat < 1:
        parser.error("--duration must be > 0, --warmup >= 0 and --repeat >= 1")
    if args.waiters < 1 or args.waiter_rounds < 1:
        parser.error("--waiters and --waiter-rounds must be >= 1")
    if args.client == "wrk" and not shutil.which("wrk"):
        parser.error("--client wrk: wrk is not on PATH")
    if args.build_db is None and not os.path.exists(args.server):
        parser.error("server not found: %s (use --server PATH)" % args.server)
    if args.endpoints is not None:
        if args.build_db is not None:
            parser.error("--endpoints and --build-db are separate runs")
        if not os.path.isfile(args.endpoints):
            parser.error("--endpoints: no database at %s (build one with --build-db)" % args.endpoints)
        if args.requests < 1:
            parser.error("--requests must be >= 1")
    if args.json is None:
        args.json = "bench-results-endpoints.json" if args.endpoints is not None else "bench-results.json"
    return args


# Workload ####################################################################
# The request shapes both servers get. Envelope bodies differ only in a
# fixed-width order number, so every POST has the same length.

def envelope_parts():
    """The JSON text of a ~400-byte envelope, split around its order number."""
    envelope = {
        "event": {"name": EVENT_NAME, "version": 2},
        "system": {"id": "shop-eu-1", "name": "codello alvine", "time": "2024-05-14 13:58:12",
                   "timezone": "Europe/Berlin"},
        "trigger": {"type": "system", "name": "/srv/shop/bin/checkout.php"},
        "payload": {"orderId": "ORD-@@@@@@@@@@", "customerId": "CUST-0004711", "currency": "EUR",
                    "total": "129.90", "items": [{"sku": "SKU-10042", "quantity": 2, "price": "39.95"},
                                                 {"sku": "SKU-20077", "quantity": 1, "price": "50.00"}]},
    }
    text = json.dumps(envelope, separators=(",", ":")).encode()
    prefix, suffix = text.split(b"@@@@@@@@@@")
    return prefix, suffix


ENVELOPE_PREFIX, ENVELOPE_SUFFIX = envelope_parts()
ENVELOPE_SIZE = len(ENVELOPE_PREFIX) + 10 + len(ENVELOPE_SUFFIX)


def envelope_bytes(number):
    return ENVELOPE_PREFIX + b"%010d" % number + ENVELOPE_SUFFIX


def batch_bytes(first, count):
    return b"[" + b",".join(envelope_bytes(n) for n in range(first, first + count)) + b"]"


def producer_id(stream):
    """Every stream has one owning producer; all writes to it use this ID."""
    return "bench-producer-" + stream


def publish_stream(index):
    return "bench-publish-%02d" % index


def scale_stream(index):
    return "bench-scale-%03d" % index


def basic_auth(user, password):
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


def stream_path(stream):
    return "/api/v1/streams/%s/events" % urllib.parse.quote(stream, safe="")


def http_request(target, method, path, headers, body=b""):
    """The bytes of one HTTP/1.1 keep-alive request."""
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: %s:%d" % (target["host"], target["port"]),
             "Authorization: " + target["auth"]]
    lines += ["%s: %s" % item for item in headers.items()]
    if method == "POST":
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# Baseline server #############################################################
# The floor: what any ThreadingHTTPServer handler pays per request before
# doing anything useful. Run as `bench_eventserver.py --baseline-server`.

class BaselineServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a listen backlog that holds 32+ connecting clients."""
    request_queue_size = 256
    daemon_threads = True
    expected_authorization = b""


class BaselineHandler(BaseHTTPRequestHandler):
    """Reads the body, parses it, checks Basic auth, answers a small JSON in one write."""
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        given = (self.headers.get("Authorization") or "").encode()
        if not hmac.compare_digest(given, self.server.expected_authorization):
            self.answer(401, b'"Unauthorized"')
            return
        if body:
            if (self.headers.get("Content-Type") or "").startswith("application/json"):
                json.loads(body)
            else:
                urllib.parse.parse_qs(body.decode())
        self.answer(200, b'"OK"')

    do_GET = do_POST = handle_any

    def answer(self, status, body):
        head = ("HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"
                "Content-Length: %d\r\n\r\n" % (status, self.responses[status][0], len(body)))
        self.wfile.write(head.encode() + body)

    def log_message(self, format, *args):
        pass


def run_baseline_server(argv):
    parser = argparse.ArgumentParser(prog="bench_eventserver.py --baseline-server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    args = parser.parse_args(argv)
    server = BaselineServer((args.host, args.port), BaselineHandler)
    server.expected_authorization = basic_auth(args.user, args.password).encode()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print("baseline %s listening on http://%s:%d/" % (__version__, args.host, server.server_address[1]),
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    server.server_close()
    return 0


# Processes under test ########################################################

URL_PATTERN = re.compile(r"http://([^\s/]+):(\d+)/")


class Service:
    """A server started as a subprocess: its address, first stdout line and logs."""

    def __init__(self, name, argv, workdir, user, password, timeout=30.0):
        self.name = name
        self.out_path = os.path.join(workdir, name + ".stdout")
        self.err_path = os.path.join(workdir, name + ".stderr")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                            env=env)
        self.pid = self.process.pid
        deadline = time.monotonic() + timeout
        while True:
            text = self.stdout()
            match = URL_PATTERN.search(text)
            if match:
                break
            if self.process.poll() is not None:
                raise BenchError("%s exited with code %s before listening: %s"
                                 % (name, self.process.returncode, self.stderr_tail() or text.strip()))
            if time.monotonic() > deadline:
                self.process.kill()
                raise BenchError("%s printed no URL within %.0f s" % (name, timeout))
            time.sleep(0.05)
        host = match.group(1).strip("[]")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        self.banner = next(line.strip() for line in text.splitlines() if URL_PATTERN.search(line))
        self.target = {"host": host, "port": int(match.group(2)), "auth": basic_auth(user, password)}
        self.exit_note = None

    def stdout(self):
        with open(self.out_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stderr_text(self):
        with open(self.err_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stderr_tail(self, lines=5):
        return " | ".join(self.stderr_text().strip().splitlines()[-lines:])

    def wait_healthy(self, timeout=15.0):
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                status, body = simple_request(self.target, "GET", "/api/v1/health")
                if status == 200:
                    return
                last = "%d %s" % (status, body[:200])
            except OSError as error:
                last = str(error)
            time.sleep(0.1)
        raise BenchError("%s not healthy after %.0f s: %s" % (self.name, timeout, last))

    def stop(self, timeout=15.0):
        """SIGTERM, then wait; notes a slow or unclean stop instead of hiding it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self.exit_note = "did not stop within %.0f s of SIGTERM (killed)" % timeout
                return
        if self.process.returncode != 0:
            self.exit_note = "exit code %s after SIGTERM: %s" % (self.process.returncode, self.stderr_tail())

    def tracebacks(self):
        return self.stderr_text().count("Traceback (most recent call last)")


def simple_request(target, method, path, headers=None, body=None, timeout=120):
    """One request on a new http.client connection: (status, body bytes)."""
    connection = http.client.HTTPConnection(target["host"], target["port"], timeout=timeout)
    try:
        all_headers = {"Authorization": target["auth"]}
        all_headers.update(headers or {})
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class ProcessMeter:
    """Peak RSS and CPU time of one process over a run, from /proc."""

    def __init__(self, pid):
        self.pid = pid
        self.poller = None
        self.polled_peak_kb = 0

    def start(self):
        self.cpu_start = self.cpu_seconds()
        # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0); without it, poll VmRSS.
        try:
            with open("/proc/%d/clear_refs" % self.pid, "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
            self.stop_polling = threading.Event()
            self.poller = threading.Thread(target=self.poll, daemon=True)
            self.poller.start()

    def mark_cpu(self):
        self.cpu_start = self.cpu_seconds()

    def stop(self):
        """(peak RSS in MB, CPU seconds since start or the last mark)."""
        cpu = self.cpu_seconds() - self.cpu_start
        if self.poller:
            self.stop_polling.set()
            self.poller.join()
            peak_kb = max(self.polled_peak_kb, self.status_kb("VmRSS"))
        else:
            peak_kb = self.status_kb("VmHWM")
        return peak_kb / 1024.0, cpu

    def poll(self):
        while not self.stop_polling.wait(0.05):
            self.polled_peak_kb = max(self.polled_peak_kb, self.status_kb("VmRSS"))

    def status_kb(self, field):
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def cpu_seconds(self):
        try:
            with open("/proc/%d/stat" % self.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0


# Load client #################################################################
# Each worker process runs a selectors loop over its keep-alive connections.
# A connection is driven by a session: a generator that yields the next
# request and is sent the (status, body) of the answer.

def publish_session(target, spec, stats):
    """POST envelopes round-robin over the publish streams this connection shares with the others."""
    streams = [publish_stream(i) for i in range(PUBLISH_STREAMS)]
    heads = []
    for stream in streams:
        request = http_request(target, "POST", stream_path(stream),
                               {"Content-Type": "application/json", "X-Producer-ID": producer_id(stream)},
                               envelope_bytes(0))
        heads.append(request[:-ENVELOPE_SIZE])
    index, total = spec["index"], spec["total"]
    first_order = index * 100_000_000
    for count in itertools.count():
        stream_index = (index + count * total) % PUBLISH_STREAMS
        yield heads[stream_index] + envelope_bytes(first_order + count % 100_000_000), False


def read_session(target, spec, stats):
    """GET the same first events again and again: this consumer never acknowledges."""
    path = "%s?eventName=%s&limit=%d" % (stream_path(READ_STREAM), EVENT_NAME, READ_LIMIT)
    request = http_request(target, "GET", path, {"X-Consumer-ID": spec["consumer"]})
    while True:
        yield request, False


def consume_session(target, spec, stats):
    """Read limit=100, acknowledge each event in order; a fresh consumer ID when the stream runs dry."""
    read_path = "%s?eventName=%s&limit=%d" % (stream_path(READ_STREAM), EVENT_NAME, CONSUME_LIMIT)
    ack_prefix = ("POST %s/" % stream_path(READ_STREAM)).encode()
    fake_ids = [str(uuid.uuid4()) for _ in range(CONSUME_LIMIT)] if spec["fake"] else None
    generation = 0
    while True:
        consumer = "%s-%d" % (spec["consumer"], generation)
        read_request = http_request(target, "GET", read_path, {"X-Consumer-ID": consumer})
        ack_suffix = http_request(target, "POST", "", {"X-Consumer-ID": consumer,
                                  "Content-Type": "application/x-www-form-urlencoded"},
                                  b"action=ACK")[len("POST "):]
        while True:
            status, body = yield read_request, False
            if status != 200:
                continue
            if fake_ids:
                event_ids = fake_ids
            else:
                event_ids = [event["eventId"] for event in json.loads(body)]
            if not event_ids:
                break
            for event_id in event_ids:
                status, body = yield ack_prefix + event_id.encode() + ack_suffix, True
                if status != 200:
                    break
        generation += 1
        stats.consumer_restarts += 1


SESSIONS = {"publish": publish_session, "read": read_session, "consume": consume_session}
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


class ClientConnection:
    """One keep-alive socket, its session, the request in flight and the answer read so far."""

    def __init__(self, target, spec, stats):
        self.target = target
        self.stats = stats
        self.session = SESSIONS[spec["role"]](target, spec, stats)
        self.request, self.is_ack = next(self.session)
        self.connect()

    def connect(self):
        self.sock = socket.create_connection((self.target["host"], self.target["port"]), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.received = b""

    def send(self, now):
        self.sent_at = now
        self.sock.sendall(self.request)

    def take_answer(self, data):
        """Add received bytes; the (status, body, close) of a complete answer, or None.

        Most answers arrive in one recv, so the head is parsed from scratch each
        time rather than keeping parser state."""
        if self.received:
            data = self.received + data
        end = data.find(b"\r\n\r\n")
        if end < 0:
            self.received = data
            return None
        length = CONTENT_LENGTH.search(data, 0, end + 2)
        if length is None:
            raise ValueError("answer without Content-Length: %r" % data[:200])
        stop = end + 4 + int(length.group(1))
        if len(data) < stop:
            self.received = data
            return None
        self.received = data[stop:]
        return int(data[9:12]), data[end + 4:stop], CONNECTION_CLOSE.search(data, 0, end + 2) is not None

    def advance(self, status, body):
        """Give the answer to the session; False when the session has ended."""
        try:
            self.request, self.is_ack = self.session.send((status, body))
            return True
        except StopIteration:
            return False


class RoleStats:
    """What the connections of one role (publish, read, consume) did in the measured window."""

    def __init__(self):
        self.requests = 0
        self.events = 0
        self.latencies = array.array("d")
        self.errors = {}
        self.samples = []
        self.consumer_restarts = 0

    def error(self, kind, detail):
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.samples) < 5:
            self.samples.append("%s: %s" % (kind, detail[:300]))

    def as_dict(self):
        return {"requests": self.requests, "events": self.events, "latencies": self.latencies.tobytes(),
                "errors": self.errors, "samples": self.samples,
                "consumer_restarts": self.consumer_restarts}


def client_worker(target, specs, duration, ready, start, start_time, results):
    """One load-client process: connect, wait for the common start, drive until the window closes."""
    stats = {}
    try:
        connections = []
        for spec in specs:
            role_stats = stats.setdefault(spec["role"], RoleStats())
            connections.append(ClientConnection(target, spec, role_stats))
    except Exception as error:
        ready.put("connect failed: %r" % error)
        return
    ready.put("ok")
    start.wait()
    window_start = start_time.value
    window_end = window_start + duration
    cpu_start = None   # CPU time of this process when the measured window opens
    selector = selectors.DefaultSelector()
    monotonic = time.monotonic
    try:
        for connection in connections:
            selector.register(connection.sock, selectors.EVENT_READ, connection)
            connection.send(monotonic())
        while True:
            now = monotonic()
            if now >= window_end:
                break
            if cpu_start is None and now >= window_start:
                cpu_start = time.process_time()
            for key, _ in selector.select(min(0.1, window_end - now)):
                drive(key.data, selector, window_start, window_end)
    except Exception as error:
        results.put({"failed": "load client process: %r" % error})
        return
    cpu = time.process_time() - (cpu_start or 0.0)
    for connection in connections:
        connection.sock.close()
    results.put({"roles": {role: s.as_dict() for role, s in stats.items()}, "cpu": cpu})


def drive(connection, selector, window_start, window_end):
    """Read what arrived; on a complete answer, record it and send the next request."""
    try:
        data = connection.sock.recv(262144)
        if not data:
            raise ConnectionError("server closed the connection")
        answer = connection.take_answer(data)
    except (OSError, ValueError) as error:
        if reconnect(connection, selector, repr(error)) and connection.advance(None, b""):
            send_next(connection, selector, time.monotonic())
        return
    if answer is None:
        return
    status, body, close_after = answer
    now = time.monotonic()
    stats = connection.stats
    if window_start <= now <= window_end:
        stats.requests += 1
        stats.latencies.append(now - connection.sent_at)
        if connection.is_ack and status == 200:
            stats.events += 1
    if status != 200:
        stats.error(str(status), body.decode("utf-8", "replace"))
    if close_after and not reconnect(connection, selector, None):
        return
    if connection.advance(status, body):
        send_next(connection, selector, now)
    else:
        selector.unregister(connection.sock)


def send_next(connection, selector, now):
    try:
        connection.send(now)
    except OSError as error:
        if reconnect(connection, selector, repr(error)) and connection.advance(None, b""):
            connection.send(time.monotonic())


def reconnect(connection, selector, error):
    """A new socket after the server closed one; False (connection given up) when that fails.

    An error fails the request in flight; the session is told with status None."""
    selector.unregister(connection.sock)
    connection.sock.close()
    if error:
        connection.stats.error("connection", error)
        time.sleep(0.01)
    try:
        connection.connect()
    except OSError as connect_error:
        connection.stats.error("connection", "reconnect failed, connection given up: %r" % connect_error)
        return False
    selector.register(connection.sock, selectors.EVENT_READ, connection)
    return True


def percentile(sorted_values, fraction):
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(fraction * len(sorted_values)) - 1)]


def run_load(service, specs, args, meter=None):
    """Drive `service` with one connection per spec; figures per role, plus server RSS and CPU."""
    processes = args.client_procs or min(len(specs), os.cpu_count() or 1)
    processes = max(1, min(processes, len(specs)))
    groups = [specs[i::processes] for i in range(processes)]
    context = multiprocessing.get_context("fork")
    ready, results, start = context.Queue(), context.Queue(), context.Event()
    start_time = context.Value("d", 0.0)   # time.monotonic() of the measured window's start
    workers = [context.Process(target=client_worker, args=(service.target, group, args.duration, ready,
                                                           start, start_time, results), daemon=True)
               for group in groups]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            message = ready.get(timeout=60)
            if message != "ok":
                raise BenchError("load client: %s" % message)
        if meter:
            meter.start()
        begin = time.monotonic()
        start_time.value = begin + args.warmup
        start.set()
        time.sleep(args.warmup)
        if meter:
            meter.mark_cpu()
        time.sleep(max(0.0, start_time.value + args.duration - time.monotonic()))
        rss_mb, server_cpu = meter.stop() if meter else (None, None)
        reports = [results.get(timeout=60) for _ in workers]
    except queue.Empty:
        raise BenchError("a load-client process did not report within 60 s") from None
    finally:
        for worker in workers:
            worker.join(5)
            if worker.is_alive():
                worker.terminate()
    failures = [report["failed"] for report in reports if "failed" in report]
    if failures:
        raise BenchError(failures[0])
    return merge_reports(reports, args.duration, rss_mb, server_cpu)


def merge_reports(reports, duration, rss_mb, server_cpu):
    roles = {}
    for report in reports:
        for role, data in report["roles"].items():
            merged = roles.setdefault(role, {"requests": 0, "events": 0, "latencies": array.array("d"),
                                             "errors": {}, "samples": [], "restarts": 0})
            merged["requests"] += data["requests"]
            merged["events"] += data["events"]
            merged["latencies"].frombytes(data["latencies"])
            for kind, count in data["errors"].items():
                merged["errors"][kind] = merged["errors"].get(kind, 0) + count
            merged["samples"] += data["samples"][:5 - len(merged["samples"])]
            merged["restarts"] += data["consumer_restarts"]
    figures = {}
    for role, merged in roles.items():
        latencies = sorted(merged["latencies"])
        figures[role] = {
            "requests": merged["requests"],
            "requests_per_s": merged["requests"] / duration,
            "events_per_s": merged["events"] / duration if role == "consume" else None,
            "p50_ms": ms(percentile(latencies, 0.50)),
            "p99_ms": ms(percentile(latencies, 0.99)),
            "errors": merged["errors"],
            "error_samples": merged["samples"],
            "consumer_restarts": merged["restarts"] if role == "consume" else None,
        }
    client_cpu = sum(report["cpu"] for report in reports)
    return {"roles": figures, "peak_rss_mb": rss_mb,
            "server_cpu_percent": None if server_cpu is None else 100.0 * server_cpu / duration,
            "client_cpu_percent": 100.0 * client_cpu / duration, "client_processes": len(reports)}


def ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 3)


# wrk client (optional) #######################################################
# Used for publish and read with --client wrk. A Lua script builds the same
# requests as the standard-library client.

WRK_LUA = r"""
local auth = "%(auth)s"
local streams = {%(streams)s}
local prefix = [==[%(prefix)s]==]
local suffix = [==[%(suffix)s]==]
local role = "%(role)s"
local read_path = "%(read_path)s"
local counter = 0
request = function()
  counter = counter + 1
  if role == "read" then
    return wrk.format("GET", read_path, {["Authorization"] = auth, ["X-Consumer-ID"] = "bench-wrk-reader"})
  end
  local stream = streams[(counter %% #streams) + 1]
  local body = prefix .. string.format("%%010d", counter %% 10000000000) .. suffix
  return wrk.format("POST", "/api/v1/streams/" .. stream .. "/events",
    {["Authorization"] = auth, ["Content-Type"] = "application/json",
     ["X-Producer-ID"] = "bench-producer-" .. stream}, body)
end
"""


def run_wrk(service, role, connections, args, workdir, meter=None):
    script = os.path.join(workdir, "bench-%s.lua" % role)
    read_path = "%s?eventName=%s&limit=%d" % (stream_path(READ_STREAM), EVENT_NAME, READ_LIMIT)
    with open(script, "w") as f:
        f.write(WRK_LUA % {"auth": service.target["auth"], "role": role, "read_path": read_path,
                           "streams": ", ".join('"%s"' % publish_stream(i) for i in range(PUBLISH_STREAMS)),
                           "prefix": ENVELOPE_PREFIX.decode(), "suffix": ENVELOPE_SUFFIX.decode()})
    url = "http://%s:%d/" % (service.target["host"], service.target["port"])
    threads = min(connections, os.cpu_count() or 1)

    def wrk(seconds):   # wrk takes whole seconds only
        command = ["wrk", "-t%d" % threads, "-c%d" % connections, "-d%ds" % max(1, round(seconds)),
                   "--latency", "--timeout", "30s", "-s", script, url]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError("wrk exited with code %d: %s" % (done.returncode, done.stderr.strip()[-300:]))
        return done.stdout

    if args.warmup:
        wrk(args.warmup)
    if meter:
        meter.start()
    output = wrk(args.duration)
    rss_mb, server_cpu = meter.stop() if meter else (None, None)
    latency = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", output, re.M))
    total = re.search(r"(\d+) requests in ([\d.]+)s", output)
    errors = {}
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors["non-2xx"] = int(non_2xx.group(1))
    socket_errors = re.search(r"Socket errors: (.*)", output)
    if socket_errors:
        errors["socket"] = socket_errors.group(1).strip()
    requests, seconds = (int(total.group(1)), float(total.group(2))) if total else (0, args.duration)
    return {"roles": {role: {"requests": requests, "requests_per_s": requests / seconds,
                             "events_per_s": None, "p50_ms": wrk_ms(latency.get("50")),
                             "p99_ms": wrk_ms(latency.get("99")), "errors": errors, "error_samples": [],
                             "consumer_restarts": None}},
            "peak_rss_mb": rss_mb,
            "server_cpu_percent": None if server_cpu is None else 100.0 * server_cpu / seconds,
            "client_cpu_percent": None, "client_processes": None}


def wrk_ms(text):
    if not text:
        return None
    number, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return round(float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit], 3)


# Loading data ################################################################

def load_events(target, plan, label):
    """POST the events of `plan` [(stream, count)] in batches of 1000 on a few connections."""
    batches = queue.Queue()
    total = 0
    for stream, count in plan:
        for first in range(0, count, LOAD_BATCH):
            batches.put((stream, first, min(LOAD_BATCH, count - first)))
        total += count
    progress = {"done": 0, "error": None, "next_report": 0.1}
    lock = threading.Lock()
    began = time.monotonic()

    def loader():
        connection = http.client.HTTPConnection(target["host"], target["port"], timeout=300)
        try:
            while progress["error"] is None:
                try:
                    stream, first, count = batches.get_nowait()
                except queue.Empty:
                    return
                connection.request("POST", stream_path(stream), body=batch_bytes(first, count), headers={
                    "Authorization": target["auth"], "Content-Type": "application/json",
                    "X-Producer-ID": producer_id(stream)})
                response = connection.getresponse()
                body = response.read()
                if response.status != 200:
                    raise BenchError("loading %s: %d %s" % (stream, response.status, body[:300]))
                answer = json.loads(body)
                if not isinstance(answer, list) or len(answer) != count:
                    raise BenchError("loading %s: batch of %d answered %r" % (stream, count, body[:200]))
                with lock:
                    progress["done"] += count
                    if total >= 100_000 and progress["done"] >= progress["next_report"] * total:
                        progress["next_report"] += 0.1
                        elapsed = time.monotonic() - began
                        print("  %s: %s / %s events, %.0f events/s"
                              % (label, f"{progress['done']:,}", f"{total:,}", progress["done"] / elapsed),
                              flush=True)
        except Exception as error:
            progress["error"] = error
        finally:
            connection.close()

    threads = [threading.Thread(target=loader) for _ in range(LOAD_CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if progress["error"] is not None:
        error = progress["error"]
        raise error if isinstance(error, BenchError) else BenchError("loading %s: %r" % (label, error))
    elapsed = time.monotonic() - began
    return {"events": total, "seconds": round(elapsed, 2), "events_per_s": round(total / elapsed)}


def scale_plan(events, streams):
    """[(stream, count)]: `events` spread evenly over `streams` streams."""
    return [(scale_stream(i), events // streams + (1 if i < events % streams else 0))
            for i in range(streams)]


# Scenarios ###################################################################

def scenario_specs(scenario, connections, fake, tag):
    """One spec per connection: its role and what its session needs."""
    if scenario == "mixed":
        roles = ["publish"] * MIXED_PUBLISHERS + ["consume"] * MIXED_CONSUMERS
    else:
        roles = [scenario] * connections
    specs, per_role = [], {}
    for role in roles:
        index = per_role.get(role, 0)
        per_role[role] = index + 1
        specs.append({"role": role, "index": index, "fake": fake,
                      "consumer": "bench-%s-%s-%d" % (role, tag, index)})
    for spec in specs:
        spec["total"] = per_role[spec["role"]]
    # Interleave roles so each client process gets a share of both in the mixed scenario.
    return sorted(specs, key=lambda spec: (spec["index"], spec["role"]))


def run_pair(scenario, connections, phase, server, baseline, args, workdir, results):
    """Baseline then server, same client and request shapes, --repeat times; one row per role.

    With repeats, each row is the repeat with the median ratio; all ratios go to the JSON."""
    use_wrk = args.client == "wrk" and scenario in ("publish", "read")
    repeats = []
    for _ in range(args.repeat):
        figures = {}
        for name, service in (("baseline", baseline), ("server", server)):
            meter = ProcessMeter(service.pid)
            tag = "%s%d-%s" % (phase, connections, uuid.uuid4().hex[:8])
            if use_wrk:
                figures[name] = run_wrk(service, scenario, connections, args, workdir, meter)
            else:
                specs = scenario_specs(scenario, connections, name == "baseline", tag)
                figures[name] = run_load(service, specs, args, meter)
        repeats.append(figures)
    for role in sorted(repeats[0]["server"]["roles"], key=("publish", "read", "consume").index):
        rows = sorted((pair_row(scenario, connections, phase, role, figures, use_wrk) for figures in repeats),
                      key=lambda row: row["ratio"] or 0)
        row = rows[(len(rows) - 1) // 2]
        peaks = [r["peak_rss_mb"] for r in rows if r["peak_rss_mb"] is not None]
        row["peak_rss_mb"] = max(peaks) if peaks else None
        if len(rows) > 1:
            row["repeat_ratios"] = [r["ratio"] for r in rows]
            row["repeat_server_throughputs"] = [round(r["server_throughput"]) for r in rows]
        results.append(row)
        print_row(row)
        for sample in row["server"]["error_samples"][:3]:
            print("      server error: %s" % sample, flush=True)
        for sample in row["baseline"].get("error_samples", [])[:3]:
            print("      baseline error: %s" % sample, flush=True)


def pair_row(scenario, connections, phase, role, figures, use_wrk):
    served = figures["server"]["roles"][role]
    base = figures["baseline"]["roles"].get(role, {})
    throughput = served["events_per_s"] if role == "consume" else served["requests_per_s"]
    base_rps = base.get("requests_per_s") or 0
    return {
        "scenario": scenario if scenario != "mixed" else "mixed:" + role,
        "phase": phase,
        "connections": connections if scenario != "mixed" else (
            MIXED_PUBLISHERS if role == "publish" else MIXED_CONSUMERS),
        "unit": "events/s" if role == "consume" else "requests/s",
        "server": served,
        "baseline": base,
        "ratio": round(throughput / base_rps, 3) if base_rps else None,
        "server_throughput": throughput,
        "peak_rss_mb": figures["server"]["peak_rss_mb"],
        "server_cpu_percent": figures["server"]["server_cpu_percent"],
        "client_cpu_percent": figures["server"]["client_cpu_percent"],
        "baseline_cpu_percent": figures["baseline"]["server_cpu_percent"],
        "baseline_client_cpu_percent": figures["baseline"]["client_cpu_percent"],
        "client_processes": figures["server"]["client_processes"],
        "client": "wrk" if use_wrk else "stdlib",
    }


# Long-poll waiters ###########################################################
# The waiters scenario: publish throughput with and without long-poll reads
# held open. The waiters live in their own process, driven over a pipe:
# ("hold", name) connects and sends the reads, ("release",) stops re-reading,
# waits for the answers the releasing events cause, disconnects and reports.

class WaiterConnection(ClientConnection):
    """A keep-alive socket that sends one long-poll read again and again (no session)."""

    def __init__(self, target, request):
        self.target = target
        self.request = request
        self.connect()


def waiter_requests(target, count, event_name):
    """The read each waiter sends: spread over the publish streams, one consumer ID each."""
    requests = []
    for index in range(count):
        path = "%s?eventName=%s&limit=1&wait=%d" % (stream_path(publish_stream(index % PUBLISH_STREAMS)),
                                                    urllib.parse.quote(event_name, safe=""), WAITERS_WAIT)
        requests.append(http_request(target, "GET", path, {"X-Consumer-ID": "bench-waiter-%03d" % index}))
    return requests


def waiter_worker(target, count, pipe):
    """The waiters' process: obeys hold / release / stop on the pipe."""
    try:
        while True:
            command = pipe.recv()
            if command[0] == "stop":
                return
            if command[0] == "hold":
                pipe.send(("released", hold_waiters(target, count, command[1], pipe)))
    except (EOFError, KeyboardInterrupt):
        return


def hold_waiters(target, count, event_name, pipe):
    """Connect `count` waiters and keep their reads waiting until told to release; their figures."""
    stats = {"connected": 0, "reads": 0, "timed_out": 0, "early": 0, "released": 0, "unanswered": 0,
             "errors": {}, "samples": [], "shortest_wait_s": None}

    def error(kind, detail):
        stats["errors"][kind] = stats["errors"].get(kind, 0) + 1
        if len(stats["samples"]) < 5:
            stats["samples"].append("%s: %s" % (kind, detail[:300]))

    selector = selectors.DefaultSelector()
    connections = []
    try:
        for request in waiter_requests(target, count, event_name):
            try:
                connection = WaiterConnection(target, request)
            except OSError as failure:
                error("connect", repr(failure))
                continue
            connections.append(connection)
            selector.register(connection.sock, selectors.EVENT_READ, connection)
            connection.send(time.monotonic())
            stats["reads"] += 1
        stats["connected"] = len(connections)
        pipe.send(("held", stats["connected"]))
        selector.register(pipe.fileno(), selectors.EVENT_READ, None)
        pending = set(connections)
        release_deadline = None
        while pending:
            timeout = 1.0 if release_deadline is None else release_deadline - time.monotonic()
            if release_deadline is not None and timeout <= 0:
                break
            for key, _ in selector.select(timeout):
                connection = key.data
                if connection is None:   # the pipe: release
                    pipe.recv()
                    selector.unregister(pipe.fileno())
                    release_deadline = time.monotonic() + 15.0
                    continue
                try:
                    data = connection.sock.recv(65536)
                    if not data:
                        raise ConnectionError("server closed the connection")
                    answer = connection.take_answer(data)
                except (OSError, ValueError) as failure:
                    error("connection", repr(failure))
                    selector.unregister(connection.sock)
                    pending.discard(connection)
                    continue
                if answer is None:
                    continue
                status, body, close_after = answer
                waited = time.monotonic() - connection.sent_at
                if status != 200:
                    error(str(status), body.decode("utf-8", "replace"))
                    selector.unregister(connection.sock)
                    pending.discard(connection)   # not read again: an error must not become a busy loop
                    continue
                if body.strip() != b"[]":
                    stats["released"] += 1
                    if release_deadline is None:
                        error("event", "an event arrived before the release: %s" % body[:200])
                    selector.unregister(connection.sock)
                    pending.discard(connection)
                    continue
                if stats["shortest_wait_s"] is None or waited < stats["shortest_wait_s"]:
                    stats["shortest_wait_s"] = round(waited, 3)
                if waited >= WAITERS_WAIT - 1:
                    stats["timed_out"] += 1
                else:
                    stats["early"] += 1
                if release_deadline is not None:
                    selector.unregister(connection.sock)
                    pending.discard(connection)
                    continue
                if close_after:
                    selector.unregister(connection.sock)
                    connection.sock.close()
                    connection.connect()
                    selector.register(connection.sock, selectors.EVENT_READ, connection)
                connection.send(time.monotonic())
                stats["reads"] += 1
        stats["unanswered"] = len(pending)
    finally:
        for connection in connections:
            connection.sock.close()
        selector.close()
    return stats


def thread_count(pid):
    """The process's threads (the server runs one per connection), from /proc."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def settle_threads(pid, wanted, timeout=10.0):
    """Wait until wanted(thread count) holds; the last count seen and whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        count = thread_count(pid)
        if count is None or wanted(count):
            return count, True
        if time.monotonic() > deadline:
            return count, False
        time.sleep(0.05)


def steady_threads(pid, timeout=5.0):
    """The thread count once it has stayed the same for 0.5 s (threads of closed connections gone)."""
    deadline = time.monotonic() + timeout
    last, since = thread_count(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        count = thread_count(pid)
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since >= 0.5:
            break
    return last


def publish_one(target, stream, event_name):
    """POST one envelope with this event name to the stream, as its owner."""
    envelope = json.loads(envelope_bytes(0))
    envelope["event"]["name"] = event_name
    status, body = simple_request(target, "POST", stream_path(stream), {
        "Content-Type": "application/json", "X-Producer-ID": producer_id(stream)},
        json.dumps(envelope).encode())
    if status != 200:
        raise BenchError("publishing %s to %s: %d %s" % (event_name, stream, status, body[:300]))


def run_waiters(server, args, problems):
    """Publish at WAITERS_PUBLISHERS connections, alternately without and with args.waiters long
    polls waiting, args.waiter_rounds rounds; the summary (also printed row by row)."""
    for index in range(PUBLISH_STREAMS):   # the waiters' streams must exist, else their reads are 404s
        publish_one(server.target, publish_stream(index), EVENT_NAME)
    idle = steady_threads(server.pid)
    context = multiprocessing.get_context("fork")
    pipe, child_pipe = context.Pipe()
    worker = context.Process(target=waiter_worker, args=(server.target, args.waiters, child_pipe),
                             daemon=True)
    worker.start()
    run_id = uuid.uuid4().hex[:8]
    runs = []

    def receive(what, timeout=60.0):
        if not pipe.poll(timeout):
            raise BenchError("the waiters' process did not answer %s within %.0f s" % (what, timeout))
        return pipe.recv()

    def one_run(round_number, with_waiters):
        threads, settled = settle_threads(server.pid, lambda count: count <= idle)
        if not settled:
            problems.append("waiters round %d: server threads %s before the run, %s when idle"
                            % (round_number, threads, idle))
        held = None
        if with_waiters:
            name = "%s-%s-%d" % (WAITERS_NAME, run_id, round_number)
            pipe.send(("hold", name))
            reply = receive("hold")
            if reply[0] != "held":
                raise BenchError("waiters: %r" % (reply,))
            threads, settled = settle_threads(server.pid, lambda count: count >= idle + reply[1])
            if not settled or reply[1] < args.waiters:
                problems.append("waiters round %d: %d of %d waiters connected, server threads %s (idle %s)"
                                % (round_number, reply[1], args.waiters, threads, idle))
            threads_before = threads
        else:
            threads_before = thread_count(server.pid)
        meter = ProcessMeter(server.pid)
        specs = scenario_specs("publish", WAITERS_PUBLISHERS, False, "waiters%d-%s" % (round_number, run_id))
        figures = run_load(server, specs, args, meter)
        threads_after = thread_count(server.pid)
        if with_waiters:
            pipe.send(("release",))
            for index in range(min(args.waiters, PUBLISH_STREAMS)):
                publish_one(server.target, publish_stream(index), name)
            reply = receive("release")
            held = reply[1]
            if held["errors"] or held["early"] or held["unanswered"]:
                problems.append("waiters round %d: %s" % (round_number, {
                    key: held[key] for key in ("connected", "early", "unanswered", "errors", "samples")}))
        served = figures["roles"]["publish"]
        run = {"round": round_number, "waiters": args.waiters if with_waiters else 0,
               "requests_per_s": round(served["requests_per_s"], 1), "p50_ms": served["p50_ms"],
               "p99_ms": served["p99_ms"], "errors": served["errors"], "error_samples": served["error_samples"],
               "server_cpu_percent": figures["server_cpu_percent"],
               "client_cpu_percent": figures["client_cpu_percent"], "peak_rss_mb": figures["peak_rss_mb"],
               "server_threads": [threads_before, threads_after], "waiter_stats": held}
        if served["errors"]:
            problems.append("waiters round %d (%s): server errors %s" % (
                round_number, "with" if with_waiters else "alone", served["errors"]))
        runs.append(run)
        return run

    try:
        for round_number in range(1, args.waiter_rounds + 1):
            order = (False, True) if round_number % 2 else (True, False)
            done = {with_waiters: one_run(round_number, with_waiters) for with_waiters in order}
            alone, held = done[False], done[True]
            print("  waiters round %d/%d: alone %s/s (p99 %s ms, CPU %s%%, %s threads) | with %d waiting "
                  "%s/s (p99 %s ms, CPU %s%%, %s threads) %+.1f%%" % (
                      round_number, args.waiter_rounds, fmt_int(alone["requests_per_s"]),
                      fmt(alone["p99_ms"], 1), fmt(alone["server_cpu_percent"], 0),
                      alone["server_threads"][0], args.waiters, fmt_int(held["requests_per_s"]),
                      fmt(held["p99_ms"], 1), fmt(held["server_cpu_percent"], 0), held["server_threads"][0],
                      change_percent(alone["requests_per_s"], held["requests_per_s"])), flush=True)
        pipe.send(("stop",))
        worker.join(5)
    finally:
        if worker.is_alive():
            worker.terminate()
            worker.join(5)
    alone = [run for run in runs if not run["waiters"]]
    held = [run for run in runs if run["waiters"]]
    alone_rps = statistics.median(run["requests_per_s"] for run in alone)
    held_rps = statistics.median(run["requests_per_s"] for run in held)
    return {"publish_connections": WAITERS_PUBLISHERS, "waiters": args.waiters, "wait_s": WAITERS_WAIT,
            "rounds": args.waiter_rounds, "idle_server_threads": idle,
            "alone_requests_per_s": round(alone_rps, 1), "with_requests_per_s": round(held_rps, 1),
            "change_percent": round(change_percent(alone_rps, held_rps), 3),
            "round_changes_percent": [round(change_percent(a["requests_per_s"], h["requests_per_s"]), 3)
                                      for a, h in zip(alone, held)],
            "alone_p99_ms": statistics.median(run["p99_ms"] for run in alone),
            "with_p99_ms": statistics.median(run["p99_ms"] for run in held),
            "alone_server_cpu_percent": statistics.median(run["server_cpu_percent"] for run in alone),
            "with_server_cpu_percent": statistics.median(run["server_cpu_percent"] for run in held),
            "runs": runs}


def change_percent(before, after):
    return 100.0 * (after / before - 1) if before else 0.0


def print_waiters(summary):
    print()
    print("Long-poll waiters: publish throughput, median of %d round(s), without and with %d reads "
          "waiting (wait=%d)" % (summary["rounds"], summary["waiters"], summary["wait_s"]))
    print("publish %d conns: %s/s alone, %s/s with %d long-polls waiting (%+.1f%%)" % (
        summary["publish_connections"], fmt_int(summary["alone_requests_per_s"]),
        fmt_int(summary["with_requests_per_s"]), summary["waiters"], summary["change_percent"]))
    print("  per round %s; p99 %s -> %s ms; server CPU %s%% -> %s%%; issue 5 allows -10%%: %s" % (
        ", ".join("%+.1f%%" % change for change in summary["round_changes_percent"]),
        fmt(summary["alone_p99_ms"], 1), fmt(summary["with_p99_ms"], 1),
        fmt(summary["alone_server_cpu_percent"], 0), fmt(summary["with_server_cpu_percent"], 0),
        "within" if summary["change_percent"] >= -10 else "OVER"))


# Report ######################################################################

TABLE_HEAD = ("%-16s %5s | %9s %8s %8s %7s %5s | %9s %8s %8s | %6s  %s"
              % ("scenario", "conns", "server/s", "p50 ms", "p99 ms", "RSS MB", "CPU%",
                 "base/s", "p50 ms", "p99 ms", "ratio", "notes"))


def print_row(row):
    served, base = row["server"], row["baseline"]
    notes = []
    if served["errors"]:
        notes.append("errors %s" % ",".join("%s:%s" % item for item in sorted(served["errors"].items())))
    if base.get("errors"):
        notes.append("baseline errors %d" % sum(v for v in base["errors"].values() if isinstance(v, int)))
    if row["unit"] == "events/s":
        notes.append("events/s")
    if served.get("consumer_restarts"):
        notes.append("ran dry %dx" % served["consumer_restarts"])
    label = row["scenario"] + ("@scale" if row["phase"] == "scale" else "")
    print("%-16s %5d | %9s %8s %8s %7s %5s | %9s %8s %8s | %6s  %s" % (
        label, row["connections"], fmt_int(row["server_throughput"]), fmt(served["p50_ms"], 2),
        fmt(served["p99_ms"], 2), fmt(row["peak_rss_mb"], 1), fmt(row["server_cpu_percent"], 0),
        fmt_int(base.get("requests_per_s")), fmt(base.get("p50_ms"), 2), fmt(base.get("p99_ms"), 2),
        fmt(row["ratio"], 2), "; ".join(notes)), flush=True)


def fmt(value, digits):
    return "-" if value is None else "%.*f" % (digits, value)


def fmt_int(value):
    return "-" if value is None else f"{value:,.0f}"


def print_table(results):
    print()
    print("Results. server/s: requests/s (events/s for consume); CPU%: the server's, 100 = one core;")
    print("base/s: the baseline's requests/s, same client and request shapes; ratio = server/s / base/s")
    print(TABLE_HEAD)
    print("-" * len(TABLE_HEAD))
    for row in results:
        print_row(row)
    base = {(r["scenario"], r["connections"]): r for r in results if r["phase"] == "base"}
    scaled = [r for r in results if r["phase"] == "scale"]
    if scaled:
        print()
        print("Scale: the same runs with the extra events stored, change of server/s against the first run")
        for row in scaled:
            before = base.get((row["scenario"], row["connections"]))
            if before and before["server_throughput"]:
                change = 100.0 * (row["server_throughput"] / before["server_throughput"] - 1)
                print("  %-8s %3d conns: %9s -> %9s /s (%+.1f%%), ratio %s -> %s" % (
                    row["scenario"], row["connections"], fmt_int(before["server_throughput"]),
                    fmt_int(row["server_throughput"]), change, fmt(before["ratio"], 2),
                    fmt(row["ratio"], 2)))


def machine_info():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return {"nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu": model, "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "platform": platform.platform(), "wrk": shutil.which("wrk") is not None}


def print_header(args, machine):
    print("command: %s" % shlex.join([sys.executable, sys.argv[0]] + sys.argv[1:]))
    print("machine: nproc %s, %s, Python %s, SQLite %s, %s" % (
        machine["nproc"], machine["cpu"] or "unknown CPU", machine["python"], machine["sqlite"],
        machine["platform"]))
    if args.endpoints is not None:
        print("run:     --endpoints %s, %d requests per endpoint, --sync %s"
              % (args.endpoints, args.requests, args.sync))
    elif args.build_db is None:
        scale = (", --scale %s events in %d streams" % (f"{args.scale_events:,}", args.scale_streams)
                 if args.scale else "")
        print("run:     --sync %s, %g s per run after %g s warm-up, x%d, connections %s, scenarios %s, "
              "client %s%s" % (args.sync, args.duration, args.warmup, args.repeat,
                               ",".join(map(str, args.connections)), ",".join(args.scenarios), args.client,
                               scale))
    print(flush=True)


# Endpoints ###################################################################
# --endpoints DB: the cost of each endpoint on a given database, one request at
# a time, next to GET /api/v1/health (routing, auth-free, one trivial query).

ENDPOINT_SLOW_S = 0.5            # an endpoint whose untimed first request takes longer ...
ENDPOINT_SLOW_REQUESTS = 5       # ... is timed this many times at most
ENDPOINT_CONSUMERS = 3           # consumer offsets created when the stream has none


class KeepAliveClient:
    """One http.client connection reused for every request; (status, body, seconds)."""

    def __init__(self, target):
        self.target = target
        self.connection = None

    def request(self, method, path, headers=None):
        all_headers = {"Authorization": self.target["auth"]}
        all_headers.update(headers or {})
        for attempt in (1, 2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.target["host"], self.target["port"],
                                                             timeout=300)
                self.connection.connect()
                self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            began = time.perf_counter()
            try:
                self.connection.request(method, path, body=b"" if method == "POST" else None,
                                        headers=all_headers)
                response = self.connection.getresponse()
                body = response.read()
            except (http.client.HTTPException, OSError) as error:
                self.close()
                if attempt == 2:
                    raise BenchError("%s %s: %r" % (method, path, error)) from None
                continue   # the server closed an idle connection: one retry on a new one
            seconds = time.perf_counter() - began
            if response.will_close:
                self.close()
            return response.status, body, seconds

    def json(self, method, path, headers=None):
        status, body, _ = self.request(method, path, headers)
        if status != 200:
            raise BenchError("%s %s: %d %s" % (method, path, status, body[:300].decode("utf-8", "replace")))
        return json.loads(body)

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def endpoint_plan(client, event_name):
    """[(label, method, path, headers)] with real names from the database, and what was found and done."""
    streams = client.json("GET", "/api/v1/streams")
    if not streams:
        raise BenchError("the database has no streams: build one with --build-db")
    stream = max(streams, key=lambda s: (s["eventsCount"], s["streamName"]))
    name = stream["streamName"]
    quoted = urllib.parse.quote(name, safe="")
    probe = {"X-Consumer-ID": "bench-endpoints-reader"}   # reads do not store an offset
    read_path = "%s?eventName=%s&limit=%%d" % (stream_path(name), urllib.parse.quote(event_name, safe=""))
    first = client.json("GET", read_path % 1, probe)
    if not first:
        raise BenchError("stream %s has no %s events for a new consumer (choose one with --event-name)"
                         % (name, event_name))
    event_id = first[0]["eventId"]
    consumers = client.json("GET", "/api/v1/consumers/%s" % quoted)
    created = []
    if not consumers:
        for number in range(1, ENDPOINT_CONSUMERS + 1):
            consumer = "bench-endpoints-%d" % number
            for offset in (stream["eventsCount"] * number // (ENDPOINT_CONSUMERS + 1), 1):
                status, body, _ = client.request("POST", "/api/v1/%s/%s/%s/change/%d" % (
                    quoted, consumer, urllib.parse.quote(event_name, safe=""), offset))
                if status == 200:
                    created.append({"consumerId": consumer, "eventName": event_name, "offset": offset})
                    break
            else:
                raise BenchError("seeking %s in %s: %d %s" % (consumer, name, status, body[:300]))
        consumers = client.json("GET", "/api/v1/consumers/%s" % quoted)
    seek = consumers[0]
    no_match = "nomatch-" + uuid.uuid4().hex[:12]
    plan = [
        ("health", "GET", "/api/v1/health", None),
        ("metrics", "GET", "/api/v1/metrics", None),
        ("consumers/<stream>", "GET", "/api/v1/consumers/%s" % quoted, None),
        ("stats/events-per-stream", "GET", "/api/v1/stats/events-per-stream", None),
        ("stats/stream-data", "GET", "/api/v1/stats/stream-data", None),
        ("stats/events-current-month", "GET", "/api/v1/stats/events-current-month", None),
        ("streams", "GET", "/api/v1/streams", None),
        ("search event name", "GET", "/api/v1/search?_q=%s" % urllib.parse.quote(event_name, safe=""), None),
        ("search no match", "GET", "/api/v1/search?_q=%s" % no_match, None),
        ("search event ID", "GET", "/api/v1/search?_q=%s" % event_id, None),
        ("event-period-search 1month", "GET", "/api/v1/event-period-search/%s?period=1month" % quoted, None),
        ("events/<id>/payload", "GET", "/api/v1/events/%s/payload" % event_id, None),
        ("change offset (seek)", "POST", "/api/v1/%s/%s/%s/change/%d" % (
            quoted, urllib.parse.quote(seek["consumerId"], safe=""),
            urllib.parse.quote(seek["eventName"], safe=""), seek["offset"]), None),
        ("read limit=10", "GET", read_path % READ_LIMIT, probe),
    ]
    found = {"stream": name, "stream_events": stream["eventsCount"], "streams": len(streams),
             "event_name": event_name, "event_id": event_id, "no_match_term": no_match,
             "consumers": len(consumers), "consumers_created": created,
             "seek": {"consumerId": seek["consumerId"], "eventName": seek["eventName"],
                      "offset": seek["offset"]}}
    return plan, found


def run_endpoints(args, machine):
    """--endpoints DB: time each endpoint, taking turns, on an existing database."""
    user, password = "bench", uuid.uuid4().hex
    rows, problems, found = [], [], {}
    with tempfile.TemporaryDirectory(prefix="bench-eventserver-") as workdir:
        server = start_server(args, os.path.abspath(args.endpoints), workdir, user, password)
        client = KeepAliveClient(server.target)
        meter = ProcessMeter(server.pid)
        meter.start()
        try:
            print("server: %s (pid %d)" % (server.banner, server.pid), flush=True)
            plan, found = endpoint_plan(client, args.event_name)
            print("stream %s (%s events, of %d streams), event name %s, event ID %s, %d consumer(s)%s"
                  % (found["stream"], f"{found['stream_events']:,}", found["streams"], found["event_name"],
                     found["event_id"], found["consumers"],
                     ", %d created by seeks" % len(found["consumers_created"])
                     if found["consumers_created"] else ""), flush=True)
            timings = {label: [] for label, *_ in plan}
            wanted, answers = {}, {}
            for label, method, path, headers in plan:   # one untimed request each: warms caches
                status, body, seconds = client.request(method, path, headers)
                answers[label] = (status, len(body))
                wanted[label] = ENDPOINT_SLOW_REQUESTS if seconds > ENDPOINT_SLOW_S else args.requests
                wanted[label] = min(wanted[label], args.requests)
                if status != 200:
                    problems.append("%s: %d %s" % (label, status, body[:200].decode("utf-8", "replace")))
            for turn in range(args.requests):
                for label, method, path, headers in plan:
                    if turn < wanted[label]:
                        status, body, seconds = client.request(method, path, headers)
                        timings[label].append(seconds)
                        answers[label] = (status, len(body))
                        if status != 200:
                            problems.append("%s: %d %s" % (label, status,
                                                           body[:200].decode("utf-8", "replace")))
            rss_mb, cpu = meter.stop()
        finally:
            client.close()
            server.stop()
            if server.exit_note:
                problems.append("server %s" % server.exit_note)
            if server.tracebacks():
                problems.append("server logged %d traceback(s); last lines: %s" % (
                    server.tracebacks(), server.stderr_tail(8)))
    health = statistics.median(timings["health"])
    print()
    print("One request at a time on one keep-alive connection; ms of wall time at the client;")
    print("ratio = the endpoint's median / health's median")
    head = "%-28s %-52s %4s %9s %9s %8s %6s %9s" % ("endpoint", "request", "n", "median ms", "p90 ms",
                                                    "ratio", "status", "bytes")
    print(head)
    print("-" * len(head))
    for label, method, path, headers in plan:
        values = sorted(timings[label])
        median = statistics.median(values)
        row = {"endpoint": label, "method": method, "path": path, "requests": len(values),
               "median_ms": ms(median), "p90_ms": ms(percentile(values, 0.90)),
               "min_ms": ms(values[0]), "max_ms": ms(values[-1]),
               "ratio_to_health": round(median / health, 1) if health else None,
               "status": answers[label][0], "bytes": answers[label][1]}
        rows.append(row)
        shown = "%s %s" % (method, path)
        print("%-28s %-52s %4d %9.2f %9.2f %8s %6d %9s" % (
            label, shown if len(shown) <= 52 else shown[:49] + "...", row["requests"], row["median_ms"],
            row["p90_ms"], fmt(row["ratio_to_health"], 1), row["status"], fmt_int(row["bytes"])))
    print()
    print("server peak RSS %.1f MB, CPU %.1f s" % (rss_mb, cpu))
    for problem in problems:
        print("PROBLEM: %s" % problem)
    if args.json:
        document = {"version": __version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "command": [sys.executable, sys.argv[0]] + sys.argv[1:], "machine": machine,
                    "config": {"database": os.path.abspath(args.endpoints), "requests": args.requests,
                               "sync": args.sync},
                    "server": server.banner, "found": found, "peak_rss_mb": round(rss_mb, 1),
                    "server_cpu_s": round(cpu, 2), "results": rows, "problems": problems}
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1)
        print("\nfigures written to %s" % args.json)
    return 1 if problems else 0


# Command line ################################################################

def start_server(args, db_path, workdir, user, password):
    argv = [sys.executable, args.server, "--port", "0", "--db", db_path, "--user", user,
            "--password", password, "--sync", args.sync, "--quiet"]
    server = Service("eventserver", argv, workdir, user, password)
    server.wait_healthy()
    return server


def build_database(args):
    """--build-db: fill a database through the HTTP batch API and exit."""
    user, password = "bench", uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="bench-eventserver-") as workdir:
        server = start_server(args, os.path.abspath(args.build_db), workdir, user, password)
        try:
            print("loading %s events in %d streams into %s (%s)" % (
                f"{args.events:,}", args.streams, args.build_db, server.banner), flush=True)
            loaded = load_events(server.target, scale_plan(args.events, args.streams), "build")
        finally:
            server.stop()
        print("loaded %s events in %.1f s (%s events/s)" % (
            f"{loaded['events']:,}", loaded["seconds"], f"{loaded['events_per_s']:,}"))
        if server.exit_note:
            print("server: %s" % server.exit_note)
            return 1
    return 0


def run_benchmark(args, machine):
    user, password = "bench", uuid.uuid4().hex
    results, loads, problems, waiters = [], {}, [], None
    with tempfile.TemporaryDirectory(prefix="bench-eventserver-") as workdir:
        baseline = Service("baseline", [sys.executable, os.path.abspath(__file__), "--baseline-server",
                                        "--user", user, "--password", password], workdir, user, password)
        server = None
        try:
            server = start_server(args, os.path.join(workdir, "bench.db"), workdir, user, password)
            print("server:   %s (pid %d)" % (server.banner, server.pid))
            print("baseline: %s (pid %d)" % (baseline.banner, baseline.pid))
            print()
            if set(args.scenarios) & set(DEFAULT_SCENARIOS) or args.scale:
                print(TABLE_HEAD)
                print("-" * len(TABLE_HEAD), flush=True)
            if "publish" in args.scenarios:
                for connections in args.connections:
                    run_pair("publish", connections, "base", server, baseline, args, workdir, results)
            if any(s in args.scenarios for s in ("read", "consume", "mixed")) or args.scale:
                print("  preloading %s events into %s ..." % (f"{args.read_events:,}", READ_STREAM),
                      flush=True)
                loads["read_stream"] = load_events(server.target, [(READ_STREAM, args.read_events)],
                                                   READ_STREAM)
                print("  ... %s events/s" % f"{loads['read_stream']['events_per_s']:,}", flush=True)
            for scenario in ("read", "consume"):
                if scenario in args.scenarios:
                    for connections in args.connections:
                        run_pair(scenario, connections, "base", server, baseline, args, workdir, results)
            if "mixed" in args.scenarios:
                run_pair("mixed", MIXED_PUBLISHERS + MIXED_CONSUMERS, "base", server, baseline, args,
                         workdir, results)
            if "waiters" in args.scenarios:
                print("  waiters: publish at %d connections, alternately without and with %d long-poll "
                      "reads waiting, %d round(s) ..." % (WAITERS_PUBLISHERS, args.waiters, args.waiter_rounds),
                      flush=True)
                waiters = run_waiters(server, args, problems)
            if args.scale:
                print("  loading %s events in %d streams (--scale) ..." % (
                    f"{args.scale_events:,}", args.scale_streams), flush=True)
                loads["scale"] = load_events(server.target, scale_plan(args.scale_events, args.scale_streams),
                                             "scale")
                print("  ... %s events/s" % f"{loads['scale']['events_per_s']:,}", flush=True)
                if hasattr(os, "sync"):  # else the runs below pay for writing back the load's ~700 MB
                    started = time.monotonic()
                    os.sync()
                    print("  ... written back to disk in %.1f s" % (time.monotonic() - started), flush=True)
                for scenario in ("publish", "read"):
                    for connections in args.connections:
                        run_pair(scenario, connections, "scale", server, baseline, args, workdir, results)
        except BenchError as error:
            problems.append("run stopped: %s" % error)
            if server and server.process.poll() is not None:
                problems.append("server exited with code %s: %s" % (server.process.returncode,
                                                                  server.stderr_tail()))
        finally:
            baseline.stop()
            if server:
                server.stop()
                if server.exit_note:
                    problems.append("server %s" % server.exit_note)
                if server.tracebacks():
                    problems.append("server logged %d traceback(s); first lines: %s" % (
                        server.tracebacks(), server.stderr_tail(8)))
        for row in results:
            if row["server"]["errors"]:
                problems.append("%s %d conns: server errors %s" % (row["scenario"], row["connections"],
                                                                     row["server"]["errors"]))
    if results:
        print_table(results)
    if waiters:
        print_waiters(waiters)
    for problem in problems:
        print("PROBLEM: %s" % problem)
    if args.json:
        document = {"version": __version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "command": [sys.executable, sys.argv[0]] + sys.argv[1:], "machine": machine,
                    "config": {"sync": args.sync, "duration_s": args.duration, "warmup_s": args.warmup,
                               "connections": args.connections, "scenarios": args.scenarios,
                               "repeat": args.repeat, "waiters": args.waiters,
                               "waiter_rounds": args.waiter_rounds,
                               "client": args.client, "envelope_bytes": ENVELOPE_SIZE,
                               "read_events": args.read_events, "scale": args.scale,
                               "scale_events": args.scale_events if args.scale else None,
                               "scale_streams": args.scale_streams if args.scale else None},
                    "server": server.banner if server else None, "loads": loads, "results": results,
                    "waiters": waiters, "problems": problems}
        with open(args.json, "w") as f:
            json.dump(document, f, indent=1)
        print("\nfigures written to %s" % args.json)
    return 1 if any(problem.startswith("run stopped") for problem in problems) else 0


def main(argv):
    if argv[:1] == ["--baseline-server"]:
        return run_baseline_server(argv[1:])
    args = parse_args(argv)
    machine = machine_info()
    print_header(args, machine)
    try:
        if args.build_db is not None:
            return build_database(args)
        if args.endpoints is not None:
            return run_endpoints(args, machine)
        return run_benchmark(args, machine)
    except BenchError as error:
        print("bench_eventserver.py: %s" % error, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""bench_eventserver.py -- throughput, latency and memory of eventserver.py next to a do-nothing baseline.

In one run it starts, each in its own process, the event server (``eventserver.py``
beside this file, or ``--server``) on a fresh SQLite file with ``--sync`` from the
command line, and a baseline: a ``ThreadingHTTPServer`` handler that does only
what no server can avoid (read the body, parse the JSON or form, check Basic
auth in constant time, answer a small JSON in one write; this file run as
``--baseline-server``). It drives both with the same keep-alive load (its own
client: worker processes with raw-socket connections in a ``selectors`` loop, one
request in flight per connection; or wrk with ``--client wrk``) for a fixed time
after a warm-up, and reports per scenario and connection count the throughput,
p50 and p99, the ratio server / baseline, and the server's peak RSS and CPU:

- publish       POSTs of a ~400-byte envelope over 16 streams;
- repeat-read   ``limit=10`` GETs of the same window of a 100,000-event stream
                (never acknowledged: the server's cache of answers serves them;
                ``read`` is its old name);
- consume       read ``limit=100``, acknowledge each event (events/s);
- mixed         4 publishers and 4 consumers at once;
- tail          consumers that keep up: read the newest events of a stream that
                one connection publishes to at ``--tail-rate``/s, acknowledge each;
- spread        10,000 consumers at distinct random offsets of a 1,000,000-event
                stream (built with ``eventserver.py import``), ``limit=10`` reads,
                each connection in its own random order of them;
- waiters       (named only) publishing at 8 connections without and with 100
                long polls waiting, 5 rounds;
- memory        (named only) peak RSS during ``--fixtures`` of 1,000,000 events,
                during their import, and after 100,000 distinct consumers.

docs/PERFORMANCE.md says how each scenario is built and what it measured. Run it:

    python3 bench_eventserver.py                  # make bench; about 5 minutes on 2 cores
    python3 bench_eventserver.py --client wrk --repeat 3 --scenarios publish,consume
    python3 bench_eventserver.py --scenarios memory   # make bench-memory
    python3 bench_eventserver.py --scale          # publish and repeat-read again over 1,000,000 more events
    python3 bench_eventserver.py --server old/eventserver.py --scenarios publish
    python3 bench_eventserver.py --build-db big.db --events 1000000 --streams 100
    python3 bench_eventserver.py --endpoints big.db   # each endpoint, one request at a time, against health

Figures vary by 10-20% between runs on a shared machine: compare ratios, use
``--repeat``. Standard library only; Linux (it reads ``/proc``).
"""

import argparse
import array
import base64
import heapq
import hmac
import http.client
import itertools
import json
import math
import multiprocessing
import os
import platform
import queue
import random
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

__version__ = "1.1.0"

HERE = os.path.dirname(os.path.abspath(__file__))


class BenchError(Exception):
    """A failure that ends the run with one clear line (server did not start, load failed...)."""


# Configuration ###############################################################

SCENARIOS = ("publish", "repeat-read", "consume", "mixed", "tail", "spread", "waiters", "memory")
DEFAULT_SCENARIOS = ("publish", "repeat-read", "consume", "mixed", "tail", "spread")
SCENARIO_ALIASES = {"read": "repeat-read"}
PUBLISH_STREAMS = 16                 # the publish scenario spreads its POSTs over this many streams
READ_LIMIT = 10                      # limit= of repeat-read and spread
CONSUME_LIMIT = 100                  # limit= of consume and tail
MIXED_PUBLISHERS = MIXED_CONSUMERS = 4
WAITERS_PUBLISHERS = 8               # publish connections of the waiters scenario
WAITERS_WAIT = 30                    # wait= of each long-poll read (the server's default --max-wait)
WAITERS_NAME = "BenchNobodyPublishes"   # the waiters' event name (+ a suffix per run); released by one event
LINGER_S = 20.0                      # how long waiters may take to be released after the window
NEWCOMER_CONNECTIONS = 8             # connections of the memory scenario's distinct consumers
LOAD_BATCH = 1000                    # envelopes per POST when preloading (the API's maximum)
LOAD_CONNECTIONS = 4                 # concurrent loader connections
EVENT_NAME = "OrderPlaced"
READ_STREAM = "bench-read"
SPREAD_STREAM = "bench-spread"
FIXED_TIME = "2024-05-14T13:58:12.000000+00:00"   # createdAt and movedAt of generated records


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench_eventserver.py", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--server", action="append", help="eventserver.py to run (default: beside this); given again, the "
        "others too, each run in turns with the first (named by their directories), for a comparison")
    add("--sync", choices=("full", "normal"), default="full", help="the server's --sync (default full)")
    add("--duration", type=float, default=5.0, help="measured seconds per run (default 5)")
    add("--warmup", type=float, default=1.0, help="unmeasured seconds before each run (default 1)")
    add("--connections", default="1,8,32", help="comma-separated connection counts (default 1,8,32)")
    add("--scenarios", default=",".join(DEFAULT_SCENARIOS),
        help="comma-separated subset of %s (default %s)" % (",".join(SCENARIOS), ",".join(DEFAULT_SCENARIOS)))
    add("--repeat", type=int, default=1, help="runs per pair; the median ratio is reported (default 1)")
    add("--client", choices=("stdlib", "wrk"), default="stdlib", help="load client (default stdlib)")
    add("--client-procs", type=int, default=0, help="load-client processes (default min(connections, CPUs))")
    add("--read-events", type=int, default=100_000, help="events of the repeat-read and consume stream")
    add("--tail-rate", type=float, default=200.0, help="tail: events/s published meanwhile (default 200)")
    add("--events", "--scale-events", "--spread-events", type=int, default=1_000_000,
        help="events of the spread stream, of --fixtures, of --scale and of --build-db (default 1000000)")
    add("--streams", "--scale-streams", type=int, default=100, help="streams of --scale and --build-db")
    add("--spread-consumers", type=int, default=10_000, help="spread: consumers at random offsets (default 10000)")
    add("--spread-db", metavar="PATH", help="spread: this database, built there first when missing")
    add("--memory-consumers", type=int, default=100_000, help="memory: distinct consumers (default 100000)")
    add("--waiters", type=int, default=100, help="waiters: long polls held open (default 100)")
    add("--waiter-rounds", type=int, default=5, help="waiters: rounds without and with them (default 5)")
    add("--scale", action="store_true", help="then load --events more and run publish and repeat-read again")
    add("--build-db", metavar="PATH", help="only fill a database at PATH through the batch API")
    add("--endpoints", metavar="DB", help="only time each endpoint on the existing database DB")
    add("--requests", type=int, default=20, help="--endpoints: timed requests per endpoint (default 20)")
    add("--event-name", default=EVENT_NAME, help="--endpoints: the event name to read and search for")
    add("--json", metavar="PATH", help="figures file (default bench-results[-endpoints].json; '' for none)")
    args = parser.parse_args(argv)
    args.servers = args.server or [os.path.join(HERE, "eventserver.py")]
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        parser.error("--connections takes comma-separated integers, e.g. 1,8,32")
    args.scenarios = [SCENARIO_ALIASES.get(s.strip(), s.strip()) for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    for failed, message in (
            (not args.connections or min(args.connections) < 1, "--connections needs counts >= 1"),
            (unknown or not args.scenarios, "unknown scenario(s) %s; choose from %s" % (
                ",".join(unknown), ",".join(SCENARIOS))),
            (args.duration <= 0 or args.warmup < 0 or args.tail_rate <= 0, "--duration and --tail-rate must be > 0"),
            (min(args.repeat, args.waiters, args.waiter_rounds, args.spread_consumers, args.memory_consumers,
                 args.requests) < 1, "counts must be >= 1"),
            (args.events < args.spread_consumers + READ_LIMIT, "--events must exceed --spread-consumers by 10"),
            (args.client == "wrk" and not shutil.which("wrk"), "--client wrk: wrk is not on PATH"),
            (not all(map(os.path.isfile, args.servers)), "server not found: %s" % ", ".join(args.servers)),
            (args.endpoints and args.build_db, "--endpoints and --build-db are separate runs"),
            (args.endpoints and not os.path.isfile(args.endpoints), "--endpoints: no database at %s" % args.endpoints)):
        if failed:
            parser.error(message)
    if args.json is None:
        args.json = "bench-results-endpoints.json" if args.endpoints else "bench-results.json"
    args.servers = [os.path.abspath(path) for path in args.servers]
    args.server = args.servers[0]   # the one that runs the scenarios with a database of their own
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
    return json.dumps(envelope, separators=(",", ":")).encode().split(b"@@@@@@@@@@")


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


def spread_consumer(index):
    return "bench-spread-%05d" % index


def basic_auth(user, password):
    return "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


def stream_path(stream):
    return "/api/v1/streams/%s/events" % urllib.parse.quote(stream, safe="")


def read_path(stream, limit, event_name=EVENT_NAME, wait=None):
    return "%s?eventName=%s&limit=%d%s" % (stream_path(stream), urllib.parse.quote(event_name, safe=""),
                                           limit, "" if wait is None else "&wait=%d" % wait)


def http_request(target, method, path, headers, body=b""):
    """The bytes of one HTTP/1.1 keep-alive request."""
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: %s:%d" % (target["host"], target["port"]),
             "Authorization: " + target["auth"]] + ["%s: %s" % item for item in headers.items()]
    if method == "POST":
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def ack_request(target, stream, consumer):
    """The bytes of an acknowledgement, split where the event ID goes."""
    return http_request(target, "POST", stream_path(stream) + "/\0", {
        "X-Consumer-ID": consumer, "Content-Type": "application/x-www-form-urlencoded"}, b"action=ACK").split(b"\0")


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
    print("baseline %s listening on http://%s:%d/" % (__version__, args.host, server.server_address[1]), flush=True)
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
        self.name, self.exit_note = name, None
        self.paths = {stream: os.path.join(workdir, "%s.%s" % (name, stream)) for stream in ("stdout", "stderr")}
        started = time.monotonic()
        with open(self.paths["stdout"], "wb") as out, open(self.paths["stderr"], "wb") as err:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.pid = self.process.pid
        while not URL_PATTERN.search(self.text("stdout")):
            if self.process.poll() is not None:
                raise BenchError("%s exited with code %s before listening: %s" % (
                    name, self.process.returncode, self.stderr_tail() or self.text("stdout").strip()))
            if time.monotonic() > started + timeout:
                self.process.kill()
                raise BenchError("%s printed no URL within %.0f s" % (name, timeout))
            time.sleep(0.05)
        self.listening_s = time.monotonic() - started
        self.banner = next(line.strip() for line in self.text("stdout").splitlines() if URL_PATTERN.search(line))
        host, port = URL_PATTERN.search(self.banner).groups()
        host = host.strip("[]")
        self.target = {"host": "127.0.0.1" if host in ("0.0.0.0", "::", "") else host, "port": int(port),
                       "auth": basic_auth(user, password)}

    def text(self, stream):
        with open(self.paths[stream], "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stderr_tail(self, lines=5):
        return " | ".join(self.text("stderr").strip().splitlines()[-lines:])

    def wait_healthy(self, timeout=15.0):
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            try:
                status, body = simple_request(self.target, "GET", "/api/v1/health")
                if status == 200:
                    return
                last = "%d %s" % (status, body[:200])
            except (OSError, BenchError) as error:
                last = str(error)
            time.sleep(0.1)
        raise BenchError("%s not healthy after %.0f s: %s" % (self.name, timeout, last))

    def stop(self, timeout=15.0):
        """SIGTERM, then wait; the problems of this server's life, for the PROBLEM lines."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self.exit_note = "did not stop within %.0f s of SIGTERM (killed)" % timeout
        if self.process.returncode != 0 and not self.exit_note:
            self.exit_note = "exit code %s after SIGTERM: %s" % (self.process.returncode, self.stderr_tail())
        found = ["%s %s" % (self.name, self.exit_note)] if self.exit_note else []
        tracebacks = self.text("stderr").count("Traceback (most recent call last)")
        if tracebacks:
            found.append("%s logged %d traceback(s); last lines: %s" % (self.name, tracebacks, self.stderr_tail(8)))
        return found


def proc_status(pid, field):
    """An integer field of /proc/PID/status (VmRSS, VmHWM in kB, Threads), or None."""
    try:
        with open("/proc/%d/status" % pid) as f:
            return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), None)
    except (OSError, ValueError):
        return None


def rss_mb(pid, field="VmRSS"):
    return round((proc_status(pid, field) or 0) / 1024, 1)


def cpu_seconds(pid):
    """User + system CPU time of a process, from /proc/PID/stat."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class ProcessMeter:
    """Peak RSS and CPU time of one process over a run, from /proc."""

    def __init__(self, pid):
        self.pid = pid

    def start(self):
        with open("/proc/%d/clear_refs" % self.pid, "w") as f:
            f.write("5")   # resets VmHWM, the peak RSS (Linux >= 4.0)
        self.mark_cpu()

    def mark_cpu(self):
        self.cpu_start = cpu_seconds(self.pid)

    def stop(self):
        """(peak RSS in MB, CPU seconds since start or the last mark)."""
        return rss_mb(self.pid, "VmHWM"), cpu_seconds(self.pid) - self.cpu_start


# Clients #####################################################################
# Client: http.client on one keep-alive connection, for set-up, loading and
# --endpoints. RawConnection: a socket and the answer read so far, for the
# load client, which parses only what it needs.

class Client:
    """One keep-alive http.client connection with the run's credentials."""

    def __init__(self, target, timeout=300):
        self.target, self.timeout, self.connection = target, timeout, None

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def request(self, method, path, headers=None, body=None):
        """(status, body, seconds); a GET is retried once when the server closed an idle connection."""
        headers = dict(headers or {}, Authorization=self.target["auth"])
        for attempt in (1, 2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.target["host"], self.target["port"],
                                                             timeout=self.timeout)
                self.connection.connect()
                self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            began = time.perf_counter()
            try:
                self.connection.request(method, path, body if body or method != "POST" else b"", headers)
                response = self.connection.getresponse()
                answer = response.read()
            except (http.client.HTTPException, OSError) as error:
                self.close()
                if attempt == 2 or method != "GET":
                    raise BenchError("%s %s: %r" % (method, path, error)) from None
                continue
            if response.will_close:
                self.close()
            return response.status, answer, time.perf_counter() - began

    def json(self, method, path, headers=None, body=None):
        status, answer, _ = self.request(method, path, headers, body)
        if status != 200:
            raise BenchError("%s %s: %d %s" % (method, path, status, answer[:300].decode("utf-8", "replace")))
        return json.loads(answer)

    def close(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def simple_request(target, method, path, headers=None, body=None):
    """One request on a new connection: (status, body bytes)."""
    with Client(target, timeout=120) as client:
        return client.request(method, path, headers, body)[:2]


def publish_one(target, stream, event_name=EVENT_NAME):
    """POST one envelope with this event name to the stream, as its owner."""
    envelope = json.loads(envelope_bytes(0))
    envelope["event"]["name"] = event_name
    with Client(target, timeout=120) as client:
        client.json("POST", stream_path(stream), {"Content-Type": "application/json",
                                                  "X-Producer-ID": producer_id(stream)}, json.dumps(envelope).encode())


CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
CONNECTION_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


class RawConnection:
    """One keep-alive socket, its session, the request in flight and the answer read so far."""

    def __init__(self, target, spec, stats):
        self.target, self.stats = target, stats
        self.interval = spec.get("interval")   # seconds from one request's due time to the next's
        self.due = 0.0
        self.linger = spec.get("linger", False)   # goes on after the window until its session ends
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
        Most answers arrive in one recv, so the head is parsed from scratch each time."""
        if self.received:
            data = self.received + data
        end = data.find(b"\r\n\r\n")
        length = CONTENT_LENGTH.search(data, 0, end + 2) if end >= 0 else None
        if end >= 0 and length is None:
            raise ValueError("answer without Content-Length: %r" % data[:200])
        stop = end + 4 + int(length.group(1)) if length else None
        if stop is None or len(data) < stop:
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


# Sessions ####################################################################
# A connection is driven by a session: a generator that yields the next
# (request bytes, is_ack) and is sent the (status, body) of the answer
# (status None: the request failed). spec["fake"]: the baseline, whose answers
# hold no events, gets the same request mix with made-up event IDs.

def publish_session(target, spec, stats):
    """POST envelopes round-robin over the streams (default the 16 publish streams)."""
    streams = spec.get("streams") or [publish_stream(i) for i in range(PUBLISH_STREAMS)]
    heads = [http_request(target, "POST", stream_path(stream), {"Content-Type": "application/json",
                          "X-Producer-ID": producer_id(stream)}, envelope_bytes(0))[:-ENVELOPE_SIZE]
             for stream in streams]
    index, total = spec["index"], spec["total"]
    for count in itertools.count():
        yield heads[(index + count * total) % len(heads)] + envelope_bytes(
            index * 100_000_000 + count % 100_000_000), False


def repeat_read_session(target, spec, stats):
    """GET the same first events again and again: this consumer never acknowledges."""
    request = http_request(target, "GET", read_path(READ_STREAM, READ_LIMIT), {"X-Consumer-ID": spec["consumer"]})
    while True:
        yield request, False


EVENT_ID = re.compile(rb'"eventId":"([0-9a-f-]{36})"')


def consumer_session(target, spec, stats):
    """Read, acknowledge each event read, in order. consume: limit=100, a new consumer ID when the
    stream runs dry; tail: read again (the stream is being published to)."""
    stream, tail = spec["stream"], spec["role"] == "tail"
    fake_ids = [str(uuid.uuid4()).encode()] * CONSUME_LIMIT
    owed = 0.0   # the baseline of tail: acknowledgements per read as many as the server's consumers made
    for generation in itertools.count():
        consumer = "%s-%d" % (spec["consumer"], generation)
        read_request = http_request(target, "GET", read_path(stream, CONSUME_LIMIT), {"X-Consumer-ID": consumer})
        ack_head, ack_tail = ack_request(target, stream, consumer)
        while True:
            status, body = yield read_request, False
            stats.count("reads")
            if status != 200:
                continue
            if spec["fake"]:
                owed += spec.get("acks_per_read", CONSUME_LIMIT)
                event_ids, owed = fake_ids[:int(owed)], owed - int(owed)
            else:
                event_ids = EVENT_ID.findall(body)
            if not event_ids and not tail:
                break
            for event_id in event_ids:
                status, body = yield ack_head + event_id + ack_tail, True
                if status != 200:
                    break
        stats.count("restarts")


def spread_session(target, spec, stats):
    """limit=10 reads for every spread consumer, in this connection's own random order."""
    head, tail = http_request(target, "GET", read_path(SPREAD_STREAM, READ_LIMIT), {"X-Consumer-ID": "\0"}).split(b"\0")
    order = list(range(spec["consumers"]))
    random.Random(spec["index"]).shuffle(order)
    while True:
        for index in order:
            yield head + spread_consumer(index).encode() + tail, False


def newcomer_session(target, spec, stats):
    """This connection's share of spec["consumers"] distinct consumers: each reads one event and
    acknowledges it; the session ends when all have."""
    for number in range(spec["index"], spec["consumers"], spec["total"]):
        consumer = "bench-newcomer-%06d" % number
        status, body = yield http_request(target, "GET", read_path(spec["stream"], 1),
                                          {"X-Consumer-ID": consumer}), False
        ack_head, ack_tail = ack_request(target, spec["stream"], consumer)
        for event_id in EVENT_ID.findall(body or b""):
            yield ack_head + event_id + ack_tail, True
        stats.count("consumers")


def waiter_session(target, spec, stats):
    """A long-poll read of an event name nobody publishes, again when it times out, until an event
    of that name (published after the window) releases it."""
    path = read_path(publish_stream(spec["index"] % PUBLISH_STREAMS), 1, spec["name"], WAITERS_WAIT)
    request = http_request(target, "GET", path, {"X-Consumer-ID": "bench-waiter-%03d" % spec["index"]})
    while True:
        sent = time.monotonic()
        status, body = yield request, False
        if status != 200:
            return   # the error is counted; reading again would make it a busy loop
        if body.strip() != b"[]":
            stats.count("released", anytime=True)
            return
        stats.count("timed_out" if time.monotonic() - sent >= WAITERS_WAIT - 1 else "early", anytime=True)


SESSIONS = {"tail": consumer_session, "publish": publish_session, "repeat-read": repeat_read_session,
            "consume": consumer_session, "spread": spread_session, "newcomer": newcomer_session,
            "waiter": waiter_session}   # in the order of the rows of one scenario


# Load client #################################################################
# Each worker process runs a selectors loop over its keep-alive connections.

class RoleStats:
    """What the connections of one role (publish, consume, ...) did in the measured window."""

    def __init__(self):
        self.requests = self.events = 0
        self.latencies = array.array("d")
        self.errors, self.samples, self.counts = {}, [], {}   # counts: what the sessions counted
        self.in_window = False

    def error(self, kind, detail):
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.samples) < 5:
            self.samples.append("%s: %s" % (kind, detail[:300]))

    def count(self, what, anytime=False):
        if self.in_window or anytime:
            self.counts[what] = self.counts.get(what, 0) + 1

    def report(self):
        return {"requests": self.requests, "events": self.events, "latencies": self.latencies.tobytes(),
                "errors": self.errors, "samples": self.samples, "counts": self.counts}


def client_worker(target, specs, duration, ready, start, start_time, results):
    """One load-client process: connect, wait for the common start, drive until the window closes
    (and the lingering sessions end), report."""
    stats = {}
    try:
        connections = [RawConnection(target, spec, stats.setdefault(spec["role"], RoleStats())) for spec in specs]
    except Exception as error:
        ready.put("connect failed: %r" % error)
        return
    ready.put("ok")
    start.wait()
    loop = Loop(start_time.value, start_time.value + duration, stats)
    cpu_start = None   # CPU time of this process when the measured window opens
    try:
        for connection in connections:
            loop.selector.register(connection.sock, selectors.EVENT_READ, connection)
            connection.send(time.monotonic())
        loop.live = len(connections)
        while loop.live:
            now = time.monotonic()
            if cpu_start is None and now >= loop.window_start:
                cpu_start = time.process_time()
                loop.open_window(True)
            if now >= loop.window_end and loop.close_window(connections, now):
                break
            loop.send_due(now)
            for key, _ in loop.selector.select(loop.timeout(now)):
                loop.drive(key.data)
    except Exception as error:
        results.put({"failed": "load client process: %r" % error})
        return
    cpu = time.process_time() - (cpu_start or 0.0)
    for connection in connections:
        connection.sock.close()
    results.put({"roles": {role: s.report() for role, s in stats.items()}, "cpu": cpu})


class Loop:
    """The selectors loop of one worker: answers in, next requests out, paced sends on a heap."""

    def __init__(self, window_start, window_end, stats):
        self.selector = selectors.DefaultSelector()
        self.window_start, self.window_end, self.stats = window_start, window_end, stats
        self.due = []   # (time, sequence, connection) of paced sends
        self.sequence = itertools.count()
        self.live = 0   # connections whose session goes on
        self.closed = False

    def open_window(self, is_open):
        for role_stats in self.stats.values():
            role_stats.in_window = is_open

    def timeout(self, now):
        until = self.window_end - now if now < self.window_end else self.window_end + LINGER_S - now
        return max(0.0, min(0.1, until, self.due[0][0] - now if self.due else 0.1))

    def close_window(self, connections, now):
        """At the window's end, stop every connection but the lingering ones; True when all are done."""
        if not self.closed:
            self.closed, self.due = True, []
            self.open_window(False)
            for connection in connections:
                if not connection.linger:
                    self.end(connection)
        return self.live == 0 or now >= self.window_end + LINGER_S

    def end(self, connection):
        if connection.sock.fileno() >= 0:
            self.selector.unregister(connection.sock)
            connection.sock.close()
            self.live -= 1

    def send_due(self, now):
        while self.due and self.due[0][0] <= now:
            self.send(heapq.heappop(self.due)[2], now)

    def drive(self, connection):
        """Read what arrived; on a complete answer, record it and send the next request."""
        try:
            data = connection.sock.recv(262144)
            if not data:
                raise ConnectionError("server closed the connection")
            answer = connection.take_answer(data)
        except (OSError, ValueError) as error:
            if self.reconnect(connection, repr(error)):
                self.next(connection, None, b"", time.monotonic())
            return
        if answer is None:
            return
        status, body, close_after = answer
        now, stats = time.monotonic(), connection.stats
        if self.window_start <= now <= self.window_end:
            stats.requests += 1
            stats.latencies.append(now - connection.sent_at)
            stats.events += connection.is_ack and status == 200
        if status != 200:
            stats.error(str(status), body.decode("utf-8", "replace"))
        if not close_after or self.reconnect(connection, None):
            self.next(connection, status, body, now)

    def next(self, connection, status, body, now):
        if not connection.advance(status, body):
            self.end(connection)
        elif connection.interval and not self.closed:   # a fixed rate; when far behind, start again
            due = connection.due + connection.interval
            connection.due = due if now - due < 10 * connection.interval else now
            heapq.heappush(self.due, (connection.due, next(self.sequence), connection))
        else:
            self.send(connection, now)

    def send(self, connection, now):
        try:
            connection.send(now)
        except OSError as error:   # one more try on a new socket; a second failure ends the worker
            if self.reconnect(connection, repr(error)):
                if connection.advance(None, b""):
                    connection.send(time.monotonic())
                else:
                    self.end(connection)

    def reconnect(self, connection, error):
        """A new socket after the server closed one; False (connection given up) when that fails.
        An error fails the request in flight; the session is told with status None."""
        self.selector.unregister(connection.sock)
        connection.sock.close()
        if error:
            connection.stats.error("connection", error)
            time.sleep(0.01)
        try:
            connection.connect()
        except OSError as connect_error:
            connection.stats.error("connection", "reconnect failed, connection given up: %r" % connect_error)
            self.live -= 1
            return False
        self.selector.register(connection.sock, selectors.EVENT_READ, connection)
        return True


def percentile(sorted_values, fraction):
    """Nearest-rank percentile."""
    return sorted_values[max(0, math.ceil(fraction * len(sorted_values)) - 1)] if sorted_values else None


def run_load(service, specs, args, meter=None, after_window=None, duration=None):
    """Drive `service` with one connection per spec; figures per role, plus server RSS and CPU.
    after_window() runs once the window has closed, while lingering sessions go on. With an
    infinite duration, the run lasts until every session has ended."""
    duration = args.duration if duration is None else duration
    processes = max(1, min(args.client_procs or os.cpu_count() or 1, len(specs)))
    context = multiprocessing.get_context("fork")
    ready, results, start = context.Queue(), context.Queue(), context.Event()
    start_time = context.Value("d", 0.0)   # time.monotonic() of the measured window's start
    workers = [context.Process(target=client_worker, args=(service.target, specs[i::processes], duration, ready,
                                                           start, start_time, results), daemon=True)
               for i in range(processes)]
    for worker in workers:
        worker.start()
    after = None
    try:
        for _ in workers:
            message = ready.get(timeout=60)
            if message != "ok":
                raise BenchError("load client: %s" % message)
        if meter:
            meter.start()
        start_time.value = time.monotonic() + args.warmup
        start.set()
        time.sleep(args.warmup)
        if meter:
            meter.mark_cpu()
        if math.isfinite(duration):
            time.sleep(max(0.0, start_time.value + duration - time.monotonic()))
            peak_mb, server_cpu = meter.stop() if meter else (None, None)
            after = after_window() if after_window else None
            reports = [results.get(timeout=60 + LINGER_S) for _ in workers]
        else:
            reports = [results.get(timeout=3600) for _ in workers]
            duration = time.monotonic() - start_time.value
            peak_mb, server_cpu = meter.stop() if meter else (None, None)
    except queue.Empty:
        raise BenchError("a load-client process did not report in time") from None
    finally:
        for worker in workers:
            worker.join(5)
            if worker.is_alive():
                worker.terminate()
    failures = [report["failed"] for report in reports if "failed" in report]
    if failures:
        raise BenchError(failures[0])
    roles = {}
    for report in reports:
        for role, data in report["roles"].items():
            merged = roles.setdefault(role, {"requests": 0, "events": 0, "latencies": array.array("d"),
                                             "errors": {}, "samples": [], "counts": {}})
            merged["requests"] += data["requests"]
            merged["events"] += data["events"]
            merged["latencies"].frombytes(data["latencies"])
            for into, counts in ((merged["errors"], data["errors"]), (merged["counts"], data["counts"])):
                for kind, count in counts.items():
                    into[kind] = into.get(kind, 0) + count
            merged["samples"] += data["samples"][:5 - len(merged["samples"])]
    for role, merged in roles.items():
        latencies = sorted(merged.pop("latencies"))
        roles[role] = role_figures(duration, percentile(latencies, 0.50), percentile(latencies, 0.99), **merged)
    figures = run_figures(roles, duration, peak_mb, server_cpu, after_window=after)
    figures["client_cpu_percent"] = 100.0 * sum(report["cpu"] for report in reports) / duration
    return figures


def role_figures(duration, p50, p99, requests=0, events=0, counts=None, errors=None, samples=()):
    """One role's figures, as both clients report them (p50 and p99 in seconds)."""
    counts = counts or {}
    return {"requests": requests, "requests_per_s": requests / duration, "events_per_s": events / duration,
            "reads_per_s": counts["reads"] / duration if "reads" in counts else None, "counts": counts,
            "p50_ms": ms(p50), "p99_ms": ms(p99), "errors": errors or {}, "error_samples": list(samples)}


def run_figures(roles, duration, peak_mb, server_cpu, **more):
    requests = sum(figure["requests"] for figure in roles.values())
    return dict({"roles": roles, "peak_rss_mb": peak_mb, "duration_s": duration, "client_cpu_percent": None,
                 "server_cpu_percent": None if server_cpu is None else 100.0 * server_cpu / duration,
                 "server_cpu_us_per_request": round(1e6 * server_cpu / requests, 1) if server_cpu and requests
                 else None}, **more)


def ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 3)


# wrk client (optional) #######################################################
# A Lua script builds the same requests as the sessions above. A consumer
# keeps its state in the Lua globals of its wrk thread, so consume and tail run
# one connection per thread; done() prints what the threads counted.

WRK_LUA = r"""
local auth, role, fake = "%(auth)s", "%(role)s", %(fake)s
local streams = {%(streams)s}
local prefix, suffix = [==[%(prefix)s]==], [==[%(suffix)s]==]
local read_path, ack_prefix, base_consumer = "%(read_path)s", "%(ack_prefix)s", "%(consumer)s"
local spread_consumers, interval, acks_per_read = %(spread_consumers)d, %(interval_ms)f, %(acks_per_read)f
local threads, counter, generation, acks, order, position, acking, owed = {}, 0, 0, {}, nil, 0, false, 0
reads, events, restarts = 0, 0, 0
setup = function(thread)
  thread:set("number", #threads)
  table.insert(threads, thread)
end
local function consumer() return base_consumer .. "-" .. number .. "-" .. generation end
request = function()
  counter = counter + 1
  if role == "publish" then
    local stream = streams[(counter %% #streams) + 1]
    return wrk.format("POST", "/api/v1/streams/" .. stream .. "/events",
      {["Authorization"] = auth, ["Content-Type"] = "application/json",
       ["X-Producer-ID"] = "bench-producer-" .. stream},
      prefix .. string.format("%%010d", (number * 100000000 + counter) %% 10000000000) .. suffix)
  elseif role == "repeat-read" then
    return wrk.format("GET", read_path, {["Authorization"] = auth, ["X-Consumer-ID"] = base_consumer})
  elseif role == "spread" then
    if order == nil or position == #order then   -- this thread's own random order of the consumers
      math.randomseed(1000 + number)
      order, position = {}, 0
      for i = 1, spread_consumers do order[i] = i - 1 end
      for i = #order, 2, -1 do local j = math.random(i); order[i], order[j] = order[j], order[i] end
    end
    position = position + 1
    return wrk.format("GET", read_path, {["Authorization"] = auth,
      ["X-Consumer-ID"] = string.format("bench-spread-%%05d", order[position])})
  end
  acking = #acks > 0
  if acking then
    return wrk.format("POST", ack_prefix .. table.remove(acks, 1), {["Authorization"] = auth,
      ["X-Consumer-ID"] = consumer(), ["Content-Type"] = "application/x-www-form-urlencoded"}, "action=ACK")
  end
  return wrk.format("GET", read_path, {["Authorization"] = auth, ["X-Consumer-ID"] = consumer()})
end
if role == "consume" or role == "tail" then
  response = function(status, headers, body)
    if acking then
      if status == 200 then events = events + 1 else acks = {} end
      return
    end
    reads = reads + 1
    if status ~= 200 then return end
    if fake then
      owed = owed + acks_per_read
      for i = 1, math.floor(owed) do acks[i] = "00000000-0000-4000-8000-000000000000" end
      owed = owed - math.floor(owed)
    else
      for id in string.gmatch(body, '"eventId":"([%%x%%-]+)"') do acks[#acks + 1] = id end
    end
    if #acks == 0 and role == "consume" then generation, restarts = generation + 1, restarts + 1 end
  end
end
if interval > 0 then   -- a fixed rate: each request due interval ms after the one before
  local ffi = require("ffi")
  ffi.cdef("typedef struct { long sec; long nsec; } bench_time; int clock_gettime(int, bench_time *);")
  local clock, due = ffi.new("bench_time"), nil
  delay = function()
    ffi.C.clock_gettime(1, clock)
    local at = tonumber(clock.sec) * 1e3 + tonumber(clock.nsec) / 1e6
    due = (due and at - due < 9 * interval) and due + interval or at
    return math.max(0, math.floor(due - at))
  end
end
done = function(summary, latency, requests)
  local r, e, x = 0, 0, 0
  for _, thread in ipairs(threads) do
    r, e, x = r + thread:get("reads"), e + thread:get("events"), x + thread:get("restarts")
  end
  io.write(string.format("BENCH reads=%%d events=%%d restarts=%%d\n", r, e, x))
end
"""


def wrk_starter(service, spec, connections, workdir, fake):
    """A function(seconds) that starts wrk for one role (its first spec) at this many connections."""
    role = spec["role"]
    script = os.path.join(workdir, "bench-%s-%s.lua" % (role, uuid.uuid4().hex[:8]))
    stream = spec.get("stream", READ_STREAM)
    path = read_path(SPREAD_STREAM if role == "spread" else stream,
                     READ_LIMIT if role in ("repeat-read", "spread") else CONSUME_LIMIT)
    streams = spec.get("streams") or [publish_stream(i) for i in range(PUBLISH_STREAMS)]
    with open(script, "w") as f:
        f.write(WRK_LUA % {
            "auth": service.target["auth"], "role": role, "fake": "true" if fake else "false",
            "streams": ", ".join('"%s"' % s for s in streams), "prefix": ENVELOPE_PREFIX.decode(),
            "suffix": ENVELOPE_SUFFIX.decode(), "read_path": path, "ack_prefix": stream_path(stream) + "/",
            "consumer": spec["consumer"], "spread_consumers": spec.get("consumers", 0),
            "interval_ms": 1000 * (spec.get("interval") or 0), "acks_per_read": spec.get("acks_per_read", 100)})
    url = "http://%s:%d/" % (service.target["host"], service.target["port"])
    one_per_thread = role in ("consume", "tail") or spec.get("interval")
    threads = connections if one_per_thread else min(connections, os.cpu_count() or 1)
    return lambda seconds: subprocess.Popen(   # wrk takes whole seconds only
        ["wrk", "-t%d" % threads, "-c%d" % connections, "-d%ds" % max(1, round(seconds)), "--latency",
         "--timeout", "30s", "-s", script, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_wrk(service, specs, args, workdir, fake, meter=None):
    """One wrk per role, all at once (tail: the consumers and the paced publisher); figures per role."""
    by_role = {}   # role -> (its first spec, connections)
    for spec in specs:
        first, count = by_role.get(spec["role"], (spec, 0))
        by_role[spec["role"]] = (first, count + 1)
    starters = {role: wrk_starter(service, spec, count, workdir, fake) for role, (spec, count) in by_role.items()}

    def run_all(seconds):
        running = {role: start(seconds) for role, start in starters.items()}
        outputs = {role: process.communicate() for role, process in running.items()}
        for role, process in running.items():
            if process.returncode != 0:
                raise BenchError("wrk exited with code %d: %s" % (process.returncode, outputs[role][1][-300:]))
        return {role: out for role, (out, _) in outputs.items()}

    if args.warmup:
        run_all(args.warmup)
    if meter:
        meter.start()
    outputs = run_all(args.duration)
    peak_mb, server_cpu = meter.stop() if meter else (None, None)
    roles, seconds = {}, args.duration
    for role, output in outputs.items():
        latency = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", output, re.M))
        total = re.search(r"(\d+) requests in ([\d.]+\w+)", output)
        requests, seconds = (int(total.group(1)), wrk_seconds(total.group(2))) if total else (0, args.duration)
        errors = {"non-2xx": int(m) for m in re.findall(r"Non-2xx or 3xx responses: (\d+)", output)}
        errors.update({"socket": m.strip() for m in re.findall(r"Socket errors: (.*)", output)})
        counts = {key: int(value) for key, value in re.findall(r"(reads|events|restarts)=(\d+)", output)
                  if role in ("consume", "tail") and (int(value) or key == "reads")}
        roles[role] = role_figures(seconds, wrk_seconds(latency.get("50")), wrk_seconds(latency.get("99")),
                                   requests, counts.pop("events", 0), counts, errors)
    return run_figures(roles, seconds, peak_mb, server_cpu, client_processes=None)


def wrk_seconds(text):
    if not text:
        return None
    number, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


# Loading data ################################################################

def load_events(target, plan, label):
    """POST the events of `plan` [(stream, count)] in batches of 1000 on a few connections."""
    batches = queue.Queue()
    for stream, count in plan:
        for first in range(0, count, LOAD_BATCH):
            batches.put((stream, first, min(LOAD_BATCH, count - first)))
    total = sum(count for _, count in plan)
    progress = {"done": 0, "error": None, "next_report": 0.1}
    lock = threading.Lock()
    began = time.monotonic()

    def loader():
        with Client(target) as client:
            try:
                while progress["error"] is None:
                    try:
                        stream, first, count = batches.get_nowait()
                    except queue.Empty:
                        return
                    answer = client.json("POST", stream_path(stream), {"Content-Type": "application/json",
                                         "X-Producer-ID": producer_id(stream)}, batch_bytes(first, count))
                    if not isinstance(answer, list) or len(answer) != count:
                        raise BenchError("loading %s: batch of %d answered %r" % (stream, count, answer))
                    with lock:
                        progress["done"] += count
                        if total >= 100_000 and progress["done"] >= progress["next_report"] * total:
                            progress["next_report"] += 0.1
                            print("  %s: %s / %s events, %.0f events/s" % (label, f"{progress['done']:,}",
                                  f"{total:,}", progress["done"] / (time.monotonic() - began)), flush=True)
            except Exception as error:
                progress["error"] = error

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
    return [("bench-scale-%03d" % i, events // streams + (1 if i < events % streams else 0)) for i in range(streams)]


def import_lines(events, consumers):
    """NDJSON as export writes it, in chunks: one stream of `events` events with made-up,
    time-ordered (UUIDv7-shaped) IDs, then `consumers` offsets at distinct random offsets
    (seeded: every run builds the same database)."""
    stream, name, when = SPREAD_STREAM.encode(), EVENT_NAME.encode(), FIXED_TIME.encode()
    yield b'{"type":"stream","stream":"%s","producerId":"%s","createdAt":"%s"}\n' % (
        stream, producer_id(SPREAD_STREAM).encode(), when)
    line = (b'{"type":"event","stream":"' + stream + b'","eventId":"01900000-0000-7000-8000-%012x","eventName":"'
            + name + b'","sequence":%d,"createdAt":"' + when + b'","envelope":%s}\n')
    for first in range(1, events + 1, 1000):
        yield b"".join(line % (n, n, envelope_bytes(n)) for n in range(first, min(first + 1000, events + 1)))
    offsets = random.Random(14).sample(range(events - READ_LIMIT), consumers)
    yield b"".join(b'{"type":"offset","stream":"%s","consumerId":"%s","eventName":"%s","offset":%d,"movedAt":"%s"}\n'
                   % (stream, spread_consumer(i).encode(), name, offset, when) for i, offset in enumerate(offsets))


def import_database(args, db_path):
    """`eventserver.py import` of the generated spread stream into db_path: its time and peak RSS."""
    print("  importing %s events and %s consumer offsets into %s ..." % (
        f"{args.events:,}", f"{args.spread_consumers:,}", db_path), flush=True)
    began = time.monotonic()
    process = subprocess.Popen([sys.executable, args.server, "import", "--db", db_path], stdin=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        for chunk in import_lines(args.events, args.spread_consumers):
            process.stdin.write(chunk)
        process.stdin.close()
    except BrokenPipeError:
        pass   # the import stopped reading: its exit code and stderr say why
    error = process.stderr.read().decode("utf-8", "replace")
    _, status, usage = os.wait4(process.pid, 0)   # wait4: this child's own peak RSS
    process.returncode = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    if process.returncode != 0:
        raise BenchError("import exited with code %s: %s" % (process.returncode, error.strip()[-300:]))
    seconds = time.monotonic() - began
    figures = {"events": args.events, "consumers": args.spread_consumers, "seconds": round(seconds, 1),
               "events_per_s": round(args.events / seconds), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
    print("  ... %.1f s, %s events/s, peak RSS %.1f MB" % (seconds, f"{figures['events_per_s']:,}",
                                                           figures["peak_rss_mb"]), flush=True)
    return figures


# Scenarios ###################################################################

def scenario_specs(scenario, connections, fake, tag, args, stream=None):
    """One spec per connection: its role and what its session needs."""
    roles = {"mixed": ["publish"] * MIXED_PUBLISHERS + ["consume"] * MIXED_CONSUMERS,
             "tail": ["tail"] * connections + ["publish"]}.get(scenario, [scenario] * connections)
    specs, per_role = [], {}
    for role in roles:
        index = per_role[role] = per_role.get(role, -1) + 1
        spec = {"role": role, "index": index, "fake": fake, "consumer": "bench-%s-%s-%d" % (role, tag, index),
                "stream": stream or READ_STREAM, "consumers": args.spread_consumers}
        if scenario == "tail" and role == "publish":
            spec.update(streams=[stream], interval=1.0 / args.tail_rate)
        specs.append(spec)
    for spec in specs:
        spec["total"] = per_role[spec["role"]] + 1
    # Interleave roles so each client process gets a share of each in mixed and tail.
    return sorted(specs, key=lambda spec: (spec["index"], spec["role"]))


def run_pair(scenario, connections, phase, servers, baseline, args, workdir, results):
    """The baseline, then each server, in turns (the first server of a turn rotates), --repeat times,
    same client and request shapes; one row per server and role. With repeats, each row is the repeat
    with the median ratio; all ratios go to the JSON."""
    use_wrk = args.client == "wrk" and scenario != "mixed"
    repeats = []
    for repeat in range(args.repeat):
        turn = servers[repeat % len(servers):] + servers[:repeat % len(servers)]
        # tail: the servers first, so that the baseline's consumers acknowledge as many events per read
        order = turn + [("baseline", baseline)] if scenario == "tail" else [("baseline", baseline)] + turn
        figures = {}
        for name, service in order:
            tag = "%s%d-%s" % (phase, connections, uuid.uuid4().hex[:8])
            stream = "bench-tail-" + tag if scenario == "tail" else None
            if stream:   # a fresh stream per run, so that its consumers start at its end
                publish_one(service.target, stream)
            specs = scenario_specs(scenario, connections, name == "baseline", tag, args, stream)
            if name == "baseline" and scenario == "tail":
                served = figures[turn[0][0]]["roles"]["tail"]
                for spec in specs:
                    spec["acks_per_read"] = served["events_per_s"] / (served["reads_per_s"] or 1)
            meter = ProcessMeter(service.pid)
            figures[name] = run_wrk(service, specs, args, workdir, name == "baseline", meter) if use_wrk \
                else run_load(service, specs, args, meter)
            if stream and name != "baseline":   # did the consumers keep up?
                with Client(service.target) as client:
                    consumers = client.json("GET", "/api/v1/consumers/%s" % stream)
                figures[name]["behind"] = max((c["behind"] for c in consumers), default=None)
        repeats.append(figures)
    for build, _ in servers:
        for role in sorted(repeats[0][build]["roles"], key=list(SESSIONS).index):
            rows = sorted((pair_row(scenario, connections, phase, role, figures[build], figures["baseline"],
                                    use_wrk) for figures in repeats), key=lambda row: row["ratio"] or 0)
            row = rows[(len(rows) - 1) // 2]
            row["peak_rss_mb"] = max((r["peak_rss_mb"] for r in rows if r["peak_rss_mb"] is not None), default=None)
            row["build"] = build if len(servers) > 1 else None
            if len(rows) > 1:
                row["repeat_ratios"] = [r["ratio"] for r in rows]
                row["repeat_server_throughputs"] = [round(r["server_throughput"]) for r in rows]
            results.append(row)
            print_row(row)
            for which in ("server", "baseline"):
                for sample in row[which].get("error_samples", [])[:3]:
                    print("      %s error: %s" % (which, sample), flush=True)


def pair_row(scenario, connections, phase, role, server_figures, baseline_figures, use_wrk):
    served = server_figures["roles"][role]
    base = baseline_figures["roles"].get(role, {})
    if scenario == "spread":   # every spread read answers limit events: offsets stop short of the end
        served = dict(served, events_per_s=READ_LIMIT * served["requests_per_s"])
    # consume: events/s against the baseline's requests/s of the same mix
    throughput = served["events_per_s"] if role == "consume" else served["requests_per_s"]
    base_rps = base.get("requests_per_s") or 0
    return {
        "scenario": scenario if scenario == role else "%s:%s" % (scenario, role), "phase": phase,
        "connections": {"mixed": MIXED_PUBLISHERS if role == "publish" else MIXED_CONSUMERS,
                        "tail": 1 if role == "publish" else connections}.get(scenario, connections),
        "unit": "events/s" if role == "consume" else "requests/s", "server": served, "baseline": base,
        "ratio": round(throughput / base_rps, 3) if base_rps else None, "server_throughput": throughput,
        "behind": server_figures.get("behind") if role == "tail" else None,
        "client": "wrk" if use_wrk else "stdlib",
        **{key: server_figures[key] for key in ("peak_rss_mb", "server_cpu_percent", "server_cpu_us_per_request",
                                                   "client_cpu_percent")},
        **{"baseline_" + key: baseline_figures[key] for key in ("server_cpu_percent", "server_cpu_us_per_request")},
    }


def run_spread(args, workdir, baseline, user, password, results, problems, memory):
    """Import the spread stream, serve it from a second server, run spread, and, for memory,
    the server's RSS after --memory-consumers distinct consumers."""
    db_path = os.path.abspath(args.spread_db) if args.spread_db else os.path.join(workdir, "spread.db")
    if not os.path.exists(db_path):
        memory["import"] = import_database(args, db_path)
    server = start_server(args, db_path, workdir, user, password, "spread-server")
    try:
        memory["spread_server_start_rss_mb"] = rss_mb(server.pid, "VmHWM")
        print("  spread server: %s (pid %d), peak RSS %.1f MB after start" % (
            server.banner, server.pid, memory["spread_server_start_rss_mb"]), flush=True)
        if "spread" in args.scenarios:
            for connections in args.connections:
                run_pair("spread", connections, "base", [("spread", server)], baseline, args, workdir, results)
        if "memory" in args.scenarios:
            print("  %s distinct consumers read and acknowledge one event each ..." % f"{args.memory_consumers:,}",
                  flush=True)
            specs = [{"role": "newcomer", "index": i, "total": NEWCOMER_CONNECTIONS, "stream": SPREAD_STREAM,
                      "consumers": args.memory_consumers} for i in range(NEWCOMER_CONNECTIONS)]
            figures = run_load(server, specs, argparse.Namespace(**dict(vars(args), warmup=0)),
                               ProcessMeter(server.pid), duration=math.inf)
            done = figures["roles"]["newcomer"]
            memory["consumers"] = {
                "consumers": done["counts"].get("consumers", 0), "seconds": round(figures["duration_s"], 1),
                "requests_per_s": round(done["requests_per_s"]), "errors": done["errors"],
                "peak_rss_mb": figures["peak_rss_mb"], "rss_after_mb": rss_mb(server.pid)}
            print("  ... %s consumers in %.1f s; server RSS peak %.1f MB, %.1f MB after" % (
                f"{memory['consumers']['consumers']:,}", figures["duration_s"], memory["consumers"]["peak_rss_mb"],
                memory["consumers"]["rss_after_mb"]), flush=True)
    finally:
        problems.extend(server.stop())


def run_fixtures_memory(args, workdir, user, password, memory):
    """The server's peak RSS while --fixtures loads --events events at its start."""
    path = os.path.join(workdir, "fixtures.ndjson")
    head = b'{"stream":"%s","producerId":"%s","envelope":' % (SPREAD_STREAM.encode(), producer_id(SPREAD_STREAM).encode())
    with open(path, "wb") as f:
        for first in range(0, args.events, 1000):
            f.write(b"".join(head + envelope_bytes(n) + b"}\n" for n in range(first, min(first + 1000, args.events))))
    print("  starting a server with --fixtures of %s events (%.0f MB) ..." % (
        f"{args.events:,}", os.path.getsize(path) / 1e6), flush=True)
    server = start_server(args, os.path.join(workdir, "fixtures.db"), workdir, user, password, "fixtures-server",
                          ["--fixtures", path], timeout=1800)
    try:
        memory["fixtures"] = {"events": args.events, "seconds": round(server.listening_s, 1),
                              "peak_rss_mb": rss_mb(server.pid, "VmHWM"), "rss_after_mb": rss_mb(server.pid)}
    finally:
        problems = server.stop()
        os.remove(path)
    print("  ... listening after %.1f s; peak RSS %.1f MB, %.1f MB once loaded" % (
        server.listening_s, memory["fixtures"]["peak_rss_mb"], memory["fixtures"]["rss_after_mb"]), flush=True)
    return problems


def wait_threads(pid, wanted, timeout=10.0):
    """Wait until wanted(the server's thread count) holds; the last count seen and whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        count = proc_status(pid, "Threads")
        if count is None or wanted(count) or time.monotonic() > deadline:
            return count, count is None or wanted(count)
        time.sleep(0.05)


def run_waiters(server, args, problems):
    """Publish at WAITERS_PUBLISHERS connections, alternately without and with args.waiters long
    polls waiting, args.waiter_rounds rounds (the order flips each round, so drift falls on both
    alike); the summary, also printed round by round."""
    for index in range(PUBLISH_STREAMS):   # the waiters' streams must exist, else their reads are 404s
        publish_one(server.target, publish_stream(index))
    time.sleep(0.5)   # the threads of the connections just closed end
    idle = proc_status(server.pid, "Threads")
    run_id = uuid.uuid4().hex[:8]
    runs = []

    def one_run(round_number, with_waiters):
        threads, settled = wait_threads(server.pid, lambda count: count <= idle)
        if not settled:
            problems.append("waiters round %d: server threads %s before the run, %s when idle"
                            % (round_number, threads, idle))
        name = "%s-%s-%d" % (WAITERS_NAME, run_id, round_number)
        specs = scenario_specs("publish", WAITERS_PUBLISHERS, False, "waiters%d-%s" % (round_number, run_id), args)
        specs += [{"role": "waiter", "index": i, "name": name, "linger": True}
                  for i in range(args.waiters if with_waiters else 0)]

        def release():   # the thread count while they are held, then one event of that name per stream
            held = wait_threads(server.pid, lambda count: count >= idle + args.waiters, 1.0)[0]
            for index in range(min(args.waiters, PUBLISH_STREAMS)):
                publish_one(server.target, publish_stream(index), name)
            return held

        figures = run_load(server, specs, args, ProcessMeter(server.pid), release if with_waiters else None)
        served, held = figures["roles"]["publish"], None
        if with_waiters:
            waiter = figures["roles"].get("waiter") or role_figures(1, None, None)
            held = dict(waiter["counts"], errors=waiter["errors"], samples=waiter["error_samples"],
                        threads_held=figures["after_window"])
            held["unanswered"] = args.waiters - held.get("released", 0)
            if (figures["after_window"] or 0) < idle + args.waiters:
                problems.append("waiters round %d: server threads %s with %d waiters held (idle %s)"
                                % (round_number, figures["after_window"], args.waiters, idle))
            if held["errors"] or held.get("early") or held["unanswered"]:
                problems.append("waiters round %d: %s" % (round_number, held))
        if served["errors"]:
            problems.append("waiters round %d (%s): server errors %s" % (
                round_number, "with" if with_waiters else "alone", served["errors"]))
        runs.append(dict({key: served[key] for key in ("requests_per_s", "p50_ms", "p99_ms", "errors")},
                         round=round_number, waiters=args.waiters if with_waiters else 0, waiter_stats=held,
                         **{key: figures[key] for key in ("server_cpu_percent", "client_cpu_percent", "peak_rss_mb")}))
        return runs[-1]

    for round_number in range(1, args.waiter_rounds + 1):
        order = (False, True) if round_number % 2 else (True, False)
        done = {with_waiters: one_run(round_number, with_waiters) for with_waiters in order}
        alone, held = done[False], done[True]
        print("  waiters round %d/%d: alone %s/s (p99 %s ms, CPU %s%%) | with %d waiting %s/s (p99 %s ms, "
              "CPU %s%%, %s threads) %+.1f%%" % (
                  round_number, args.waiter_rounds, fmt_int(alone["requests_per_s"]), fmt(alone["p99_ms"], 1),
                  fmt(alone["server_cpu_percent"], 0), args.waiters, fmt_int(held["requests_per_s"]),
                  fmt(held["p99_ms"], 1), fmt(held["server_cpu_percent"], 0), held["waiter_stats"]["threads_held"],
                  change_percent(alone["requests_per_s"], held["requests_per_s"])), flush=True)
    groups = {"alone": [run for run in runs if not run["waiters"]], "with": [run for run in runs if run["waiters"]]}
    summary = {"%s_%s" % (which, key): statistics.median(run[key] for run in group)
               for which, group in groups.items() for key in ("requests_per_s", "p99_ms", "server_cpu_percent")}
    return dict(summary, publish_connections=WAITERS_PUBLISHERS, waiters=args.waiters, wait_s=WAITERS_WAIT,
                rounds=args.waiter_rounds, idle_server_threads=idle,
                change_percent=round(change_percent(summary["alone_requests_per_s"], summary["with_requests_per_s"]), 3),
                round_changes_percent=[round(change_percent(a["requests_per_s"], h["requests_per_s"]), 3)
                                       for a, h in zip(groups["alone"], groups["with"])], runs=runs)


def change_percent(before, after):
    return 100.0 * (after / before - 1) if before else 0.0


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
    if served["counts"].get("restarts") and row["scenario"] != "tail":
        notes.append("ran dry %dx" % served["counts"]["restarts"])
    if row["scenario"] in ("tail", "spread"):
        notes.append("reads %s/s, events %s/s" % (fmt_int(served["reads_per_s"] or served["requests_per_s"]),
                                                   fmt_int(served["events_per_s"])))
    if row["behind"] is not None:
        notes.append("behind %d" % row["behind"])
    if row["server_cpu_us_per_request"]:
        notes.append("%.0f us/req" % row["server_cpu_us_per_request"])
    print("%-16s %5d | %9s %8s %8s %7s %5s | %9s %8s %8s | %6s  %s" % (
        row["scenario"] + ("@scale" if row["phase"] == "scale" else "") + (" " + row["build"] if row["build"] else ""),
        row["connections"],
        fmt_int(row["server_throughput"]), fmt(served["p50_ms"], 2), fmt(served["p99_ms"], 2),
        fmt(row["peak_rss_mb"], 1), fmt(row["server_cpu_percent"], 0), fmt_int(base.get("requests_per_s")),
        fmt(base.get("p50_ms"), 2), fmt(base.get("p99_ms"), 2), fmt(row["ratio"], 2), "; ".join(notes)), flush=True)


def fmt(value, digits):
    return "-" if value is None else "%.*f" % (digits, value)


def fmt_int(value):
    return "-" if value is None else f"{value:,.0f}"


def print_report(results, waiters, memory, problems):
    if results:
        print()
        print("Results. server/s: requests/s (events/s for consume); CPU%: the server's, 100 = one core;")
        print("base/s: the baseline's requests/s, same client and request shapes; ratio = server/s / base/s")
        print(TABLE_HEAD)
        print("-" * len(TABLE_HEAD))
        for row in results:
            print_row(row)
    first = {(r["scenario"], r["connections"]): r for r in reversed(results) if r["phase"] == "base"}
    scaled = [(first.get((r["scenario"], r["connections"])), r) for r in results if r["phase"] == "scale"]
    if scaled:
        print("\nScale: the same runs with the extra events stored, change of server/s against the first run")
    for before, row in scaled:
        if before and before["server_throughput"]:
            print("  %-11s %3d conns: %9s -> %9s /s (%+.1f%%), ratio %s -> %s" % (
                row["scenario"], row["connections"], fmt_int(before["server_throughput"]),
                fmt_int(row["server_throughput"]), change_percent(before["server_throughput"],
                                                                  row["server_throughput"]),
                fmt(before["ratio"], 2), fmt(row["ratio"], 2)))
    if waiters:
        print("\nLong-poll waiters: publish throughput, median of %d round(s), without and with %d reads "
              "waiting (wait=%d)" % (waiters["rounds"], waiters["waiters"], waiters["wait_s"]))
        print("publish %d conns: %s/s alone, %s/s with %d long-polls waiting (%+.1f%%)" % (
            waiters["publish_connections"], fmt_int(waiters["alone_requests_per_s"]),
            fmt_int(waiters["with_requests_per_s"]), waiters["waiters"], waiters["change_percent"]))
        print("  per round %s; p99 %s -> %s ms; server CPU %s%% -> %s%%; issue 5 allows -10%%: %s" % (
            ", ".join("%+.1f%%" % change for change in waiters["round_changes_percent"]),
            fmt(waiters["alone_p99_ms"], 1), fmt(waiters["with_p99_ms"], 1), fmt(waiters["alone_server_cpu_percent"], 0),
            fmt(waiters["with_server_cpu_percent"], 0), "within" if waiters["change_percent"] >= -10 else "OVER"))
    lines = []
    if "fixtures" in memory:
        lines.append("--fixtures of %s events: peak RSS %.1f MB (%.1f MB once loaded), %.1f s" % (
            f"{memory['fixtures']['events']:,}", memory["fixtures"]["peak_rss_mb"],
            memory["fixtures"]["rss_after_mb"], memory["fixtures"]["seconds"]))
    if "import" in memory:
        lines.append("import of %s events: peak RSS %.1f MB, %.1f s" % (
            f"{memory['import']['events']:,}", memory["import"]["peak_rss_mb"], memory["import"]["seconds"]))
    if "consumers" in memory:
        lines.append("%s distinct consumers (read + ACK each): server peak RSS %.1f MB, %.1f MB after" % (
            f"{memory['consumers']['consumers']:,}", memory["consumers"]["peak_rss_mb"],
            memory["consumers"]["rss_after_mb"]))
    if lines:
        print("\nMemory\n  " + "\n  ".join(lines))
    for problem in problems:
        print("PROBLEM: %s" % problem)


def machine_info():
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "platform": platform.platform(), "wrk": shutil.which("wrk") is not None,
            "load_average": os.getloadavg()}


def print_header(args, machine):
    print("command: %s" % shlex.join([sys.executable, sys.argv[0]] + sys.argv[1:]))
    print("machine: nproc %s, %s, Python %s, SQLite %s, %s, load %.2f" % (
        machine["nproc"], machine["cpu"] or "unknown CPU", machine["python"], machine["sqlite"],
        machine["platform"], machine["load_average"][0]))
    if args.endpoints:
        print("run:     --endpoints %s, %d requests per endpoint, --sync %s" % (args.endpoints, args.requests,
                                                                            args.sync))
    elif not args.build_db:
        print("run:     %s, --sync %s, %g s per run after %g s warm-up, x%d, connections %s, scenarios %s, "
              "client %s%s" % (" + ".join(args.servers), args.sync, args.duration, args.warmup, args.repeat,
                               ",".join(map(str, args.connections)), ",".join(args.scenarios), args.client,
                               ", --scale %s events in %d streams" % (f"{args.events:,}", args.streams)
                               if args.scale else ""))
    print(flush=True)


def write_json(path, document):
    with open(path, "w") as f:
        json.dump(dict({"version": __version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "command": [sys.executable, sys.argv[0]] + sys.argv[1:]}, **document), f, indent=1)
    print("\nfigures written to %s" % path)


# Endpoints ###################################################################
# --endpoints DB: the cost of each endpoint on a given database, one request at
# a time, next to GET /api/v1/health (routing, auth-free, one trivial query).

ENDPOINT_SLOW_S = 0.5            # an endpoint whose untimed first request takes longer ...
ENDPOINT_SLOW_REQUESTS = 5       # ... is timed this many times at most
ENDPOINT_CONSUMERS = 3           # consumer offsets created when the stream has none


def endpoint_plan(client, event_name):
    """[(label, method, path, headers)] with real names from the database, and what was found and done.
    It changes only consumer offsets: when the stream has none it creates three (seeks), and the
    timed seek sets the first one to the offset it already has."""
    streams = client.json("GET", "/api/v1/streams")
    if not streams:
        raise BenchError("the database has no streams: build one with --build-db")
    stream = max(streams, key=lambda s: (s["eventsCount"], s["streamName"]))
    name = stream["streamName"]
    quoted, quoted_name = urllib.parse.quote(name, safe=""), urllib.parse.quote(event_name, safe="")
    probe = {"X-Consumer-ID": "bench-endpoints-reader"}   # reads do not store an offset
    first = client.json("GET", read_path(name, 1, event_name), probe)
    if not first:
        raise BenchError("stream %s has no %s events for a new consumer (choose one with --event-name)"
                         % (name, event_name))
    event_id = first[0]["eventId"]
    consumers = client.json("GET", "/api/v1/consumers/%s" % quoted)
    created = []
    for number in range(1, ENDPOINT_CONSUMERS + 1 if not consumers else 1):
        consumer = "bench-endpoints-%d" % number
        for offset in (stream["eventsCount"] * number // (ENDPOINT_CONSUMERS + 1), 1):
            status, body, _ = client.request("POST", "/api/v1/%s/%s/%s/change/%d" % (quoted, consumer, quoted_name,
                                                                                     offset))
            if status == 200:
                created.append({"consumerId": consumer, "eventName": event_name, "offset": offset})
                break
        else:
            raise BenchError("seeking %s in %s: %d %s" % (consumer, name, status, body[:300]))
    seek = (consumers or client.json("GET", "/api/v1/consumers/%s" % quoted))[0]
    no_match = "nomatch-" + uuid.uuid4().hex[:12]
    plan = [("health", "GET", "/api/v1/health", None),
            ("metrics", "GET", "/api/v1/metrics", None),
            ("consumers/<stream>", "GET", "/api/v1/consumers/%s" % quoted, None),
            ("stats/events-per-stream", "GET", "/api/v1/stats/events-per-stream", None),
            ("stats/stream-data", "GET", "/api/v1/stats/stream-data", None),
            ("stats/events-current-month", "GET", "/api/v1/stats/events-current-month", None),
            ("streams", "GET", "/api/v1/streams", None),
            ("search event name", "GET", "/api/v1/search?_q=%s" % quoted_name, None),
            ("search no match", "GET", "/api/v1/search?_q=%s" % no_match, None),
            ("search event ID", "GET", "/api/v1/search?_q=%s" % event_id, None),
            ("event-period-search 1month", "GET", "/api/v1/event-period-search/%s?period=1month" % quoted, None),
            ("events/<id>/payload", "GET", "/api/v1/events/%s/payload" % event_id, None),
            ("change offset (seek)", "POST", "/api/v1/%s/%s/%s/change/%d" % (
                quoted, urllib.parse.quote(seek["consumerId"], safe=""),
                urllib.parse.quote(seek["eventName"], safe=""), seek["offset"]), None),
            ("read limit=10", "GET", read_path(name, READ_LIMIT, event_name), probe)]
    found = {"stream": name, "stream_events": stream["eventsCount"], "streams": len(streams),
             "event_name": event_name, "event_id": event_id, "no_match_term": no_match,
             "consumers": len(consumers) or len(created), "consumers_created": created,
             "seek": {key: seek[key] for key in ("consumerId", "eventName", "offset")}}
    return plan, found


def run_endpoints(args, machine):
    """--endpoints DB: time each endpoint, taking turns (a burst of noise falls on all alike), on an
    existing database: median and p90 of --requests requests each, and each median / health's."""
    user, password = "bench", uuid.uuid4().hex
    rows, problems = [], []
    with tempfile.TemporaryDirectory(prefix="bench-eventserver-") as workdir:
        server = start_server(args, os.path.abspath(args.endpoints), workdir, user, password)
        meter = ProcessMeter(server.pid)
        meter.start()
        try:
            with Client(server.target) as client:
                print("server: %s (pid %d)" % (server.banner, server.pid), flush=True)
                plan, found = endpoint_plan(client, args.event_name)
                print("stream %s (%s events, of %d streams), event name %s, event ID %s, %d consumer(s)%s" % (
                    found["stream"], f"{found['stream_events']:,}", found["streams"], found["event_name"],
                    found["event_id"], found["consumers"], ", %d created by seeks" % len(found["consumers_created"])
                    if found["consumers_created"] else ""), flush=True)
                timings, wanted, answers = {label: [] for label, *_ in plan}, {}, {}
                for turn in range(-1, args.requests):   # turn -1: one untimed request each, warms caches
                    for label, method, path, headers in plan:
                        if turn >= 0 and turn >= wanted[label]:
                            continue
                        status, body, seconds = client.request(method, path, headers)
                        answers[label] = (status, len(body))
                        if turn < 0:
                            wanted[label] = ENDPOINT_SLOW_REQUESTS if seconds > ENDPOINT_SLOW_S else args.requests
                            wanted[label] = min(wanted[label], args.requests)
                        else:
                            timings[label].append(seconds)
                        if status != 200:
                            problems.append("%s: %d %s" % (label, status, body[:200].decode("utf-8", "replace")))
            peak_mb, cpu = meter.stop()
        finally:
            problems.extend(server.stop())
    health = statistics.median(timings["health"])
    print("\nOne request at a time on one keep-alive connection; ms of wall time at the client;")
    print("ratio = the endpoint's median / health's median")
    head = "%-28s %-52s %4s %9s %9s %8s %6s %9s" % ("endpoint", "request", "n", "median ms", "p90 ms", "ratio",
                                                    "status", "bytes")
    print(head + "\n" + "-" * len(head))
    for label, method, path, headers in plan:
        values = sorted(timings[label])
        median = statistics.median(values)
        row = {"endpoint": label, "method": method, "path": path, "requests": len(values), "median_ms": ms(median),
               "p90_ms": ms(percentile(values, 0.90)), "min_ms": ms(values[0]), "max_ms": ms(values[-1]),
               "ratio_to_health": round(median / health, 1) if health else None, "status": answers[label][0],
               "bytes": answers[label][1]}
        rows.append(row)
        shown = "%s %s" % (method, path)
        print("%-28s %-52s %4d %9.2f %9.2f %8s %6d %9s" % (
            label, shown if len(shown) <= 52 else shown[:49] + "...", row["requests"], row["median_ms"],
            row["p90_ms"], fmt(row["ratio_to_health"], 1), row["status"], fmt_int(row["bytes"])))
    print("\nserver peak RSS %.1f MB, CPU %.1f s" % (peak_mb, cpu))
    for problem in problems:
        print("PROBLEM: %s" % problem)
    if args.json:
        write_json(args.json, {"machine": machine, "config": {"database": os.path.abspath(args.endpoints),
                                                              "requests": args.requests, "sync": args.sync},
                               "server": server.banner, "found": found, "peak_rss_mb": peak_mb,
                               "server_cpu_s": round(cpu, 2), "results": rows, "problems": problems})
    return 1 if problems else 0


# Command line ################################################################

def start_server(args, db_path, workdir, user, password, name="eventserver", extra=(), timeout=30.0):
    argv = [sys.executable, args.server, "--port", "0", "--db", db_path, "--user", user, "--password", password,
            "--sync", args.sync, "--quiet", *extra]
    server = Service(name, argv, workdir, user, password, timeout)
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
            problems = server.stop()
        print("loaded %s events in %.1f s (%s events/s)" % (f"{loaded['events']:,}", loaded["seconds"],
                                                            f"{loaded['events_per_s']:,}"))
        for problem in problems:
            print("PROBLEM: %s" % problem)
    return 1 if problems else 0


def build_names(paths):
    """A short name per server: its directory's, or its place in the list when those repeat."""
    names = [os.path.basename(os.path.dirname(path)) for path in paths]
    return names if len(set(names)) == len(names) else ["#%d" % (i + 1) for i in range(len(paths))]


def run_benchmark(args, machine):
    user, password = "bench", uuid.uuid4().hex
    results, loads, problems, waiters, memory, servers = [], {}, [], None, {}, []
    wanted = set(args.scenarios)
    with tempfile.TemporaryDirectory(prefix="bench-eventserver-") as workdir:
        baseline = Service("baseline", [sys.executable, os.path.abspath(__file__), "--baseline-server",
                                        "--user", user, "--password", password], workdir, user, password)
        try:
            for number, (name, path) in enumerate(zip(build_names(args.servers), args.servers)):
                servers.append((name, start_server(argparse.Namespace(**dict(vars(args), server=path)), os.path.join(
                    workdir, "bench-%d.db" % number), workdir, user, password, "eventserver-%d" % number)))
                print("server %s: %s (pid %d, %s)" % (name, servers[-1][1].banner, servers[-1][1].pid, path))
            first = servers[0][1]   # the server of waiters and --scale
            print("baseline: %s (pid %d)\n" % (baseline.banner, baseline.pid))
            if wanted - {"waiters", "memory"} or args.scale:
                print(TABLE_HEAD + "\n" + "-" * len(TABLE_HEAD), flush=True)
            for connections in args.connections if "publish" in wanted else ():
                run_pair("publish", connections, "base", servers, baseline, args, workdir, results)
            if wanted & {"repeat-read", "consume", "mixed"} or args.scale:
                print("  preloading %s events into %s ..." % (f"{args.read_events:,}", READ_STREAM), flush=True)
                for _, server in servers:
                    loads["read_stream"] = load_events(server.target, [(READ_STREAM, args.read_events)], READ_STREAM)
                print("  ... %s events/s" % f"{loads['read_stream']['events_per_s']:,}", flush=True)
            for scenario in ("repeat-read", "consume", "tail"):
                for connections in args.connections if scenario in wanted else ():
                    run_pair(scenario, connections, "base", servers, baseline, args, workdir, results)
            if "mixed" in wanted:
                run_pair("mixed", MIXED_PUBLISHERS + MIXED_CONSUMERS, "base", servers, baseline, args, workdir,
                         results)
            if "waiters" in wanted:
                print("  waiters: publish at %d connections, alternately without and with %d long-poll reads "
                      "waiting, %d round(s) ..." % (WAITERS_PUBLISHERS, args.waiters, args.waiter_rounds), flush=True)
                waiters = run_waiters(first, args, problems)
            if args.scale:
                print("  loading %s events in %d streams (--scale) ..." % (f"{args.events:,}", args.streams),
                      flush=True)
                loads["scale"] = load_events(first.target, scale_plan(args.events, args.streams), "scale")
                started = time.monotonic()
                os.sync()   # else the runs below pay for writing back the load's ~700 MB
                print("  ... %s events/s; written back to disk in %.1f s" % (
                    f"{loads['scale']['events_per_s']:,}", time.monotonic() - started), flush=True)
                for scenario in ("publish", "repeat-read"):
                    for connections in args.connections:
                        run_pair(scenario, connections, "scale", servers[:1], baseline, args, workdir, results)
            if wanted & {"spread", "memory"}:
                run_spread(args, workdir, baseline, user, password, results, problems, memory)
            if "memory" in wanted:
                problems.extend(run_fixtures_memory(args, workdir, user, password, memory))
        except BenchError as error:
            problems.append("run stopped: %s" % error)
            problems += ["%s exited with code %s: %s" % (server.name, server.process.returncode, server.stderr_tail())
                         for _, server in servers if server.process.poll() is not None]
        finally:
            baseline.stop()
            for _, server in servers:
                problems.extend(server.stop())
    problems += ["%s %d conns: server errors %s" % (row["scenario"], row["connections"], row["server"]["errors"])
                 for row in results if row["server"]["errors"]]
    print_report(results, waiters, memory, problems)
    if args.json:
        config = {key: getattr(args, key) for key in (
            "servers", "sync", "duration", "warmup", "connections", "scenarios", "repeat", "client", "read_events",
            "tail_rate", "events", "spread_consumers", "memory_consumers", "waiters", "waiter_rounds", "scale",
            "streams")}
        write_json(args.json, {"machine": machine, "config": dict(config, envelope_bytes=ENVELOPE_SIZE),
                               "servers": {name: server.banner for name, server in servers}, "loads": loads,
                               "results": results, "waiters": waiters, "memory": memory, "problems": problems})
    return 1 if any(problem.startswith("run stopped") for problem in problems) else 0


def main(argv):
    if argv[:1] == ["--baseline-server"]:
        return run_baseline_server(argv[1:])
    args = parse_args(argv)
    machine = machine_info()
    print_header(args, machine)
    try:
        if args.build_db:
            return build_database(args)
        if args.endpoints:
            return run_endpoints(args, machine)
        return run_benchmark(args, machine)
    except BenchError as error:
        print("bench_eventserver.py: %s" % error, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

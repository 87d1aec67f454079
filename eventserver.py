#!/usr/bin/env python3
"""eventserver: record events in named streams and track each consumer's offset.

One file, standard library only: a stand-in for the Go + PostgreSQL
"eventserver" with the same HTTP API, for local development, CI fixtures and
small boxes.

    python3 eventserver.py [--host 127.0.0.1] [--port 8000] [--db eventserver.db]

or, in a test suite's own process:

    with eventserver.running() as server:   # server.url, .user, .password
        ...

The API, the flags and the guarantees are documented in README.md.

Security stance: every endpoint except GET /api/v1/health needs HTTP Basic
auth, checked in constant time. When no credentials are configured a random
password is made up and printed once. Basic auth over plain HTTP can be read
on the wire, so bind to loopback (the default) or serve HTTPS with
--certfile/--keyfile. Names and IDs are data: all SQL is parameterised.
"""

import argparse
import base64
import binascii
import bisect
import calendar
import codecs
import collections
import contextlib
import datetime
import decimal
import errno
import gzip
import hashlib
import hmac
import http.server
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import struct
import sys
import tempfile
import threading
import time
import urllib.parse

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__version__ = "1.0.0"

log = logging.getLogger("eventserver")


# Configuration ###############################################################

class ConfigError(Exception):
    """A flag, variable or file the server cannot start with."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message):
        raise ConfigError(message)


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


_positive_int.__name__ = "a positive integer"


def _port(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(text)
    return value


_port.__name__ = "a port between 0 and 65535"


def _seconds(text):
    value = float(text)
    if not 0 <= value < 1e6:
        raise ValueError(text)
    return value


_seconds.__name__ = "a number of seconds"


def _switch(text):
    value = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(text.lower())
    if value is None:
        raise ValueError(text)
    return value


_switch.__name__ = "1, true, yes, 0, false or no"


def _choice(*choices):
    def choice(text):
        if text.lower() not in choices:
            raise ValueError(text)
        return text.lower()

    choice.__name__ = " or ".join(choices)
    return choice


def _text(text):
    return text


_text.__name__ = "text"


def _host_names(text):
    names = [name.strip().lower().rstrip(".") for name in text.split(",")]
    if not all(names):
        raise ValueError(text)
    return frozenset(names)


_host_names.__name__ = "comma-separated host names"

# Every flag of the server: (name, kind, default, meaning). Each has an environment
# variable, EVENTSERVER_ and the name in capitals with "-" as "_"; a kind of
# _switch is a flag without a value. None: not set unless given.
FLAGS = [
    ("host", _text, "127.0.0.1", "bind address (0.0.0.0 to serve a network)"),
    ("port", _port, "8000", "port; 0 picks a free one"),
    ("db", _text, "eventserver.db", "SQLite file, created on first start; :memory: is a temporary "
                                    "file removed at exit"),
    ("user", _text, None, "Basic-auth user (also AUTH_USER)"),
    ("password", _text, None, "Basic-auth password (also AUTH_PASS)"),
    ("sync", _choice("full", "normal"), "full", "full: a 200 survives power loss; normal: it survives "
                                                "a crash of the process"),
    ("max-body", _positive_int, "1048576", "largest request body in bytes"),
    ("max-limit", _positive_int, "1000", "largest limit a read returns"),
    ("max-wait", _seconds, "30", "longest wait= of a long-poll read, in seconds"),
    ("timeout", _seconds, "30", "seconds a connection may sit idle or half-sent"),
    ("head-timeout", _seconds, "10", "seconds a request's head (request line and headers) may take to arrive "
                                     "in all; past it, 408 and the connection is closed"),
    ("max-head", _positive_int, "65536", "largest request head (request line and headers) in bytes; past it, "
                                        "431 and the connection is closed"),
    ("max-connections", _positive_int, "1000", "most connections at once; past it a new one gets 503 and is closed"),
    ("max-answer", _positive_int, "16777216", "most bytes of events a read answers, and of a list: fewer "
                                              "events or items, never an error (a read gets one at least)"),
    ("max-list", _positive_int, "1000", "most items of a list in an answer (streams, consumers, an event's "
                                        "consumerIds)"),
    ("allowed-hosts", _host_names, None, "comma-separated Host names to answer besides loopback ones "
                                         "(localhost, 127.0.0.1, [::1]); bound to another address than "
                                         "loopback, every name is answered unless this is given"),
    ("quiet", _switch, "no", "no access log on stderr"),
    ("certfile", _text, None, "serve HTTPS with this PEM certificate chain"),
    ("keyfile", _text, None, "the private key of --certfile"),
    ("fixtures", _text, None, "NDJSON file of {stream, producerId, envelope} lines to publish at start"),
    ("compat", _choice("readme", "go"), "readme", "readme: answer as the Go server's README says; go: as the "
                                                  "Go server itself answers (see Dialects)"),
    ("port-file", _text, None, "write the URL to this file (atomically) once the server accepts "
                               "connections; removed at exit"),
    ("allow-reset", _switch, "no", "answer POST /api/v1/reset and DELETE /api/v1/streams/<stream>, "
                                   "which remove data (for test suites)"),
    ("log-format", _choice("text", "json"), "text", "access and error log lines: text, or one JSON "
                                                    "object per line"),
]
ALSO_FROM = {"user": "AUTH_USER", "password": "AUTH_PASS"}  # the Go server's variable names


def environment_variable(name):
    return "EVENTSERVER_" + name.upper().replace("-", "_")


class Config:
    """Everything the server is started with: each flag's value from the
    command line, else its environment variable, else its default; an
    attribute per flag (max-body is config.max_body)."""

    def __init__(self, args, environ):
        for name, kind, default, _ in FLAGS:
            variable = environment_variable(name)
            given, source = getattr(args, name.replace("-", "_")), f"--{name}"
            if given is None:
                for variable in (variable, ALSO_FROM.get(name)):
                    if variable is not None and variable in environ:
                        given, source = environ[variable], variable
                        break
            if given == "":
                raise ConfigError(f"{source} is empty")
            value = None if given is None and default is None else \
                given if given is True else _parse(kind, default if given is None else given, source)
            setattr(self, name.replace("-", "_"), value)
        if (self.user is None) != (self.password is None):
            raise ConfigError("a user needs a password and a password needs a user "
                              "(--user/--password or AUTH_USER/AUTH_PASS)")
        self.password_generated = self.user is None
        if self.password_generated:
            self.user, self.password = "admin", secrets.token_urlsafe(18)
        if bool(self.certfile) != bool(self.keyfile):
            raise ConfigError("--certfile and --keyfile go together")


def _parse(kind, text, source):
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{source} must be {kind.__name__}, not {text!r}") from None


def server_arguments(parser):
    """Add the server's flags to parser."""
    for name, kind, default, meaning in FLAGS:
        variable = environment_variable(name)
        shown = f"env {variable}" + (f", default {default}" if default is not None and kind is not _switch else "")
        if kind is _switch:
            parser.add_argument(f"--{name}", action="store_const", const=True, help=f"{meaning} ({shown})")
        else:
            parser.add_argument(f"--{name}", help=f"{meaning} ({shown})")


def options_config(options):
    """The Config of running(**options): options named as the flags, with
    "_" for "-" (max_body=10, allow_reset=True), any value that the flag
    would take as text; the environment is not read."""
    attributes = {name.replace("-", "_"): kind for name, kind, _, _ in FLAGS}
    args = argparse.Namespace(**dict.fromkeys(attributes))
    for attribute, value in options.items():
        if attribute not in attributes:
            raise TypeError(f"unknown option {attribute!r}: options are the flags' names, with _ for -")
        if value is not None:
            if attributes[attribute] is _switch and isinstance(value, bool):
                value = "yes" if value else "no"
            setattr(args, attribute, os.fspath(value) if isinstance(value, os.PathLike) else str(value))
    return Config(args, {})


def parse_config(argv, environ):
    parser = _ArgumentParser(prog="eventserver.py", description=__doc__.split("\n\n")[0],
                             epilog="Also: eventserver.py export|import|backup --help")
    server_arguments(parser)
    parser.add_argument("--version", action="version", version=f"eventserver {__version__}")
    return Config(parser.parse_args(argv), environ)


# Errors ######################################################################

REASONS = {
    200: "OK", 201: "Created", 301: "Moved Permanently", 400: "Bad Request", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    411: "Length Required", 413: "Payload Too Large", 414: "URI Too Long",
    423: "Locked", 431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable", 505: "HTTP Version Not Supported", 507: "Insufficient Storage",
}


class HTTPError(Exception):
    """A request refused with an HTTP status; the body is the JSON string
    "<Reason> - <detail>" (or just "<Reason>"), as the Go server answers."""

    def __init__(self, status, detail="", headers=()):
        reason = REASONS.get(status, "Error")
        self.status, self.detail = status, detail
        self.text = f"{reason} - {detail}" if detail else reason
        self.headers = tuple(headers)
        super().__init__(self.text)


def bad_request(detail):
    return HTTPError(400, detail)


def not_found(detail):
    return HTTPError(404, detail)


class StreamOwned(HTTPError):
    """A producer writing to another producer's stream."""

    def __init__(self, owner):
        super().__init__(423, "Second writers not allowed")
        self.owner = owner


class OffsetMismatch(HTTPError):
    """An acknowledgement of an event that is not the consumer's next one."""

    def __init__(self, expected, got):
        super().__init__(400, f"consumer offset mismatch: expected sequence {expected}, got {got}")
        self.expected, self.got = expected, got


class OffsetOutOfRange(HTTPError):
    """A seek past the count of the event name's events."""

    def __init__(self, count, event_name, stream):
        super().__init__(400, f"offset must be between 0 and {count}, the count of "
                              f"{event_name} events in stream {stream}")


# Logging #####################################################################

LOG_QUEUE_LINES = 10_000  # lines held for stderr while it is slow; past that they are dropped
_CONTROL_IN_LINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # category Cc, but the newline of a line


class LogLines:
    """Lines for stderr, written by a thread of their own from a bounded
    queue, so that no request ever waits for its log line. When stderr
    blocks (a pipe nobody reads), the queue fills and further lines are
    dropped and counted; once it drains, a line says how many were lost.
    One per process, as stderr is."""

    def __init__(self, capacity=LOG_QUEUE_LINES):
        self._lines = queue.Queue(capacity)
        self._lock = threading.Lock()  # the count of dropped lines, and starting the thread
        self.dropped = 0
        self._thread = None

    def write(self, line):
        """Queue a line (ending in a newline) for stderr; drop it if the queue
        is full. Control characters in it (from a request, say) are escaped:
        none reaches a terminal or a log reader raw."""
        if self._thread is None:
            self._start()
        if _CONTROL_IN_LINE.search(line):
            line = _CONTROL_IN_LINE.sub(lambda found: f"\\x{ord(found.group()):02x}", line)
        try:
            self._lines.put_nowait(line)
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def _start(self):
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="log", daemon=True)
                self._thread.start()

    def _run(self):
        reported = 0
        while True:
            line = self._lines.get()
            try:
                sys.stderr.write(line)
                if self._lines.empty():
                    if self.dropped != reported:
                        notice = (f"{self.dropped - reported} log lines dropped while stderr "
                                  f"was not read ({self.dropped} in all)")
                        if line.startswith("{"):  # in the format of the lines around it
                            sys.stderr.write(_json_log_line(time.time(), "WARNING", notice))
                        else:
                            sys.stderr.write(f"{utc_now()[:23]}Z eventserver: {notice}\n")
                        reported = self.dropped
                    sys.stderr.flush()
            except (OSError, ValueError):  # stderr closed: nowhere to say it
                pass
            finally:
                self._lines.task_done()

    def flush(self, timeout):
        """Wait up to timeout seconds for the queued lines to be written."""
        deadline = time.monotonic() + timeout
        while self._lines.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)


LOG_LINES = LogLines()

_LOG_JSON = json.JSONEncoder()  # ASCII only: no control character of a request reaches the log raw


def _json_log_line(created, level, message):
    """--log-format json: a line of the server's own as {"time", "level", "message"}."""
    moment = datetime.datetime.fromtimestamp(created, datetime.timezone.utc)
    return _LOG_JSON.encode({"time": moment.isoformat(timespec="milliseconds")[:23] + "Z",
                             "level": level, "message": message}) + "\n"


class _QueuedLogHandler(logging.Handler):
    """The logging module's records, through LOG_LINES: text, or with
    json_format one JSON object each (a traceback in its message)."""

    def __init__(self, json_format=False):
        super().__init__()
        self.json_format = json_format
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def emit(self, record):
        try:
            if self.json_format:
                message = record.getMessage()
                if record.exc_info:
                    message += "\n" + self.formatter.formatException(record.exc_info)
                LOG_LINES.write(_json_log_line(record.created, record.levelname, message))
            else:
                LOG_LINES.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


# Validation ##################################################################

MAX_NAME = 255
_FORBIDDEN_IN_NAME = re.compile("[\x00-\x1f\x7f-\x9f/]")  # category Cc, and the path separator
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_DIGITS = re.compile(r"[0-9]+\Z")
_HEX = re.compile(rb"[0-9a-fA-F]+\Z")
INT64 = range(-2 ** 63, 2 ** 63)


def check_name(what, value):
    """A stream or event name: 1-255 code points, no control character, no '/'."""
    if not isinstance(value, str) or not value:
        raise bad_request(f"{what} is missing")
    if len(value) > MAX_NAME:
        raise bad_request(f"{what} is longer than {MAX_NAME} characters")
    if _FORBIDDEN_IN_NAME.search(value):
        raise bad_request(f"{what} contains a control character or '/'")
    return value


def check_token(what, value):
    """A producer ID, consumer ID or idempotency key: 1-255 printable code points."""
    if not value:
        raise bad_request(f"{what} is missing")
    if len(value) > MAX_NAME or not value.isprintable():
        raise bad_request(f"{what} must be 1-{MAX_NAME} printable characters")
    return value


def check_event_id(value):
    """An event ID: a UUID in 8-4-4-4-12 hex form, answered in lowercase."""
    if not _UUID.match(value):
        raise bad_request(f"event ID {value!r} is not a UUID")
    return value.lower()


def check_count(what, text, minimum):
    """A non-negative decimal integer of at least minimum."""
    if text is None or text == "":
        raise bad_request(f"{what} is missing")
    value = digits_value(text) if _DIGITS.match(text) else -1
    if value < minimum:
        raise bad_request(f"{what} must be an integer >= {minimum}")
    return value


def digits_value(text):
    """The value of a string of decimal digits; past 19 digits, just 10**19
    (bigger than any count here, and int() refuses very long strings)."""
    return int(text) if len(text) <= 19 else 10 ** 19


def _wait_seconds(text, maximum):
    """wait=: seconds, 0 or more; above maximum it is lowered to it."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise bad_request("wait must be a number of seconds, 0 or more")
    return min(seconds, maximum)


_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00\Z")


def _time(value):
    """A time as the API writes it (checked, since counts per day use its date)."""
    if not isinstance(value, str) or not _TIME.match(value):
        raise bad_request(f"time {value!r} is not like 2019-10-30T09:21:26.664704+00:00")
    return value


class Unstorable:
    """Stands, once parsed, for a number JSON cannot hold (NaN, Infinity,
    1e999), so that the envelope's check can name the field it is in."""

    def __init__(self, text):
        self.text = text


class ExactNumber:
    """Stands for a number whose text a float would not give back as sent:
    more digits than a double holds (12345678901234567.89), or another
    spelling of its value (1e5, 1.50). It is stored as that text."""

    __slots__ = ("text",)

    def __init__(self, text):
        self.text = text


def _finite_float(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        return Unstorable(text)
    return value if repr(value) == text else ExactNumber(text)  # repr: the shortest text of a float


# json writes an ExactNumber as a string that holds its text behind a mark nobody can send
# (a NUL, written \u0000, and a secret of this process); compact_json then unquotes it.
_EXACT_MARK = "\x00" + secrets.token_hex(8) + ":"
_EXACT_WRITTEN = re.compile(r'"\\u0000' + _EXACT_MARK[1:] + r'([^"]*)"')


def _exact_number(value):
    if isinstance(value, ExactNumber):
        return _EXACT_MARK + value.text
    raise TypeError(f"{type(value).__name__} is not JSON")  # an Unstorable


# Made once: json.loads and json.dumps build a new coder on each call when given options.
# What is encoded was decoded from JSON, so it holds no cycles to look for.
_STRICT_JSON = json.JSONDecoder(parse_constant=Unstorable, parse_float=_finite_float)
_COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False, check_circular=False,
                                 default=_exact_number)


def parse_json(body, content_type):
    """The value of a JSON request body; any flaw is a 400."""
    media_type, _, params = (content_type or "").partition(";")
    if media_type.strip().lower() != "application/json":
        raise bad_request("Content-Type must be application/json")
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise bad_request("charset must be utf-8")
    if not body:
        raise bad_request("body is empty")
    return decode_json(body, "body")


def decode_json(data, what):
    """Strict JSON from UTF-8 bytes: no NaN or Infinity, no float overflow."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request(f"{what} is not valid UTF-8") from None
    try:
        return _STRICT_JSON.decode(text)
    except (ValueError, RecursionError):
        raise bad_request(f"{what} is not valid JSON") from None


def compact_json(value, what="body"):
    """JSON text without spaces; a 400 naming what when it cannot be stored
    (a lone surrogate, NaN, Infinity, a number out of range)."""
    try:
        text = _COMPACT_JSON.encode(value)
        if "\\u0000" in text:  # perhaps an ExactNumber: its text, unquoted
            text = _EXACT_WRITTEN.sub(r"\1", text)
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{what} contains a lone surrogate") from None
    except (TypeError, ValueError, RecursionError):
        raise bad_request(f"{what} holds NaN, Infinity or a number out of range, which JSON cannot store") from None
    return text


def _text_bytes(text):
    """At most the bytes text takes, in UTF-8 or in CPython's memory: one a
    character when it is all ASCII, else up to 4."""
    return len(text) if text.isascii() else 4 * len(text)


class Envelope:
    """A validated event envelope: its event name and compact JSON text.

    payload_span is (start, length) of the payload's JSON text inside text,
    1-based as SQLite's substr() counts, so search can look at the payload
    alone; (1, 0) when there is no payload. size: _text_bytes of the text."""

    __slots__ = ("name", "text", "payload_span", "size")

    def __init__(self, value, where=""):
        if not isinstance(value, dict):
            raise bad_request(f"{where}body must be a JSON object")
        event = value.get("event")
        if not isinstance(event, dict):
            raise bad_request(f"{where}field event must be an object")
        if not isinstance(event.get("name"), str):
            raise bad_request(f"{where}field event.name must be a non-empty string")
        try:
            self.name = check_name("field event.name", event["name"])
        except HTTPError as error:
            raise bad_request(where + error.detail) from None
        if "version" in event and (type(event["version"]) is not int or event["version"] not in INT64):
            raise bad_request(f"{where}field event.version must be a 64-bit integer")
        for field in ("system", "trigger", "payload"):
            if field in value and not isinstance(value[field], dict):
                raise bad_request(f"{where}field {field} must be an object")
        # The fields before the payload, the payload, and those after it, each
        # encoded once: the payload's place in the text is then known, not searched for.
        fields = before = {}
        after = {}
        for key, item in value.items():
            if key == "payload":
                fields = after
            elif key != "eventId":  # the server's ID is the event's ID
                fields[key] = item
        try:
            text, self.payload_span = compact_json(before), (1, 0)
            if "payload" in value:
                payload = compact_json(value["payload"])
                head = text[:-1] + ("," if before else "") + '"payload":'
                self.payload_span = (len(head) + 1, len(payload))
                text = head + payload + ("," + compact_json(after)[1:] if after else "}")
        except HTTPError:
            for key, item in value.items():  # find the field to name
                if key != "eventId":
                    compact_json(item, f"{where}field {key}")
            raise
        self.text, self.size = text, _text_bytes(text)


MAX_BATCH = 1000


def parse_envelopes(value):
    """One envelope, or a batch: a JSON array of 1 to MAX_BATCH envelopes."""
    if not isinstance(value, list):
        return [Envelope(value)]
    if not 1 <= len(value) <= MAX_BATCH:
        raise bad_request(f"a batch holds 1 to {MAX_BATCH} events")
    return [Envelope(item, f"event [{index}]: ") for index, item in enumerate(value)]


# Storage #####################################################################
#
# Concurrency: who does what, and what must never block.
#
# Threads
# - Connection threads, one per client connection (ThreadingHTTPServer). Each
#   parses its requests, checks them, reads from SQLite (a one-query read on
#   the quick reader connection, in turn; a longer one on a connection from
#   the pool), and answers its own client. A write it hands to the writer
#   thread as a ticket, and sleeps until the ticket is committed or refused;
#   then it answers, or sends what the writer thread left of the reply.
# - The deadlines thread, one per Server (HeadDeadlines): shuts down the
#   reading side of a connection whose request head is late, which wakes its
#   connection thread to answer 408; it never writes to a socket.
# - The writer thread, one per Store (GroupCommit). It alone uses the write
#   connection and changes the committed state kept in memory (and Tails,
#   the newest events' text). It takes every
#   queued ticket at once, runs their work in one transaction (group commit),
#   commits, updates the state in memory, releases the long polls waiting on
#   what it stored, sends each committed write's reply as far as the client's
#   socket takes it without waiting (EarlyReply), then wakes the tickets'
#   threads. It never waits on a socket or on stderr: a client that does not
#   read, or a log nobody reads, cannot hold up anybody's write.
# - The log thread, one per process (LogLines): writes log lines to stderr from
#   a bounded queue; when stderr blocks, lines are dropped and counted.
# - The accept thread (serve_forever): starts a connection thread per
#   connection up to --max-connections, refuses the others with a 503 sent
#   without waiting, and waits a moment when no descriptor is left.
# - The main thread (signals, stopping).
#
# Locks
# - GroupCommit.lock, the write lock: held by the writer thread for each
#   transaction. It serialises writes, so the ownership check of a stream,
#   made inside the transaction's work, cannot race; close() takes it too.
# - GroupCommit's condition: the queue of tickets and the writer's state.
# - A ticket's own lock: its connection thread sleeps on it until the writer
#   thread releases it, after the commit.
# - Waiters' lock: the long polls registered per (stream, event name).
# - Store's quick-read turn: one-query reads take turns on one connection.
# - A connection's head_lock: taking it out of HeadDeadlines' table and, if
#   late, shutting its reading side are one step (see HeadDeadlines).
# - Server's connection count lock: the count checked against --max-connections.
# The committed state in memory (streams, counts, offsets) is written by the
# writer thread only, after its commit, and read without a lock: a reader may
# see the state of the commit before, never a state that is not committed.
# (After a reset or a stream's removal it is replaced whole, not changed.)
#
# Who answers a request: its connection thread; a committed write, the writer
# thread first, while the request's thread still sleeps (so replies on one
# connection keep the order of its requests). Either way only once the ticket
# is done: a 200 is never sent before the commit it reports.

LOAD_CHUNK = 10_000  # events a load (import, fixtures) writes at a time: its file may not fit in memory
RECENT_EVENTS = 10_000  # events remembered from reads so acknowledging them needs no query (~2.5 MB)
TAIL_EVENTS = 500  # newest events of each (stream, event name) kept in memory for consumers that keep up
TAIL_BYTES = 4 * 1048576  # the memory all those tails take together, at most
TAIL_EVENT_BYTES = 320  # what an event in a tail takes beside its text: the strings' heads, its ID, its index entry
ANSWER_BYTES, MAX_ANSWER_BYTES = 2 * 1048576, 65536  # answers to reads kept for re-reads: in all, and each
SQLITE_MAX_VARIABLES = 999  # the default limit before SQLite 3.32


_random_pool = [b"", 0]  # random bytes drawn ahead, and how many of them are used
_random_pool_lock = threading.Lock()


def new_event_id():
    """A UUID, version 7 (RFC 9562): the time in milliseconds, then 74 random
    bits. New events' IDs sort together, so they land on the same pages of
    the ID index instead of a random page each (less to write per commit).
    The random bits come from os.urandom 64 KiB at a time: a system call per
    ID cost more than all the rest of it."""
    with _random_pool_lock:
        pool, used = _random_pool
        if used + 10 > len(pool):
            pool, used = os.urandom(65536), 0
        _random_pool[:] = pool, used + 10
    random_bits = int.from_bytes(pool[used:used + 10], "big")
    value = (time.time_ns() // 1_000_000 << 80 | 0x7 << 76 | (random_bits >> 68) << 64
             | 0b10 << 62 | random_bits & (1 << 62) - 1)
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def utc_now():
    """Now, as the API writes times: ISO 8601, UTC, microseconds, +00:00."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


SCHEMA_VERSION = 1

# Each entry upgrades the schema by one version; PRAGMA user_version says where a file stands.
MIGRATIONS = [
    """
    CREATE TABLE streams (
        stream_id   INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        producer_id TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
    CREATE INDEX streams_by_producer ON streams (producer_id);
    CREATE TABLE events (
        event_pk      INTEGER PRIMARY KEY,
        event_id      TEXT NOT NULL UNIQUE,
        stream_id     INTEGER NOT NULL REFERENCES streams,
        event_name    TEXT NOT NULL,
        sequence      INTEGER NOT NULL,
        envelope      TEXT NOT NULL,
        payload_start INTEGER NOT NULL,
        payload_size  INTEGER NOT NULL,
        created_at    TEXT NOT NULL,
        UNIQUE (stream_id, event_name, sequence)
    );
    CREATE INDEX events_by_time ON events (stream_id, created_at);
    -- counts kept by the INSERT of each event, so they never need a scan of events
    CREATE TABLE event_counts (
        stream_id  INTEGER NOT NULL REFERENCES streams,
        event_name TEXT NOT NULL,
        count      INTEGER NOT NULL,
        PRIMARY KEY (stream_id, event_name)
    ) WITHOUT ROWID;
    CREATE TABLE daily_counts (
        day   TEXT PRIMARY KEY,
        count INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TRIGGER events_counted AFTER INSERT ON events BEGIN
        INSERT INTO event_counts (stream_id, event_name, count) VALUES (NEW.stream_id, NEW.event_name, NEW.sequence)
            ON CONFLICT (stream_id, event_name) DO UPDATE SET count = excluded.count;
        INSERT INTO daily_counts (day, count) VALUES (substr(NEW.created_at, 1, 10), 1)
            ON CONFLICT (day) DO UPDATE SET count = count + 1;
    END;
    CREATE TABLE consumer_offsets (
        stream_id       INTEGER NOT NULL REFERENCES streams,
        event_name      TEXT NOT NULL,
        consumer_id     TEXT NOT NULL,
        consumer_offset INTEGER NOT NULL,
        moved_at        TEXT NOT NULL,
        PRIMARY KEY (stream_id, event_name, consumer_id)
    ) WITHOUT ROWID;
    CREATE INDEX consumer_offsets_by_consumer ON consumer_offsets (consumer_id);
    -- publish retries: the IDs first stored under a key, and a hash of the envelopes
    CREATE TABLE idempotency_keys (
        stream_id   INTEGER NOT NULL REFERENCES streams,
        key         TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        event_ids   TEXT NOT NULL,
        PRIMARY KEY (stream_id, key)
    ) WITHOUT ROWID;
    """,
]


def _statements(script):
    """The SQL statements of a script, one by one (a trigger's body keeps its
    semicolons), so that they run inside the caller's transaction."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""


StreamTotals = collections.namedtuple(
    "StreamTotals", "name producer_id created_at events consumed consumers lag",
    module=__name__)
StreamTotals.__doc__ = """A stream's owner and figures: events stored, the sum of its consumer
offsets (consumed), distinct consumers, and lag (events its consumers have
not acknowledged, summed over their offsets)."""




def _inserts(table, rows, conflict=""):
    """(sql, parameters) of statements that INSERT rows into table ("name
    (columns)"), as few as the variable limit allows: one SQLite step for
    many rows, where executemany takes a step (and a GIL hand-over) for each."""
    if not rows:
        return []
    per_statement = SQLITE_MAX_VARIABLES // len(rows[0])
    row_marks = "(" + ",".join("?" * len(rows[0])) + ")"
    return [(f"INSERT INTO {table} VALUES {','.join([row_marks] * len(chunk))}{conflict}",
             [value for row in chunk for value in row])
            for chunk in (rows[start:start + per_statement] for start in range(0, len(rows), per_statement))]


# The tables whose rows belong to one stream, by stream_id, the streams table last.
STREAM_TABLES = ("idempotency_keys", "consumer_offsets", "events", "event_counts", "streams")
EVENT_COLUMNS = "events (event_id, stream_id, event_name, sequence, envelope, payload_start, payload_size, created_at)"
EVENT_ID_BYTES = 50  # what an event's "eventId" and its comma add to its envelope in a read's answer
# A read's answer, sequences :offset + 1 to :last: a JSON array of the stored envelopes, each with
# "eventId" spliced in first, and "sequence event_id" of each, comma-separated. (Named parameters,
# given a dict: Python 3.12 deprecates numbered ones, "?1", given a sequence.)
_READ_ANSWER = ("SELECT '[' || group_concat('{\"eventId\":\"' || event_id || '\",' || substr(envelope, 2)) || ']',"
                " group_concat(sequence || ' ' || event_id)")
READ_ALL = (_READ_ANSWER + " FROM (SELECT event_id, envelope, sequence FROM events WHERE stream_id = :stream_id"
            " AND event_name = :event_name AND sequence > :offset AND sequence <= :last ORDER BY sequence)")
# The same, but no more than :max_bytes of them (one at least): the events are walked one by one
# (sequences have no gaps), adding up their sizes, and the walk stops once past :max_bytes, so that
# a read of many large events neither builds a huge answer nor reads the rest of them.
READ_WITHIN = (
    "WITH RECURSIVE walk (sequence, event_id, envelope, total) AS ("
    f" SELECT sequence, event_id, envelope, length(CAST(envelope AS BLOB)) + {EVENT_ID_BYTES} FROM events"
    "  WHERE stream_id = :stream_id AND event_name = :event_name AND sequence = :offset + 1"
    " UNION ALL"
    f" SELECT e.sequence, e.event_id, e.envelope, w.total + length(CAST(e.envelope AS BLOB)) + {EVENT_ID_BYTES}"
    "  FROM walk w JOIN events e ON e.stream_id = :stream_id AND e.event_name = :event_name"
    "   AND e.sequence = w.sequence + 1"
    "  WHERE w.total < :max_bytes AND w.sequence < :last)"
    + _READ_ANSWER + " FROM walk WHERE total <= :max_bytes OR sequence = :offset + 1")
OFFSET_COLUMNS = "consumer_offsets (stream_id, event_name, consumer_id, consumer_offset, moved_at)"
OFFSET_UPSERT = (" ON CONFLICT (stream_id, event_name, consumer_id)"
                 " DO UPDATE SET consumer_offset = excluded.consumer_offset, moved_at = excluded.moved_at")




class StoreError(Exception):
    """The database cannot be opened or used."""


def _refusal(error):
    """What a failed piece of work raises to its caller: a database error
    becomes a 507 (the disk is full), a 503 (the database is read-only) or
    a 500; anything else (an HTTPError, a LoadError) as it is."""
    if isinstance(error, sqlite3.Error):
        text = str(error)
        if "database or disk is full" in text:
            return HTTPError(507, "the disk is full: nothing was stored; writes resume once space is freed")
        if "readonly database" in text:
            return HTTPError(503, "the database is read-only: nothing was stored")
        log.error("write failed: %s", error)
        return HTTPError(500, "the write failed")
    return error


class _Ticket:
    """One write's share of a group commit: its work, then its outcome. The
    connection thread that queued it sleeps in wait() until the writer
    thread, done with the commit, wakes it."""

    __slots__ = ("work", "answer", "result", "error", "done", "_turn")

    def __init__(self, work, answer=None):
        self.work, self.answer = work, answer
        self.result = self.error = None
        self.done = False
        self._turn = threading.Lock()
        self._turn.acquire()

    def wait(self):
        self._turn.acquire()

    def wake(self):
        self._turn.release()


class WriterState:
    """What the writer thread does: takes writes, commits the last ones
    queued before it stops, or has stopped."""
    RUNNING, STOPPING, STOPPED = "running", "stopping", "stopped"


class GroupCommit:
    """The writer thread and its queue of tickets (the model is peewee's
    playhouse/sqliteq: one thread, one queue, one wake-up per result).

    submit(work) queues work(tx), to run in a write transaction, and sleeps
    until the transaction is committed. The writer thread takes every ticket
    queued when it is ready for the next transaction: while one commit waits
    for the disk, the writes that arrive queue up and share the next (group
    commit), so the fsyncs per second bound the commits, not the writes.
    commit(batch) runs a batch's work and sets each ticket's outcome.

    A ticket may carry an answer: called by the writer thread with the
    result once committed, before the ticket's thread wakes, it sends the
    request's reply at once if the client's socket takes it without waiting
    (EarlyReply). The reply then does not wait for the woken thread to get
    the GIL back, behind the others the commit woke."""

    def __init__(self, commit):
        self.lock = threading.Lock()  # the write lock: held for each transaction
        self._commit = commit
        self._queued = threading.Condition(threading.Lock())
        self._tickets = []  # waiting for the next transaction, in order of arrival
        self.state = WriterState.RUNNING
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self._thread.start()

    def submit(self, work, answer=None):
        """work(tx)'s result once it is committed; its error if it was refused."""
        ticket = _Ticket(work, answer)
        with self._queued:
            if self.state != WriterState.RUNNING:
                raise HTTPError(503, "the server is stopping")
            self._tickets.append(ticket)
            self._queued.notify()
        ticket.wait()
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def queued(self):
        """How many writes wait for the next transaction."""
        return len(self._tickets)

    def _run(self):
        while True:
            with self._queued:
                while not self._tickets and self.state == WriterState.RUNNING:
                    self._queued.wait()
                if not self._tickets:  # stopping, and every write is answered
                    self.state = WriterState.STOPPED
                    return
            batch = []
            try:
                with self.lock:
                    with self._queued:  # taken as late as possible: the more it takes, the fewer commits
                        batch, self._tickets = self._tickets, []
                    self._commit(batch)
            except Exception:  # commit() sets the outcomes itself; this thread must live on regardless
                log.exception("the writer thread failed")
            finally:
                for ticket in batch:
                    if not ticket.done:  # never let a request think it committed
                        ticket.result, ticket.error = None, HTTPError(500, "the commit failed")
                    elif ticket.error is None and ticket.answer is not None:
                        with contextlib.suppress(Exception):  # then its own thread answers
                            ticket.answer(ticket.result)
                    ticket.wake()
            batch = ticket = None  # not kept (envelopes, replies) while the writer waits for the next write

    def close(self):
        """Take no more writes, commit those queued, and wait for the writer thread to end."""
        with self._queued:
            if self.state == WriterState.RUNNING:
                self.state = WriterState.STOPPING
            self._queued.notify()
        self._thread.join()


class Waiters:
    """Long-poll reads waiting for an event of a (stream_id, event_name) to be committed."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_key = {}  # (stream_id, event_name) -> set of threading.Event

    @contextlib.contextmanager
    def waiting(self, key):
        """A threading.Event set when an event of key is committed (or at shutdown)."""
        woken = threading.Event()
        with self._lock:
            self._by_key.setdefault(key, set()).add(woken)
        try:
            yield woken
        finally:
            with self._lock:
                waiting = self._by_key.get(key)
                if waiting is not None:
                    waiting.discard(woken)
                    if not waiting:
                        del self._by_key[key]

    def count(self):
        """How many reads wait."""
        with self._lock:
            return sum(len(waiting) for waiting in self._by_key.values())

    def wake(self, keys):
        """Release the reads waiting on these keys (by the writer thread: it only sets Events)."""
        if not self._by_key:
            return
        with self._lock:
            for key in keys:
                for woken in self._by_key.pop(key, ()):
                    woken.set()

    def wake_all(self):
        """Release every waiting read (at shutdown)."""
        with self._lock:
            for waiting in self._by_key.values():
                for woken in waiting:
                    woken.set()
            self._by_key.clear()


class ReadCache:
    """What reads learnt, kept for the requests after them. Events never
    change once stored, so what was read stays true:

    - answers: (stream_id, event_name, offset, limit, max_bytes) -> (full,
      count, JSON text) of a read. A full answer (limit events, or fewer when
      the next would pass max_bytes) holds for good; a shorter one until the
      count of that name moves past the count read before its query. Only
      answers up to MAX_ANSWER_BYTES are kept, ANSWER_BYTES of them in all.
    - events: event_id -> (stream_id, event_name, sequence) of the events
      lately read, since consumers acknowledge what they just read: the ack
      then needs no query. Up to RECENT_EVENTS of them.
    Both are emptied when full; entries are only ever added whole, so any
    thread may read them without a lock."""

    def __init__(self):
        self._answers = {}
        self._answer_bytes = 0  # the length of the texts kept (updated without a lock: near enough)
        self._events = {}

    def answer(self, key, count):
        """A kept answer that still holds while the name has count events, or None."""
        kept = self._answers.get(key)
        if kept is not None and (kept[0] or kept[1] == count):
            return kept[2]
        return None

    def keep(self, key, full, count, text, listed):
        """Remember a read's answer and its (sequence, event_id) list; full:
        it holds for good (limit events, or as many as its bytes allowed)."""
        stream_id, event_name = key[:2]
        if len(self._events) > RECENT_EVENTS:
            self._events.clear()
        for sequence, event_id in listed:
            self._events[event_id] = (stream_id, event_name, int(sequence))
        if len(text) <= MAX_ANSWER_BYTES:
            if self._answer_bytes + len(text) > ANSWER_BYTES:
                self._answers.clear()
                self._answer_bytes = 0
            self._answers[key] = (full, count, text)
            self._answer_bytes += len(text)

    def event(self, event_id):
        """(stream_id, event_name, sequence) of an event lately read, or None."""
        return self._events.get(event_id)


class _Tail:
    """The newest events of one (stream_id, event_name): sequences first,
    first + 1, ... with no gap, as the items of a read's answer, and their IDs."""

    __slots__ = ("first", "items", "event_ids", "size")

    def __init__(self, first, items=(), event_ids=()):
        self.first, self.items, self.event_ids = first, list(items), list(event_ids)
        self.size = sum(map(_text_bytes, self.items)) + TAIL_EVENT_BYTES * len(self.items)


class Tails:
    """The newest events of every (stream_id, event_name), kept by the
    writer thread as each commit adds them, so that a consumer that keeps up
    is answered from memory and its acknowledgement needs no query.

    An item is the text a read answers for an event: '{"eventId":"<id>",'
    and the stored envelope after its '{'. A tail only grows at its end, by
    list.append (atomic under the GIL), and is cut by putting a new, shorter
    one in its place: readers take one tail and slice it, without a lock.
    A tail keeps up to 2 * TAIL_EVENTS items and is cut to TAIL_EVENTS; when
    all of them hold more than TAIL_BYTES of text, the tails written to least
    lately go first (TAIL_BYTES counts TAIL_EVENT_BYTES more for each event).
    """

    def __init__(self):
        self._tails = collections.OrderedDict()  # (stream_id, event_name) -> _Tail, least lately written first
        self._events = {}  # event_id -> (stream_id, event_name, sequence) of every event in a tail
        self._size = 0

    def extend(self, rows):
        """(In the writer thread, once they are committed.) Add rows of the events table, in order."""
        for event_id, stream_id, event_name, sequence, envelope, *_ in rows:
            key = (stream_id, event_name)
            tail = self._tails.get(key)
            if tail is None or tail.first + len(tail.items) != sequence:
                if tail is not None:
                    self._drop(key)
                tail = self._tails[key] = _Tail(sequence)
            else:
                self._tails.move_to_end(key)
            item = '{"eventId":"' + event_id + '",' + envelope[1:]
            size = _text_bytes(item) + TAIL_EVENT_BYTES
            tail.items.append(item)
            tail.event_ids.append(event_id)
            tail.size += size
            self._size += size
            self._events[event_id] = (stream_id, event_name, sequence)
            if len(tail.items) >= 2 * TAIL_EVENTS:
                self._cut(key, tail)
        while self._size > TAIL_BYTES and self._tails:
            self._drop(next(iter(self._tails)))

    def _cut(self, key, tail):
        gone = len(tail.items) - TAIL_EVENTS
        for event_id in tail.event_ids[:gone]:
            self._events.pop(event_id, None)
        kept = _Tail(tail.first + gone, tail.items[gone:], tail.event_ids[gone:])
        self._size -= tail.size - kept.size
        self._tails[key] = kept

    def _drop(self, key):
        tail = self._tails.pop(key)
        for event_id in tail.event_ids:
            self._events.pop(event_id, None)
        self._size -= tail.size

    def keep_only(self, stream_ids):
        """(In the writer thread.) Drop the tails of the streams not in stream_ids."""
        for key in [key for key in self._tails if key[0] not in stream_ids]:
            self._drop(key)

    def read(self, key, offset, limit):
        """The items of up to limit events after offset; None when the
        tail does not hold the event after offset."""
        tail = self._tails.get(key)
        if tail is None or offset < tail.first - 1:
            return None
        start = offset + 1 - tail.first
        return tail.items[start:start + limit] or None

    def event(self, event_id):
        """(stream_id, event_name, sequence) of an event in a tail, or None."""
        return self._events.get(event_id)


class _Transaction:
    """A write transaction on conn, and what its requests change, kept until
    its commit: new events and offsets are written then, a statement each for
    the whole batch; the streams it created were written at once (for their
    IDs). Kept in the store's state in memory, with the counts, once committed.

    known_streams are the committed streams as this transaction sees them:
    the store's own, until a reset or a stream's removal in it (forget)
    leaves fewer for the writes after. (Counts and offsets need no such view:
    they are kept by stream ID, and a stream's ID is never used again.)

    SQLite's transaction begins only when a statement needs it (execute):
    often the batch's INSERT is all there is, and runs alone (see Store._write)."""

    __slots__ = ("conn", "begun", "now", "events", "counts", "sizes", "offsets", "streams", "known_streams",
                 "forgot")

    def __init__(self, conn, known_streams):
        self.conn = conn
        self.begun = False
        self.now = utc_now()  # the time of every event and offset the transaction writes
        self.events = []  # rows of the events table, in order
        self.counts = {}  # (stream_id, event_name) -> count
        self.sizes = {}  # (stream_id, event_name) -> the largest new envelope in bytes (or more)
        self.offsets = {}  # (stream_id, event_name, consumer_id) -> (offset, moved_at)
        self.streams = {}  # name -> (stream_id, producer_id)
        self.known_streams = known_streams
        self.forgot = False  # a reset or a stream removed: the state in memory is rebuilt at the commit

    def snapshot(self):
        return (len(self.events), dict(self.counts), dict(self.sizes), dict(self.offsets), dict(self.streams),
                self.known_streams, self.forgot)

    def restore(self, saved):
        del self.events[saved[0]:]
        self.counts, self.sizes, self.offsets, self.streams, self.known_streams, self.forgot = saved[1:]

    def forget(self, stream_id=None):
        """Drop one stream (every stream, given none) from what this
        transaction has written and knows; its rows are deleted already."""
        def kept(by_stream):
            return {key: value for key, value in by_stream.items() if stream_id is not None and key[0] != stream_id}

        self.events[:] = [row for row in self.events if stream_id is not None and row[1] != stream_id]
        self.counts, self.sizes, self.offsets = kept(self.counts), kept(self.sizes), kept(self.offsets)
        self.streams, self.known_streams = (
            {name: value for name, value in streams.items() if stream_id is not None and value[0] != stream_id}
            for streams in (self.streams, self.known_streams))
        self.forgot = True

    def write_events(self, at_least=LOAD_CHUNK):
        """Write the events kept so far, once there are at_least of them, and
        keep no more of them in memory: for loads of a whole file in one
        transaction. (Their tails are not kept: reads find them in SQLite.)"""
        if len(self.events) >= at_least:
            for statement in _inserts(EVENT_COLUMNS, self.events):
                self.execute(*statement)
            self.events.clear()

    def execute(self, sql, parameters=()):
        """Run a statement in the transaction, beginning it if need be."""
        if not self.begun:
            self.conn.execute("BEGIN IMMEDIATE")
            self.begun = True
        return self.conn.execute(sql, parameters)



class Store:
    """The event store: the only code that speaks SQL. Its methods are the
    domain verbs.

    Writes go through one writer thread (GroupCommit): a verb's work runs
    inside a transaction shared with the writes queued beside it, and the
    verb returns once that transaction is committed. Ownership, counts and
    offsets are checked in memory, in the work, against the committed state
    kept here and what the transaction itself changed: this process is the
    database's only writer (an exclusive flock makes sure), so the state in
    memory is the database's. Reads use connections of their own (one for
    quick reads, a pool for longer ones) and never wait for the write lock
    (WAL readers see the last commit)."""

    def __init__(self, path, sync="full", exclusive=True):
        self.path = path
        self.sync = sync
        self._readers = queue.SimpleQueue()
        self._quick_turn = threading.Lock()  # see reading()
        self._quick = None  # the quick reader connection, made at the first quick read
        # The committed state, in memory, changed by the writer thread only:
        self._streams = {}  # name -> (stream_id, producer_id) of every stream; streams never change
        self._counts = {}  # (stream_id, event_name) -> events of that name, where any
        self._offsets = {}  # (stream_id, event_name, consumer_id) -> consumer offset, where one was set
        # (stream_id, event_name) -> (first sequence committed by this process, the largest of those
        # envelopes in bytes, or an upper bound): whether a read's events all fit in its byte budget.
        self._sizes = {}
        # Stream IDs are never used twice in a process, not even after a reset: what the
        # read cache keeps by stream ID cannot be taken for a stream made after.
        self._last_stream_id = 0
        self.cache = ReadCache()
        self.tails = Tails()
        self.waiters = Waiters()
        self.closed = False
        self._lock_fd = None
        try:
            self._writer = self._connect()
            if exclusive:
                self._lock_fd = _lock_exclusively(path)
            self._migrate()
            self._identity = _file_identity(path)
            self._load_state()
            self._wal_identity = _identity_or_none(path + "-wal")
            self.read_only = self._read_only()
        except (sqlite3.Error, StoreError) as error:
            with contextlib.suppress(AttributeError, sqlite3.Error):
                self._writer.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            if isinstance(error, StoreError):
                raise
            hint = "" if os.access(os.path.dirname(os.path.abspath(path)), os.W_OK) else \
                " (its folder is read-only, and WAL mode writes -wal and -shm files beside it)"
            raise StoreError(f"cannot open database {path}: {error}{hint}") from None
        self._wal_rescued = False
        self._disk_full = None  # the free bytes when a write last failed for want of space, till one succeeds
        self.writes = GroupCommit(self._commit)

    def _load_state(self):
        """Read the committed state kept in memory: streams, counts, offsets."""
        conn = self._writer
        self._streams = {name: (stream_id, producer_id) for stream_id, name, producer_id
                         in conn.execute("SELECT stream_id, name, producer_id FROM streams")}
        self._counts = {(stream_id, name): count for stream_id, name, count
                        in conn.execute("SELECT stream_id, event_name, count FROM event_counts")}
        self._sizes = {key: (count + 1, 0) for key, count in self._counts.items()}
        self._offsets = {(stream_id, name, consumer_id): offset for stream_id, name, consumer_id, offset
                         in conn.execute("SELECT stream_id, event_name, consumer_id, consumer_offset"
                                         " FROM consumer_offsets")}
        self._last_stream_id = conn.execute("SELECT coalesce(max(stream_id), 0) FROM streams").fetchone()[0]

    def _read_only(self):
        """Why the database cannot be written (a read-only file or file
        system), or None: found by writing in a transaction rolled back."""
        conn = self._writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.OperationalError as error:
            if "readonly" not in str(error):
                raise
            return f"the database {self.path} is read-only ({error}): reads are served, writes get 503"
        finally:
            conn.execute("ROLLBACK")
        return None

    def file_problem(self):
        """Why writes would not reach the database file, or None: the file,
        or its WAL, removed or replaced under the server (its connections
        still write to the old ones, which nobody opens again)."""
        try:
            if _file_identity(self.path) != self._identity:
                return f"the database file {self.path} was removed or replaced"
        except OSError:
            return f"the database file {self.path} was removed"
        wal = _identity_or_none(self.path + "-wal")
        if self._wal_identity is None:
            self._wal_identity = wal
        elif wal != self._wal_identity:
            return f"the WAL file {self.path}-wal was removed or replaced"
        return None

    def _refuse_if_files_moved(self, batch):
        """(In the writer thread.) Refuse the batch, writing nothing, if the
        database file or its WAL is gone. A WAL removed still holds, in the
        file the server has open, commits not yet copied to the database
        file: they are copied now (a checkpoint), so that what was
        acknowledged is kept."""
        problem = self.file_problem()
        if problem is None:
            return False
        if "WAL" in problem and not self._wal_rescued:
            self._wal_rescued = True
            try:
                self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                log.error("%s: its commits were copied into the database file; writes are refused "
                          "until a restart", problem)
            except sqlite3.Error as error:
                log.error("%s, and its commits could not be copied into the database file: %s", problem, error)
        failure = HTTPError(503, f"{problem}: writes are refused until a restart, nothing was stored")
        for ticket in batch:
            ticket.result, ticket.error, ticket.done = None, failure, True
        return True

    def _connect(self, create=True):
        """A connection to the database; create: the file may be made (only
        the writer's, at start: a reader never makes an empty database where
        the file was removed)."""
        target = self.path if create else f"file:{urllib.parse.quote(os.path.abspath(self.path))}?mode=rw"
        conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False,
                               cached_statements=256, uri=not create)
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"WAL mode not available (journal_mode is {mode})")
            conn.execute(f"PRAGMA synchronous = {'FULL' if self.sync == 'full' else 'NORMAL'}")
            # Statement journals in memory: else each commit of a multi-row INSERT
            # creates, writes and deletes a temporary file.
            conn.execute("PRAGMA temp_store = MEMORY")
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self):
        """Bring the schema to SCHEMA_VERSION; a database already there is not written to."""
        conn = self._writer
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"schema version {version} is newer than this eventserver ({SCHEMA_VERSION})")
        if version == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for number in range(version, SCHEMA_VERSION):
                for statement in _statements(MIGRATIONS[number]):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self):
        """Commit the writes queued, then close every connection (once);
        later requests get a 503."""
        if self.closed:
            return
        self.waiters.wake_all()
        self.writes.close()
        self.closed = True
        with self.writes.lock:
            self._writer.close()
        while True:
            try:
                self._readers.get_nowait().close()
            except queue.Empty:
                break
        with self._quick_turn:
            if self._quick is not None:
                self._quick.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # only now: see _lock_exclusively
            self._lock_fd = None

    # -- transactions ---------------------------------------------------------

    @contextlib.contextmanager
    def reading(self, quick=False):
        """A reader connection, its queries seeing one state of the database.
        quick: for one short query (a single statement needs no transaction),
        on the one quick connection, in turn with the other quick reads: two
        threads inside SQLite at once cost more in lock and GIL hand-overs
        than they gain, and one connection keeps one page cache (2 MB), not
        one per thread that waits. Long queries (search, stats) run beside
        them, each on a connection from the pool."""
        if self.closed:
            raise HTTPError(503, "the server is stopping")
        if quick:
            with self._quick_turn:
                if self.closed:  # closed while this read waited for its turn
                    raise HTTPError(503, "the server is stopping")
                if self._quick is None:
                    self._quick = self._reader()
                yield self._quick
            return
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = self._reader()
        try:
            conn.execute("BEGIN")
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
            if self.closed:
                conn.close()  # close() has emptied the pool already
            else:
                self._readers.put(conn)

    def _reader(self):
        try:
            return self._connect(create=False)
        except sqlite3.Error as error:  # the file removed, or no descriptor left
            raise HTTPError(503, self.file_problem() or f"the database cannot be read: {error}") from None

    def transact(self, work, answer=None):
        """Run work(tx) in a write transaction, maybe shared with other
        writes; return its result once the transaction is committed (answer:
        see GroupCommit)."""
        return self.writes.submit(work, answer)

    def _commit(self, batch):
        """(In the writer thread.) Run the tickets' work in one transaction
        and commit it. A refusal raised before the work wrote anything leaves
        the rest alone. Anything else (work that fails after writing, a
        failed write of the batch) spoils the transaction: it is rolled back,
        and each ticket runs again in a transaction of its own, so that only
        the culprit fails."""
        if self._refuse_if_files_moved(batch):
            return
        conn = self._writer
        tx = _Transaction(conn, self._streams)
        try:
            for ticket in batch:
                saved, changes = tx.snapshot(), conn.total_changes
                try:
                    ticket.error = None
                    ticket.result = ticket.work(tx)
                except Exception as error:
                    tx.restore(saved)
                    ticket.result, ticket.error = None, _refusal(error)
                    if conn.total_changes != changes:
                        raise
            self._write(tx)
        except BaseException as error:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            if not isinstance(error, Exception):
                raise
            if len(batch) > 1:
                for ticket in batch:
                    self._commit([ticket])
                return
            log.error("commit failed: %s", error)
            failure = _refusal(error)
            status = getattr(failure, "status", None)
            if status == 507:
                self._disk_full = _free_bytes(self.path)
            elif status == 503:
                self.read_only = f"the database {self.path} is read-only: writes get 503"
            for ticket in batch:
                ticket.result, ticket.error = None, failure
        else:
            self._disk_full = self.read_only = None
            problem = self.file_problem()
            if problem is not None:  # removed while the commit was written: it may be lost
                for ticket in batch:
                    if ticket.error is None:
                        ticket.result, ticket.error = None, HTTPError(
                            503, f"{problem} while this write was committed: it may be lost")
            sizes = dict(self._sizes) if tx.forgot else self._sizes
            for key, size in tx.sizes.items():  # before the counts: a read takes the count, then the sizes
                first, largest = sizes.get(key, (1, 0))
                sizes[key] = (first, max(largest, size))
            self._keep_tails(tx.events if problem is None else ())  # before the counts: see Tails
            if tx.forgot:  # a reset or a stream removed: only what belongs to the streams left is kept
                streams = {**tx.known_streams, **tx.streams}
                left = {stream_id for stream_id, _ in streams.values()}
                counts, offsets = {**self._counts, **tx.counts}, dict(self._offsets)
                offsets.update((key, offset) for key, (offset, _) in tx.offsets.items())
                self._sizes = {key: size for key, size in sizes.items() if key[0] in left}
                self._counts = {key: count for key, count in counts.items() if key[0] in left}
                self._offsets = {key: offset for key, offset in offsets.items() if key[0] in left}
                self._streams = streams
                self.tails.keep_only(left)
                self.waiters.wake_all()  # the long polls of a stream removed answer; the others wait on
            else:
                self._counts.update(tx.counts)
                self._offsets.update((key, offset) for key, (offset, _) in tx.offsets.items())
                self._streams.update(tx.streams)
                self.waiters.wake(tx.counts)
        for ticket in batch:
            ticket.done = True

    def _keep_tails(self, rows):
        """Add the committed rows to the tails; none for a commit whose file
        went missing (its writers were told it may be lost: then no reader
        may get it from memory either). A failure here must not leave the
        counts behind the commit: the tails are given up instead."""
        try:
            if rows:
                self.tails.extend(rows)
            else:
                self.tails = Tails()
        except Exception:
            log.exception("keeping the newest events in memory failed; reads go to the database")
            self.tails = Tails()

    def _write(self, tx):
        """Write what the transaction's requests kept in memory, and commit.
        A lone statement runs outside the transaction, as one of its own: one
        SQLite step, so the writer thread gives up the GIL once instead of
        three times (BEGIN, INSERT, COMMIT), and waits once to get it back."""
        statements = (_inserts(EVENT_COLUMNS, tx.events)  # the counts follow (trigger events_counted)
                      + _inserts(OFFSET_COLUMNS, [(*key, offset, moved_at) for key, (offset, moved_at)
                                                  in tx.offsets.items()], OFFSET_UPSERT))
        if len(statements) == 1 and not tx.begun:
            tx.conn.execute(*statements[0])
            return
        for statement in statements:
            tx.execute(*statement)
        if tx.begun:
            tx.conn.execute("COMMIT")

    # -- the committed state in memory: loaded at start, changed only by this
    #    store's commits (so this process must be the database's only writer) --

    def _stream(self, name, tx=None):
        """(stream_id, producer_id) of a stream, or None if it has never been written to."""
        if tx is None:
            return self._streams.get(name)
        return tx.streams.get(name) or tx.known_streams.get(name)

    def _stream_id(self, name, tx=None):
        """The ID of a stream that has been written to, else a 404."""
        found = self._stream(name, tx)
        if found is None:
            raise not_found(f"stream {name} not found")
        return found[0]

    def count(self, tx, stream_id, event_name):
        """How many events of that name the stream has (its last sequence), in tx."""
        key = (stream_id, event_name)
        return tx.counts[key] if key in tx.counts else self._counts.get(key, 0)

    def _offset(self, tx, stream_id, event_name, consumer_id):
        key = (stream_id, event_name, consumer_id)
        return tx.offsets[key][0] if key in tx.offsets else self._offsets.get(key, 0)

    # -- the core verbs -------------------------------------------------------

    def publish(self, stream, producer_id, envelopes, idempotency_key=None, answer=None, event_ids=None):
        """Store envelopes in order, all or none; return their new event IDs
        (event_ids, when given: new_event_id()s made by the caller). The
        first producer of a stream owns it; another gets a 423. A retry
        with a known idempotency key and the same envelopes stores nothing
        and returns the first IDs; with other envelopes it is a 409."""
        # What needs no state is done here, not in the writer thread, which does every write in turn.
        event_ids = event_ids or [new_event_id() for _ in envelopes]
        fingerprint = None if idempotency_key is None else \
            hashlib.sha256("\n".join(e.text for e in envelopes).encode()).hexdigest()
        return self.transact(lambda tx: self._publish_in(tx, stream, producer_id, envelopes, event_ids,
                                                         idempotency_key, fingerprint), answer)

    def publish_fixtures(self, fixtures):
        """Publish (stream, producer_id, Envelope) records, taken from the
        iterable as they are written, in one transaction, all or none; only
        into a database without streams (into another, the records are
        still taken, to check them). Returns whether they were published,
        and how many there were."""
        def work(tx):
            empty = not tx.execute("SELECT 1 FROM streams LIMIT 1").fetchone()
            records = 0
            for stream, producer_id, envelope in fixtures:
                records += 1
                if empty:
                    self._publish_in(tx, stream, producer_id, [envelope], [new_event_id()])
                    tx.write_events()
            return empty, records

        return self.transact(work)

    def _publish_in(self, tx, stream, producer_id, envelopes, event_ids, idempotency_key=None, fingerprint=None):
        found = self._stream(stream, tx)
        if found is None:
            stream_id = self.create_stream(tx, stream, producer_id, tx.now)
        elif found[1] != producer_id:
            raise StreamOwned(found[1])
        else:
            stream_id = found[0]
        events = [(event_id, envelope, tx.now) for event_id, envelope in zip(event_ids, envelopes)]
        if idempotency_key is not None:
            known = tx.execute(
                "SELECT fingerprint, event_ids FROM idempotency_keys WHERE stream_id = ? AND key = ?",
                (stream_id, idempotency_key)).fetchone()
            if known is not None:
                if known[0] != fingerprint:
                    raise HTTPError(409, f"idempotency key {idempotency_key} was used for other events")
                return known[1].split(",")
            self.remember_key(tx, stream_id, idempotency_key, fingerprint, event_ids)
        self.append(tx, stream_id, events)
        return event_ids

    def remember_key(self, tx, stream_id, key, fingerprint, event_ids):
        tx.execute("INSERT INTO idempotency_keys (stream_id, key, fingerprint, event_ids) VALUES (?, ?, ?, ?)",
                   (stream_id, key, fingerprint, ",".join(event_ids)))

    def create_stream(self, tx, name, producer_id, created_at):
        self._last_stream_id += 1  # (in the writer thread only) a rolled-back one is not used again
        stream_id = self._last_stream_id
        tx.execute("INSERT INTO streams (stream_id, name, producer_id, created_at) VALUES (?, ?, ?, ?)",
                   (stream_id, name, producer_id, created_at))
        tx.streams[name] = (stream_id, producer_id)
        return stream_id

    def append(self, tx, stream_id, events):
        """Add (event_id, Envelope, created_at) in order, each with the next
        sequence of its name, to the transaction's events. Returns the sequences."""
        sequences = []
        for event_id, envelope, created_at in events:
            key = (stream_id, envelope.name)
            sequence = tx.counts[key] = self.count(tx, stream_id, envelope.name) + 1
            size = envelope.size
            if size > tx.sizes.get(key, 0):
                tx.sizes[key] = size
            tx.events.append((event_id, stream_id, envelope.name, sequence, envelope.text,
                              *envelope.payload_span, created_at))
            sequences.append(sequence)
        return sequences

    def read(self, stream, event_name, consumer_id, limit, max_bytes):
        """The JSON text of up to limit events of that name past the
        consumer's offset, oldest first (the stored text, spliced, not
        re-encoded), and no more than max_bytes of them: fewer events then,
        but always one at least, so that no event is too big to be read."""
        return self._read(self._stream_id(stream), event_name, consumer_id, limit, max_bytes)

    def _read(self, stream_id, event_name, consumer_id, limit, max_bytes):
        offset = self._offsets.get((stream_id, event_name, consumer_id), 0)
        count = self._counts.get((stream_id, event_name), 0)  # read before the query: see ReadCache
        if offset >= count:
            return "[]"  # nothing past the offset: no need to ask the database
        items = self.tails.read((stream_id, event_name), offset, limit)
        if items is not None and 4 * sum(map(len, items)) + len(items) <= max_bytes:  # 4: UTF-8's most per character
            return "[" + ",".join(items) + "]"
        key = (stream_id, event_name, offset, limit, max_bytes)
        events = self.cache.answer(key, count)
        if events is not None:
            return events
        last = min(offset + limit, count)  # events committed after count was read wait for the next read
        first_known, largest = self._sizes.get(key[:2], (1, 0))  # read after count: see _commit
        fits = offset + 1 >= first_known and (last - offset) * (largest + EVENT_ID_BYTES) <= max_bytes
        with self.reading(quick=True) as conn:
            # SQLite splices "eventId" into each stored envelope and joins them: one step for the
            # whole answer, where fetching row by row costs a step each. When the events might not
            # fit in max_bytes, it walks them one by one, adding up their sizes, and stops there.
            values = {"stream_id": stream_id, "event_name": event_name, "offset": offset, "last": last,
                      "max_bytes": max_bytes}
            events, listed = conn.execute(READ_ALL if fits else READ_WITHIN, values).fetchone()
            listed = [item.split(" ") for item in listed.split(",")]
            if [int(sequence) for sequence, _ in listed] != list(range(offset + 1, offset + 1 + len(listed))):
                # SQLite does not promise group_concat keeps the rows' order (it does in
                # practice); should it not, build the answer row by row.
                events, listed = self._read_rows(conn, stream_id, event_name, offset, last, max_bytes)
        full = len(listed) == limit or offset + len(listed) < last  # cut short by max_bytes: for good too
        self.cache.keep(key, full, count, events, listed)
        return events

    @staticmethod
    def _read_rows(conn, stream_id, event_name, offset, last, max_bytes):
        pieces, listed, size = [], [], 0
        for sequence, event_id, envelope in conn.execute(
                "SELECT sequence, event_id, envelope FROM events WHERE stream_id = ? AND event_name = ?"
                " AND sequence > ? AND sequence <= ? ORDER BY sequence", (stream_id, event_name, offset, last)):
            size += len(envelope.encode("utf-8")) + EVENT_ID_BYTES
            if pieces and size > max_bytes:
                break
            pieces.append('{"eventId":"%s",%s' % (event_id, envelope[1:]))
            listed.append((sequence, event_id))
        return "[" + ",".join(pieces) + "]", listed

    def wait_and_read(self, stream, event_name, consumer_id, limit, max_bytes, seconds, stopping):
        """Like read, but when nothing is there, wait up to seconds for an
        event of that name to be committed to the stream (long poll)."""
        deadline = time.monotonic() + seconds
        stream_id = self._stream_id(stream)
        key = (stream_id, event_name)
        while True:
            with self.waiters.waiting(key) as woken:  # before reading: a commit in between is not missed
                if (self._stream(stream) or (None,))[0] != stream_id:
                    return "[]"  # removed while it waited (a reset): answered with what is there
                events = self._read(stream_id, event_name, consumer_id, limit, max_bytes)
                remaining = deadline - time.monotonic()
                if events != "[]" or remaining <= 0 or self.closed or stopping():
                    return events
                woken.wait(remaining)

    def owner(self, stream):
        """The producer that owns a stream (as last committed), or None."""
        found = self._stream(stream)
        return found and found[1]

    def ack(self, stream, event_id, consumer_id, retry_is_done=True, answer=None):
        """Move the consumer's offset to the event, if it is the next one;
        return the new offset. An event at or below the offset is a retried
        ACK: done already when retry_is_done, else an OffsetMismatch."""
        stream_id = self._stream_id(stream)
        found = self.tails.event(event_id) or self.cache.event(event_id)  # usually one is there
        if found is None or found[0] != stream_id:
            with self.reading(quick=True) as conn:  # an event, once stored, never changes
                row = conn.execute("SELECT event_name, sequence FROM events WHERE event_id = ? AND stream_id = ?",
                                   (event_id, stream_id)).fetchone()
            if row is None:
                raise not_found(f"event {event_id} not found in stream {stream}")
            found = (stream_id, *row)
        _, event_name, sequence = found

        def work(tx):
            if (self._stream(stream, tx) or (None,))[0] != stream_id:
                raise not_found(f"stream {stream} not found")  # removed (a reset) since it was looked up
            offset = self._offset(tx, stream_id, event_name, consumer_id)
            if sequence <= offset and retry_is_done:
                return sequence  # a retried ACK: already done
            if sequence != offset + 1:
                raise OffsetMismatch(offset + 1, sequence)
            tx.offsets[stream_id, event_name, consumer_id] = (sequence, tx.now)
            return sequence

        return self.transact(work, answer)

    # -- the Go server's other verbs ------------------------------------------

    def seek(self, stream, consumer_id, event_name, offset, create=True):
        """Set the consumer's offset for an event name (0 to that name's count).
        Without create, only an offset the consumer already has is moved: one
        it has not counts as an event name of no events, and stays unset."""
        def work(tx):
            stream_id = self._stream_id(stream, tx) if create else (self._stream(stream, tx) or (None,))[0]
            key = (stream_id, event_name, consumer_id)
            known = create or key in tx.offsets or key in self._offsets
            count = self.count(tx, stream_id, event_name) if known else 0
            if offset > count:
                raise OffsetOutOfRange(count, event_name, stream)
            if known:
                tx.offsets[key] = (offset, tx.now)

        self.transact(work)

    def envelope(self, event_id):
        """The stored JSON text of one event's envelope."""
        with self.reading(quick=True) as conn:
            row = conn.execute("SELECT envelope FROM events WHERE event_id = ?", (event_id,)).fetchone()
        if row is None:
            raise not_found(f"event {event_id} not found")
        return row[0]

    def consumers(self, stream, limit):
        """The first limit consumer offsets of a stream with the count of their event
        name, by event name then consumer ID: (consumer, offset, moved_at, name, count)."""
        with self.reading() as conn:
            return conn.execute(
                "SELECT o.consumer_id, o.consumer_offset, o.moved_at, o.event_name, coalesce(c.count, 0)"
                " FROM consumer_offsets o LEFT JOIN event_counts c USING (stream_id, event_name)"
                " WHERE o.stream_id = ? ORDER BY o.event_name, o.consumer_id LIMIT ?",
                (self._stream_id(stream), limit)).fetchall()

    def stream_totals(self):
        """Every stream's StreamTotals, by name."""
        with self.reading() as conn:
            return [StreamTotals(*row) for row in conn.execute(
                "SELECT s.name, s.producer_id, s.created_at,"
                " (SELECT coalesce(sum(count), 0) FROM event_counts c WHERE c.stream_id = s.stream_id),"
                " (SELECT coalesce(sum(consumer_offset), 0) FROM consumer_offsets o"
                "  WHERE o.stream_id = s.stream_id),"
                " (SELECT count(DISTINCT consumer_id) FROM consumer_offsets o WHERE o.stream_id = s.stream_id),"
                " (SELECT coalesce(sum(coalesce(c.count, 0) - o.consumer_offset), 0) FROM consumer_offsets o"
                "  LEFT JOIN event_counts c USING (stream_id, event_name) WHERE o.stream_id = s.stream_id)"
                " FROM streams s ORDER BY s.name")]

    def all_offsets(self):
        """Every consumer offset: (stream, consumer, event name, offset, count of that name)."""
        with self.reading() as conn:
            return conn.execute(
                "SELECT s.name, o.consumer_id, o.event_name, o.consumer_offset, coalesce(c.count, 0)"
                " FROM consumer_offsets o JOIN streams s USING (stream_id)"
                " LEFT JOIN event_counts c USING (stream_id, event_name)"
                " ORDER BY s.name, o.consumer_id, o.event_name").fetchall()

    def daily_counts(self, first_day, last_day):
        """{'YYYY-MM-DD': events stored that day (UTC)} for the days in range."""
        with self.reading() as conn:
            return dict(conn.execute("SELECT day, count FROM daily_counts WHERE day BETWEEN ? AND ?",
                                     (first_day, last_day)))

    def search(self, term, limit):
        """What matches term, at most limit per category: (stream, event
        name) pairs, single events, (stream, producer, whether the name
        matched), consumers. Contains ignores the case of ASCII letters;
        equals is exact."""
        if "\x00" in term:
            return [], [], [], []  # no name or ID holds one, and stored JSON escapes it
        with self.reading() as conn:
            # lower() of SQLite folds ASCII letters only, as "contains" asks.
            pairs = conn.execute(
                "SELECT s.name, c.event_name FROM event_counts c JOIN streams s USING (stream_id)"
                " WHERE instr(lower(c.event_name), lower(?)) ORDER BY s.name, c.event_name LIMIT ?",
                (term, limit)).fetchall()
            events = "SELECT s.name, e.event_name, e.event_id FROM events e JOIN streams s USING (stream_id)"
            single = conn.execute(events + " WHERE e.event_id = ?", (term,)).fetchall()
            single += conn.execute(
                events + " WHERE instr(lower(substr(e.envelope, e.payload_start, e.payload_size)), lower(?))"
                " AND e.event_id != ? ORDER BY e.event_pk DESC LIMIT ?",
                (term, term, max(0, limit - len(pairs) - len(single)))).fetchall()
            # Plain "?" only: Python 3.12 deprecates numbered ones ("?1") given a sequence.
            streams = conn.execute(
                "SELECT name, producer_id, instr(lower(name), lower(?)) > 0 FROM streams"
                " WHERE instr(lower(name), lower(?)) OR producer_id = ? ORDER BY name LIMIT ?",
                (term, term, term, limit)).fetchall()
            consumers = conn.execute(
                "SELECT DISTINCT s.name, o.consumer_id FROM consumer_offsets o JOIN streams s USING (stream_id)"
                " WHERE o.consumer_id = ? ORDER BY s.name LIMIT ?", (term, limit)).fetchall()
        return pairs, single, streams, consumers

    def search_like(self, term, limit, payload_text):
        """What the Go server's search finds for term, at most limit per
        category. Its "contains" is LIKE '%term%': % and _ in term are
        wildcards and a backslash escapes the next character (ASCII letters
        match either case). (stream, event name) pairs whose name matches;
        events whose name does not but whose ID equals term or whose payload,
        as payload_text writes it, matches; (stream, producer, whether the
        name matched) for streams matching by name or by producer ID equal to
        term; (stream, consumer) for the consumer ID equal to term."""
        # Named parameters, given a dict: Python 3.12 deprecates numbered ones ("?1") given a sequence.
        values = {"pattern": "%" + term + "%", "term": term, "limit": limit}
        with self.reading() as conn:
            conn.create_function("payload_text", 1, payload_text)
            like = "LIKE :pattern ESCAPE '\\'"
            pairs = conn.execute(
                "SELECT s.name, c.event_name FROM event_counts c JOIN streams s USING (stream_id)"
                f" WHERE c.event_name {like} ORDER BY s.name, c.event_name LIMIT :limit", values).fetchall()
            single = conn.execute(
                "SELECT s.name, e.event_name, e.event_id FROM events e JOIN streams s USING (stream_id)"
                f" WHERE NOT e.event_name {like} AND (e.event_id = :term"
                f"  OR payload_text(substr(e.envelope, e.payload_start, e.payload_size)) {like})"
                " ORDER BY e.event_pk LIMIT :limit", values).fetchall()
            streams = conn.execute(
                f"SELECT name, producer_id, name {like} FROM streams WHERE name {like} OR producer_id = :term"
                " ORDER BY stream_id LIMIT :limit", values).fetchall()
            consumers = conn.execute(
                "SELECT DISTINCT s.name, o.consumer_id FROM consumer_offsets o JOIN streams s USING (stream_id)"
                " WHERE o.consumer_id = :term ORDER BY s.name LIMIT :limit", values).fetchall()
        return pairs, single, streams, consumers

    def events_since(self, stream, since, limit, max_consumers):
        """The stream's newest events created at or after since, newest first,
        each with the sorted IDs of the consumers past it, the first
        max_consumers of them: (event_id, event_name, created_at, [consumer IDs])."""
        with self.reading() as conn:
            stream_id = self._stream_id(stream)
            events = conn.execute(
                "SELECT event_id, event_name, sequence, created_at FROM events"
                " WHERE stream_id = ? AND created_at >= ? ORDER BY created_at DESC, event_pk DESC LIMIT ?",
                (stream_id, since, limit)).fetchall()
            offsets = {}  # event name -> [(offset, consumer)], furthest first
            for name, consumer, offset in conn.execute(
                    "SELECT event_name, consumer_id, consumer_offset FROM consumer_offsets"
                    " WHERE stream_id = ? ORDER BY event_name, consumer_offset DESC", (stream_id,)):
                offsets.setdefault(name, []).append((offset, consumer))
        # From the highest sequence down, the consumers past an event are those past the one
        # above it and some more: each is added once, to the first max_consumers IDs in order
        # (not events x consumers steps, with thousands of consumers).
        past = {}  # event_id -> its consumer IDs
        taken = {}  # event name -> [consumers taken from offsets, the first IDs of those, sorted]
        for event_id, name, sequence, _ in sorted(events, key=lambda event: -event[2]):
            ahead = offsets.get(name, ())
            state = taken.setdefault(name, [0, []])
            while state[0] < len(ahead) and ahead[state[0]][0] >= sequence:
                bisect.insort(state[1], ahead[state[0]][1])
                del state[1][max_consumers:]
                state[0] += 1
            past[event_id] = list(state[1])
        return [(event_id, name, created_at, past[event_id]) for event_id, name, _, created_at in events]

    # -- between tests (--allow-reset) ----------------------------------------

    def reset(self):
        """Remove every stream, event, consumer offset and idempotency key, in
        one transaction: the store is as new (long polls are answered)."""
        def work(tx):
            for table in ("daily_counts", *STREAM_TABLES):
                tx.execute(f"DELETE FROM {table}")
            tx.forget()

        self.transact(work)

    def remove_stream(self, stream):
        """Remove one stream with its events, offsets and idempotency keys, in
        one transaction; its name is free for any producer after."""
        def work(tx):
            stream_id = self._stream_id(stream, tx)
            for day, count in tx.execute("SELECT substr(created_at, 1, 10), count(*) FROM events"
                                         " WHERE stream_id = ? GROUP BY 1", (stream_id,)).fetchall():
                tx.execute("UPDATE daily_counts SET count = count - ? WHERE day = ?", (count, day))
            tx.execute("DELETE FROM daily_counts WHERE count <= 0")
            for table in STREAM_TABLES:
                tx.execute(f"DELETE FROM {table} WHERE stream_id = ?", (stream_id,))
            tx.forget(stream_id)

        self.transact(work)

    def health_problem(self):
        """Why the database does not answer, or cannot be written, or None."""
        problem = self.read_only or self.file_problem()
        if problem is not None:
            return problem
        full = self._disk_full
        if full is not None and _free_bytes(self.path) < full + DISK_FREED_BYTES:
            return f"the disk holding {self.path} is full: writes get 507 until space is freed"
        try:
            with self.reading(quick=True) as conn:
                conn.execute("SELECT count(*) FROM streams").fetchone()
        except (sqlite3.Error, HTTPError) as error:
            return f"the database does not answer: {error}"
        return None



def _lock_exclusively(path):
    """A descriptor of the database file holding an exclusive flock on it, so
    that a second server on the same file stops at start (the store keeps its
    state in memory: it must be the only writer). flock is apart from
    SQLite's own POSIX locks; the descriptor stays open until the store's
    connections are closed, as closing any descriptor of a file drops the
    POSIX locks a process holds on it."""
    if fcntl is None:  # not on this platform: one server per file is then the user's care
        return None
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise StoreError(f"database {path} is in use by another eventserver") from None
    return descriptor


def _file_identity(path):
    status = os.stat(path)
    return status.st_dev, status.st_ino


def _identity_or_none(path):
    try:
        return _file_identity(path)
    except OSError:
        return None


def _free_bytes(path):
    """Bytes free for the server on the file system of path (0 if it cannot tell)."""
    try:
        status = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except (OSError, AttributeError):  # statvfs: not on Windows
        return 0
    return status.f_bavail * status.f_frsize


DISK_FREED_BYTES = 1048576  # freed since a write failed for want of space: health says OK again


# HTTP ########################################################################
#
# The routing table first, then its handlers in its order (each parses the
# request, calls one Store method and returns a Reply), then the framing:
# Request and Reply, the Router, the App that all requests share, and the
# Handler that reads requests off a connection and writes their answers.

JSON_TYPE = "application/json; charset=utf-8"
CHALLENGE = ("WWW-Authenticate", 'Basic realm="eventserver"')
DASHBOARD_HEADER = "X-Eventserver-Dashboard"  # on the dashboard's own API requests
IDEMPOTENCY_HEADERS = ("Idempotency-Key", "ES-EventId", "Nats-Msg-Id")

SEARCH_LIMIT = 100
PERIODS = {"6hour": 6, "24hour": 24, "2day": 48, "7day": 7 * 24, "14day": 14 * 24, "1month": 30 * 24}
PERIOD_LIMIT = 1000

MAX_HEADERS = 100
MAX_LINE = 65536  # a chunk-size or trailer line of a chunked body
# A request line: a method token, the target (visible ASCII), the version, one space between.
_REQUEST_LINE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([!-~]+) (HTTP/[0-9]\.[0-9])\Z")
HEAD_READ, HEAD_REFUSED, HEAD_CUT = "read", "refused", "cut"  # what parse_request made of a head
_SINGLE_HEADERS = {"content-length", "transfer-encoding", "authorization", "content-type", "host"}

LINGER_SECONDS, LINGER_BYTES = 2.0, 64 * 1048576  # see Handler._linger

# A client that went away, stalled past the timeout or spoke no TLS: nobody to answer,
# and not the server's error. (socket.timeout is TimeoutError only from Python 3.10.)
CLIENT_GONE = (ConnectionError, TimeoutError, socket.timeout, BlockingIOError, ssl.SSLError)

SEND_AT_ONCE = getattr(socket, "MSG_DONTWAIT", 0)  # a send flag: fail rather than wait for room
POLL_SECONDS = 0.05  # how often the accept loop looks whether to stop: a stop takes at most this


# -- the routing table: method, path pattern, handler --------------------------

ROUTES = [
    ("GET",  "/api/v1/health",                               "health"),
    ("POST", "/api/v1/streams/{stream}/events",              "publish"),
    ("GET",  "/api/v1/streams/{stream}/events",              "read_events"),
    ("POST", "/api/v1/streams/{stream}/events/{event_id}",   "ack"),
    ("GET",  "/api/v1/streams",                              "list_streams"),
    ("GET",  "/api/v1/metrics",                              "metrics"),
    ("GET",  "/api/v1/consumers/{stream}",                   "consumers"),
    ("GET",  "/api/v1/consumers",                            "consumers"),  # ?stream=: see Request.stream
    ("GET",  "/api/v1/stats/events-per-stream",              "events_per_stream"),
    ("GET",  "/api/v1/stats/stream-data",                    "stream_data"),
    ("GET",  "/api/v1/stats/events-current-month",           "events_current_month"),
    ("GET",  "/api/v1/search",                               "search"),
    ("POST", "/api/v1/search",                               "search"),
    ("GET",  "/api/v1/event-period-search/{stream}",         "event_period_search"),
    ("POST", "/api/v1/event-period-search/{stream}",         "event_period_search"),
    ("GET",  "/api/v1/event-period-search",                  "event_period_search"),  # ?stream=
    ("POST", "/api/v1/event-period-search",                  "event_period_search"),
    ("POST", "/api/v1/{stream}/{consumer_id}/{event_name}/change/{offset}", "change_offset"),
    ("GET",  "/api/v1/events/{event_id}/payload",            "event_payload"),
    ("GET",  "/",                                            "dashboard"),
    ("GET",  "/admin",                                       "dashboard"),
    ("GET",  "/admin/streams",                               "dashboard"),
    ("GET",  "/admin/streams/{stream}/events",               "dashboard"),
    ("GET",  "/admin/streams/{stream}/consumers",            "dashboard"),
]

# Only with --allow-reset, for test suites: without it these are unknown routes.
RESET_ROUTES = [
    ("POST",   "/api/v1/reset",                              "reset"),
    ("DELETE", "/api/v1/streams/{stream}",                   "remove_stream"),
]

PUBLIC = {"health"}  # answered without credentials


# -- handlers, in the order of the table ----------------------------------------

def health(request):
    problem = request.app.store.health_problem()
    if problem is None:
        return json_reply({"status": "OK"})
    return json_reply({"status": "ERROR", "error": problem}, 503)


def publish(request):
    producer_id = request.client("X-Producer-ID")
    stream = request.stream()
    key = request.idempotency_key()
    body = parse_json(request.body, request.headers.get("Content-Type"))
    batch, envelopes = isinstance(body, list), parse_envelopes(body)
    del body  # a batch's parsed JSON (some 2 MB of objects) need not live on while the write waits for its commit
    event_ids = [new_event_id() for _ in envelopes]
    return request.write(
        lambda answer: request.app.store.publish(stream, producer_id, envelopes, key, answer, event_ids),
        lambda stored: json_reply(stored if batch else stored[0]), expected=event_ids)


def read_events(request):
    consumer_id = request.client("X-Consumer-ID")
    stream = request.stream()
    event_name = check_name("eventName", request.arg("eventName"))
    limit = min(check_count("limit", request.arg("limit"), 1), request.app.config.max_limit)
    wait = request.arg("wait")
    store = request.app.store
    if wait is None:
        return Reply(200, store.read(stream, event_name, consumer_id, limit, request.app.config.max_answer))
    seconds = _wait_seconds(wait, request.app.config.max_wait)
    return Reply(200, store.wait_and_read(stream, event_name, consumer_id, limit, request.app.config.max_answer,
                                          seconds,
                                          request.app.stopping.is_set))


def ack(request):
    consumer_id = request.client("X-Consumer-ID")
    stream = request.stream()
    event_id = check_event_id(request.params["event_id"])
    content_type = (request.headers.get("Content-Type") or "").partition(";")[0].strip().lower()
    if content_type == "application/x-www-form-urlencoded":
        try:
            form = urllib.parse.parse_qs(request.body.decode("utf-8"), errors="strict")
        except UnicodeError:
            raise bad_request("body is not valid UTF-8") from None
        action = form.get("action", [None])[0]
    elif content_type == "application/json":
        body = parse_json(request.body, request.headers.get("Content-Type"))
        action = body.get("action") if isinstance(body, dict) else None
    else:
        raise bad_request("Content-Type must be application/x-www-form-urlencoded or application/json")
    if action != "ACK":
        raise bad_request("action must be ACK")
    return request.write(lambda answer: request.app.store.ack(stream, event_id, consumer_id, answer=answer),
                         lambda _: json_reply("OK"))


def list_streams(request):
    return list_reply(request, ({"streamName": s.name, "producerId": s.producer_id, "createdAt": s.created_at,
                                 "eventsCount": s.events, "consumers": s.consumers, "lag": s.lag}
                                for s in request.app.store.stream_totals()))


def metrics(request):
    store = request.app.store
    streams = store.stream_totals()
    offsets = store.all_offsets()
    families = [
        ("streams_total", "gauge", "Streams that have events.", [({}, len(streams))]),
        ("events_total", "counter", "Events stored, per stream and its producer.",
         [({"producerId": s.producer_id, "stream": s.name}, s.events) for s in streams]),
        ("consumers_total", "gauge", "Consumers with an offset in the stream.",
         [({"stream": s.name}, s.consumers) for s in streams]),
        ("consumer_offset", "gauge", "Sequence of the last event the consumer acknowledged.",
         [({"stream": stream, "consumerId": consumer, "eventName": name}, offset)
          for stream, consumer, name, offset, _ in offsets]),
        ("consumer_lag", "gauge", "Events of that name the consumer has not acknowledged.",
         [({"stream": stream, "consumerId": consumer, "eventName": name}, count - offset)
          for stream, consumer, name, offset, count in offsets]),
        ("long_polls_waiting", "gauge", "Long-poll reads waiting for an event.", [({}, store.waiters.count())]),
        ("log_lines_dropped_total", "counter", "Log lines dropped because stderr was not read.",
         [({}, LOG_LINES.dropped)]),
    ]
    lines = []
    for name, kind, text, samples in families:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            label_text = ",".join(f'{key}="{_label_value(text)}"' for key, text in labels.items())
            lines.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")
    return Reply(200, "\n".join(lines) + "\n", "text/plain; version=0.0.4; charset=utf-8")


def _label_value(text):
    """A Prometheus label value: backslash, double quote and newline escaped."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def consumers(request):
    rows = request.app.store.consumers(request.stream(), request.app.config.max_list)
    return list_reply(request, ({"consumerId": consumer, "offset": offset, "movedAt": moved_at, "eventName": name,
                                 "consumedPercentage": percentage(offset, count), "behind": count - offset}
                                for consumer, offset, moved_at, name, count in rows))


def percentage(part, whole):
    """part / whole * 100, rounded half away from zero to 2 places; 0 when whole is 0."""
    if whole <= 0:
        return 0
    hundredths = (part * 10000 * 2 + whole) // (2 * whole)  # exact integer rounding, half up
    return hundredths // 100 if hundredths % 100 == 0 else hundredths / 100  # 50, not 50.0, as Go writes it


def events_per_stream(request):
    ranked = sorted(request.app.store.stream_totals(), key=lambda s: (-s.events, s.name))
    return json_reply([{"label": s.name, "value": s.events} for s in ranked[:10]])


def stream_data(request):
    streams = request.app.store.stream_totals()
    largest = max((s.events for s in streams), default=0)
    return list_reply(request, ({"streamName": s.name, "eventsCount": s.events, "consumedEvents": s.consumed,
                                 "ranking": "\u272d" * -(-5 * s.events // largest) if largest else ""}
                                for s in streams))


def events_current_month(request):
    today = datetime.datetime.now(datetime.timezone.utc).date()
    first = today.replace(day=1)
    last = (first + datetime.timedelta(days=32)).replace(day=1) - datetime.timedelta(days=1)
    counts = request.app.store.daily_counts(first.isoformat(), last.isoformat())
    days, previous = [], None
    for number in range(first.day, last.day + 1):
        day = first.replace(day=number).isoformat()
        count = counts.get(day, 0)
        change = 0 if previous is None else count - previous
        days.append({"date": day, "eventCount": count, "progress": f"{change:+d}" if change else ""})
        previous = count
    return json_reply(days)


def search(request):
    term = request.arg("_q")
    if not term:
        raise bad_request("_q is missing")
    pairs, single, streams, consumers = request.app.store.search(term, SEARCH_LIMIT)
    path = _url_part
    results = [("events", f"{stream}/{name}", f"/admin/streams/{path(stream)}/events?eventName={path(name)}")
               for stream, name in pairs]
    results += [("events", f"{stream}/{name}", f"/admin/streams/{path(stream)}/events?eventId={event_id}")
                for stream, name, event_id in single]
    results += [("streams", stream,
                 f"/admin/streams/{path(stream)}/events" if by_name else f"/admin/streams?producerId={path(producer)}")
                for stream, producer, by_name in streams]
    results += [("consumers", f"{stream}/{consumer}",
                 f"/admin/streams/{path(stream)}/consumers?consumerId={path(consumer)}")
                for stream, consumer in consumers]
    return json_reply([{"search_result": {"label": label, "category": category, "url": url}}
                       for category, label, url in results])


def _url_part(text):
    return urllib.parse.quote(text, safe="")


def event_period_search(request):
    hours = PERIODS.get(request.arg("period"))
    if hours is None:
        raise bad_request("period is not supported or invalid")
    stream = request.stream()
    since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=hours)
    most = request.app.config.max_list
    rows = request.app.store.events_since(stream, since.isoformat(timespec="microseconds"),
                                          min(PERIOD_LIMIT, most), most)
    return list_reply(request, ({"eventId": event_id, "eventName": name, "createdAt": created_at,
                                 "consumerIds": consumer_ids}
                                for event_id, name, created_at, consumer_ids in rows))


def change_offset(request):
    stream = request.stream()
    consumer_id = check_token("consumer ID", request.params["consumer_id"])
    event_name = check_name("event name", request.params["event_name"])
    offset = check_count("offset", request.params["offset"], 0)
    request.app.store.seek(stream, consumer_id, event_name, offset)
    return json_reply(f"successfully updated offset to {offset} for consumer {consumer_id}")


def event_payload(request):
    return Reply(200, request.app.store.envelope(check_event_id(request.params["event_id"])))


def dashboard(request):
    return Reply(200, DASHBOARD_HTML, "text/html; charset=utf-8", DASHBOARD_HEADERS)


def reset(request):
    request.app.store.reset()
    return json_reply("OK")


def remove_stream(request):
    request.app.store.remove_stream(request.stream())
    return json_reply("OK")


# -- framing -------------------------------------------------------------------

class Request:
    """What a handler needs of a request: path parameters, query, headers, body."""

    __slots__ = ("app", "params", "query", "headers", "body", "client_id", "_handler")

    def __init__(self, app, params, query, headers, body, handler=None):
        self.app, self.params, self.query, self.headers, self.body = app, params, query, headers, body
        self.client_id = ""
        self._handler = handler  # the connection's, where the writer thread may send the reply

    def write(self, write, make_reply, expected=None):
        """The reply of a write: make_reply(write(answer)), where write calls
        a Store verb with answer, so that the writer thread can send the
        reply itself right after the commit (an EarlyReply, then returned).
        expected: the result the write will have unless it fails or is a
        retry; its reply is made now, in this thread, not in the writer's."""
        answer = EarlyReply(self._handler, make_reply, expected) if self._handler else None
        result = write(answer)
        return answer if answer is not None and answer.reply is not None else make_reply(result)

    def header(self, name):
        """A header's value read as UTF-8 ('' when absent)."""
        value = self.headers.get(name)
        if value is None:
            return ""
        try:
            return value.encode("latin-1").decode("utf-8").strip(" \t")
        except UnicodeError:
            raise bad_request(f"header {name} is not valid UTF-8") from None

    def arg(self, name):
        """The first value of a query parameter, or None."""
        values = self.query.get(name)
        return values[0] if values else None

    def client(self, header):
        """The producer or consumer ID in header (X-Producer-ID, X-Consumer-ID),
        remembered for the access log."""
        self.client_id = check_token(header, self.header(header))
        return self.client_id

    def idempotency_key(self):
        """The publish's idempotency key, under any of its accepted names, or None."""
        for name in IDEMPOTENCY_HEADERS:
            if name in self.headers:
                return check_token(name, self.header(name))
        return None

    def stream(self):
        """The stream named in the path, or else in the query (?stream=): a
        browser turns a path segment "." or ".." (even as %2E) into a move up
        the path, so the dashboard names streams in the query."""
        name = self.params.get("stream")
        return check_name("stream name", self.arg("stream") if name is None else name)


class Reply:
    """A response: status, body bytes, content type (None: no Content-Type)."""

    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status, body, content_type=JSON_TYPE, headers=()):
        self.status, self.content_type, self.headers = status, content_type, headers
        self.body = body.encode("utf-8") if isinstance(body, str) else body


def parse_query(text):
    """{name: [values]} of a query string, as HTML forms encode it; a
    name given twice keeps every value, the first counts."""
    query = {}
    if text:
        try:
            for pair in text.split("&"):
                name, _, value = pair.partition("=")
                if "%" in pair or "+" in pair:
                    name = urllib.parse.unquote_plus(name, errors="strict")
                    value = urllib.parse.unquote_plus(value, errors="strict")
                query.setdefault(name, []).append(value)
        except UnicodeError:
            raise bad_request("query is not valid UTF-8 after percent-decoding") from None
    return query


_REPLY_JSON = json.JSONEncoder(ensure_ascii=False)


def json_reply(value, status=200):
    return Reply(status, _REPLY_JSON.encode(value))


def list_reply(request, items):
    """A JSON array of the first items, at most --max-list of them and no
    more than --max-answer bytes: fewer items, never an error. Encoded one
    by one: a list too long is never built whole."""
    config = request.app.config
    pieces, size = [], 2
    for item in itertools.islice(items, config.max_list):
        piece = _REPLY_JSON.encode(item).encode("utf-8")
        size += len(piece) + 2
        if size > config.max_answer:
            break
        pieces.append(piece)
    return Reply(200, b"[" + b", ".join(pieces) + b"]")


def error_reply(error):
    return Reply(error.status, _REPLY_JSON.encode(error.text), headers=error.headers)


class Router:
    """Matches a path against a routing table (its handlers named, as
    functions of this module): literal segments, and {name} segments
    captured percent-decoded (UTF-8)."""

    def __init__(self, routes):
        self._routes = {}  # segment count -> [(method, segments, handler)]
        for method, pattern, name in routes:
            segments = pattern.strip("/").split("/")
            self._routes.setdefault(len(segments), []).append((method, segments, globals()[name]))

    def match(self, method, path):
        """(handler, params) for method and path; 404 or 405 otherwise."""
        segments = path.strip("/").split("/")
        allowed = []
        for route_method, pattern, handler in self._routes.get(len(segments), ()):
            params = {}
            for want, got in zip(pattern, segments):
                if want.startswith("{"):
                    if not got:
                        break
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                if route_method in (method, "*"):
                    return handler, params
                allowed.append(route_method)
        if allowed:
            raise HTTPError(405, headers=[("Allow", ", ".join(sorted(set(allowed))))])
        raise HTTPError(404)

    @staticmethod
    def decode(params):
        """The path parameters percent-decoded as UTF-8 (a 400 when they are not)."""
        try:
            return {key: urllib.parse.unquote(value, errors="strict") for key, value in params.items()}
        except UnicodeError:
            raise bad_request("path is not valid UTF-8 after percent-decoding") from None


SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}  # they change nothing: any page may send them
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"http": "80", "https": "443"}


def _split_host(text):
    """(name, port or None) of a Host header or an Origin's authority:
    lowercase, without brackets, user information or a final dot."""
    text = text.rpartition("@")[2].strip().lower()
    if text.startswith("["):
        name, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif text.count(":") == 1:
        name, _, port = text.partition(":")
    else:
        name, port = text, None
    return name.rstrip("."), port or None


def _is_loopback_name(name):
    """localhost (and its subdomains, RFC 6761), 127.0.0.0/8 or ::1."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _same_origin(origin, host):
    """Whether an Origin header names the server the request was sent to
    (its Host): the same name, and the same port where either gives one."""
    scheme, sep, authority = origin.strip().partition("://")
    if not sep or host is None:
        return False  # "null" (a sandboxed or file: page), or nothing to compare with
    default = DEFAULT_PORTS.get(scheme.lower())
    origin_name, origin_port = _split_host(authority)
    host_name, host_port = _split_host(host)
    return origin_name == host_name and (origin_port or default) == (host_port or default)


class App:
    """The server's state shared by all requests: config, store, the
    dialect and its router, and the count of requests in flight (so
    shutdown can wait for them)."""

    def __init__(self, config, store):
        self.config = config
        self.store = store
        self.dialect = DIALECTS[config.compat]
        self.router = Router(self.dialect.routes + (RESET_ROUTES if config.allow_reset else []))
        self.stopping = threading.Event()
        self._in_flight = set()  # handlers serving a request
        self._connections = set()  # handlers of every open connection
        self._user = config.user.encode("utf-8")
        self._password = config.password.encode("utf-8")
        self._expected = ("Basic " + base64.b64encode(self._user + b":" + self._password).decode()).encode()
        # Bound to loopback, or told its names: only those Hosts are answered (see check_host).
        self._hosts_checked = config.allowed_hosts is not None or _is_loopback_name(config.host.lower())
        self._hosts = LOOPBACK_HOSTS | (config.allowed_hosts or frozenset())
        self._hosts_seen = set()

    def check_host(self, host):
        """403 for a Host this server is not known by. A page of another
        site whose name the attacker points at this address (DNS
        rebinding) sends its own name: without this check it could read
        and write a server on loopback with the browser's credentials."""
        if host is None or not self._hosts_checked or host in self._hosts_seen:
            return  # HTTP/1.0 without Host: no browser sends that
        name, _ = _split_host(host)
        if name not in self._hosts and not _is_loopback_name(name):
            raise HTTPError(403, f"Host {host[:100]} is not a name of this server (see --allowed-hosts)")
        if len(self._hosts_seen) < 64:
            self._hosts_seen.add(host)  # answered before: the usual Host needs no parsing

    def check_origin(self, headers, host):
        """403 for a request that changes something and comes from a page of
        another origin (a form on another site, in a browser holding the
        user's credentials: CSRF). Browsers say where a request comes from
        (Origin, Sec-Fetch-Site); clients that say nothing are not browsers."""
        origin, fetch_site = headers.get("Origin"), headers.get("Sec-Fetch-Site")
        if origin is None and fetch_site is None:
            return
        if fetch_site is not None and fetch_site.strip().lower() == "cross-site":
            raise HTTPError(403, "cross-origin request (Sec-Fetch-Site: cross-site): only this server's "
                                 "own pages may change anything")
        if origin is not None and not _same_origin(origin, host):
            raise HTTPError(403, f"cross-origin request (Origin {origin[:100]}): only this server's "
                                 "own pages may change anything")

    def authorized(self, header):
        """Basic auth, compared in constant time."""
        if hmac.compare_digest((header or "").encode("latin-1"), self._expected):
            return True  # the usual spelling; others are decoded below
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        same_user = hmac.compare_digest(user, self._user)
        same_password = hmac.compare_digest(password, self._password)
        return bool(sep) and same_user and same_password

    def begin(self, handler):
        """Count a request in; False when the server is stopping."""
        self._in_flight.add(handler)  # a set's add and discard are atomic: no lock to contend for
        if self.stopping.is_set():
            self._in_flight.discard(handler)
            return False
        return True

    def end(self, handler):
        self._in_flight.discard(handler)

    def drain(self, timeout):
        """Refuse new requests, release long polls, wait for the rest to finish."""
        self.stopping.set()
        self.store.waiters.wake_all()
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.01)

    def connected(self, handler):
        self._connections.add(handler)

    def disconnected(self, handler):
        self._connections.discard(handler)

    def close_connections(self):
        """Cut the connections still open (idle keep-alives, once drained):
        their threads end now, not when --timeout runs out."""
        for handler in list(self._connections):
            with contextlib.suppress(OSError):
                socket.socket.shutdown(handler.connection, socket.SHUT_RDWR)  # the thread's recv returns


class Headers(dict):
    """Request headers by lowercase name: get() and `in` ignore case."""

    def add(self, name, value):
        """Keep the first value; False when a header that must be single repeats."""
        key = name.lower()
        if dict.__contains__(self, key):
            return key not in _SINGLE_HEADERS
        self[key] = value
        return True

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)

    def __contains__(self, name):
        return dict.__contains__(self, name.lower())


class Handler(http.server.BaseHTTPRequestHandler):
    """HTTP framing only: routing, auth, body limits, dispatch, the response."""

    protocol_version = "HTTP/1.1"
    server_version = f"eventserver/{__version__}"
    disable_nagle_algorithm = True  # else a keep-alive response can wait 40 ms for a delayed ACK

    def __getattr__(self, name):
        if name.startswith("do_"):  # every method goes through the router: 404/405, never 501
            return self._dispatch
        raise AttributeError(name)

    def setup(self):
        super().setup()
        self._body_unread = False
        self.head_lock = threading.Lock()  # see HeadDeadlines
        seconds = self.server.app.config.timeout
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.settimeout(seconds or None)
            self.server.deadlines.watch(self)  # a handshake dripped byte by byte ends too
            try:
                self.connection.do_handshake()
            finally:
                self.server.deadlines.unwatch(self)
        elif seconds:
            _kernel_timeout(self.connection, seconds)
        self.server.app.connected(self)
        # Whether the writer thread may send a reply on this connection: where a send can be
        # told not to wait (MSG_DONTWAIT, and no Python-level timeout, which would poll first).
        self._early_replies = bool(SEND_AT_ONCE) and not isinstance(self.connection, ssl.SSLSocket) \
            and self.connection.gettimeout() is None

    def handle_one_request(self):
        """Wait (up to --timeout) for a request to begin, then read its head
        against the head deadline and budget, then dispatch it."""
        try:
            if not self.rfile.peek(1):  # idle past the timeout, or hung up: close quietly
                self.close_connection = True
                return
            deadlines = self.server.deadlines
            deadlines.watch(self)
            try:
                head = self.parse_request()
            finally:
                in_time = deadlines.unwatch(self)
            if not in_time and head is not HEAD_REFUSED:
                self.send_error(408, f"the request head did not arrive within "
                                     f"{self.server.app.config.head_timeout:g} s")
            elif head is HEAD_READ:
                self._dispatch()
        except CLIENT_GONE:
            self.close_connection = True

    def parse_request(self):
        """The request line and headers, within the head budget (--max-head in
        all, so a connection that never authenticates holds at most that):
        HEAD_READ, HEAD_REFUSED (answered) or HEAD_CUT (nobody to answer).
        The standard library parses headers with the email package, which
        costs more than all the rest of a small request; a header is one line
        here, so a split does."""
        self.command, self.request_version, self.close_connection = None, "HTTP/1.1", True
        self.requestline = ""
        budget = self.server.app.config.max_head
        readline = self.rfile.readline
        self.raw_requestline = line = readline(budget + 1)
        used = len(line)
        if used > budget:
            return self._refuse_head(431, f"the request head is larger than {budget} bytes")
        if not line.endswith(b"\n"):
            return HEAD_CUT  # cut off by a timeout or a hang-up: nobody to answer
        self.requestline = str(line, "iso-8859-1").rstrip("\r\n")
        words = _REQUEST_LINE.match(self.requestline)
        if words is None:
            if not self.requestline.isascii():
                return self._refuse_head(400, "the request target must be ASCII: percent-encode other characters")
            return self._refuse_head(400, f"bad request line {self.requestline[:100]!r}")
        self.command, target, version = words.groups()
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            return self._refuse_head(505, f"{version} is not supported")
        self.request_version = version
        self.path, self.authority = _origin_form(target)
        headers = Headers()
        for _ in range(MAX_HEADERS + 1):
            line = readline(budget - used + 1)
            used += len(line)
            if line == b"\r\n" or line == b"\n":
                break
            if used > budget:
                return self._refuse_head(431, f"the request head is larger than {budget} bytes")
            if not line.endswith(b"\n"):
                return HEAD_CUT
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon or not name or name != name.strip():
                return self._refuse_head(400, "bad header line")
            if not headers.add(name, value.strip(" \t\r\n")):
                return self._refuse_head(400, f"header {name} appears twice")
        else:
            return self._refuse_head(431, f"more than {MAX_HEADERS} headers")
        self.headers = headers
        host = headers.get("Host")
        if version == "HTTP/1.1" and not host:
            return self._refuse_head(400, "an HTTP/1.1 request needs a Host header")
        self.host = self.authority if self.authority is not None else host
        connection = headers.get("Connection", "").lower()
        self.close_connection = connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive")
        return HEAD_READ

    def _refuse_head(self, status, detail):
        self.send_error(status, detail)
        return HEAD_REFUSED

    def _dispatch(self):
        app = self.server.app
        self._started = time.perf_counter()
        self._body_unread = self.headers.get("Content-Length") not in (None, "0") \
            or "Transfer-Encoding" in self.headers
        self.client_id = ""
        if not app.begin(self):
            self.close_connection = True
            self._answer(error_reply(HTTPError(503, "the server is stopping")))
            return
        try:
            reply = self._handle(app)
        except CLIENT_GONE:
            app.end(self)
            self.close_connection = True
            return
        self._answer(reply)

    # The usual methods, found without a detour through __getattr__ (a cost on every request).
    do_GET = do_POST = do_HEAD = _dispatch

    def _answer(self, reply):
        """Send the reply (what the writer thread did not send of an
        EarlyReply), log it, then count the request out: a server that stops
        waits for both, so the last requests' lines are not lost."""
        app = self.server.app
        try:
            if isinstance(reply, EarlyReply):
                reply, rest = reply.reply, reply.rest
                if rest:
                    self.wfile.write(rest)
            else:
                self.wfile.write(self._encode(reply))
            if not app.config.quiet:
                log_access(self, reply, (time.perf_counter() - self._started) * 1000)
        finally:
            app.end(self)

    def _handle(self, app):
        """Route, authenticate, read the body, call the handler: its Reply,
        or the error's (never a traceback)."""
        dialect = app.dialect
        try:
            app.check_host(self.host)
            path, _, query_text = self.path.partition("?")
            handler, params = dialect.route(app.router, self.command, path, query_text)
            if self.command not in SAFE_METHODS:
                app.check_origin(self.headers, self.host)
            dialect.check_headers(handler.__name__, self.headers)
            if handler.__name__ not in dialect.public and not app.authorized(self.headers.get("Authorization")):
                raise dialect.unauthorized(handler.__name__, self.headers)
            body = self._read_body(app.config.max_body, dialect.reads_chunked)
            request = Request(app, dialect.decode(params), dialect.parse_query(query_text), self.headers, body,
                              self if self._early_replies else None)
            try:
                return handler(request)
            finally:
                self.client_id = request.client_id
        except HTTPError as error:
            return dialect.error_reply(error)
        except CLIENT_GONE:
            raise
        except Exception:
            log.exception("error handling %s %s", self.command, self.path)
            return dialect.error_reply(HTTPError(500, "see the server log"))

    def _read_body(self, max_body, reads_chunked=False):
        if "Transfer-Encoding" in self.headers:
            if reads_chunked and self.headers.get("Transfer-Encoding").strip().lower() == "chunked":
                return self._read_chunked(max_body)
            raise HTTPError(411)
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return b""
        if not _DIGITS.match(length_text.strip()):
            raise bad_request("Content-Length must be a non-negative integer")
        length = digits_value(length_text.strip())
        if length > max_body:
            raise HTTPError(413, str(max_body))
        if self.request_version == "HTTP/1.1" and self.headers.get("Expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self.rfile.read(length)
        if body is None or len(body) < length:  # the client stalled past the timeout, or hung up
            raise TimeoutError("the body stopped short of its Content-Length")
        self._body_unread = False
        return body

    def _read_chunked(self, max_body):
        """A body sent in chunks (Transfer-Encoding: chunked), at most max_body bytes."""
        if self.request_version == "HTTP/1.1" and self.headers.get("Expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = bytearray()
        while True:
            line = self.rfile.readline(MAX_LINE + 1)
            if not line.endswith(b"\n"):
                raise TimeoutError("the body stopped before its last chunk")
            size_text = line.split(b";")[0].strip()
            if not _HEX.match(size_text):
                raise bad_request("a chunk size is not hexadecimal")
            size = int(size_text, 16) if len(size_text) <= 15 else max_body + 1
            if size == 0:
                break
            if len(body) + size > max_body:
                raise HTTPError(413, str(max_body))
            chunk = self.rfile.read(size + 2)
            if chunk is None or len(chunk) < size + 2:
                raise TimeoutError("the body stopped short of a chunk")
            body += chunk[:size]
        for _ in range(MAX_HEADERS + 1):  # trailer lines, up to the empty one
            line = self.rfile.readline(MAX_LINE + 1)
            if not line.endswith(b"\n") or line.strip() == b"":
                break
        self._body_unread = False
        return bytes(body)

    def _encode(self, reply):
        """The bytes of a reply: head and body in one piece, for one write
        (no small packets for Nagle to hold back)."""
        if self._body_unread:  # we answered without reading the body: the connection cannot go on
            self.close_connection = True
        lines = [f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, 'Error')}",
                 f"Server: {self.server_version}",
                 f"Date: {_http_date()}"]
        if reply.content_type is not None:
            lines.append(f"Content-Type: {reply.content_type}")
        lines.append(f"Content-Length: {len(reply.body)}")
        lines.append("X-Content-Type-Options: nosniff")  # a browser takes JSON for JSON, never for a page
        lines.extend(f"{name}: {value}" for name, value in reply.headers)
        if self.close_connection:
            lines.append("Connection: close")
        elif self.request_version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        body = b"" if self.command == "HEAD" else reply.body  # HEAD: the head only, as HTTP says
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def send_error(self, code, message=None, explain=None):
        """A refused head (a bad request line, a head too large or too
        late...), as JSON like every other error; the connection closes."""
        self.close_connection = True
        self._body_unread = True
        detail = message if message and message != REASONS.get(code) else ""
        reply = self.server.app.dialect.error_reply(HTTPError(code, detail))
        if not self.server.app.config.quiet:  # queued before the client has the answer: a stop then keeps it
            self.client_id = ""
            log_access(self, reply, 0.0)
        with contextlib.suppress(OSError):
            self.wfile.write(self._encode(reply))

    def finish(self):
        try:
            super().finish()
            if self._body_unread:
                self._linger()
        finally:
            self.server.app.disconnected(self)

    def _linger(self):
        """Read and drop what the client still sends of a body refused unread
        (a 413, say), for a while: closing a socket with unread data resets
        the connection, and the client can lose the answer it was sent."""
        deadline, dropped = time.monotonic() + LINGER_SECONDS, 0
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)  # the answer is complete: the client sees the end
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.settimeout(LINGER_SECONDS)
            else:
                _kernel_timeout(self.connection, LINGER_SECONDS)
            while time.monotonic() < deadline and dropped < LINGER_BYTES:
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                dropped += len(chunk)

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), format % args)


_date_cache = [0, ""]


def _http_date():
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[1] = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
        _date_cache[0] = now
    return _date_cache[1]


class EarlyReply:
    """A write's reply, sent by the writer thread as soon as the write is
    committed, before the request's own thread is woken (see GroupCommit).
    The send never waits: what the socket does not take at once (rest) the
    request's thread sends once awake. The thread sleeps until then, so
    replies on a connection still go out in the order of its requests."""

    __slots__ = ("handler", "make_reply", "expected", "reply", "rest")

    def __init__(self, handler, make_reply, expected=None):
        self.handler, self.make_reply = handler, make_reply
        self.reply, self.rest = None, b""
        self.expected = None  # (result, reply, its bytes) made beforehand, in the request's thread
        if expected is not None:
            reply = make_reply(expected)
            self.expected = (expected, reply, handler._encode(reply))

    def __call__(self, result):
        """(In the writer thread.) Build the reply, unless made already for
        this result, and send what the socket takes."""
        if self.expected is not None and self.expected[0] == result:
            _, reply, data = self.expected
        else:
            reply = self.make_reply(result)
            data = self.handler._encode(reply)
        try:
            sent = self.handler.connection.send(data, SEND_AT_ONCE)
        except BlockingIOError:
            sent = 0
        self.reply, self.rest = reply, data[sent:]


def log_access(handler, reply, milliseconds):
    """One line per request on stderr: time, client address, method, path,
    status, body bytes, milliseconds, producer or consumer ID; for a request
    line that could not be read, "-" and the line (JSON: method null)."""
    if handler.server.app.config.log_format == "json":
        LOG_LINES.write(_LOG_JSON.encode({
            "time": utc_now()[:23] + "Z", "client": handler.client_address[0], "method": handler.command,
            "path": handler.path if handler.command else handler.requestline[:200], "status": reply.status,
            "bytes": len(reply.body), "ms": round(milliseconds, 1), "clientId": handler.client_id or None}) + "\n")
        return
    request = f"{handler.command} {handler.path}" if handler.command else f"- {handler.requestline[:200]!r}"
    LOG_LINES.write(f"{utc_now()[:23]}Z {handler.client_address[0]} {request}"
                    f" {reply.status} {len(reply.body)} {milliseconds:.1f}ms {handler.client_id or '-'}\n")


def _kernel_timeout(sock, seconds):
    """Let the kernel time out blocking reads and writes (SO_RCVTIMEO,
    SO_SNDTIMEO). A Python socket timeout polls before every recv and send:
    a system call and a GIL hand-over each, on every request. A read that
    times out then looks like the end of the request."""
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except (OSError, struct.error):
        sock.settimeout(seconds)


def _origin_form(target):
    """(path, authority) of a request target. An absolute-form target
    (http://host:port/path), which a server must accept (RFC 9112 3.2.2),
    gives its authority, which then stands for the Host header."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return target, None
    end = len(rest)
    for mark in "/?":
        found = rest.find(mark)
        if 0 <= found < end:
            end = found
    path = rest[end:]
    return (path if path.startswith("/") else "/" + path), rest[:end]


class HeadDeadlines:
    """The connections whose request head (or TLS handshake) is arriving,
    each with the moment it must be whole by (--head-timeout), and the
    thread that holds them to it. The kernel's read timeout (--timeout)
    cannot: it starts again with every byte, so a client dripping a byte a
    second would hold its connection and thread for good. A connection past
    its deadline has its reading side shut down, which wakes its thread from
    the read; that thread answers 408 and closes. Whoever takes a connection
    out of the table first, its own thread (in time) or this one (late),
    decides; the connection's head_lock makes taking it out and shutting it
    down one step, so a connection its thread has closed is never touched."""

    def __init__(self, seconds):
        self.seconds = seconds
        self._arriving = {}  # Handler -> deadline (time.monotonic()); in order of their deadlines
        self._stopped = threading.Event()
        if seconds:
            threading.Thread(target=self._run, name="deadlines", daemon=True).start()

    def watch(self, handler):
        if self.seconds:
            self._arriving[handler] = time.monotonic() + self.seconds

    def unwatch(self, handler):
        """True when the head arrived in time (or there is no deadline)."""
        if not self.seconds:
            return True
        with handler.head_lock:
            return self._arriving.pop(handler, None) is not None

    def _run(self):
        tick = min(0.25, self.seconds / 4)
        while not self._stopped.wait(tick):
            now = time.monotonic()
            for handler, deadline in list(self._arriving.items()):  # a copy: list() of a dict is atomic
                if deadline > now:
                    break
                with handler.head_lock:
                    if self._arriving.pop(handler, None) is not None:
                        with contextlib.suppress(OSError):
                            socket.socket.shutdown(handler.connection, socket.SHUT_RD)

    def close(self):
        self._stopped.set()


# accept() errors that mean the process (EMFILE) or the system (ENFILE) has no descriptor
# or buffer left: the connection stays in the backlog, so retrying at once would spin.
OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_BACKOFF_SECONDS = 0.1  # the longest the accept loop waits for a descriptor to be freed
WARN_EVERY_SECONDS = 60.0  # how often the server says again that it is full or out of descriptors


class Server(http.server.ThreadingHTTPServer):
    """A thread per connection, at most --max-connections of them (past
    that, a new connection gets 503 at once and is closed); a backlog long
    enough for bursts. When accept() finds no file descriptor left, the
    accept loop waits until a connection closes (or ACCEPT_BACKOFF_SECONDS)
    instead of retrying at once."""

    request_queue_size = 1024  # the default of 5 pushes p99 past a second under load
    daemon_threads = True

    def __init__(self, address, app):
        self.app = app
        self.deadlines = HeadDeadlines(app.config.head_timeout)
        self._connections = 0
        self._connections_lock = threading.Lock()
        self._connection_closed = threading.Event()  # descriptors may be free again
        self._warned = {}  # what was last warned about -> when (time.monotonic())
        super().__init__(address, Handler)

    def get_request(self):
        try:
            return super().get_request()
        except OSError as error:
            if error.errno in OUT_OF_DESCRIPTORS:
                self._warn("descriptors", f"cannot accept connections: {error.strerror} "
                                          "(raise the limit, ulimit -n, or lower --max-connections)")
                self._connection_closed.wait(ACCEPT_BACKOFF_SECONDS)
                self._connection_closed.clear()
            raise

    def process_request(self, request, client_address):
        with self._connections_lock:
            full = self._connections >= self.app.config.max_connections
            if not full:
                self._connections += 1
        if full:
            self._warn("full", f"{self._connections} connections, the most --max-connections allows: "
                               "new ones get 503")
            _refuse_connection(request, self.app.dialect.error_reply(HTTPError(
                503, f"the server has {self.app.config.max_connections} connections, its most: try again")))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # its thread did not start
            self._closed()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed()

    def _closed(self):
        with self._connections_lock:
            self._connections -= 1
        self._connection_closed.set()

    def _warn(self, what, message):
        now = time.monotonic()
        if now - self._warned.get(what, -WARN_EVERY_SECONDS) >= WARN_EVERY_SECONDS:
            self._warned[what] = now
            log.warning("%s", message)

    def server_close(self):
        super().server_close()
        self.deadlines.close()

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, CLIENT_GONE):
            return
        log.error("error serving %s", client_address[0], exc_info=True)


def _refuse_connection(sock, reply):
    """(In the accept thread.) A 503 for a connection past the cap, sent
    without waiting; over TLS, before any handshake, just the close."""
    if isinstance(sock, ssl.SSLSocket):
        return
    head = (f"HTTP/1.1 503 {REASONS[503]}\r\nServer: {Handler.server_version}\r\nContent-Type: {reply.content_type}"
            f"\r\nContent-Length: {len(reply.body)}\r\nX-Content-Type-Options: nosniff\r\nRetry-After: 1\r\n"
            "Connection: close\r\n\r\n")
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(head.encode("latin-1") + reply.body)
        sock.recv(65536)  # what the client sent already: closing on unread data would reset the answer away


def make_server(config, store):
    """A Server for config, bound and listening (OSError when the port is
    taken, ConfigError when the certificate cannot be loaded)."""
    server = Server((config.host, config.port), App(config, store))
    if config.certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(config.certfile, config.keyfile)
        except (OSError, ssl.SSLError) as error:
            server.server_close()
            raise ConfigError(f"cannot load --certfile/--keyfile: {error}") from None
        # The handshake happens in the connection's thread (Handler.setup), not in the accept loop.
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server


# Dialects ####################################################################
#
# How the server answers: as SPEC and the Go server's README say (README, the
# default), or as the Go server itself answers (GO, --compat go): the Go
# server of github pavbis/eventserver, read from its router, middlewares,
# handlers, validation tags and SQL. App picks one by config.compat; nothing
# else in the file asks which one is on. Everything that differs is in the
# two classes below and the Go routing table, whose handlers (go_*) follow:
# they call the same Store verbs, passing the two choices the Go server makes
# otherwise (Store.ack's retry_is_done, Store.seek's create) and searching
# with Store.search_like. The rest of the section is how the Go server and
# its libraries read and write (encoding/json, its types.Event, PostgreSQL's
# JSON, the Prometheus client).
#
# Where the Go server loses, corrupts or leaks data, or races, GO does not
# copy it: it gives the safe outcome in the Go server's wire format (the
# README lists each such departure under "Where --compat go differs").

class Dialect:
    """The default: routes, checks and answers as SPEC says."""

    routes = ROUTES
    public = PUBLIC  # handlers answered without credentials
    reads_chunked = False  # a chunked request body is a 411

    def route(self, router, method, path, query_text):
        """(handler, params) for a request."""
        return router.match(method, path)

    def decode(self, params):
        """The path parameters, decoded once the request may be served."""
        return Router.decode(params)

    def check_headers(self, handler_name, headers):
        """Checks of the request's headers made before authentication: none."""

    def unauthorized(self, handler_name, headers):
        return HTTPError(401, headers=[CHALLENGE])

    def parse_query(self, text):
        return parse_query(text)

    def error_reply(self, error):
        return error_reply(error)


GO_JSON_TYPE = "application/json; charset=utf-8"  # what its middleware demands, to the byte
GO_REPLY_TYPE = "application/json"  # what it answers with

# The Go server's router (api/server.go), in its order, then what this server adds.
GO_ROUTES = [
    ("GET",  "/api/v1/health",                               "go_health"),
    ("POST", "/api/v1/streams/{stream}/events",              "go_publish"),
    ("POST", "/api/v1/streams/{stream}/events/{event_id}",   "go_ack"),
    ("GET",  "/api/v1/streams/{stream}/events",              "go_read_events"),
    ("POST", "/api/v1/{stream}/{consumer_id}/{event_name}/change/{offset}", "go_change_offset"),
    ("GET",  "/api/v1/events/{event_id}/payload",            "go_event_payload"),
    ("GET",  "/api/v1/consumers/{stream}",                   "go_consumers"),
    ("GET",  "/api/v1/stats/events-per-stream",              "go_events_per_stream"),
    ("GET",  "/api/v1/stats/stream-data",                    "go_stream_data"),
    ("GET",  "/api/v1/stats/events-current-month",           "go_events_current_month"),
    ("POST", "/api/v1/search",                               "go_search"),
    ("POST", "/api/v1/event-period-search/{stream}",         "go_event_period_search"),
    ("*",    "/api/v1/metrics",                              "go_metrics"),  # any method
    # not the Go server's: the stream in the query, for the dashboard (see Request.stream) ...
    ("GET",  "/api/v1/consumers",                            "go_consumers"),
    ("POST", "/api/v1/event-period-search",                  "go_event_period_search"),
    # ... and the stream list and the dashboard, answered as by default
    ("GET",  "/api/v1/streams",                              "list_streams"),
    *[route for route in ROUTES if route[2] == "dashboard"],
]


class GoDialect(Dialect):
    """--compat go: routes, checks and answers as the Go server does.

    Its router is gorilla/mux: it matches the decoded path (%2F is a /),
    redirects a path that is not clean (// . ..) with a 301, answers an
    unknown path with a plain-text 404 and a wrong method with an empty 405.
    Its middleware checks Content-Type and Accept, to the byte, before Basic
    auth, and answers both in plain text. Its errors are {"error": "..."}.
    Publishing, reading and the rest are GO_ROUTES' handlers (go_*)."""

    routes = GO_ROUTES
    public = {"go_health", "go_metrics"}
    checked = {name for _, _, name in GO_ROUTES if name.startswith("go_")} - public
    reads_chunked = True  # Go's net/http reads them

    def route(self, router, method, path, query_text):
        if _GO_BAD_ESCAPE.search(path):  # net/http cannot parse the request target
            raise GoError("400 Bad Request", 400, plain=True, content_type="text/plain; charset=utf-8")
        decoded = urllib.parse.unquote_to_bytes(path).decode("utf-8", "surrogateescape")
        clean = _go_clean_path(decoded)
        if clean != decoded:
            raise GoRedirect(urllib.parse.quote(clean.encode("utf-8", "surrogateescape"), safe="/$&+,:;=@")
                             + ("?" + query_text if query_text else ""))
        if decoded != "/" and decoded.endswith("/"):  # no route ends with a slash
            raise HTTPError(404)
        return router.match(method, decoded)

    def decode(self, params):
        return params  # decoded before routing

    def check_headers(self, handler_name, headers):
        if handler_name in self.checked:
            if headers.get("Content-Type") != GO_JSON_TYPE:
                raise GoError(f"Content-Type header must be {GO_JSON_TYPE}", plain=True)
            if headers.get("Accept") != GO_JSON_TYPE:
                raise GoError(f"accept header must be {GO_JSON_TYPE}", plain=True)

    def unauthorized(self, handler_name, headers):
        if handler_name not in self.checked:
            return super().unauthorized(handler_name, headers)
        refusal = GoError("Unauthorized", 401, plain=True)  # without WWW-Authenticate...
        if DASHBOARD_HEADER in headers:  # ...but the dashboard's browser needs it to send what it has
            refusal.headers = (CHALLENGE,)
        return refusal

    def parse_query(self, text):
        return _go_query(text)

    def error_reply(self, error):
        if isinstance(error, GoRedirect):
            return Reply(301, b"", None, [("Location", error.location)])
        if isinstance(error, GoError):
            body = error.go_text if error.plain else go_json({"error": error.go_text})
            return Reply(error.status, body, error.content_type, error.headers)
        if error.status == 404 and not error.detail:  # no route: Go's http.NotFound
            return Reply(404, "404 page not found\n", "text/plain; charset=utf-8",
                         [("X-Content-Type-Options", "nosniff")])
        if error.status == 405 and not error.detail:
            return Reply(405, b"", None)
        if error.status == 401:
            return super().error_reply(error)
        # this server's own refusals (413, a stopping server...), in the Go server's error shape
        return Reply(error.status, go_json({"error": error.text}), GO_REPLY_TYPE)


class GoError(HTTPError):
    """A refusal worded as the Go server words it: {"error": text}, or text
    alone (plain) as its middleware writes it."""

    def __init__(self, text, status=400, plain=False, content_type=GO_REPLY_TYPE):
        super().__init__(status, text)
        self.go_text, self.plain, self.content_type = text, plain, content_type


class GoRedirect(HTTPError):
    """gorilla/mux's 301 to the clean form of a path."""

    def __init__(self, location):
        super().__init__(301, location)
        self.location = location


README, GO = Dialect(), GoDialect()
DIALECTS = {"readme": README, "go": GO}

# The Go server's error texts (api/input/errors.go and its handlers).
GO_BAD_CONSUMER = "missing or invalid consumer id provided"
GO_BAD_EVENT_ID = "missing or invalid event id provided"
GO_BAD_LIMIT = "limit argument is not valid"
GO_BAD_OFFSET = "offset argument is not valid"
GO_BAD_PERIOD = "period is not supported or invalid"
# Departures: what it cannot store, refused before anything is stored.
GO_PRODUCER_RULE = ("X-Producer-ID must be a UUID: the Go server keeps 36 characters of it, and locks a "
                    "producer with another ID out of its own stream")


def go_required(struct, *fields):
    """go-playground/validator's text for fields failing their 'required' tag."""
    return "\n".join(f"Key: '{struct}.{field}' Error:Field validation for '{field}' failed on the 'required' tag"
                     for field in fields)


# -- the Go server's handlers ----------------------------------------------------

def go_health(request):
    problem = request.app.store.health_problem()
    if problem is None:
        return go_reply({"status": "OK"})
    return go_reply({"status": "ERROR", "error": problem}, 503)  # never hidden, unlike the Go server


def go_publish(request):
    producer_id = request.headers.get("X-Producer-ID") or ""
    if not producer_id:
        raise GoError(go_required("ReceiveEventRequest", "XProducerID"))
    request.client_id = producer_id
    event = GoEvent.decode(request.body)
    stream, store = request.params["stream"], request.app.store
    problem = go_name_problem(stream, event.name)
    if problem:
        raise GoError(problem)
    if not _UUID.match(producer_id):
        raise GoError(GO_PRODUCER_RULE)
    owner = store.owner(stream)
    if owner is not None and owner != producer_id:
        raise GoError(f"stream is reserved for another producer {owner}")
    if len(stream) > MAX_NAME or len(event.name) > MAX_NAME:
        raise GoError(f"pq: value too long for type character varying({MAX_NAME})")
    if _holds_nul(event.stored):
        raise GoError("pq: unsupported Unicode escape sequence")  # jsonb refuses \u0000
    envelopes, event_ids = [Envelope(event.stored)], [new_event_id()]
    try:
        return request.write(lambda answer: store.publish(stream, producer_id, envelopes, answer=answer,
                                                          event_ids=event_ids),
                             lambda stored: go_reply({"uuid": stored[0]}, 201), expected=event_ids)
    except StreamOwned as error:  # another producer's first publish committed in between
        raise GoError(f"stream is reserved for another producer {error.owner}") from None


def go_ack(request):  # the body is not read: any body, or none, will do
    consumer_id = go_uuid(request.headers.get("X-Consumer-ID"), GO_BAD_CONSUMER)
    request.client_id = consumer_id
    event_id = go_uuid(request.params["event_id"], GO_BAD_EVENT_ID)
    stream = request.params["stream"]
    def moved(offset):
        return go_reply(f"Successfully moved offset to {offset} for cosumer id {consumer_id}")  # its typo

    try:  # a retried ACK is a mismatch too: the offset has moved past the event
        return request.write(lambda answer: request.app.store.ack(stream, event_id, consumer_id,
                                                                  retry_is_done=False, answer=answer), moved)
    except OffsetMismatch as error:
        raise GoError(f"Consumer offset mismatch: {error.expected}->{error.got}") from None
    except HTTPError as error:
        if error.status != 404:
            raise
        raise GoError(f"event not found in stream {stream}/{event_id}") from None


def go_read_events(request):
    consumer_id = go_uuid(request.headers.get("X-Consumer-ID"), GO_BAD_CONSUMER)
    request.client_id = consumer_id
    limit = go_atoi(request.arg("limit"), GO_BAD_LIMIT)
    event_name = request.arg("eventName") or ""
    missing = [field for field, absent in (("EventName", not event_name), ("Limit", limit == 0)) if absent]
    if missing:
        raise GoError(go_required("ReceiveEvents", *missing))
    if limit < 0:
        raise GoError(GO_BAD_LIMIT)  # the Go server asks PostgreSQL, which answers a 500
    limit = min(limit, request.app.config.max_limit)
    text = _unless_unknown(request.app.store.read, request.params["stream"], event_name, consumer_id, limit,
                           request.app.config.max_answer)
    events = json.loads(text) if text else []
    return go_reply([GoEvent.stored_view(event.pop("eventId"), event) for event in events])


def go_change_offset(request):
    consumer_id = go_uuid(request.params["consumer_id"], GO_BAD_CONSUMER)
    offset = go_atoi(request.params["offset"], GO_BAD_OFFSET)
    if offset < 0:
        raise GoError(GO_BAD_OFFSET)  # the Go server would store it
    try:  # only an offset the consumer has is moved; one it has not counts 0 events
        request.app.store.seek(request.params["stream"], consumer_id, request.params["event_name"], offset,
                               create=False)
    except OffsetOutOfRange:
        raise GoError("offset can not be greater than event count", 500) from None
    return go_reply(f"successfully updated offset to {offset} for consumer {consumer_id}")


def go_event_payload(request):
    event_id = go_uuid(request.params["event_id"], GO_BAD_EVENT_ID)
    text = _unless_unknown(request.app.store.envelope, event_id)
    if text is None:
        raise GoError("event id not found", 404)
    view = GoEvent.stored_view(event_id, json.loads(text))
    return Reply(200, pg_jsonb(view), GO_REPLY_TYPE)  # its jsonb column, as PostgreSQL writes it


def go_consumers(request):
    rows = _unless_unknown(request.app.store.consumers, _go_stream(request), request.app.config.max_list) or []
    rows = sorted((row for row in rows if row[4] > 0), key=lambda row: (row[3], row[1], row[0]))
    return Reply(200, pg_rows([
        {"consumerId": consumer, "offset": offset, "movedAt": pg_time(moved_at), "eventName": name,
         "consumedPercentage": PgText(_hundredths(offset, count)), "behind": count - offset}
        for consumer, offset, moved_at, name, count in rows]), GO_REPLY_TYPE)


def go_events_per_stream(request):
    ranked = sorted((s for s in request.app.store.stream_totals() if s.events), key=lambda s: (-s.events, s.name))
    return Reply(200, pg_rows([{"label": s.name, "value": s.events} for s in ranked[:10]]), GO_REPLY_TYPE)


def go_stream_data(request):
    streams = sorted(request.app.store.stream_totals(), key=lambda s: s.name, reverse=True)
    tiles = go_ranking([s.events for s in streams])
    return Reply(200, pg_rows([{"streamName": s.name, "eventsCount": s.events, "consumedEvents": s.consumed,
                                "ranking": None if tile is None else "\u272d" * tile}
                               for s, tile in zip(streams, tiles)][:request.app.config.max_list]), GO_REPLY_TYPE)


def go_events_current_month(request):
    rows, previous = [], None
    for day, count in _days_of_this_month(request.app.store):
        change = 0 if previous is None else count - previous
        progress = "" if not change else ("+" if change > 0 else "-") + f"{abs(change):>3}"  # FORMAT('+%3s')
        rows.append({"date": day, "eventcount": count, "progress": progress})
        previous = count
    return Reply(200, pg_rows(rows), GO_REPLY_TYPE)


def go_search(request):
    term = request.arg("_q") or ""
    if not term:
        raise GoError(go_required("SearchTermRequest", "Term"))
    pairs, single, streams, consumers = request.app.store.search_like(term, SEARCH_LIMIT, _payload_search_text)
    events = sorted({(f"{stream}/{name}", f"/admin/streams/{stream}/events?eventName={name}")
                     for stream, name in pairs}
                    | {(f"{stream}/{name}", f"/admin/streams/{stream}/events?eventId={event_id}")
                       for stream, name, event_id in single})[:SEARCH_LIMIT]
    results = [("events", label, url) for label, url in events]
    results += [("streams", stream, f"/admin/streams/{stream}/events" if by_name
                 else f"/admin/streams?producerId={producer}") for stream, producer, by_name in streams]
    results += [("consumers", f"{stream}/{consumer}", f"/admin/streams/{stream}/consumers?consumerId={consumer}")
                for stream, consumer in consumers]
    return Reply(200, pg_rows([{"search_result": {"label": label, "category": category, "url": url}}
                               for category, label, url in results]), GO_REPLY_TYPE)


def go_event_period_search(request):
    since = _go_period_start(request.arg("period") or "")
    if since is None:
        raise GoError(GO_BAD_PERIOD)
    most = request.app.config.max_list
    rows = _unless_unknown(request.app.store.events_since, _go_stream(request),
                           since.isoformat(timespec="microseconds"), min(PERIOD_LIMIT, most), most) or []
    return Reply(200, pg_rows([{"eventId": event_id, "eventName": name, "createdAt": pg_time(created_at),
                                "consumerids": consumer_ids}  # its unquoted SQL alias, lowercased
                               for event_id, name, created_at, consumer_ids in rows]), GO_REPLY_TYPE)


def go_metrics(request):
    store = request.app.store
    streams, offsets = store.stream_totals(), store.all_offsets()
    families = [  # as its collector names them; promhttp sorts families, samples and labels
        ("consumer_offset", "gauge", "Current offset of consumers per stream and event",
         [({"consumerId": consumer, "eventName": name, "stream": stream}, offset)
          for stream, consumer, name, offset, _ in offsets]),
        ("consumers_total", "counter", "Total amount of registered consumers per stream",
         [({"stream": s.name}, s.consumers) for s in streams if s.consumers]),
        ("events_total", "counter", "Total amount of events per stream",
         [({"producerId": s.producer_id, "stream": s.name}, s.events) for s in streams]),
        ("streams_total", "counter", "Total number of streams", [({}, len(streams))]),
    ]
    lines = []
    for name, kind, text, samples in families:
        if samples:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for labels, value in sorted(samples, key=lambda sample: list(sample[0].values())):
                label_text = ",".join(f'{key}="{_label_value(text)}"' for key, text in labels.items())
                lines.append(f"{name}{{{label_text}}} {_go_g(value)}" if label_text else f"{name} {_go_g(value)}")
    body = ("\n".join(lines) + "\n").encode("utf-8")
    headers = []
    if _go_negotiate_gzip(request.headers.get("Accept-Encoding")):
        body, headers = gzip.compress(body), [("Content-Encoding", "gzip")]
    return Reply(200, body, "text/plain; version=0.0.4; charset=utf-8; escaping=underscores", headers)


def _go_stream(request):
    """The stream of the path, or of the query (the dashboard's form of two routes)."""
    return request.params["stream"] if "stream" in request.params else request.arg("stream") or ""


def _unless_unknown(verb, *args):
    """verb(*args), or None where the stream or event is unknown (a 404):
    the Go server's queries then find nothing."""
    try:
        return verb(*args)
    except HTTPError as error:
        if error.status != 404:
            raise
        return None


def go_reply(value, status=200):
    return Reply(status, go_json(value), GO_REPLY_TYPE)


# -- what the Go server accepts ----------------------------------------------------

_GO_BAD_ESCAPE = re.compile(r"%(?![0-9a-fA-F]{2})")
_GO_INT = re.compile(r"[+-]?[0-9]+\Z")
_GO_HEX32 = re.compile(r"[0-9a-fA-F]{32}\Z")
# An unquoted SQL identifier, as PostgreSQL lexes one (any non-ASCII character is a letter).
_GO_IDENTIFIER = re.compile("[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*\\Z")
# PostgreSQL's reserved and type/function keywords: not a sequence name (pg_get_keywords, R and T).
_PG_RESERVED = frozenset("""
    all analyse analyze and any array as asc asymmetric both case cast check collate column constraint
    create current_catalog current_date current_role current_time current_timestamp current_user default
    deferrable desc distinct do else end except false fetch for foreign from grant group having in
    initially intersect into lateral leading limit localtime localtimestamp not null offset on only or
    order placing primary references returning select session_user some symmetric table then to trailing
    true union unique user using variadic when where window with authorization binary collation
    concurrently cross current_schema freeze full ilike inner is isnull join left like natural notnull
    outer overlaps right similar tablesample verbose""".split())


def go_uuid(text, error):
    """A UUID as google/uuid's Parse takes it (also {...}, urn:uuid:..., or
    32 hex digits), written in lowercase; GoError(error) otherwise."""
    text = text or ""
    if len(text) == 45 and text[:9].lower() == "urn:uuid:":
        text = text[9:]
    elif len(text) == 38:
        text = text[1:37]  # it skips the braces without looking at them
    elif _GO_HEX32.match(text):
        text = f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
    if not _UUID.match(text):
        raise GoError(error)
    return text.lower()


def go_atoi(text, error):
    """An integer as strconv.Atoi takes it (a sign allowed, 64 bits)."""
    if text is None or not _GO_INT.match(text) or len(text.lstrip("+-").lstrip("0")) > 19:
        raise GoError(error)
    value = int(text)
    if value not in INT64:
        raise GoError(error)
    return value


def go_name_problem(stream, event_name):
    """Why the Go server cannot store events of that name in that stream, or
    None. It splices stream + event name into its SQL as a sequence's name
    (and lowercases it with Go's rules, not PostgreSQL's), so together they
    must be one unquoted identifier that is no keyword. The Go server fails
    with a syntax error and keeps the stream reserved; this refuses up front."""
    name = stream + event_name
    rule = (f"stream name + event name ({name!r}) must form an SQL identifier, as the Go server builds one "
            f"from them: ")
    if re.search("[\ud800-\udfff]", name):
        return rule + "valid UTF-8"
    if not _GO_IDENTIFIER.match(name):
        return rule + "a letter or _ first, then letters, digits, _ or $"
    if name.lower() in _PG_RESERVED:
        return rule + "not a reserved word of PostgreSQL"
    if any(char >= "\x80" and char.lower() != char for char in name):
        return rule + "no uppercase letter outside A-Z"
    return None


def _go_query(text):
    """{name: [values]} as Go's url.ParseQuery reads a query: + is a space,
    a pair with ';' or a bad %-escape is dropped."""
    query = {}
    for pair in text.split("&") if text else ():
        if not pair or ";" in pair or _GO_BAD_ESCAPE.search(pair):
            continue
        name, _, value = pair.partition("=")
        query.setdefault(urllib.parse.unquote_plus(name, errors="replace"), []).append(
            urllib.parse.unquote_plus(value, errors="replace"))
    return query


def _go_clean_path(path):
    """The path as Go's path.Clean leaves it, trailing slash kept (gorilla/mux's cleanPath)."""
    parts = []
    for segment in path.split("/"):
        if segment == "..":
            if parts:
                parts.pop()
        elif segment not in ("", "."):
            parts.append(segment)
    clean = "/" + "/".join(parts)
    return clean + "/" if path.endswith("/") and clean != "/" else clean


def _go_period_start(period):
    """Now less the period, as PostgreSQL's interval does it (1month: a calendar month), or None."""
    now = datetime.datetime.now(datetime.timezone.utc)
    if period == "1month":
        year, month = (now.year, now.month - 1) if now.month > 1 else (now.year - 1, 12)
        last_day = calendar.monthrange(year, month)[1]
        return now.replace(year=year, month=month, day=min(now.day, last_day))
    hours = {"6hour": 6, "24hour": 24, "2day": 48, "7day": 7 * 24, "14day": 14 * 24}.get(period)
    return None if hours is None else now - datetime.timedelta(hours=hours)


def _go_negotiate_gzip(accept_encoding):
    """Whether promhttp picks gzip for this Accept-Encoding (it offers
    identity, then gzip; an equal weight keeps the first)."""
    best, best_q = "identity", -1.0
    specs = []
    for item in (accept_encoding or "").split(","):
        value, _, params = item.partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, number = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(number)
                except ValueError:
                    q = 0.0
        if value.strip():
            specs.append((value.strip(), q))
    for offer in ("identity", "gzip"):
        for value, q in specs:
            if q > best_q and value in ("*", offer):
                best, best_q = offer, q
    return best == "gzip" and best_q > 0


def _days_of_this_month(store):
    """(YYYY-MM-DD, events stored that day) for every day of this month (UTC)."""
    today = datetime.datetime.now(datetime.timezone.utc).date()
    first = today.replace(day=1)
    last = first.replace(day=calendar.monthrange(first.year, first.month)[1])
    counts = store.daily_counts(first.isoformat(), last.isoformat())
    return [(day, counts.get(day, 0)) for day in
            (first.replace(day=number).isoformat() for number in range(1, last.day + 1))]


def _hundredths(part, whole):
    """ROUND(part * 100.0 / whole, 2) as PostgreSQL writes it: two places, always."""
    hundredths = (part * 10000 * 2 + whole) // (2 * whole)
    return f"{hundredths // 100}.{hundredths % 100:02d}"


def go_ranking(counts):
    """Each count's ranking (1-5, or None) as the Go server's SQL function
    ranking(count, all counts, 5) computes it: an index per count against the
    largest count within two standard deviations of the mean, then NTILE(5)
    over the distinct rounded indexes."""
    context = decimal.Context(prec=50)
    values = [decimal.Decimal(count) for count in counts]
    if not values:
        return []
    mean = context.divide(sum(values), len(values))
    low = high = None
    if len(values) > 1:
        variance = context.divide(sum((value - mean) ** 2 for value in values), len(values) - 1)
        deviation = context.sqrt(variance)
        low, high = mean - 2 * deviation, mean + 2 * deviation
    upper = max((v for v in values if high is not None and v <= high and v != 0), default=None)

    def index(value):
        if low is not None and value < low:
            share = None if upper is None else context.divide(low, abs(upper)) * 100
        elif high is not None and value <= high:
            share = None if upper is None else context.divide(value, abs(upper)) * 100
        else:
            share = decimal.Decimal(100)
        return None if share is None else int(share.quantize(1, rounding=decimal.ROUND_HALF_UP))

    indexes = [index(value) for value in values]
    bases = sorted(set(indexes), key=lambda base: (base is None, base or 0))  # NULLS LAST
    size, extra = divmod(len(bases), 5)
    tiles, position = {}, 0
    for tile in range(1, 6):
        for _ in range(size + (1 if tile <= extra else 0)):
            tiles[bases[position]] = tile
            position += 1
    return [None if base is None else tiles[base] for base in indexes]


# -- how the Go server reads an event: types.Event and encoding/json -------------

class _GoNumber(str):
    """A JSON number's literal text, as Go's decoder has it before converting it."""


class _GoObject(list):
    """A JSON object's (key, value) pairs in order, duplicates kept."""


_GO_DECODER = json.JSONDecoder(object_pairs_hook=_GoObject, parse_int=_GoNumber, parse_float=_GoNumber)
codecs.register_error("eventserver-go", lambda error: ("\ufffd" * (error.end - error.start), error.end))


class GoEvent:
    """An event envelope as the Go server's types.Event keeps it: known
    fields only (matched by name, else ignoring case), missing strings "",
    a missing version 0, payload an object or null.

    stored is what is kept of it: those fields, the payload's numbers as
    sent. On reading, the payload's numbers are float64, as Go has them."""

    __slots__ = ("name", "stored", "_errors")
    STRUCTS = {"event": ("EventData", "types.EventData", {"name": "", "version": 0}),
               "system": ("System", "types.System", {"id": "", "name": "", "time": "", "timezone": ""}),
               "trigger": ("Trigger", "types.Trigger", {"type": "", "name": ""})}

    def __init__(self, value):
        self._errors = []
        fields = {name: dict(struct[2]) for name, struct in self.STRUCTS.items()}
        payload = None
        kind = _go_kind(value)
        if kind not in ("object", "null"):
            self._error(f"{kind} into Go value of type types.Event")
        for key, item in _go_items(value) if kind == "object" else ():
            field = _go_field(key, ("eventId", "event", "system", "trigger", "payload"))
            item_kind = _go_kind(item)
            if field == "eventId" and item_kind not in ("string", "null"):
                self._error(f"{item_kind} into Go struct field Event.eventId of type string")
            elif field in self.STRUCTS:
                self._struct(field, item, fields[field])
            elif field == "payload":
                if item_kind == "object":
                    payload = {} if payload is None else payload  # a second payload adds to the first
                    payload.update((_go_text(k), self._any(v)) for k, v in _go_items(item))
                elif item_kind == "null":
                    payload = None
                else:
                    self._error(f"{item_kind} into Go struct field Event.payload of type types.Payload")
        if self._errors:
            raise GoError(self._errors[0])
        self.name = fields["event"]["name"]
        self.stored = dict(fields, **({} if payload is None else {"payload": payload}))

    @classmethod
    def decode(cls, body):
        """The request body's first JSON value as json.Decoder reads it (what
        follows it is not read), refused in its words: EOF, unexpected EOF,
        its syntax and type errors, and the validator's on a missing name."""
        end = _GoScanner(body).end_of_value()
        try:
            value = _GO_DECODER.decode(body[:end].decode("utf-8", "eventserver-go"))
        except RecursionError:
            raise GoError("invalid character '[' exceeded max depth") from None
        event = cls(value)
        if not event.name:
            raise GoError(go_required("Event.EventData", "Name"))
        return event

    @classmethod
    def stored_view(cls, event_id, stored):
        """What the Go server answers of a stored event: its types.Event,
        eventId first, the payload's numbers as float64 (a stored envelope it
        could not have read is its 500)."""
        try:
            event = cls(stored)
        except GoError as error:
            raise GoError(error.go_text, 500) from None
        view = {"eventId": event_id, **event.stored, "payload": _go_floats(event.stored.get("payload"))}
        return view

    def _error(self, text):
        self._errors.append("json: cannot unmarshal " + text)

    def _struct(self, field, value, into):
        struct, go_type, defaults = self.STRUCTS[field]
        kind = _go_kind(value)
        if kind == "null":
            return
        if kind != "object":
            return self._error(f"{kind} into Go struct field Event.{field} of type {go_type}")
        for key, item in _go_items(value):
            name = _go_field(key, tuple(defaults))
            if name is None:
                continue
            item_kind = _go_kind(item)
            where = f"Go struct field {struct}.{field}.{name}"
            if name == "version":
                literal = str(item)
                if item_kind == "number" and _GO_INT.match(literal) and literal[0] != "+" and int(literal) in INT64:
                    into[name] = int(literal)
                elif item_kind != "null":
                    self._error(f"{'number ' + literal if item_kind == 'number' else item_kind} into {where} of type int")
            elif item_kind == "string":
                into[name] = _go_text(item)
            elif item_kind != "null":
                self._error(f"{item_kind} into {where} of type string")

    def _any(self, value):
        """A payload value as sent, checked as Go's float64 would take its numbers."""
        kind = _go_kind(value)
        if kind == "object":
            return {_go_text(key): self._any(item) for key, item in _go_items(value)}
        if kind == "array":
            return [self._any(item) for item in value]
        if kind == "string":
            return _go_text(value)
        if kind == "number":
            literal = str(value)
            try:
                number = int(literal) if _GO_INT.match(literal) else float(literal)
                if math.isinf(float(number)):
                    raise OverflowError(literal)
                return number
            except (OverflowError, ValueError):
                self._error(f"number {literal} into Go struct field Event.payload of type float64")
                return None
        return value  # true, false, null


def _go_kind(value):
    if isinstance(value, (_GoObject, dict)):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, _GoNumber) or type(value) in (int, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "bool" if isinstance(value, bool) else "null"


def _go_items(value):
    return value if isinstance(value, _GoObject) else value.items()


def _go_fold(name):
    """encoding/json's case folding of a key (a character's simple case mapping, one to one)."""
    return "".join(char.upper() if char < "\x80" else _go_fold_char(char) for char in name)


def _go_fold_char(char):
    folded = char.lower().upper()
    return folded if len(folded) == 1 else char


def _go_field(key, names):
    """The struct field a key goes to: the same name, else the same ignoring case, else None."""
    if key in names:
        return key
    folded = _go_fold(key)
    return next((name for name in names if _go_fold(name) == folded), None)


def _go_text(text):
    """A decoded string as Go keeps it: a lone surrogate is U+FFFD."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def _go_floats(value):
    """The payload's numbers as float64, as Go decodes them into interface{}."""
    if isinstance(value, dict):
        return GoMap((key, _go_floats(item)) for key, item in value.items())
    if isinstance(value, list):
        return [_go_floats(item) for item in value]
    if type(value) in (int, float):
        return float(value)
    return value


def _holds_nul(value):
    """Whether any string of the value, key or text, holds U+0000."""
    if isinstance(value, dict):
        return any("\x00" in key or _holds_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return isinstance(value, str) and "\x00" in value


class _GoScanner:
    """Go's JSON scanner, as far as json.Decoder needs it: where the first
    value of the data ends, or the scanner's error message."""

    def __init__(self, data):
        self.data, self.at = data, 0

    def fail(self, context):
        if self.at >= len(self.data):  # json.Decoder at the end of the body
            raise GoError("unexpected EOF" if self.data.strip(b" \t\r\n") else "EOF")
        raise GoError(f"invalid character {_go_quote_char(self.data[self.at])} {context}")

    def peek(self):
        return self.data[self.at] if self.at < len(self.data) else None

    def space(self):
        while self.peek() in (0x20, 0x09, 0x0d, 0x0a):
            self.at += 1

    def end_of_value(self):
        stack, want_value = [], True
        while True:
            if want_value:
                self.space()
                byte = self.peek()
                if byte in (0x7b, 0x5b):  # { [
                    stack.append(byte)
                    if len(stack) > 10000:
                        self.fail("exceeded max depth")
                    self.at += 1
                    self.space()
                    if self.peek() == byte + 2:  # } ]
                        self.at += 1
                        stack.pop()
                    elif byte == 0x7b:
                        self.key()
                        continue
                    else:
                        continue
                elif byte == 0x22:
                    self.string()
                elif byte is not None and (byte == 0x2d or 0x30 <= byte <= 0x39):
                    self.number()
                elif byte in (0x74, 0x66, 0x6e):  # t f n
                    self.literal()
                else:
                    self.fail("looking for beginning of value")
                want_value = False
            if not stack:
                return self.at
            self.space()
            in_object = stack[-1] == 0x7b
            if self.peek() == 0x2c:  # ,
                self.at += 1
                if in_object:
                    self.space()
                    self.key()
                want_value = True
            elif self.peek() == stack[-1] + 2:
                self.at += 1
                stack.pop()
            else:
                self.fail("after object key:value pair" if in_object else "after array element")

    def key(self):
        if self.peek() != 0x22:
            self.fail("looking for beginning of object key string")
        self.string()
        self.space()
        if self.peek() != 0x3a:  # :
            self.fail("after object key")
        self.at += 1

    def string(self):
        self.at += 1
        while True:
            byte = self.peek()
            if byte is None:
                self.fail("")
            if byte == 0x22:
                self.at += 1
                return
            if byte == 0x5c:  # backslash
                self.at += 1
                escaped = self.peek()
                if escaped == 0x75:  # u
                    for _ in range(4):
                        self.at += 1
                        if self.peek() is None or self.peek() not in b"0123456789abcdefABCDEF":
                            self.fail("in \\u hexadecimal character escape")
                elif escaped is None or escaped not in b'bfnrt\\/"':
                    self.fail("in string escape code")
            elif byte < 0x20:
                self.fail("in string literal")
            self.at += 1

    def digits(self):
        while self.peek() is not None and 0x30 <= self.peek() <= 0x39:
            self.at += 1

    def number(self):
        if self.peek() == 0x2d:
            self.at += 1
            if self.peek() is None or not 0x30 <= self.peek() <= 0x39:
                self.fail("in numeric literal")
        if self.peek() == 0x30:
            self.at += 1
        else:
            self.digits()
        if self.peek() == 0x2e:
            self.at += 1
            if self.peek() is None or not 0x30 <= self.peek() <= 0x39:
                self.fail("after decimal point in numeric literal")
            self.digits()
        if self.peek() in (0x65, 0x45):
            self.at += 1
            if self.peek() in (0x2b, 0x2d):
                self.at += 1
            if self.peek() is None or not 0x30 <= self.peek() <= 0x39:
                self.fail("in exponent of numeric literal")
            self.digits()

    def literal(self):
        word = {0x74: "true", 0x66: "false", 0x6e: "null"}[self.peek()]
        for expected in word[1:]:
            self.at += 1
            if self.peek() != ord(expected):
                self.fail(f"in literal {word} (expecting '{expected}')")
        self.at += 1


def _go_quote_char(byte):
    """A byte as Go's scanner names it in an error: quoted like a rune."""
    if byte == 0x27:
        return "'\\''"
    if byte == 0x22:
        return "'\"'"
    char = chr(byte)
    short = {"\\": "\\\\", "\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}
    if char in short:
        return f"'{short[char]}'"
    if char.isprintable():
        return f"'{char}'"
    return f"'\\x{byte:02x}'" if byte < 0x20 or byte == 0x7f else f"'\\u{byte:04x}'"


# -- how the Go server writes: encoding/json, and PostgreSQL's json and jsonb ------

class GoMap(dict):
    """A Go map: encoding/json writes its keys sorted (a plain dict is a
    struct: its fields in order)."""


class PgText(str):
    """JSON text PostgreSQL writes as it is (a numeric with its scale)."""


def go_json(value):
    """JSON as Go's json.Marshal writes it: compact; <, >, &, U+2028 and
    U+2029 escaped; a float64 in its shortest form (1e+21, 1e-7)."""
    if isinstance(value, str):
        return _go_string(value)
    if value is None or isinstance(value, bool):
        return "null" if value is None else "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, dict):
        items = sorted(value.items()) if isinstance(value, GoMap) else value.items()
        return "{" + ",".join(_go_string(key) + ":" + go_json(item) for key, item in items) + "}"
    return "[" + ",".join(go_json(item) for item in value) + "]"


def _go_string(text):
    return (json.dumps(text, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _shortest(value):
    """(sign, digits, exponent) of the shortest decimal that reads back as value."""
    sign, digits, exponent = decimal.Decimal(repr(value)).normalize().as_tuple()
    return "-" if sign else "", "".join(map(str, digits)), exponent + len(digits) - 1


def _go_exponent_form(sign, digits, exponent):
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"


def _go_float(value):
    """A float64 as encoding/json writes it."""
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    if 1e-6 <= abs(value) < 1e21:
        return format(decimal.Decimal(repr(value)).normalize(), "f")
    text = _go_exponent_form(*_shortest(value))
    return text[:-2] + text[-1] if text[-3:-1] == "-0" else text  # e-07 is e-7


def _go_g(value):
    """A number as strconv's shortest 'g' writes it (the Prometheus client's values): 1e+06 for a million."""
    if value in (0, 1, -1):
        return str(int(value))
    sign, digits, exponent = _shortest(float(value))
    if exponent < -4 or exponent >= 6:
        return _go_exponent_form(sign, digits, exponent)
    return format(decimal.Decimal(repr(float(value))).normalize(), "f")


def _pg_json(value):
    """A value as PostgreSQL's row_to_json writes it: compact, only " \\ and control characters escaped."""
    if isinstance(value, PgText):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value is None or isinstance(value, bool):
        return "null" if value is None else "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(key) + ":" + _pg_json(item) for key, item in value.items()) + "}"
    return "[" + ",".join(_pg_json(item) for item in value) + "]"


def pg_rows(rows):
    """json_agg of rows, COALESCEd to []: PostgreSQL puts ", newline, space" between rows."""
    return "[" + ", \n ".join(_pg_json(row) for row in rows) + "]"


def pg_jsonb(value):
    """A value as PostgreSQL writes a jsonb: ", " and ": ", an object's keys
    shortest first (then bytewise), numbers as numeric text."""
    if isinstance(value, dict):
        keys = sorted(value, key=lambda key: (len(key.encode("utf-8")), key.encode("utf-8")))
        return "{" + ", ".join(f"{json.dumps(key, ensure_ascii=False)}: {pg_jsonb(value[key])}" for key in keys) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(pg_jsonb(item) for item in value) + "]"
    if isinstance(value, float):  # what Go wrote, read back as numeric: 1e+21 is 1000000000000000000000
        number = decimal.Decimal(_go_float(value))
        return "0" if number.is_zero() else format(number, "f")
    return _pg_json(value)


def pg_time(text):
    """A stored time as PostgreSQL writes a timestamptz in JSON: no trailing zeros in the fraction."""
    head, dot, rest = text.partition(".")
    fraction, zone = rest[:6].rstrip("0"), rest[6:]
    return head + ("." + fraction if fraction else "") + zone if dot else text


def _payload_search_text(payload):
    """The stored payload as the Go server's search reads it (event->>'payload'), or None."""
    try:
        value = json.loads(payload) if payload else None
    except ValueError:
        return None
    return pg_jsonb(_go_floats(value)) if isinstance(value, dict) else None


# Tools: moving whole databases ###############################################

class LoadError(Exception):
    """A line of an import that cannot be loaded (number 0: the whole import)."""

    def __init__(self, number, reason):
        super().__init__(f"line {number}: {reason}" if number else reason)


def export(store, out):
    """Write every stream, event, consumer offset and idempotency key as
    NDJSON lines to the text stream out, from one consistent snapshot."""
    def line(record, envelope=None):
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
        out.write(text[:-1] + ',"envelope":' + envelope + "}\n" if envelope else text + "\n")

    with store.reading() as conn:
        for name, producer_id, created_at in conn.execute(
                "SELECT name, producer_id, created_at FROM streams ORDER BY stream_id"):
            line({"type": "stream", "stream": name, "producerId": producer_id, "createdAt": created_at})
        for name, event_id, event_name, sequence, created_at, envelope in conn.execute(
                "SELECT s.name, e.event_id, e.event_name, e.sequence, e.created_at, e.envelope"
                " FROM events e JOIN streams s USING (stream_id) ORDER BY e.event_pk"):
            line({"type": "event", "stream": name, "eventId": event_id, "eventName": event_name,
                  "sequence": sequence, "createdAt": created_at}, envelope)
        for name, consumer_id, event_name, offset, moved_at in conn.execute(
                "SELECT s.name, o.consumer_id, o.event_name, o.consumer_offset, o.moved_at"
                " FROM consumer_offsets o JOIN streams s USING (stream_id)"
                " ORDER BY o.stream_id, o.event_name, o.consumer_id"):
            line({"type": "offset", "stream": name, "consumerId": consumer_id, "eventName": event_name,
                  "offset": offset, "movedAt": moved_at})
        for name, key, fingerprint, event_ids in conn.execute(
                "SELECT s.name, k.key, k.fingerprint, k.event_ids"
                " FROM idempotency_keys k JOIN streams s USING (stream_id) ORDER BY k.stream_id, k.key"):
            line({"type": "idempotencyKey", "stream": name, "key": key, "fingerprint": fingerprint,
                  "eventIds": event_ids.split(",")})


def import_records(store, lines):
    """Load what export wrote into the store's empty database, exactly, in
    one transaction; a bad line (LoadError names it) changes nothing."""
    def work(tx):
        if tx.execute("SELECT 1 FROM streams LIMIT 1").fetchone():
            raise LoadError(0, "the database is not empty")
        for number, raw in enumerate(lines, 1):
            if raw.strip():
                try:
                    _import_line(store, tx, decode_json(raw, "line"))
                    tx.write_events()
                except HTTPError as error:
                    raise LoadError(number, error.detail or error.text) from None
                except (KeyError, TypeError, AttributeError, ValueError) as error:
                    raise LoadError(number, f"malformed record ({error!r})") from None
        return len(tx.streams)

    return store.transact(work)


def _import_line(store, tx, record):
    kind = record["type"]
    if kind == "stream":
        name = check_name("stream", record["stream"])
        if name in tx.streams:
            raise bad_request(f"stream {name} appears twice")
        store.create_stream(tx, name, check_token("producerId", record["producerId"]), _time(record["createdAt"]))
        return
    stream_id = tx.streams.get(record["stream"], (None,))[0]
    if stream_id is None:
        raise bad_request(f"stream {record['stream']} has no stream line before it")
    if kind == "event":
        envelope = Envelope(record["envelope"])
        if envelope.name != record["eventName"]:
            raise bad_request("eventName is not the envelope's event.name")
        event = (check_event_id(record["eventId"]), envelope, _time(record["createdAt"]))
        if store.append(tx, stream_id, [event]) != [record["sequence"]]:
            raise bad_request(f"sequence {record['sequence']} is not the next of {envelope.name}")
    elif kind == "offset":
        event_name = check_name("eventName", record["eventName"])
        offset = record["offset"]
        if type(offset) is not int or not 0 <= offset <= store.count(tx, stream_id, event_name):
            raise bad_request(f"offset {offset!r} is out of range")
        consumer_id = check_token("consumerId", record["consumerId"])
        tx.offsets[stream_id, event_name, consumer_id] = (offset, _time(record["movedAt"]))
    elif kind == "idempotencyKey":
        event_ids = [check_event_id(event_id) for event_id in record["eventIds"]]
        store.remember_key(tx, stream_id, check_token("key", record["key"]), str(record["fingerprint"]), event_ids)
    else:
        raise bad_request(f"unknown record type {kind!r}")


def backup(store, target):
    """Copy the database, consistently even while it is written, to the file target."""
    with store.reading() as conn:
        conn.execute("COMMIT")  # the backup API takes its own snapshot
        destination = sqlite3.connect(target)
        try:
            conn.backup(destination)
        finally:
            destination.close()


TOOLS = {
    "export": "Write every stream's events, consumer offsets and idempotency keys as NDJSON to stdout.",
    "import": "Read what export wrote from stdin into an empty database, exactly.",
    "backup": "Copy a database, consistently even while a server writes to it, to OUT.",
}


def run_tool(command, argv, environ):
    """export, import and backup: one database in, NDJSON or a copy out."""
    parser = _ArgumentParser(prog=f"eventserver.py {command}", description=TOOLS[command])
    parser.add_argument("--db", default=environ.get("EVENTSERVER_DB") or "eventserver.db",
                        help="SQLite file (env EVENTSERVER_DB, default eventserver.db)")
    if command == "backup":
        parser.add_argument("out", help="file to write the copy to")
    args = parser.parse_args(argv)
    if command != "import" and not os.path.isfile(args.db):
        raise ConfigError(f"no database file {args.db}")
    try:
        store = Store(args.db, exclusive=command == "import")  # export and backup read a live database
    except StoreError as error:
        raise ConfigError(str(error)) from None
    try:
        if command == "export":
            try:
                export(store, sys.stdout)
                sys.stdout.flush()
            except BrokenPipeError:  # export | head: the reader has all it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        elif command == "import":
            import_records(store, sys.stdin.buffer)
        else:
            backup(store, args.out)
    except LoadError as error:
        raise ConfigError(f"import: {error}") from None
    except (HTTPError, sqlite3.Error, OSError) as error:
        raise ConfigError(f"{command}: {error}") from None
    finally:
        store.close()
    return 0


# Running a server: in a test's process, or from the command line ############

class RunningServer:
    """A server running in this process, on threads of its own (the accept
    thread, a thread per connection, the writer thread): what running()
    yields, and what serve() runs until a signal. Start and stop are the
    same code for both.

    url ("http://127.0.0.1:PORT/"), host, port, user, password and db (the
    database file, a temporary one for ":memory:") are what a client needs;
    store and httpd (the Store, the HTTP server) what a test may look into."""

    def __init__(self, config, announce=None):
        """Start serving (StoreError, ConfigError or OSError if it cannot;
        nothing is left behind then). announce(self) is called once the
        server accepts connections, before the port file is written."""
        self.config = config
        self.user, self.password = config.user, config.password
        self._stopped = False
        # What start made, undone in reverse order by stop(): the port file, the accept
        # loop, the listening socket, the requests in flight, the store, a temporary database.
        self._undo = contextlib.ExitStack()
        try:
            self.db = self._undo.enter_context(_database_file(config.db))
            self.store = Store(self.db, config.sync)
            self._undo.callback(self.store.close)
            if config.fixtures:
                load_fixtures(self.store, config.fixtures)
            self.httpd = make_server(config, self.store)
            self._undo.callback(self.httpd.app.close_connections)
            self._undo.callback(self.httpd.app.drain, timeout=config.timeout or 30)
            self._undo.callback(self.httpd.server_close)
            self.host, self.port = self.httpd.server_address[:2]
            self.url = f"{'https' if config.certfile else 'http'}://{_url_host(self.host)}:{self.port}/"
            threading.Thread(target=self.httpd.serve_forever, args=(POLL_SECONDS,), name="accept",
                             daemon=True).start()
            self._undo.callback(self.httpd.shutdown)  # only once serve_forever runs: it waits for it
            if announce is not None:
                announce(self)
            if config.port_file:
                _write_port_file(config.port_file, self.url)
                self._undo.callback(_remove_port_file, config.port_file, self.url)
        except BaseException:
            self._undo.close()
            raise

    def reset(self):
        """Remove every stream, event, offset and idempotency key, as POST
        /api/v1/reset does (which needs allow_reset; this does not)."""
        self.store.reset()

    def stop(self):
        """Stop (once): the port file removed, no new connections, requests
        in flight finish and long polls are answered, idle connections are
        closed, the database is closed (and removed if temporary)."""
        if not self._stopped:
            self._stopped = True
            self._undo.close()


@contextlib.contextmanager
def running(**options):
    """A server on a free port in background threads of this process, for a
    test suite: `with eventserver.running() as server:` yields a
    RunningServer (server.url, .user, .password, .db); leaving the block
    stops it and removes what it made, within a few tens of milliseconds.

    The options are the flags' names with "_" for "-" (db, user, password,
    fixtures, allow_reset, sync, max_body, ...). Unlike the command line: a
    temporary database unless db is given, port 0 unless port is given,
    quiet unless quiet=False, and the environment is not read. Credentials
    are generated unless given. Nothing is global (no signal handler, no
    logging set up, nothing printed): several can run at once."""
    server = RunningServer(options_config({"port": 0, "db": ":memory:", "quiet": True, **options}))
    try:
        yield server
    finally:
        server.stop()


def _write_port_file(path, url):
    """Write url to path atomically: whoever waits for the file reads all of it or nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=".eventserver-port-", dir=folder)
        try:
            with os.fdopen(descriptor, "w") as out:
                out.write(url + "\n")
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as error:
        raise ConfigError(f"cannot write --port-file {path}: {error.strerror or error}") from None


def _remove_port_file(path, url):
    """Remove the port file, unless it no longer holds our URL (another server's now)."""
    with contextlib.suppress(OSError):
        with open(path) as written:
            if written.read().strip() != url:
                return
        os.unlink(path)


# Command line ################################################################

def serve(config):
    """Run the server until SIGINT or SIGTERM; return the exit code."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # first: a signal during the start stops it at once after
        signal.signal(signum, lambda *_: stop.set())

    def announce(server):
        # The first line on stdout is documented as stable: scripts read the URL from it.
        print(f"eventserver {__version__} listening on {server.url}", flush=True)
        if config.password_generated:
            print(f"no credentials configured: user {config.user}, password {config.password}", flush=True)
        if server.store.read_only:
            print(f"eventserver: {server.store.read_only}", file=sys.stderr, flush=True)

    try:
        server = RunningServer(config, announce)
    except StoreError as error:
        print(f"eventserver: {error}", file=sys.stderr)
        return 1
    except (ConfigError, OSError) as error:
        print(f"eventserver: {_one_line(error, config)}", file=sys.stderr)
        return 1
    while not stop.wait(1.0):
        pass
    server.stop()
    LOG_LINES.flush(timeout=1.0)
    return 0


def _one_line(error, config):
    if isinstance(error, ConfigError) or not isinstance(error, OSError):
        return str(error)
    return f"cannot listen on {config.host}:{config.port}: {error.strerror or error}"


@contextlib.contextmanager
def _database_file(path):
    """The database path; for ':memory:' a temporary file, removed at exit
    (readers need their own connections, which a real in-memory database
    cannot give)."""
    if path != ":memory:":
        yield path
        return
    folder = tempfile.mkdtemp(prefix="eventserver-")
    try:
        yield os.path.join(folder, "memory.db")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load_fixtures(store, filename):
    """Publish an NDJSON file of {"stream", "producerId", "envelope"} lines,
    all or none, into a database that has no streams yet. The file is read
    as it is published: memory does not grow with it."""
    def fixtures(lines):
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                record = decode_json(raw, "line")
                if not isinstance(record, dict):
                    raise bad_request("line is not a JSON object")
                yield (check_name("stream", record.get("stream")),
                       check_token("producerId", record.get("producerId")),
                       Envelope(record.get("envelope"), "envelope: "))
            except HTTPError as error:
                raise ConfigError(f"fixtures {filename} line {number}: {error.detail}") from None

    try:
        with open(filename, "rb") as lines:
            loaded, records = store.publish_fixtures(fixtures(lines))
    except OSError as error:
        raise ConfigError(f"cannot read fixtures {filename}: {error.strerror or error}") from None
    except HTTPError as error:
        raise ConfigError(f"fixtures {filename}: {error.text}") from None
    if not loaded and records:
        log.info("fixtures %s not loaded: the database already has streams", filename)


def _url_host(host):
    return f"[{host}]" if ":" in host else host


M_ARENA_MAX = -8  # glibc's mallopt() parameter
MALLOC_ARENAS = 2


def _fewer_malloc_arenas(environ):
    """glibc's malloc gives threads that allocate at once arenas of their
    own, up to 8 per core, and keeps what is freed in each: with a thread per
    connection, the memory kept grew with the connections that had come (75
    MB after 32 consumers, 60 MB with two arenas, at the same speed). Two, as
    MALLOC_ARENA_MAX=2 would, unless that variable is set; nothing where the
    C library is not glibc. Only for a server of its own process, before its
    threads start: running() leaves a test process's malloc alone."""
    if "MALLOC_ARENA_MAX" in environ:
        return
    try:
        import ctypes  # here, not at the top: some Python builds have no ctypes, and only this needs it
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (ImportError, OSError, AttributeError):
        pass


def main(argv=None):
    _fewer_malloc_arenas(os.environ)
    handler = _QueuedLogHandler()
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in TOOLS:
            return run_tool(argv[0], argv[1:], os.environ)
        config = parse_config(argv, os.environ)
        handler.json_format = config.log_format == "json"
        return serve(config)
    except ConfigError as error:
        print(f"eventserver: {error}", file=sys.stderr)
        return 2


# Dashboard ###################################################################

# One page, no external requests: it reads the JSON API with the browser's own
# Basic-auth credentials and puts every name into the page as text, never HTML.
DASHBOARD_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>eventserver</title>
<style>
  :root { --ink: #1d2433; --muted: #5d6880; --line: #dde2ec; --bg: #f6f7fb; --accent: #2f6fde; --bad: #b3261e; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); background: var(--bg); }
  header { display: flex; gap: 16px; align-items: center; padding: 10px 20px; background: #fff; border-bottom: 1px solid var(--line); flex-wrap: wrap; }
  header h1 { font-size: 17px; margin: 0; }
  header h1 a { color: inherit; text-decoration: none; }
  #search { display: flex; gap: 6px; flex: 1; max-width: 460px; }
  #search input { flex: 1; padding: 6px 9px; border: 1px solid var(--line); border-radius: 6px; font: inherit; }
  button { padding: 6px 12px; border: 1px solid var(--accent); background: var(--accent); color: #fff; border-radius: 6px; font: inherit; cursor: pointer; }
  #status { margin-left: auto; color: var(--muted); font-size: 13px; }
  #status.down { color: #fff; background: var(--bad); padding: 3px 10px; border-radius: 6px; }
  main { padding: 16px 20px; display: grid; gap: 16px; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); }
  section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; min-width: 0; }
  section.wide { grid-column: 1 / -1; }
  h2 { font-size: 15px; margin: 0 0 8px; }
  table { width: 100%; border-collapse: collapse; }
  th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); overflow-wrap: anywhere; }
  th { color: var(--muted); font-weight: 600; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
  a { color: var(--accent); }
  .muted { color: var(--muted); }
  .event-row { cursor: pointer; }
  .event-row:hover { background: #eef3fd; }
  .event-row.open { background: #e3ecfc; }
  pre { background: #0f1626; color: #e6edf7; padding: 10px; border-radius: 6px; overflow: auto; max-height: 360px; margin: 6px 0; }
  svg text { font-size: 11px; fill: var(--muted); }
  svg .bar { fill: var(--accent); }
  svg .axis { stroke: #9aa4b8; stroke-width: 1; }
  .crumbs { grid-column: 1 / -1; margin: 0; }
</style>
</head>
<body>
<header>
  <h1><a href="#/">eventserver</a></h1>
  <form id="search"><input id="q" type="search" placeholder="Search streams, events, consumers, IDs" aria-label="Search"><button>Search</button></form>
  <span id="status">connecting…</span>
</header>
<main id="view"></main>
<script>
"use strict";
const API = "/api/v1";
const REFRESH_MS = 4000;
const view = document.getElementById("view");
const statusLine = document.getElementById("status");
let openEventId = null;
let timer = null;

// Every name is put in the page as text (textContent), never as HTML.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "onclick") node.addEventListener("click", value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}
function svg(tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = String(text);
  return node;
}
function section(id, title, wide) {
  let node = document.getElementById(id);
  if (!node) {
    node = el("section", { id: id, class: wide ? "wide" : "" }, el("h2", {}, title), el("div", { class: "body" }));
    view.append(node);
  }
  return node.querySelector(".body");
}
const part = encodeURIComponent;
function streamLink(name) { return el("a", { href: "#/admin/streams/" + part(name) + "/events" }, name); }

// Asked as the Go server (--compat go) wants it, which the default takes too: both headers
// exactly so, search and period search by POST; its field names are read as well.
const JSON_TYPE = "application/json; charset=utf-8";
async function api(path, method) {
  // location.origin, not a relative URL: a page opened as http://user:pass@host/ must not
  // put the credentials in its requests (fetch refuses that); the browser's auth cache does.
  const response = await fetch(location.origin + API + path, { method: method || "GET", cache: "no-store",
    headers: { "Accept": JSON_TYPE, "Content-Type": JSON_TYPE, "X-Eventserver-Dashboard": "1" } });
  if (!response.ok) throw new Error(response.status + " " + (await response.text()));
  return response.json();
}

function table(headers, rows, rowAttrs) {
  const head = el("tr", {}, ...headers.map(h => el("th", { class: h.num ? "num" : "" }, h.label)));
  const body = rows.map((cells, index) => el("tr", rowAttrs ? rowAttrs(index) : {},
    ...cells.map((cell, i) => el("td", { class: headers[i].num ? "num" : "" }, cell))));
  if (!rows.length) body.push(el("tr", {}, el("td", { colspan: headers.length, class: "muted" }, "nothing yet")));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
}

// A bar chart in inline SVG: labels along the x axis, counts on the y axis.
function barChart(points, xTitle, yTitle, labelEvery) {
  const width = 640, height = 240, left = 52, right = 12, top = 12, bottom = 58;
  const max = Math.max(1, ...points.map(p => p.value));
  const plotW = width - left - right, plotH = height - top - bottom;
  const step = plotW / Math.max(1, points.length);
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img", "aria-label": yTitle + " per " + xTitle });
  chart.append(svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: top + plotH }));
  chart.append(svg("line", { class: "axis", x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH }));
  for (const fraction of [0, 0.5, 1]) {
    const y = top + plotH - fraction * plotH;
    chart.append(svg("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "tick" }, Math.round(max * fraction)));
  }
  points.forEach((p, i) => {
    const barH = p.value / max * plotH;
    const bar = svg("rect", { class: "bar", x: left + i * step + step * 0.15, y: top + plotH - barH, width: step * 0.7, height: barH });
    bar.append(svg("title", {}, p.label + ": " + p.value));
    chart.append(bar);
    if (i % labelEvery === 0) {
      const x = left + i * step + step / 2, y = top + plotH + 14;
      const text = p.short !== undefined ? p.short : p.label;
      chart.append(svg("text", { x: x, y: y, "text-anchor": "middle", class: "xlabel" }, text.length > 14 ? text.slice(0, 13) + "…" : text));
    }
  });
  chart.append(svg("text", { x: left + plotW / 2, y: height - 8, "text-anchor": "middle", class: "axis-title" }, xTitle));
  chart.append(svg("text", { x: 12, y: top + plotH / 2, transform: `rotate(-90 12 ${top + plotH / 2})`, "text-anchor": "middle", class: "axis-title" }, yTitle));
  return chart;
}

async function overview(producerId) {
  const [streams, perStream, perDay] = await Promise.all([
    api("/streams"), api("/stats/events-per-stream"), api("/stats/events-current-month")]);
  const shown = producerId ? streams.filter(s => s.producerId === producerId) : streams;
  const title = producerId ? "Streams of producer " + producerId : "Streams";
  const body = section("streams", title, true);
  body.closest("section").querySelector("h2").textContent = title;
  body.replaceChildren(table(
    [{ label: "stream" }, { label: "owner" }, { label: "events", num: 1 }, { label: "consumers", num: 1 }, { label: "total lag", num: 1 }],
    shown.map(s => [streamLink(s.streamName), s.producerId, s.eventsCount, s.consumers, s.lag])));
  section("per-stream", "Events per stream (top 10)").replaceChildren(
    perStream.length ? barChart(perStream, "stream", "events", 1) : el("p", { class: "muted" }, "no events yet"));
  section("per-day", "Events per day, this month (UTC)").replaceChildren(
    barChart(perDay.map(d => ({ label: d.date, short: String(Number(d.date.slice(8))), value: d.eventCount ?? d.eventcount })), "day of month", "events", 2));
}

async function streamView(stream, params) {
  // The name in the query, not the path: a browser drops a path segment "." or ".." (or %2E).
  const [consumers, events] = await Promise.all([
    api("/consumers?stream=" + part(stream)),
    api("/event-period-search?stream=" + part(stream) + "&period=1month", "POST")]);
  const crumbs = document.getElementById("crumbs") || view.appendChild(el("p", { id: "crumbs", class: "crumbs" }));
  crumbs.replaceChildren(el("a", { href: "#/" }, "all streams"), " › ", el("strong", {}, stream));
  const consumerId = params.get("consumerId");
  const eventName = params.get("eventName");
  const shownConsumers = consumerId ? consumers.filter(c => c.consumerId === consumerId) : consumers;
  section("consumers", "Consumers", true).replaceChildren(table(
    [{ label: "consumer" }, { label: "event name" }, { label: "offset", num: 1 }, { label: "behind", num: 1 }, { label: "consumed", num: 1 }, { label: "moved at" }],
    shownConsumers.map(c => [c.consumerId, c.eventName, c.offset, c.behind, c.consumedPercentage.toFixed(2) + " %", c.movedAt])));
  if (params.get("eventId") && openEventId === null) openEventId = params.get("eventId");
  const newest = events.filter(e => !eventName || e.eventName === eventName).slice(0, 50);
  const body = section("events", "Newest events (last 30 days)" + (eventName ? " named " + eventName : ""), true);
  body.closest("section").querySelector("h2").textContent = "Newest events (last 30 days)" + (eventName ? " named " + eventName : "");
  const rows = table([{ label: "event ID" }, { label: "name" }, { label: "created at" }, { label: "consumed by" }],
    newest.map(e => [e.eventId, e.eventName, e.createdAt, (e.consumerIds || e.consumerids).join(", ") || "—"]),
    index => ({ class: "event-row" + (newest[index].eventId === openEventId ? " open" : ""), "data-event-id": newest[index].eventId }));
  const envelope = el("div", { id: "envelope" });
  body.replaceChildren(rows, envelope);
  rows.querySelectorAll(".event-row").forEach(row => row.addEventListener("click", () => {
    openEventId = openEventId === row.dataset.eventId ? null : row.dataset.eventId;
    refresh();
  }));
  if (openEventId) {
    const stored = await api("/events/" + part(openEventId) + "/payload").catch(() => null);
    envelope.replaceChildren(el("h2", {}, "Envelope of " + openEventId),
      el("pre", {}, stored ? JSON.stringify(stored, null, 2) : "not found"));
  }
}

async function searchView(term) {
  const results = await api("/search?_q=" + part(term), "POST");
  const body = section("results", "Search results for “" + term + "”", true);
  body.closest("section").querySelector("h2").textContent = "Search results for “" + term + "”";
  body.replaceChildren(table([{ label: "category" }, { label: "result" }],
    results.map(r => [r.search_result.category, el("a", { href: "#" + r.search_result.url }, r.search_result.label)])));
}

// Routes: #/ (overview), #/search?q=..., and the /admin/... URLs that search answers.
function route() {
  const hash = location.hash.length > 1 ? location.hash.slice(1)
    : location.pathname.startsWith("/admin") ? location.pathname + location.search : "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodePart);
  return { parts, params, key: hash };
}
function decodePart(text) {  // a malformed escape (a link such as #/admin/streams/%E0%A4%A) stays as written
  try { return decodeURIComponent(text); } catch (error) { return text; }
}
let shownKey = null;
async function refresh() {
  clearTimeout(timer);
  try {
    const { parts, params, key } = route();
    if (key !== shownKey) { view.replaceChildren(); shownKey = key; }
    if (parts[0] === "search") await searchView(params.get("q") || "");
    else if (parts[0] === "admin" && parts[1] === "streams" && parts.length >= 3) await streamView(parts[2], params);
    else await overview(parts[0] === "admin" ? params.get("producerId") : null);
    statusLine.className = "";
    statusLine.textContent = "live · updated " + new Date().toLocaleTimeString();
  } catch (error) {
    statusLine.className = "down";
    statusLine.textContent = error instanceof TypeError
      ? "Cannot reach the server — retrying every " + REFRESH_MS / 1000 + " s"
      : "The server answered " + error.message;
  }
  timer = setTimeout(refresh, REFRESH_MS);
}
document.getElementById("search").addEventListener("submit", event => {
  event.preventDefault();
  const term = document.getElementById("q").value.trim();
  if (term) location.hash = "#/search?q=" + part(term);
});
window.addEventListener("hashchange", () => { openEventId = null; refresh(); });
refresh();
</script>
</body>
</html>
"""

DASHBOARD_HEADERS = (  # no page of another site may frame it (clickjacking)
    ("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline';"
                                " connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none';"
                                " frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"),
    ("Cache-Control", "no-store"),
)


if __name__ == "__main__":
    sys.exit(main())

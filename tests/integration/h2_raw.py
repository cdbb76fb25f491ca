"""A tiny HTTP/2 client over a plain TCP socket, for hostile_test.py: it writes the frames a well-behaved
client library never would (floods, half-sent prefaces, endless CONTINUATIONs, lying gRPC length prefixes)
and reads back what the server answered. Only what those cases need: no Huffman encoding, no flow control
beyond what is asked, no TLS.

    c = Connection(port)                                  # preface + SETTINGS
    c.send(headers(1, grpc_request_headers()) + data(1, grpc_message(b"..."), end_stream=True))
    reply = c.read_call(1, timeout=10)                    # {"headers": ..., "trailers": ..., "rst": ...}
"""

import select
import socket
import struct
import threading
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
INFER_PATH = "/attnserve.v1.AttentionService/Infer"
INFER_STREAM_PATH = "/attnserve.v1.AttentionService/InferStream"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
FRAME_NAMES = ["DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING", "GOAWAY",
               "WINDOW_UPDATE", "CONTINUATION"]
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

ERROR_NAMES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR",
               4: "SETTINGS_TIMEOUT", 5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL",
               9: "COMPRESSION_ERROR", 10: "CONNECT_ERROR", 11: "ENHANCE_YOUR_CALM", 12: "INADEQUATE_SECURITY",
               13: "HTTP_1_1_REQUIRED"}
CANCEL = 8


def error_name(code):
    return ERROR_NAMES.get(code, f"0x{code:x}")


# ---- frames ---------------------------------------------------------------------------------------------

def frame(kind, flags, stream, payload=b""):
    n = len(payload)
    return struct.pack(">BHBBI", n >> 16, n & 0xFFFF, kind, flags, stream & 0x7FFFFFFF) + payload


def headers(stream, block, end_headers=True, end_stream=False):
    return frame(HEADERS, (END_HEADERS if end_headers else 0) | (END_STREAM if end_stream else 0), stream, block)


def continuation(stream, block, end_headers=False):
    return frame(CONTINUATION, END_HEADERS if end_headers else 0, stream, block)


def data(stream, payload, end_stream=False):
    return frame(DATA, END_STREAM if end_stream else 0, stream, payload)


def rst_stream(stream, code=CANCEL):
    return frame(RST_STREAM, 0, stream, struct.pack(">I", code))


def ping(opaque=b"\0" * 8, ack=False):
    return frame(PING, ACK if ack else 0, 0, opaque)


def settings(pairs=(), ack=False):
    return frame(SETTINGS, ACK if ack else 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def window_update(stream, increment):
    return frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", increment & 0x7FFFFFFF))


def goaway(last_stream=0, code=0):
    return frame(GOAWAY, 0, 0, struct.pack(">II", last_stream, code))


def grpc_message(payload, compressed=False, length=None):
    """The gRPC length-prefixed message: a compressed flag, a 4-byte length (which may lie), the bytes."""
    return struct.pack(">BI", 1 if compressed else 0, len(payload) if length is None else length) + payload


# ---- HPACK: literal header fields without indexing, new name, no Huffman (RFC 7541 6.2.2) ---------------

def hpack_int(value, prefix_bits, first=0):
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_string(s):
    b = s if isinstance(s, bytes) else s.encode()
    return hpack_int(len(b), 7) + b


def literal(name, value):
    return b"\x00" + hpack_string(name) + hpack_string(value)


def grpc_request_headers(path=INFER_PATH, authority="127.0.0.1", extra=()):
    """The header block of a gRPC call: :method POST, :scheme http, :path, :authority, content-type
    application/grpc, te trailers, then the (name, value) pairs of extra."""
    fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
              ("content-type", "application/grpc"), ("te", "trailers"), *extra]
    return b"".join(literal(k, v) for k, v in fields)


# ---- HPACK decoding: what the server answers (static and dynamic tables; Huffman strings are decoded) ---

STATIC_TABLE = [
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
    (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
    (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
    ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""),
    ("cache-control", ""), ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""),
    ("content-length", ""), ("content-location", ""), ("content-range", ""), ("content-type", ""),
    ("cookie", ""), ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""),
    ("proxy-authenticate", ""), ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""),
    ("retry-after", ""), ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""),
    ("transfer-encoding", ""), ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
]

# RFC 7541 Appendix B: (code, bit length) of symbols 0..256 (256 is EOS).
HUFFMAN = [
    (0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28), (0xfffffe4, 28), (0xfffffe5, 28),
    (0xfffffe6, 28), (0xfffffe7, 28), (0xfffffe8, 28), (0xffffea, 24), (0x3ffffffc, 30), (0xfffffe9, 28),
    (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28), (0xfffffec, 28), (0xfffffed, 28), (0xfffffee, 28),
    (0xfffffef, 28), (0xffffff0, 28), (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28),
    (0xffffff4, 28), (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28), (0xffffff8, 28), (0xffffff9, 28),
    (0xffffffa, 28), (0xffffffb, 28), (0x14, 6), (0x3f8, 10), (0x3f9, 10), (0xffa, 12), (0x1ff9, 13),
    (0x15, 6), (0xf8, 8), (0x7fa, 11), (0x3fa, 10), (0x3fb, 10), (0xf9, 8), (0x7fb, 11), (0xfa, 8),
    (0x16, 6), (0x17, 6), (0x18, 6), (0x0, 5), (0x1, 5), (0x2, 5), (0x19, 6), (0x1a, 6), (0x1b, 6),
    (0x1c, 6), (0x1d, 6), (0x1e, 6), (0x1f, 6), (0x5c, 7), (0xfb, 8), (0x7ffc, 15), (0x20, 6), (0xffb, 12),
    (0x3fc, 10), (0x1ffa, 13), (0x21, 6), (0x5d, 7), (0x5e, 7), (0x5f, 7), (0x60, 7), (0x61, 7), (0x62, 7),
    (0x63, 7), (0x64, 7), (0x65, 7), (0x66, 7), (0x67, 7), (0x68, 7), (0x69, 7), (0x6a, 7), (0x6b, 7),
    (0x6c, 7), (0x6d, 7), (0x6e, 7), (0x6f, 7), (0x70, 7), (0x71, 7), (0x72, 7), (0xfc, 8), (0x73, 7),
    (0xfd, 8), (0x1ffb, 13), (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14), (0x22, 6), (0x7ffd, 15), (0x3, 5),
    (0x23, 6), (0x4, 5), (0x24, 6), (0x5, 5), (0x25, 6), (0x26, 6), (0x27, 6), (0x6, 5), (0x74, 7),
    (0x75, 7), (0x28, 6), (0x29, 6), (0x2a, 6), (0x7, 5), (0x2b, 6), (0x76, 7), (0x2c, 6), (0x8, 5),
    (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7), (0x79, 7), (0x7a, 7), (0x7b, 7), (0x7ffe, 15), (0x7fc, 11),
    (0x3ffd, 14), (0x1ffd, 13), (0xffffffc, 28), (0xfffe6, 20), (0x3fffd2, 22), (0xfffe7, 20), (0xfffe8, 20),
    (0x3fffd3, 22), (0x3fffd4, 22), (0x3fffd5, 22), (0x7fffd9, 23), (0x3fffd6, 22), (0x7fffda, 23),
    (0x7fffdb, 23), (0x7fffdc, 23), (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23),
    (0xffffec, 24), (0xffffed, 24), (0x3fffd7, 22), (0x7fffe0, 23), (0xffffee, 24), (0x7fffe1, 23),
    (0x7fffe2, 23), (0x7fffe3, 23), (0x7fffe4, 23), (0x1fffdc, 21), (0x3fffd8, 22), (0x7fffe5, 23),
    (0x3fffd9, 22), (0x7fffe6, 23), (0x7fffe7, 23), (0xffffef, 24), (0x3fffda, 22), (0x1fffdd, 21),
    (0xfffe9, 20), (0x3fffdb, 22), (0x3fffdc, 22), (0x7fffe8, 23), (0x7fffe9, 23), (0x1fffde, 21),
    (0x7fffea, 23), (0x3fffdd, 22), (0x3fffde, 22), (0xfffff0, 24), (0x1fffdf, 21), (0x3fffdf, 22),
    (0x7fffeb, 23), (0x7fffec, 23), (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21),
    (0x7fffed, 23), (0x3fffe1, 22), (0x7fffee, 23), (0x7fffef, 23), (0xfffea, 20), (0x3fffe2, 22),
    (0x3fffe3, 22), (0x3fffe4, 22), (0x7ffff0, 23), (0x3fffe5, 22), (0x3fffe6, 22), (0x7ffff1, 23),
    (0x3ffffe0, 26), (0x3ffffe1, 26), (0xfffeb, 20), (0x7fff1, 19), (0x3fffe7, 22), (0x7ffff2, 23),
    (0x3fffe8, 22), (0x1ffffec, 25), (0x3ffffe2, 26), (0x3ffffe3, 26), (0x3ffffe4, 26), (0x7ffffde, 27),
    (0x7ffffdf, 27), (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25), (0x7fff2, 19), (0x1fffe3, 21),
    (0x3ffffe6, 26), (0x7ffffe0, 27), (0x7ffffe1, 27), (0x3ffffe7, 26), (0x7ffffe2, 27), (0xfffff2, 24),
    (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26), (0x3ffffe9, 26), (0xffffffd, 28), (0x7ffffe3, 27),
    (0x7ffffe4, 27), (0x7ffffe5, 27), (0xfffec, 20), (0xfffff3, 24), (0xfffed, 20), (0x1fffe6, 21),
    (0x3fffe9, 22), (0x1fffe7, 21), (0x1fffe8, 21), (0x7ffff3, 23), (0x3fffea, 22), (0x3fffeb, 22),
    (0x1ffffee, 25), (0x1ffffef, 25), (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23),
    (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26), (0x7ffffe7, 27), (0x7ffffe8, 27),
    (0x7ffffe9, 27), (0x7ffffea, 27), (0x7ffffeb, 27), (0xffffffe, 28), (0x7ffffec, 27), (0x7ffffed, 27),
    (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27), (0x3ffffee, 26), (0x3fffffff, 30),
]
_HUFFMAN_DECODE = {(length, code): sym for sym, (code, length) in enumerate(HUFFMAN)}


def huffman_decode(b):
    out = bytearray()
    code = length = 0
    for byte in b:
        for shift in range(7, -1, -1):
            code = (code << 1) | ((byte >> shift) & 1)
            length += 1
            sym = _HUFFMAN_DECODE.get((length, code))
            if sym is not None:
                if sym == 256:
                    raise ValueError("EOS in a Huffman string")
                out.append(sym)
                code = length = 0
            elif length > 30:
                raise ValueError("bad Huffman code")
    return bytes(out)  # what is left is padding (at most 7 bits of ones)


class HpackDecoder:
    def __init__(self):
        self.dynamic = []  # newest first
        self.size = 0
        self.max_size = 4096

    def _entry(self, index):
        if index <= 0:
            raise ValueError("HPACK index 0")
        if index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        return self.dynamic[index - len(STATIC_TABLE) - 1]

    def _add(self, name, value):
        self.dynamic.insert(0, (name, value))
        self.size += len(name) + len(value) + 32
        self._evict()

    def _evict(self):
        while self.size > self.max_size and self.dynamic:
            n, v = self.dynamic.pop()
            self.size -= len(n) + len(v) + 32

    @staticmethod
    def _int(b, pos, prefix_bits):
        limit = (1 << prefix_bits) - 1
        value = b[pos] & limit
        pos += 1
        if value < limit:
            return value, pos
        shift = 0
        while True:
            byte = b[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos

    def _string(self, b, pos):
        huffman = b[pos] & 0x80
        n, pos = self._int(b, pos, 7)
        raw = bytes(b[pos:pos + n])
        pos += n
        return (huffman_decode(raw) if huffman else raw).decode("latin-1"), pos

    def decode(self, b):
        """A whole header block: a list of (name, value)."""
        out = []
        pos = 0
        while pos < len(b):
            first = b[pos]
            if first & 0x80:  # indexed
                index, pos = self._int(b, pos, 7)
                out.append(self._entry(index))
            elif first & 0x40:  # literal with incremental indexing
                index, pos = self._int(b, pos, 6)
                name, pos = (self._entry(index)[0], pos) if index else self._string(b, pos)
                value, pos = self._string(b, pos)
                self._add(name, value)
                out.append((name, value))
            elif first & 0x20:  # dynamic table size update
                self.max_size, pos = self._int(b, pos, 5)
                self._evict()
            else:  # literal without indexing / never indexed
                index, pos = self._int(b, pos, 4)
                name, pos = (self._entry(index)[0], pos) if index else self._string(b, pos)
                value, pos = self._string(b, pos)
                out.append((name, value))
        return out


# ---- a connection ---------------------------------------------------------------------------------------

class Closed(Exception):
    pass


class Connection:
    """One TCP connection to the server, its preface and SETTINGS sent (unless preface=False)."""

    def __init__(self, port, preface=True, initial_settings=((SETTINGS_ENABLE_PUSH, 0),), timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.decoder = HpackDecoder()
        self.goaway = None  # (last_stream, error code, debug data) once the server sent GOAWAY
        self.eof = False
        self.pending_block = None  # (stream, bytes) while a header block has CONTINUATIONs to come
        self.lock = threading.Lock()  # a reader thread answers SETTINGS while another thread floods
        self.backlog = []  # frames read by send_flow_controlled, for read_frame to return
        self.peer_initial_window = 65535
        self.conn_window = 65535
        self.stream_windows = {}
        if preface:
            self.send(PREFACE + settings(initial_settings))

    def send(self, b):
        try:
            with self.lock:
                self.sock.sendall(b)
        except socket.timeout as e:  # the server stopped reading for `timeout` seconds
            raise Closed("send timed out") from e
        except OSError as e:  # EPIPE, ECONNRESET: the server closed the connection
            raise Closed(e.strerror or str(e)) from e

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self, deadline):
        remaining = deadline - time.time()
        if remaining <= 0:
            return False
        # select, not a socket timeout: the timeout is shared with a flooding thread's sendall
        try:
            if not select.select([self.sock], [], [], remaining)[0]:
                return False
            chunk = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except (OSError, ValueError):
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def read_frame(self, timeout=5.0):
        """The next frame (kind, flags, stream, payload), or None on timeout or end of the connection. Answers
        SETTINGS (ACK) on the way and records GOAWAY."""
        if self.backlog:
            return self.backlog.pop(0)
        deadline = time.time() + timeout
        while True:
            if len(self.buf) >= 9:
                n = (self.buf[0] << 16) | (self.buf[1] << 8) | self.buf[2]
                if len(self.buf) >= 9 + n:
                    kind, flags, stream = self.buf[3], self.buf[4], struct.unpack(">I", self.buf[5:9])[0] & 0x7FFFFFFF
                    payload = bytes(self.buf[9:9 + n])
                    del self.buf[:9 + n]
                    if kind == SETTINGS and not flags & ACK:
                        for off in range(0, len(payload) - 5, 6):
                            key, value = struct.unpack(">HI", payload[off:off + 6])
                            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                                delta = value - self.peer_initial_window
                                self.peer_initial_window = value
                                for sid in self.stream_windows:
                                    self.stream_windows[sid] += delta
                        try:
                            self.send(settings(ack=True))
                        except Closed:
                            pass
                    elif kind == WINDOW_UPDATE and len(payload) == 4:
                        inc = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
                        if stream == 0:
                            self.conn_window += inc
                        else:
                            self.stream_windows[stream] = self.stream_windows.get(stream, self.peer_initial_window) + inc
                    elif kind == GOAWAY:
                        last, code = struct.unpack(">II", payload[:8])
                        self.goaway = (last & 0x7FFFFFFF, code, payload[8:].decode("latin-1"))
                    return kind, flags, stream, payload
            if self.eof or not self._fill(deadline):
                return None

    def send_body(self, stream, body, seconds=10.0, end_stream=True):
        """`body` as DATA frames within the server's windows and max frame size, then END_STREAM. Returns
        (bytes sent, why it stopped)."""
        sent, why = self.send_flow_controlled(stream, body, b"", len(body), seconds)
        if end_stream and sent == len(body):
            try:
                self.send(data(stream, b"", end_stream=True))
            except Closed as e:
                return sent, f"the connection failing ({e})"
        return sent, why

    def send_flow_controlled(self, stream, first, chunk, limit, seconds):
        """DATA on `stream` (opened by the caller): `first`, then `chunk` again and again, as fast as the
        server's flow-control windows allow, until `limit` bytes, `seconds`, or the server ends the stream or
        the connection. Returns (bytes sent, why it stopped); the frames read meanwhile stay for read_frame."""
        deadline = time.time() + seconds
        self.stream_windows.setdefault(stream, self.peer_initial_window)
        pending = first
        sent = 0
        while True:
            if sent >= limit:
                return sent, "the limit"
            if time.time() >= deadline:
                return sent, f"{seconds:.0f} s"
            window = min(self.conn_window, self.stream_windows[stream])
            if not pending:
                if not chunk:
                    return sent, "the end of the body"
                pending = chunk
            if window <= 0:
                f = self.read_frame(min(0.5, max(0.01, deadline - time.time())))
                if f is not None and f[0] not in (WINDOW_UPDATE, SETTINGS, PING):
                    self.backlog.append(f)
                    if f[2] == stream or f[0] == GOAWAY:
                        return sent, f"the server's {FRAME_NAMES[f[0]] if f[0] < len(FRAME_NAMES) else f[0]}"
                if self.eof:
                    return sent, "the server closing the connection"
                continue
            n = min(window, len(pending), 16384)
            try:
                self.send(data(stream, pending[:n]))
            except Closed as e:
                return sent, f"the connection failing ({e})"
            pending = pending[n:]
            sent += n
            self.conn_window -= n
            self.stream_windows[stream] -= n

    def drain(self, timeout):
        """Reads and counts frames by kind for `timeout` seconds (or until the connection ends)."""
        counts = {}
        deadline = time.time() + timeout
        while time.time() < deadline:
            f = self.read_frame(deadline - time.time())
            if f is None:
                break
            counts[FRAME_NAMES[f[0]] if f[0] < len(FRAME_NAMES) else str(f[0])] = \
                counts.get(FRAME_NAMES[f[0]] if f[0] < len(FRAME_NAMES) else str(f[0]), 0) + 1
        return counts

    def read_call(self, stream, timeout=10.0):
        """What the server answered on one stream: {"headers", "data", "trailers", "rst", "goaway", "eof",
        "status" (grpc-status as int or None), "message"}: until the stream ends, the connection ends or
        the timeout."""
        out = {"headers": None, "data": b"", "trailers": None, "rst": None}
        deadline = time.time() + timeout
        while time.time() < deadline:
            f = self.read_frame(deadline - time.time())
            if f is None:
                break
            kind, flags, sid, payload = f
            if kind in (HEADERS, CONTINUATION):
                if kind == HEADERS:
                    block = payload
                    if flags & 0x8:  # PADDED
                        block = block[1:len(block) - block[0]]
                    if flags & 0x20:  # PRIORITY
                        block = block[5:]
                    self.pending_block = (sid, block)
                else:
                    self.pending_block = (self.pending_block[0], self.pending_block[1] + payload)
                if flags & END_HEADERS:
                    hsid, block = self.pending_block
                    self.pending_block = None
                    fields = self.decoder.decode(block)  # every block goes through, to keep the table right
                    if hsid == stream:
                        if out["headers"] is None and any(k == ":status" for k, _ in fields):
                            out["headers"] = fields
                        else:
                            out["trailers"] = fields
                if sid == stream and flags & END_STREAM:
                    # END_STREAM on a HEADERS with CONTINUATIONs to come: wait for END_HEADERS
                    if self.pending_block is None:
                        break
                    out["_end_after_block"] = True
                elif self.pending_block is None and out.pop("_end_after_block", False):
                    break
            elif kind == DATA and sid == stream:
                out["data"] += payload
                if payload:
                    self.send(window_update(0, len(payload)) + window_update(stream, len(payload)))
                if flags & END_STREAM:
                    break
            elif kind == RST_STREAM and sid == stream:
                out["rst"] = error_name(struct.unpack(">I", payload)[0])
                break
            elif kind == PING and not flags & ACK:
                self.send(ping(payload, ack=True))
        out["goaway"] = self.goaway
        out["eof"] = self.eof
        meta = dict(out["trailers"] or []) or dict(out["headers"] or [])  # a trailers-only answer
        out["status"] = int(meta["grpc-status"]) if "grpc-status" in meta else None
        out["message"] = meta.get("grpc-message", "")
        return out


def describe(reply):
    """One short line for a read_call answer."""
    parts = []
    if reply["status"] is not None:
        parts.append(f"grpc-status {reply['status']} {reply['message'][:120]!r}")
    if reply["rst"]:
        parts.append(f"RST_STREAM {reply['rst']}")
    if reply["goaway"]:
        last, code, debug = reply["goaway"]
        parts.append(f"GOAWAY {error_name(code)} {debug[:80]!r}")
    if reply["eof"]:
        parts.append("connection closed")
    return ", ".join(parts) or "no answer"


class Reader:
    """A thread reading one connection's frames until it ends or stop(): counts them by kind, records GOAWAY
    and RST_STREAM codes. The attacker reads, as real ones do, so that the server's writes never block."""

    def __init__(self, conn):
        self.conn = conn
        self.counts = {}
        self.rst_codes = {}
        self.statuses = {}  # grpc-status values of the HEADERS the server sent
        self.ended_at = None
        self._block = b""
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            f = self.conn.read_frame(0.2)
            if f is None:
                if self.conn.eof:
                    self.ended_at = time.time()
                    return
                continue
            kind, flags, _, payload = f
            name = FRAME_NAMES[kind] if kind < len(FRAME_NAMES) else str(kind)
            self.counts[name] = self.counts.get(name, 0) + 1
            if kind == RST_STREAM:
                code = error_name(struct.unpack(">I", payload)[0])
                self.rst_codes[code] = self.rst_codes.get(code, 0) + 1
            elif kind in (HEADERS, CONTINUATION):
                self._block = (self._block if kind == CONTINUATION else b"") + payload
                if flags & END_HEADERS:
                    try:
                        fields = dict(self.conn.decoder.decode(self._block))
                    except (ValueError, IndexError):
                        fields = {"grpc-status": "undecodable"}
                    if "grpc-status" in fields:
                        st = fields["grpc-status"]
                        self.statuses[st] = self.statuses.get(st, 0) + 1

    def stop(self):
        self._stop.set()
        self.thread.join()
        return self

    def summary(self):
        parts = [f"{n} {k}" for k, n in sorted(self.counts.items())]
        if self.statuses:
            parts.append("grpc-status " + ",".join(f"{k}:{n}" for k, n in sorted(self.statuses.items())))
        if self.rst_codes:
            parts.append("RST codes " + ",".join(f"{k}:{n}" for k, n in sorted(self.rst_codes.items())))
        if self.conn.goaway:
            parts.append(f"GOAWAY {error_name(self.conn.goaway[1])} {self.conn.goaway[2][:60]!r}")
        if self.conn.eof:
            parts.append("closed by the server")
        return ", ".join(parts) or "nothing"

"""Content coding of a stream's body: which codec (``negotiate``), and its bytes, flushed per write.

The response hands every byte it writes to its ``Encoder`` (``encode``), and
what comes back goes on the wire at once: an event is decodable by the client
as soon as its bytes arrive, never held in a compressor's buffer. At the end
of the body ``finish`` gives the codec's trailer.

Two codecs, each a well-kept library (docs/DECISIONS.md, "Compressed streams"):

- ``zstd`` (RFC 8878, ``Content-Encoding: zstd``), by ``backports.zstd``: the
  backport of Python 3.14's ``compression.zstd`` (PEP 784), the one aiohttp's
  own client decodes with; level 1 with a small hash table, a 128 KiB
  window (RFC 9659 caps a browser's at 8 MB), no checksum (HTTP has its own
  framing), each write ending a block (``FLUSH_BLOCK``).
- ``gzip`` (RFC 1952), by ``isal`` (ISA-L's deflate and CRC-32 behind the
  standard library's zlib API): the 10-byte header and 8-byte trailer here,
  the deflate stream by ISA-L at level 1 with a 1 KiB window (candles repeat
  their shape every ~100 bytes: the nearest matches are the cheapest to
  code) and a small level buffer (165 KiB a compressor), each write ending
  with a sync flush.

Followers of one job share the compressed bytes of their live events
(``LiveEncoder``): a connection's own encoder hands over at a boundary after
which nothing refers to what it wrote (``hand_over``), frees its compressor,
and takes the shared bytes until it leaves (``take_back``). A deflate stream
after a full flush, and a zstd frame begun after the previous one ended,
depend on nothing before them; both decoders take the concatenation.

What a fan-out that writes one event to many connections does with it
(a group of the follow hub, ``hub._Group``), per codec among its connections:

- join: ``live.restart()``'s bytes to those already taking ``live``, then the
  joiner's ``encoder.hand_over()`` bytes to the joiner;
- each write: ``coded = live.encode(data)`` to every one of them, and for
  gzip ``encoder.took(data, live)`` on each (its trailer's CRC-32 and length);
- a joined connection's ``: ping`` goes through ``live`` to all of them alike
  (its body may hold nothing the shared bytes did not, as they refer back);
- leave: ``encoder.take_back(live)``'s bytes to the leaver, whose own
  ``encode`` then goes on; at the end of its body, ``finish()`` as always.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Sequence
from typing import Final

from backports.zstd import CompressionParameter, ZstdCompressor
from isal import isal_zlib

from gateway import metrics


class Codec(enum.StrEnum):
    """A content coding of the stream's body, by its ``Content-Encoding`` name."""

    IDENTITY = "identity"
    ZSTD = "zstd"
    GZIP = "gzip"


# The server's preference among codings the client weighs equally.
PREFERENCE: Final = (Codec.ZSTD, Codec.GZIP)
# RFC 9110 12.5.3: a recipient should treat x-gzip as gzip.
_ALIASES: Final = {"x-gzip": "gzip"}

ZSTD_LEVEL: Final = 1
ZSTD_WINDOW_LOG: Final = 17  # 128 KiB; RFC 9659: at most 8 MB (window_log 23)
# Level 1's hash table cut from 2^13 entries to 2^8: candles repeat their shape
# every ~100 bytes, and a small table that keeps the latest positions finds the
# nearest match. Measured on 16 MB of random-walk candles: 6.3x instead of
# 5.3x, in 29 ms of CPU instead of 38 ms, and about 30 KiB less per compressor.
ZSTD_HASH_LOG: Final = 8
# ISA-L level 1 (of 0-3), measured on 16 MB of random-walk candles with a sync flush
# per event: 5.1x in 27 ms of CPU, where zlib's level 1 (8 KiB window) took 103 ms
# for 4.2x and zlib-ng's level 2 77 ms for 4.5x. A smaller window codes smaller:
# candles refer back to the last few, and near distances take fewer bits
# (8 KiB: 4.5x; 1 KiB: 5.1x; 512 B: 5.3x, kept a step away from the floor).
GZIP_LEVEL: Final = 1
GZIP_WINDOW_BITS: Final = 10  # 1 KiB
# ISA-L's level buffer (1: min, 2-3: small, 4-6: medium, 7-8: large, 9: extra large):
# small is as fast here as medium, in 165 KiB a compressor instead of 229 KiB.
GZIP_MEM_LEVEL: Final = 3
# ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=255 (unknown) (RFC 1952 2.3).
_GZIP_HEADER: Final = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
# A final deflate block with no data (fixed Huffman, end-of-block only): ends a
# deflate stream whose compressor was given away after a sync or full flush.
_DEFLATE_END: Final = b"\x03\x00"
# A last zstd block, raw and empty (RFC 8878 3.1.1.2): ends a frame that a shared
# compressor began (frames carry no checksum, so nothing else follows it).
_ZSTD_FRAME_END: Final = b"\x01\x00\x00"


@functools.lru_cache(maxsize=8)
def parse_codecs(setting: str) -> tuple[Codec, ...]:
    """``compression.codecs`` ("zstd,gzip"; "" or "identity": none) in preference order; ValueError names a bad one."""
    chosen: list[Codec] = []
    for name in (part.strip().lower() for part in setting.split(",")):
        if not name or name == Codec.IDENTITY:
            continue
        if name not in (codec.value for codec in PREFERENCE):
            raise ValueError(f"unknown codec {name!r} (known: zstd, gzip; empty turns compression off)")
        if Codec(name) not in chosen:
            chosen.append(Codec(name))
    return tuple(chosen)


def negotiate(accept_encoding: str | None, allowed: Sequence[Codec]) -> Codec:
    """The codec of the answer to a request with this ``Accept-Encoding`` (RFC 9110 12.5.3).

    The highest q-value among ``allowed`` codecs wins, ties going to
    ``allowed``'s order; ``q=0`` refuses a coding, ``*`` stands for every
    coding not named. Identity when nothing acceptable is allowed (even where
    the client refused identity: a stream sent plain beats no stream).
    """
    if not accept_encoding or not allowed:
        return Codec.IDENTITY
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        name = name.strip().lower()
        if not name:
            continue
        weight = 1.0
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = min(max(float(value.strip()), 0.0), 1.0)
                except ValueError:
                    weight = 0.0  # a q-value that does not parse accepts nothing
        name = _ALIASES.get(name, name)
        weights[name] = max(weights.get(name, 0.0), weight)
    wildcard = weights.get("*", 0.0)
    best, best_weight = Codec.IDENTITY, 0.0
    for codec in allowed:
        weight = weights.get(codec.value, wildcard)
        if weight > best_weight:
            best, best_weight = codec, weight
    return best


class Encoder:
    """One connection's content coding: ``encode`` each write (flushed), ``finish`` at the end of the body."""

    __slots__ = ()
    codec: Codec = Codec.IDENTITY

    def encode(self, data: bytes) -> bytes:
        """``data`` coded and flushed: everything the client needs to decode it."""
        raise NotImplementedError

    def finish(self) -> bytes:
        """The last bytes of the body (the codec's end and trailer)."""
        raise NotImplementedError

    def hand_over(self) -> bytes:
        """End this connection's own compression at a boundary and free its compressor: the bytes to write first.

        From here on the connection takes a ``LiveEncoder``'s shared bytes
        (telling ``took`` what they stood for) until ``take_back``.
        """
        raise NotImplementedError

    def took(self, data: bytes, shared: LiveEncoder) -> None:
        """``shared``'s coding of ``data`` was written to this connection."""

    def take_back(self, shared: LiveEncoder) -> bytes:
        """Leave ``shared``: the bytes that close what it began, before this encoder's own again."""
        raise NotImplementedError


class ZstdEncoder(Encoder):
    """zstd, one frame per run of the connection's own writes, one block per write."""

    codec = Codec.ZSTD
    __slots__ = ("_compressor",)

    def __init__(self) -> None:
        self._compressor: ZstdCompressor | None = None

    def encode(self, data: bytes) -> bytes:
        compressor = self._compressor
        if compressor is None:
            compressor = self._compressor = _zstd_compressor()
        out = compressor.compress(data, ZstdCompressor.FLUSH_BLOCK)
        _count(Codec.ZSTD, len(data), len(out))
        return out

    def finish(self) -> bytes:
        compressor, self._compressor = self._compressor, None
        # A body with no write at all still is one (empty) frame.
        return (compressor or _zstd_compressor()).flush(ZstdCompressor.FLUSH_FRAME)

    def hand_over(self) -> bytes:
        compressor, self._compressor = self._compressor, None
        return b"" if compressor is None else compressor.flush(ZstdCompressor.FLUSH_FRAME)

    def take_back(self, shared: LiveEncoder) -> bytes:
        return _ZSTD_FRAME_END if shared.open else b""


class GzipEncoder(Encoder):
    """gzip: the header, one deflate stream sync-flushed after each write, the CRC-32 and length trailer."""

    codec = Codec.GZIP
    __slots__ = ("_crc", "_deflate", "_size", "_started")

    def __init__(self) -> None:
        self._deflate: isal_zlib.Compress | None = None
        self._started = False
        self._crc = 0
        self._size = 0

    def _begin(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        return _GZIP_HEADER

    def encode(self, data: bytes) -> bytes:
        head = self._begin()
        deflate = self._deflate
        if deflate is None:
            deflate = self._deflate = _deflate()
        out = head + deflate.compress(data) + deflate.flush(isal_zlib.Z_SYNC_FLUSH)
        self._crc = _crc32(data, self._crc)
        self._size += len(data)
        _count(Codec.GZIP, len(data), len(out))
        return out

    def finish(self) -> bytes:
        head = self._begin()
        deflate, self._deflate = self._deflate, None
        end = _DEFLATE_END if deflate is None else deflate.flush(isal_zlib.Z_FINISH)
        return head + end + struct.pack("<II", self._crc, self._size & 0xFFFFFFFF)

    def hand_over(self) -> bytes:
        # Every write ended with a sync flush: the stream is byte-aligned, its
        # blocks not final, so the shared deflate blocks may follow as they are.
        self._deflate = None
        return self._begin()

    def took(self, data: bytes, shared: LiveEncoder) -> None:
        self._crc = _crc32(data, self._crc)
        self._size += len(data)

    def take_back(self, shared: LiveEncoder) -> bytes:
        return b""  # the shared blocks end sync-flushed too: the next compressor's may follow


def encoder_for(codec: Codec) -> Encoder | None:
    """A new connection's encoder; None for identity (the bytes go as they are)."""
    if codec is Codec.ZSTD:
        return ZstdEncoder()
    if codec is Codec.GZIP:
        return GzipEncoder()
    return None


class LiveEncoder:
    """One compressor whose flushed output many connections take alike (followers of one job at one position).

    ``restart`` before a connection joins: what it returns goes to those
    already taking, and what comes after depends on nothing before (zstd: the
    frame ends and the next begins; deflate: a full flush).
    """

    __slots__ = ("_compressor", "_deflate", "codec", "open")

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._compressor = _zstd_compressor() if codec is Codec.ZSTD else None
        self._deflate = _deflate() if codec is Codec.GZIP else None
        self.open = False  # output since the last restart (a zstd frame open, deflate history to forget)

    def encode(self, data: bytes) -> bytes:
        """``data`` coded and flushed, for every connection taking this encoder's bytes."""
        self.open = True
        if self._compressor is not None:
            return self._compressor.compress(data, ZstdCompressor.FLUSH_BLOCK)
        assert self._deflate is not None
        return self._deflate.compress(data) + self._deflate.flush(isal_zlib.Z_SYNC_FLUSH)

    def restart(self) -> bytes:
        """For those taking now: after these bytes, nothing depends on earlier output."""
        if not self.open:
            return b""
        self.open = False
        if self._compressor is not None:
            return self._compressor.flush(ZstdCompressor.FLUSH_FRAME)
        assert self._deflate is not None
        return self._deflate.flush(isal_zlib.Z_FULL_FLUSH)


def _zstd_compressor() -> ZstdCompressor:
    return ZstdCompressor(
        options={
            CompressionParameter.compression_level: ZSTD_LEVEL,
            CompressionParameter.window_log: ZSTD_WINDOW_LOG,
            CompressionParameter.hash_log: ZSTD_HASH_LOG,
            CompressionParameter.checksum_flag: 0,
        }
    )


def _deflate() -> isal_zlib.Compress:
    return isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, -GZIP_WINDOW_BITS, GZIP_MEM_LEVEL)


# The gzip trailer's CRC-32, taken per write and per shared write a member took
# (ISA-L's: 16 MB in 2 ms, where zlib's takes 8 ms).
_crc32 = isal_zlib.crc32


def _count(codec: Codec, before: int, after: int) -> None:
    if metrics.SWITCH.on:
        metrics.compressed(codec.value, before, after)


def count_shared(codec: Codec, before: int, after: int, connections: int) -> None:
    """Bytes of a shared live write, once per connection it went to."""
    if metrics.SWITCH.on and connections:
        metrics.compressed(codec.value, before * connections, after * connections)

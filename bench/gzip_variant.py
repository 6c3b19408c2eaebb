"""gzip coded by another deflate, side by side with the gateway's own: ``python -m bench.gzip_variant SPEC serve ...``.

A variant names a library and its parameters, ``LIBRARY:LEVEL:WBITS:MEMLEVEL``
(``zlib:1:13:5`` is the standard library's zlib at level 1, an 8 KiB window
and memory level 5). The compression benchmark serves each variant from a
gateway of its own (this module: the variant swapped into
``gateway.compression``, then the ordinary command line) and codes the same
events with it in process, next to the gateway's gzip.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

from gateway import compression

# Each a drop-in of the standard library's zlib API (compressobj, crc32, the flush modes).
LIBRARIES: dict[str, str] = {"zlib": "zlib", "zlib-ng": "zlib_ng.zlib_ng", "isal": "isal.isal_zlib"}


@dataclass(frozen=True)
class GzipVariant:
    """A deflate library and its level, window bits and memory level."""

    library: str
    level: int
    window_bits: int
    mem_level: int

    @classmethod
    def parse(cls, spec: str) -> GzipVariant:
        """``LIBRARY:LEVEL:WBITS:MEMLEVEL``; ValueError names what is wrong."""
        parts = spec.split(":")
        if len(parts) != 4 or parts[0] not in LIBRARIES:
            raise ValueError(
                f"gzip variant {spec!r}: expected LIBRARY:LEVEL:WBITS:MEMLEVEL, LIBRARY one of {sorted(LIBRARIES)}"
            )
        try:
            level, window_bits, mem_level = (int(part) for part in parts[1:])
        except ValueError:
            raise ValueError(f"gzip variant {spec!r}: level, window bits and memory level are integers") from None
        if not (0 <= level <= 9 and 9 <= window_bits <= 15 and 1 <= mem_level <= 9):
            raise ValueError(f"gzip variant {spec!r}: level 0-9, window bits 9-15, memory level 1-9")
        variant = cls(parts[0], level, window_bits, mem_level)
        try:
            variant.module  # noqa: B018 (imported here, so that a missing library is named before any gateway starts)
        except ImportError as exc:
            raise ValueError(f"gzip variant {spec!r}: {exc} (pip install it into the virtualenv)") from None
        return variant

    @classmethod
    def gateways(cls) -> GzipVariant:
        """The gateway's own gzip, as a variant (its library known by its CRC-32)."""
        for library, module in LIBRARIES.items():
            with contextlib.suppress(ImportError):
                if importlib.import_module(module).crc32 is compression._crc32:
                    return cls(
                        library, compression.GZIP_LEVEL, compression.GZIP_WINDOW_BITS, compression.GZIP_MEM_LEVEL
                    )
        raise LookupError("gateway.compression's gzip library is none of bench.gzip_variant.LIBRARIES")

    @property
    def spec(self) -> str:
        return f"{self.library}:{self.level}:{self.window_bits}:{self.mem_level}"

    @property
    def label(self) -> str:
        return f"{self.library} L{self.level}/{self.window_bits}/{self.mem_level}"

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(LIBRARIES[self.library])

    def deflate(self) -> Callable[[], object]:
        """A factory of this variant's raw deflate compressors."""
        library = self.module

        def make() -> object:
            return library.compressobj(self.level, library.DEFLATED, -self.window_bits, self.mem_level)

        return make

    def crc32(self) -> Callable[[bytes, int], int]:
        crc: Callable[[bytes, int], int] = self.module.crc32
        return crc


@contextlib.contextmanager
def swapped_in(variant: GzipVariant) -> Iterator[None]:
    """``gateway.compression``'s gzip coded by ``variant`` (its deflate and CRC-32) until the block ends."""
    names = ("_deflate", "_crc32")
    module = vars(compression)
    before = {name: module[name] for name in names}
    # The module's own names, looked up at each call: the encoders take the variant's without knowing.
    module.update(_deflate=variant.deflate(), _crc32=variant.crc32())
    try:
        yield
    finally:
        module.update(before)


def command(variant: GzipVariant, *args: str) -> list[str]:
    """The command line of a gateway whose gzip is ``variant`` (``args`` as for ``python -m gateway``)."""
    return [sys.executable, "-m", "bench.gzip_variant", variant.spec, *args]


def main() -> None:
    variant = GzipVariant.parse(sys.argv[1])
    from gateway.__main__ import run

    sys.argv = [sys.argv[0], *sys.argv[2:]]
    with swapped_in(variant):
        run()


if __name__ == "__main__":
    main()

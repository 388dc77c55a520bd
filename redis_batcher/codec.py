"""Item codecs: how items are turned into the bytes stored in Redis lists.

msgpack is the default. ``json`` and any object with ``encode``/``decode`` methods
(see :class:`Codec`) are accepted too. Pickle is deliberately not supported: a worker must
never execute code found in Redis.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import msgpack
from msgpack import unpackb as _unpackb

from .errors import ConfigError, DecodeError, ItemEncodeError, ItemTooLarge

# each thread's own msgpack Packer (attribute ``pack``): msgpack.packb builds one per call and
# parses its keyword arguments, which costs about as much as packing a small item
_packers = threading.local()


def _thread_pack() -> Callable[[Any], bytes]:
    """This thread's ``Packer.pack`` (made on first use)."""
    try:
        return _packers.pack  # type: ignore[no-any-return]
    except AttributeError:
        pack: Callable[[Any], bytes] = msgpack.Packer(use_bin_type=True).pack
        _packers.pack = pack
        return pack


def _drop_thread_pack() -> None:
    """After a failed pack: whatever state that Packer was left in, the next call gets a new one."""
    _packers.__dict__.pop("pack", None)


@runtime_checkable
class Codec(Protocol):
    """What a custom codec must provide."""

    name: str

    def encode(self, item: Any) -> bytes:
        """Serialise one item to bytes; raise on unsupported values."""
        ...

    def decode(self, data: bytes) -> Any:
        """Turn stored bytes back into the item."""
        ...


class MsgpackCodec:
    """dict, list, str, bytes, int, float, bool and None, via msgpack (tuples become lists)."""

    name = "msgpack"

    def encode(self, item: Any) -> bytes:
        pack = _thread_pack()
        try:
            return pack(item)
        except BaseException:
            _drop_thread_pack()
            raise

    def encode_many(self, items: Iterable[Any]) -> list[bytes]:
        """Encode many items with this thread's Packer, as :meth:`encode` does each."""
        pack = _thread_pack()
        try:
            return [pack(item) for item in items]
        except BaseException:
            _drop_thread_pack()
            raise

    def decode(self, data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)

    def decode_many(self, entries: Iterable[bytes]) -> list[Any]:
        """Decode many entries, as :meth:`decode` does each (a worker's window).

        Parsing ``unpackb``'s keyword arguments costs about as much as decoding a small item,
        so entries are first read with the defaults (``raw=False`` and ``strict_map_key=True``:
        only str and bytes map keys). Should that refuse one (another key type, or a bad entry),
        all are read again with :meth:`decode`'s arguments: same result, at the slower pace.
        Raises what msgpack raises for an entry that is not one msgpack value."""
        entries = entries if isinstance(entries, list) else list(entries)
        try:
            return [_unpackb(data) for data in entries]
        except ValueError:
            return [self.decode(data) for data in entries]


class JsonCodec:
    """UTF-8 JSON (no NaN/Infinity, no bytes)."""

    name = "json"

    def encode(self, item: Any) -> bytes:
        return json.dumps(item, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

    def decode(self, data: bytes) -> Any:
        return json.loads(data)


_BUILTIN: dict[str, Codec] = {"msgpack": MsgpackCodec(), "json": JsonCodec()}


def resolve_codec(codec: str | Codec) -> Codec:
    """Return a codec object for ``"msgpack"``, ``"json"`` or a user codec."""
    if isinstance(codec, str):
        try:
            return _BUILTIN[codec]
        except KeyError:
            raise ConfigError(f"unknown codec {codec!r}; use 'msgpack', 'json' or a Codec object") from None
    if not (callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))):
        raise ConfigError("codec must be 'msgpack', 'json' or an object with encode() and decode()")
    return codec


def codec_name(codec: Codec) -> str:
    """A printable name for a codec (used in the processor registry)."""
    return str(getattr(codec, "name", type(codec).__qualname__))


def encode_item(codec: Codec, item: Any, max_bytes: int) -> bytes:
    """Encode one item, raising :class:`ItemEncodeError` / ``ItemTooLarge`` before any write."""
    try:
        data = codec.encode(item)
    except Exception as exc:  # the codec decides what it cannot encode
        raise ItemEncodeError(f"cannot encode item of type {type(item).__name__}: {exc}") from exc
    if type(data) is not bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ItemEncodeError(f"codec {codec_name(codec)!r} returned {type(data).__name__}, not bytes")
        data = bytes(data)
    if len(data) > max_bytes:
        raise ItemTooLarge(f"encoded item is {len(data)} bytes, over max_item_bytes={max_bytes}")
    return data


def encode_items(codec: Codec, items: Iterable[Any], max_bytes: int) -> list[bytes]:
    """Encode items for one add_many: a fast path for the built-in msgpack codec; on any
    problem, item by item so the error names the culprit. Nothing is written before this."""
    if isinstance(codec, MsgpackCodec):
        items = list(items)
        try:
            out = codec.encode_many(items)
        except Exception:
            out = None
        if out is not None and max(map(len, out), default=0) <= max_bytes:
            return out
    return [encode_item(codec, item, max_bytes) for item in items]


def decode_item(codec: Codec, data: bytes, index: int) -> Any:
    """Decode one stored entry, raising :class:`DecodeError` with its index on failure."""
    try:
        return codec.decode(data)
    except Exception as exc:
        raise DecodeError(f"cannot decode item {index} with codec {codec_name(codec)!r}: {exc}") from exc

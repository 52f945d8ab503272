"""Pack every ArrayRecord of a message into one Array for the wire, and back, bit for bit.

Why. Flower (1.41-1.42) moves a message as a tree of objects, each pushed or pulled with one HTTP request
per hop: every tensor is an ``Array`` object plus at least one ``ArrayChunk`` object. medfed's
default CNN encoder alone has 34 tensors (58 objects in a RecordDict); the ClientApp profiles
of `benchmarks/deployment_overhead.py` counted 80-150 objects per message, each crossing
ServerApp -> SuperLink -> SuperNode -> ClientApp or back through Python HTTP servers: 10-17 s of
a 13-25 s ClientApp run went to pulling the message. Packed, the encoder is 5 objects.

What. `pack_content` replaces each non-empty ArrayRecord ``name`` by an ArrayRecord holding one
Array (the records' Arrays' raw bytes, concatenated) and adds a ConfigRecord
``name + PACKED_SUFFIX`` that lists each Array's key, dtype, shape, storage type and length.
`unpack_content` rebuilds the original Arrays from those bytes: same keys, order, dtypes,
shapes and bytes (so the same Flower object ids). Nothing is compressed, rounded or dropped.

Where. Only at the two ends of the deployment transport: the ServerApp's Grid packs what it
pushes and unpacks what it pulls (`medfed.server.grid.QuickPollGrid`), and the ClientApp's
outermost mod (`packed_transport_mod`) unpacks what arrives and packs its reply, only when the
message arrived packed. Strategies, SecAgg+, DP and the ClientApp's handlers never see a packed
message; the simulation runtime, which moves messages in memory, never packs.
"""

from __future__ import annotations

from typing import Any, cast

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

PACKED_SUFFIX = ".medfed-packed"
PACKED_KEY = "packed"
PACKED_STYPE = "medfed.packed-bytes"


def _is_manifest(name: str) -> bool:
    return name.endswith(PACKED_SUFFIX)


def is_packed(content: RecordDict) -> bool:
    return any(_is_manifest(name) for name in content.config_records)


def pack_content(content: RecordDict) -> RecordDict:
    """A RecordDict with every non-empty ArrayRecord packed into one Array (see the module
    docstring); other records are kept as they are. Raises ValueError if a ConfigRecord name
    already ends with `PACKED_SUFFIX`."""
    if is_packed(content):
        raise ValueError(f"content already holds a record named '*{PACKED_SUFFIX}'")
    out = RecordDict()
    for name, record in content.items():
        if not isinstance(record, ArrayRecord) or len(record) == 0:
            out[name] = record
            continue
        keys, dtypes, stypes, ndims, sizes, blobs = [], [], [], [], [], []
        dims: list[int] = []
        for key, array in record.items():
            keys.append(key)
            dtypes.append(array.dtype)
            stypes.append(array.stype)
            ndims.append(len(array.shape))
            dims.extend(int(d) for d in array.shape)
            sizes.append(len(array.data))
            blobs.append(array.data)
        blob = b"".join(blobs)
        out[name] = ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)})
        out[name + PACKED_SUFFIX] = ConfigRecord({"keys": keys, "dtypes": dtypes, "stypes": stypes, "ndims": ndims,
                                                  "dims": dims, "sizes": sizes})
    return out


def unpack_content(content: RecordDict) -> RecordDict:
    """The inverse of `pack_content` (content that is not packed comes back unchanged). Raises
    ValueError when a manifest does not match its packed bytes."""
    manifests = {name[: -len(PACKED_SUFFIX)]: content.config_records[name]
                 for name in content.config_records if _is_manifest(name)}
    out = RecordDict()
    for name, record in content.items():
        if _is_manifest(name):
            continue
        if name not in manifests:
            out[name] = record
            continue
        out[name] = _unpack_record(name, record, manifests[name])
    missing = set(manifests) - set(out)
    if missing:
        raise ValueError(f"packed message: manifests without their arrays: {sorted(missing)}")
    return out


def _unpack_record(name: str, record: Any, manifest: ConfigRecord) -> ArrayRecord:
    if not isinstance(record, ArrayRecord) or list(record.keys()) != [PACKED_KEY]:
        raise ValueError(f"packed message: record {name!r} is not one packed Array")
    blob = record[PACKED_KEY].data
    # the lists `pack_content` wrote (checked against each other and the blob below)
    keys, dtypes, stypes = (list(cast("list[str]", manifest[k])) for k in ("keys", "dtypes", "stypes"))
    ndims, dims, sizes = (list(cast("list[int]", manifest[k])) for k in ("ndims", "dims", "sizes"))
    if not (len(keys) == len(dtypes) == len(stypes) == len(ndims) == len(sizes)) or sum(ndims) != len(dims) \
            or sum(sizes) != len(blob) or min(sizes, default=0) < 0:
        raise ValueError(f"packed message: the manifest of {name!r} does not match its {len(blob)} bytes")
    arrays: dict[str, Array] = {}
    offset = dim_at = 0
    for key, dtype, stype, ndim, size in zip(keys, dtypes, stypes, ndims, sizes, strict=True):
        shape = tuple(int(d) for d in dims[dim_at: dim_at + ndim])
        arrays[key] = Array(dtype=dtype, shape=shape, stype=stype, data=blob[offset: offset + size])
        offset, dim_at = offset + size, dim_at + ndim
    return ArrayRecord(arrays)


def pack_message(message: Message) -> Message:
    """``message`` with its content packed, in place (error messages are left alone)."""
    if message.has_content():
        message.content = pack_content(message.content)
    return message


def unpack_message(message: Message) -> Message:
    """``message`` with its content unpacked, in place (error messages are left alone)."""
    if message.has_content() and is_packed(message.content):
        message.content = unpack_content(message.content)
    return message


def packed_transport_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """The ClientApp's outermost mod: a message that arrived packed is unpacked for the handlers, and
    their reply is packed for the way back; anything else passes through untouched."""
    if not (msg.has_content() and is_packed(msg.content)):
        return call_next(msg, context)
    reply = call_next(unpack_message(msg), context)
    return pack_message(reply)

#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""Inspect and patch qcow2 images for tests (standard library only).

Tests use this to build damaged images the way a bug, a crash or a hostile
user would leave them, so new values are written exactly as given, with no
sanity check.  Finding where to write is strict, on the other hand: an L1
entry that does not lead to an L2 table inside the file is an error, so a
test never patches a random place by mistake.

Numbers may be decimal, 0x hex, or sizes with a K/M/G/T suffix.  Table
entries are printed as 0x%016x; header fields as plain decimal (one field)
or JSON.  --force, given before the subcommand, allows indexes and fields
outside the image's own limits (l1_size, header_length, a bad magic).

  qcow2_patch.py header IMG [FIELD]           all fields as JSON, or one value
  qcow2_patch.py set-header IMG FIELD VALUE
  qcow2_patch.py set-bit IMG FIELD BIT        e.g. set-bit x.qcow2 incompatible_features 1
  qcow2_patch.py clear-bit IMG FIELD BIT
  qcow2_patch.py l1 IMG INDEX [NEWVALUE]
  qcow2_patch.py l2 IMG GUEST_OFFSET [NEWVALUE]
  qcow2_patch.py refcount-table IMG INDEX [NEWVALUE]
  qcow2_patch.py refcount IMG HOST_OFFSET [NEWVALUE]
  qcow2_patch.py truncate IMG SIZE
  qcow2_patch.py bitmap IMG NAME [FIELD [NEWVALUE]]
  qcow2_patch.py run-tables IMG               how many L2 tables are one run

l1, l2 and refcount-table accept --json to print the entry decoded, with the
file offset where it is stored.  l2 accepts --bitmap to read or write the
second word of an extended L2 entry (the subcluster bitmap).  bitmap prints
a persistent bitmap's directory entry as JSON (FIELD: one of its fields), or
writes one field of it (table_offset, table_size, flags, type,
granularity_bits).  run-tables counts the L2 tables whose every entry names
the host cluster after the one before, COPIED and nothing else set: the
tables whose entries the server computes instead of loading (server/l2.c).
"""

import argparse
import json
import os
import struct
import sys

MAGIC = 0x514649FB

# name: (byte offset, struct format); all big-endian.
HEADER_FIELDS = {
    "magic": (0, ">I"),
    "version": (4, ">I"),
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "crypt_method": (32, ">I"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    # Version 3 and later only.
    "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"),
    "autoclear_features": (88, ">Q"),
    "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
    "compression_type": (104, ">B"),
}
V2_HEADER_LENGTH = 72

INCOMPAT_EXTENDED_L2 = 1 << 4

EXTENSION_NAMES = {
    0xE2792ACA: "backing_format",
    0x6803F857: "feature_name_table",
    0x23852875: "bitmaps",
    0x0537BE77: "encryption_header",
    0x44415441: "external_data_file",
}

L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00     # bits 9-55
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00     # bits 9-55
REFTABLE_OFFSET_MASK = 0xFFFFFFFFFFFFFE00  # bits 9-63
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1


class Qcow2Error(Exception):
    pass


SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_int(text):
    """Decimal, 0x hex, or a size with a K/M/G/T suffix (powers of 1024)."""
    mult = 1
    if text[-1:].upper() in SUFFIXES:
        mult = SUFFIXES[text[-1].upper()]
        text = text[:-1]
    try:
        return int(text, 0) * mult
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text)


def hex64(value):
    return "0x%016x" % value


class Image:
    """An open image; header values are read once, tables on demand."""

    def __init__(self, path, writable=False, force=False):
        self.path = path
        self.force = force
        self.fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        raw = self.pread(0, V2_HEADER_LENGTH)
        if len(raw) < V2_HEADER_LENGTH:
            raise Qcow2Error("%s: file too short for a qcow2 header" % path)
        self.h = {}
        for name, (off, fmt) in HEADER_FIELDS.items():
            if off < V2_HEADER_LENGTH:
                self.h[name] = struct.unpack_from(fmt, raw, off)[0]
        if self.h["magic"] != MAGIC and not force:
            raise Qcow2Error("%s: bad magic 0x%08x" % (path, self.h["magic"]))
        if self.h["version"] >= 3:
            # Fields beyond header_length read as 0, as the format says.
            more = self.pread(0, 112)
            self.h["header_length"] = struct.unpack_from(">I", more, 100)[0] \
                if len(more) >= 104 else 0
            for name, (off, fmt) in HEADER_FIELDS.items():
                if off < V2_HEADER_LENGTH or name == "header_length":
                    continue
                size = struct.calcsize(fmt)
                if off + size <= min(self.h["header_length"], len(more)):
                    self.h[name] = struct.unpack_from(fmt, more, off)[0]
                else:
                    self.h[name] = 0
        else:
            self.h.update(incompatible_features=0, compatible_features=0,
                          autoclear_features=0, refcount_order=4,
                          header_length=V2_HEADER_LENGTH, compression_type=0)

    # Geometry derived from the header.
    @property
    def cluster_size(self):
        return 1 << self.h["cluster_bits"]

    @property
    def extended_l2(self):
        return bool(self.h["incompatible_features"] & INCOMPAT_EXTENDED_L2)

    @property
    def l2_entry_size(self):
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self):
        return self.cluster_size // self.l2_entry_size

    @property
    def refcount_bits(self):
        return 1 << self.h["refcount_order"]

    def file_size(self):
        return os.fstat(self.fd).st_size

    def close(self):
        os.close(self.fd)

    def pread(self, offset, length):
        return os.pread(self.fd, length, offset)

    def pwrite(self, offset, data):
        if os.pwrite(self.fd, data, offset) != len(data):
            raise Qcow2Error("short write at 0x%x" % offset)

    def read_u64(self, offset):
        data = self.pread(offset, 8)
        if len(data) != 8:
            raise Qcow2Error("offset 0x%x is beyond the end of the file "
                             "(size 0x%x)" % (offset, self.file_size()))
        return struct.unpack(">Q", data)[0]

    def write_u64(self, offset, value):
        self.pwrite(offset, struct.pack(">Q", value & 0xFFFFFFFFFFFFFFFF))

    # Header.
    def header_dict(self):
        d = {name: self.h[name] for name in HEADER_FIELDS}
        d["cluster_size"] = self.cluster_size
        d["refcount_bits"] = self.refcount_bits
        d["l2_entries"] = self.l2_entries
        d["file_size"] = self.file_size()
        d["backing_file"] = self.backing_file()
        d["extensions"] = self.extensions()
        return d

    def backing_file(self):
        off, size = self.h["backing_file_offset"], self.h["backing_file_size"]
        if off == 0 or size == 0:
            return None
        return self.pread(off, size).decode("utf-8", "replace")

    def extensions(self):
        """List header extensions; stops quietly at anything malformed,
        since damaged images are this tool's daily bread."""
        out = []
        off = self.h["header_length"]
        if off < V2_HEADER_LENGTH:
            return out          # header cut short: nowhere to start
        end = min(self.cluster_size, self.file_size())
        if self.h["backing_file_offset"]:
            end = min(end, self.h["backing_file_offset"])
        while off + 8 <= end:
            etype, elen = struct.unpack(">II", self.pread(off, 8))
            if etype == 0:
                break
            entry = {"type": "0x%08x" % etype,
                     "name": EXTENSION_NAMES.get(etype, "unknown"),
                     "offset": off, "length": elen}
            if etype in (0xE2792ACA, 0x44415441):
                entry["value"] = self.pread(off + 8, elen).decode("utf-8", "replace")
            out.append(entry)
            off += 8 + (elen + 7) // 8 * 8
        return out

    def set_header(self, name, value):
        if name not in HEADER_FIELDS:
            raise Qcow2Error("unknown header field %r (known: %s)"
                             % (name, ", ".join(HEADER_FIELDS)))
        off, fmt = HEADER_FIELDS[name]
        size = struct.calcsize(fmt)
        if off + size > self.h["header_length"] and off >= V2_HEADER_LENGTH \
                and not self.force:
            raise Qcow2Error("field %s lies beyond header_length %d: it would "
                             "overwrite header extensions (use --force)"
                             % (name, self.h["header_length"]))
        if value < 0 or value >= 1 << (8 * size):
            raise Qcow2Error("value %d does not fit in %s" % (value, name))
        self.pwrite(off, struct.pack(fmt, value))
        self.h[name] = value

    # L1.
    def l1_entry_offset(self, index):
        if not 0 <= index < self.h["l1_size"] and not self.force:
            raise Qcow2Error("L1 index %d outside l1_size %d (use --force)"
                             % (index, self.h["l1_size"]))
        return self.h["l1_table_offset"] + 8 * index

    # L2: locate the entry that maps a guest offset, following L1.
    def l2_entry_offset(self, guest_offset):
        per_l2 = self.l2_entries
        cluster = guest_offset // self.cluster_size
        l1_index, l2_index = divmod(cluster, per_l2)
        l1_off = self.l1_entry_offset(l1_index)
        l1 = self.read_u64(l1_off)
        table = l1 & L1_OFFSET_MASK
        if table == 0:
            raise Qcow2Error("guest offset 0x%x: L1[%d] is 0, no L2 table"
                             % (guest_offset, l1_index))
        loc = table + l2_index * self.l2_entry_size
        if loc + self.l2_entry_size > self.file_size():
            raise Qcow2Error("guest offset 0x%x: L1[%d] = %s points beyond "
                             "the end of the file" % (guest_offset, l1_index, hex64(l1)))
        return loc, {"l1_index": l1_index, "l1_entry": hex64(l1),
                     "l2_table_offset": table, "l2_index": l2_index}

    def decode_l2(self, entry):
        if entry & COMPRESSED:
            x = 62 - (self.h["cluster_bits"] - 8)
            host = entry & ((1 << x) - 1)
            sectors = (entry >> x) & ((1 << (62 - x)) - 1)
            return {"type": "compressed", "host_offset": host,
                    "additional_sectors": sectors,
                    "compressed_length": (sectors + 1) * 512 - host % 512}
        host = entry & L2_OFFSET_MASK
        if entry & ZERO:
            kind = "zero_allocated" if host else "zero"
        else:
            kind = "normal" if host else "unallocated"
        return {"type": kind, "host_offset": host, "copied": bool(entry & COPIED)}

    # Refcount table and blocks.
    def reftable_entry_offset(self, index):
        entries = self.h["refcount_table_clusters"] * self.cluster_size // 8
        if not 0 <= index < entries and not self.force:
            raise Qcow2Error("refcount table index %d outside %d entries "
                             "(use --force)" % (index, entries))
        return self.h["refcount_table_offset"] + 8 * index

    def refcount_location(self, host_offset):
        """(byte offset of the count, bit shift inside that byte span,
        span length in bytes) for the host cluster holding host_offset."""
        per_block = self.cluster_size * 8 // self.refcount_bits
        cluster = host_offset // self.cluster_size
        rt_index, block_index = divmod(cluster, per_block)
        rt = self.read_u64(self.reftable_entry_offset(rt_index))
        block = rt & REFTABLE_OFFSET_MASK
        if block == 0:
            raise Qcow2Error("host offset 0x%x: refcount table entry %d is 0, "
                             "no refcount block" % (host_offset, rt_index))
        bits = self.refcount_bits
        if bits >= 8:
            return block + block_index * bits // 8, 0, bits // 8
        # Sub-byte widths: the first count sits in the lowest bits of a byte.
        bit = block_index * bits
        return block + bit // 8, bit % 8, 1

    def get_refcount(self, host_offset):
        loc, shift, span = self.refcount_location(host_offset)
        data = self.pread(loc, span)
        if len(data) != span:
            raise Qcow2Error("refcount for 0x%x lies beyond the end of the file"
                             % host_offset)
        value = int.from_bytes(data, "big")
        if self.refcount_bits < 8:
            value = (value >> shift) & ((1 << self.refcount_bits) - 1)
        return value

    def set_refcount(self, host_offset, value):
        if not 0 <= value < 1 << self.refcount_bits:
            raise Qcow2Error("refcount %d does not fit in %d bits"
                             % (value, self.refcount_bits))
        loc, shift, span = self.refcount_location(host_offset)
        if self.refcount_bits < 8:
            old = self.pread(loc, 1)[0]
            mask = ((1 << self.refcount_bits) - 1) << shift
            value = (old & ~mask) | (value << shift)
        self.pwrite(loc, value.to_bytes(span, "big"))


def show_entry(args, loc, value, extra):
    if args.json:
        extra = dict(extra)
        extra.update(entry_offset=loc, value=hex64(value))
        print(json.dumps(extra, sort_keys=True))
    else:
        print(hex64(value))


def cmd_header(img, args):
    d = img.header_dict()
    if args.field:
        if args.field not in d:
            raise Qcow2Error("unknown header field %r" % args.field)
        value = d[args.field]
        if value is None:
            print("")
        elif isinstance(value, (list, dict)):
            print(json.dumps(value))
        else:
            print(value)
    else:
        print(json.dumps(d, indent=2))


def cmd_set_header(img, args):
    img.set_header(args.field, args.value)


def cmd_bit(img, args):
    if args.field not in HEADER_FIELDS:
        raise Qcow2Error("unknown header field %r" % args.field)
    old = img.h.get(args.field, 0)
    if args.command == "set-bit":
        img.set_header(args.field, old | (1 << args.bit))
    else:
        img.set_header(args.field, old & ~(1 << args.bit))


def cmd_l1(img, args):
    loc = img.l1_entry_offset(args.index)
    if args.value is not None:
        img.write_u64(loc, args.value)
    value = img.read_u64(loc)
    show_entry(args, loc, value, {"index": args.index,
                                  "l2_table_offset": value & L1_OFFSET_MASK,
                                  "copied": bool(value & COPIED)})


def cmd_l2(img, args):
    loc, info = img.l2_entry_offset(args.guest_offset)
    if args.bitmap:
        if not img.extended_l2:
            raise Qcow2Error("--bitmap needs an image with extended L2 entries")
        loc += 8
    if args.value is not None:
        img.write_u64(loc, args.value)
    value = img.read_u64(loc)
    if not args.bitmap:
        info.update(img.decode_l2(value))
    show_entry(args, loc, value, info)


def cmd_refcount_table(img, args):
    loc = img.reftable_entry_offset(args.index)
    if args.value is not None:
        img.write_u64(loc, args.value)
    value = img.read_u64(loc)
    show_entry(args, loc, value, {"index": args.index,
                                  "block_offset": value & REFTABLE_OFFSET_MASK})


def cmd_refcount(img, args):
    if args.value is not None:
        img.set_refcount(args.host_offset, args.value)
    print(img.get_refcount(args.host_offset))


# A bitmap directory entry's fixed fields: (byte offset, struct format).
BITMAP_FIELDS = {
    "table_offset": (0, ">Q"),
    "table_size": (8, ">I"),
    "flags": (12, ">I"),
    "type": (16, ">B"),
    "granularity_bits": (17, ">B"),
}


def bitmap_entries(img):
    """(directory offset of each entry, its fields) of the bitmaps extension."""
    ext = [e for e in img.extensions() if e["name"] == "bitmaps"]
    if not ext:
        raise Qcow2Error("%s has no bitmaps extension" % img.path)
    count, _, size, off = struct.unpack(">IIQQ", img.pread(ext[0]["offset"] + 8, 24))
    d = img.pread(off, size)
    pos, out = 0, []
    for _ in range(count):
        if pos + 24 > len(d):
            raise Qcow2Error("the bitmap directory at 0x%x is cut short" % off)
        e = {k: struct.unpack_from(f, d, pos + o)[0] for k, (o, f) in BITMAP_FIELDS.items()}
        name_size, extra = struct.unpack_from(">HI", d, pos + 18)
        e["name"] = d[pos + 24 + extra:pos + 24 + extra + name_size].decode("utf-8", "replace")
        e["extra_data_size"] = extra
        out.append((off + pos, e))
        pos += (24 + extra + name_size + 7) // 8 * 8
    return out


def cmd_run_tables(img, args):
    n, cs, runs = img.l2_entries, img.cluster_size, 0
    for i in range(img.h["l1_size"]):
        table = img.read_u64(img.l1_entry_offset(i)) & L1_OFFSET_MASK
        if not table or img.extended_l2:
            continue
        data = img.pread(table, n * 8)
        if len(data) != n * 8:
            raise Qcow2Error("L1[%d] points beyond the end of the file" % i)
        entries = struct.unpack(">%dQ" % n, data)
        first = entries[0] & ~COPIED
        runs += first != 0 and all(e == (first + j * cs) | COPIED
                                   for j, e in enumerate(entries))
    print(runs)


def cmd_bitmap(img, args):
    found = [(loc, e) for loc, e in bitmap_entries(img) if e["name"] == args.name]
    if not found:
        raise Qcow2Error("%s has no bitmap named %r" % (img.path, args.name))
    loc, e = found[0]
    if args.field is not None and args.field not in BITMAP_FIELDS:
        raise Qcow2Error("unknown bitmap field %r (known: %s)"
                         % (args.field, ", ".join(BITMAP_FIELDS)))
    if args.value is not None:
        o, f = BITMAP_FIELDS[args.field]
        img.pwrite(loc + o, struct.pack(f, args.value))
        e[args.field] = args.value
    if args.field:
        print(e[args.field])
    else:
        e["entry_offset"] = loc
        print(json.dumps(e, sort_keys=True))


def cmd_truncate(path, args):
    # No header parsing: truncating must work on any file, even a damaged one.
    os.truncate(path, args.size)


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Inspect and patch qcow2 images for tests.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--force", action="store_true",
                   help="allow indexes and fields outside the image's own limits")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("header", help="print header fields as JSON")
    s.add_argument("image")
    s.add_argument("field", nargs="?")
    s.set_defaults(fn=cmd_header, writes=False)

    s = sub.add_parser("set-header", help="set one header field")
    s.add_argument("image")
    s.add_argument("field")
    s.add_argument("value", type=parse_int)
    s.set_defaults(fn=cmd_set_header, writes=True)

    for name in ("set-bit", "clear-bit"):
        s = sub.add_parser(name, help="%s one bit of a header field" % name.split("-")[0])
        s.add_argument("image")
        s.add_argument("field")
        s.add_argument("bit", type=parse_int)
        s.set_defaults(fn=cmd_bit, writes=True)

    s = sub.add_parser("l1", help="read or write an L1 entry")
    s.add_argument("image")
    s.add_argument("index", type=parse_int)
    s.add_argument("value", type=parse_int, nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_l1)

    s = sub.add_parser("l2", help="read or write the L2 entry mapping a guest offset")
    s.add_argument("image")
    s.add_argument("guest_offset", type=parse_int)
    s.add_argument("value", type=parse_int, nargs="?")
    s.add_argument("--json", action="store_true")
    s.add_argument("--bitmap", action="store_true",
                   help="the subcluster bitmap word of an extended L2 entry")
    s.set_defaults(fn=cmd_l2)

    s = sub.add_parser("refcount-table", help="read or write a refcount table entry")
    s.add_argument("image")
    s.add_argument("index", type=parse_int)
    s.add_argument("value", type=parse_int, nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_refcount_table)

    s = sub.add_parser("refcount", help="read or write the refcount of a host cluster")
    s.add_argument("image")
    s.add_argument("host_offset", type=parse_int)
    s.add_argument("value", type=parse_int, nargs="?")
    s.set_defaults(fn=cmd_refcount)

    s = sub.add_parser("bitmap", help="read or write a persistent bitmap's directory entry")
    s.add_argument("image")
    s.add_argument("name")
    s.add_argument("field", nargs="?")
    s.add_argument("value", type=parse_int, nargs="?")
    s.set_defaults(fn=cmd_bitmap)

    s = sub.add_parser("run-tables", help="count the L2 tables that are one run")
    s.add_argument("image")
    s.set_defaults(fn=cmd_run_tables, writes=False)

    s = sub.add_parser("truncate", help="set the file's length")
    s.add_argument("image")
    s.add_argument("size", type=parse_int)
    s.set_defaults(fn=cmd_truncate, raw=True)

    args = p.parse_args(argv)
    writes = getattr(args, "writes", None)
    if writes is None:
        writes = getattr(args, "value", None) is not None
    try:
        if getattr(args, "raw", False):
            args.fn(args.image, args)
            return 0
        img = Image(args.image, writable=writes, force=args.force)
        try:
            args.fn(img, args)
        finally:
            img.close()
    except (Qcow2Error, OSError) as e:
        print("qcow2_patch.py: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

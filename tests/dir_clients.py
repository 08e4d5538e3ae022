#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""Clients of a dir= server, for test-dir.sh.

  list SOCK                  print the export names the server lists
  refused SOCK NAME...       each name must be refused at connection
  pair SOCK NAME DIR         two connections to one image (multi-conn); after
                             closing the first, touches DIR/one-left and waits
                             for DIR/go before closing the second
  reclaim SOCK NAME FILE     write, flush, trim, flush: prints FILE's host
                             allocation after each flush
  churn SOCK NAME K ROUNDS   ROUNDS times: connect, write byte K+1 over the
                             K-th MiB, read it back, disconnect (run several
                             at once, so the image opens and closes under
                             connections that arrive meanwhile)
Exit status 0 when every check held, 1 otherwise.
"""

import os
import sys
import time

import nbd

MiB = 1 << 20


def connect(sock, name):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    return h


def cmd_list(sock):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(sock)
    names = []
    h.opt_list(lambda name, desc: names.append(name))
    h.opt_abort()
    for n in names:
        print(n)
    return 0


def cmd_refused(sock, names):
    bad = 0
    for name in names:
        try:
            h = connect(sock, name)
        except nbd.Error as e:
            print("refused %r: %s" % (name, e))
            continue
        print("FAIL: export name %r was served (size %d)" % (name, h.get_size()))
        h.shutdown()
        bad = 1
    return bad


def wait_for(path, seconds=120):
    t0 = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - t0 > seconds:
            raise SystemExit("FAIL: %s did not appear in %d s" % (path, seconds))
        time.sleep(0.05)


def expect(what, got, want):
    if got != want:
        raise SystemExit("FAIL: %s: read %r... where %r... was expected"
                         % (what, got[:8], want[:8]))


def cmd_pair(sock, name, d):
    a, b = connect(sock, name), connect(sock, name)
    if not (a.can_multi_conn() and b.can_multi_conn()):
        raise SystemExit("FAIL: %s does not advertise multi-conn" % name)
    # What one connection writes, a flush and read on the other sees,
    # many times over, with both writing at interleaved places.
    for i in range(64):
        off = i * 3 * 65536 + 4096 * (i % 7)
        data = bytes([i + 1]) * (65536 + 512 * i)
        w, r = (a, b) if i % 2 == 0 else (b, a)
        w.pwrite(data, off)
        r.flush()
        expect("%s: connection %s after a write on the other"
               % (name, "b" if w is a else "a"), r.pread(len(data), off), data)
    # A trim on one reads as zeros on the other.
    a.pwrite(b"\x77" * MiB, 32 * MiB)
    b.trim(MiB, 32 * MiB)
    a.flush()
    expect("%s: connection a after a trim on b" % name, a.pread(MiB, 32 * MiB),
           bytes(MiB))
    b.pwrite(b"\x5a" * MiB, 40 * MiB)
    a.shutdown()
    open(os.path.join(d, "one-left"), "w").close()
    wait_for(os.path.join(d, "go"))
    # The image stayed open for b: what b wrote unflushed is still there.
    expect("%s: connection b after a closed" % name, b.pread(MiB, 40 * MiB),
           b"\x5a" * MiB)
    b.shutdown()
    return 0


def cmd_reclaim(sock, name, path):
    h = connect(sock, name)
    alloc = lambda: os.stat(path).st_blocks * 512
    n = 16 * MiB
    h.pwrite(b"\xc3" * n, 8 * MiB)
    h.flush()
    written = alloc()
    h.trim(n, 8 * MiB)
    h.flush()
    trimmed = alloc()
    if h.pread(n, 8 * MiB) != bytes(n):
        raise SystemExit("FAIL: %s: the trimmed range does not read as zeros" % name)
    h.shutdown()
    print(written, trimmed)
    return 0


def cmd_churn(sock, name, k, rounds):
    k, data = int(k), bytes([int(k) + 1]) * MiB
    for r in range(int(rounds)):
        h = connect(sock, name)
        h.pwrite(data, k * MiB)
        expect("%s: round %d of client %d" % (name, r, k), h.pread(MiB, k * MiB), data)
        h.shutdown()
    return 0


def main(argv):
    if len(argv) >= 2 and argv[0] == "list":
        return cmd_list(argv[1])
    if len(argv) >= 2 and argv[0] == "refused":
        return cmd_refused(argv[1], argv[2:])
    if len(argv) == 4 and argv[0] == "pair":
        return cmd_pair(*argv[1:])
    if len(argv) == 4 and argv[0] == "reclaim":
        return cmd_reclaim(*argv[1:])
    if len(argv) == 5 and argv[0] == "churn":
        return cmd_churn(*argv[1:])
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

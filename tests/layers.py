#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""The engine's layering, checked against the table in DESIGN.md ("Layers").

  layers.py DESIGN.md SERVER-DIR [OBJECT-DIR]

Reads the table between the "layers: begin" and "layers: end" markers, then:
  - every .c and .h file in SERVER-DIR must be in the table, and every file
    in the table must exist;
  - every .c file has a header of its own (image.c: the public API header);
  - a file includes only its own header, headers of include/ (types and
    the format), and headers of strictly lower layers;
  - with OBJECT-DIR (the libtool objects, .libs/libqcow2engine_la-NAME.o):
    a function an object calls that another engine object defines must be
    defined in a strictly lower layer, and every function an object defines
    starts with its file's prefix (NAME_; q2_ in image.o only).
Prints one line per violation and exits 1 if there was any.
"""

import os
import re
import subprocess
import sys

PUBLIC = {"qcow2reclaim.h", "qcow2-format.h"}
OWN_HEADER = {"image": "qcow2reclaim.h"}
PUBLIC_PREFIX = {"image": "q2_"}


def read_table(design):
    text = open(design).read()
    m = re.search(r"<!-- layers: begin -->(.*?)<!-- layers: end -->", text, re.S)
    if not m:
        sys.exit("%s: no layer table (the layers: begin/end markers)" % design)
    table = {}
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].isdigit():
            continue
        layer, group, name = int(cells[0]), cells[1], cells[2]
        if name in table:
            sys.exit("%s: %s is in the layer table twice" % (design, name))
        table[name] = (layer, group)
    if not table:
        sys.exit("%s: the layer table has no rows" % design)
    return table


def includes(path):
    for n, line in enumerate(open(path), 1):
        m = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
        if m:
            yield n, m.group(1)


def check_sources(table, server):
    errors = []
    files = sorted(f for f in os.listdir(server) if f.endswith((".c", ".h")))
    names = {os.path.splitext(f)[0] for f in files}
    for name in sorted(set(table) - names):
        errors.append("DESIGN.md: %s is in the layer table but server/ has no %s.c or %s.h"
                      % (name, name, name))
    for f in files:
        name, ext = os.path.splitext(f)
        if name not in table:
            errors.append("server/%s is not in the layer table of DESIGN.md" % f)
            continue
        if ext == ".c" and name not in OWN_HEADER and f[:-2] + ".h" not in files:
            errors.append("server/%s has no header of its own (%s.h)" % (f, name))
        layer, group = table[name]
        for n, inc in includes(os.path.join(server, f)):
            base = os.path.splitext(inc)[0]
            if inc in PUBLIC or inc == "config.h" or base == name:
                continue
            if base not in table:
                errors.append("server/%s:%d includes %s, which is not in the layer table"
                              % (f, n, inc))
                continue
            ilayer, igroup = table[base]
            if ilayer >= layer:
                errors.append("server/%s:%d (layer %d, %s) includes %s (layer %d, %s): "
                              "a file may only use layers below its own"
                              % (f, n, layer, group, inc, ilayer, igroup))
    return errors


def symbols(obj):
    out = subprocess.run(["nm", "--defined-only", "-g", obj], capture_output=True,
                         text=True, check=True).stdout
    defined = {l.split()[2] for l in out.splitlines() if len(l.split()) == 3}
    out = subprocess.run(["nm", "--undefined-only", "-g", obj], capture_output=True,
                         text=True, check=True).stdout
    undefined = {l.split()[-1] for l in out.splitlines() if l.split()}
    return defined, undefined


def check_objects(table, objdir):
    errors = []
    objs = {}
    for f in sorted(os.listdir(objdir)):
        m = re.fullmatch(r"libqcow2engine_la-(.+)\.o", f)
        if m:
            objs[m.group(1)] = symbols(os.path.join(objdir, f))
    if not objs:
        return ["%s: no engine objects (libqcow2engine_la-*.o): build first" % objdir]
    owner = {}
    for name, (defined, _) in objs.items():
        prefix = PUBLIC_PREFIX.get(name, name + "_")
        for s in defined:
            owner[s] = name
            if not s.startswith(prefix):
                errors.append("server/%s.c defines %s, without the file's prefix %s"
                              % (name, s, prefix))
    for name, (_, undefined) in objs.items():
        if name not in table:
            errors.append("object %s has no row in the layer table" % name)
            continue
        layer, group = table[name]
        for s in sorted(undefined):
            other = owner.get(s)
            if other is None or other == name:
                continue
            olayer, ogroup = table.get(other, (10**6, "?"))
            if olayer >= layer:
                errors.append("server/%s.c (layer %d, %s) calls %s, defined in %s.c "
                              "(layer %d, %s)" % (name, layer, group, s, other, olayer,
                                                   ogroup))
    return errors


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    table = read_table(sys.argv[1])
    errors = check_sources(table, sys.argv[2])
    if len(sys.argv) == 4:
        errors += check_objects(table, sys.argv[3])
    for e in errors:
        print("layers: " + e)
    groups = sorted({(l, g) for l, g in table.values()})
    print("layers: %d files in %d layers checked, %d violations"
          % (len(table), len({l for l, _ in groups}), len(errors)))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()

"""Derive the deserialization schema that async-stripe (miniserde) enforces.

async-stripe 1.0.0-rc.x deserializes every response with generated miniserde
builders: a field whose Rust type is not ``Option<..>`` must be present and
non-null, an ``Option`` field may be missing or null but, when present, must
itself deserialize; unknown keys are ignored; string enums accept any string
(they have an ``Unknown(String)`` variant); polymorphic enums pick the variant
by the ``object`` key; ``Expandable<T>`` is an id string or a full ``T``.

This tool reads the unpacked crate sources (``async-stripe-shared``,
``-types``, ``-core``, ...) and writes the subset of types reachable from the
roots we care about as JSON, which ``stripe_launcher.validate`` interprets.

Usage (crate sources from crates.io, ``<name>-<version>.crate`` tarballs)::

    python stripe_schema_extract.py /tmp/crates > stripe_schema_rc10.json
"""

import glob
import json
import os
import re
import sys

ROOTS = ["PaymentIntent", "Charge", "Refund", "Dispute", "Event", "Error",
         "ApiErrors", "PaymentMethod", "Customer", "BalanceTransaction"]

PRIMS = {"i64": "int", "i32": "int", "u64": "uint", "u32": "uint",
         "u8": "uint", "f64": "float", "bool": "bool", "String": "str",
         "Timestamp": "int", "Currency": "str", "Value": "any",
         "SmolStr": "str"}


def strip_path(t):
    """Remove module paths (``stripe_shared::X`` -> ``X``) from a type."""
    t = re.sub(r"\s+", "", t)
    return re.sub(r"\b(?:[a-z_][a-z0-9_]*::)+", "", t)


def main(root_dir):
    structs, enums, tagged, ids = {}, set(), {}, set()
    files = sorted(glob.glob(os.path.join(root_dir, "async-stripe-*",
                                          "src", "**", "*.rs"),
                             recursive=True))
    # async-stripe-shared first: it defines the canonical objects.
    files.sort(key=lambda f: ("async-stripe-shared" not in f, f))
    for path in files:
        src = open(path, encoding="utf-8").read()
        ids.update(re.findall(r"def_id!\(\s*(\w+)", src))
        for m in re.finditer(r"\npub struct (\w+)\s*\{(?:\}|\n(.*?)\n\})", src, re.S):
            name, body = m.group(1), m.group(2) or ""
            if name.endswith("Builder") or name in structs:
                continue
            fields = {}
            for fm in re.finditer(r"^[ \t]*pub (\w+):\s+(.*?),[ \t]*\n"
                                  r"(?=[ \t]*(?:pub |///|#\[)|[ \t]*$)",
                                  body + "\n", re.S | re.M):
                fields[fm.group(1)] = strip_path(fm.group(2))
            km = re.search(r"impl MapBuilder\s+for\s+%sBuilder\s*\{.*?fn key\(.*?"
                           r"fn deser_default" % name, src, re.S)
            if not km:
                continue  # not deserializable by miniserde (params etc.)
            keys = dict((f, k) for k, f in re.findall(
                r'"([^"]+)" => \{?\s*Deserialize::begin\(\s*&mut self\.(\w+)',
                km.group(0)))
            structs[name] = {keys.get(f, f): t for f, t in fields.items()
                             if f in keys}
        for m in re.finditer(r"\npub enum (\w+)\s*\{\n(.*?)\n\}", src, re.S):
            name, body = m.group(1), m.group(2)
            cm = re.search(r"impl %s\s*\{\s*fn construct\(key: &str.*?"
                           r"\n\s*_ =>" % name, src, re.S)
            if cm:
                variants = {}
                for k, v in re.findall(r'"(\w+)" => Self::(\w+)\(', cm.group(0)):
                    vm = re.search(r"\b%s\(([^)]*)\)" % v, body)
                    variants[k] = strip_path(vm.group(1)) if vm else v
                tagged[name] = variants
            elif "Unknown(String)" in body:
                enums.add(name)

    def names_in(t):
        return re.findall(r"[A-Za-z_][A-Za-z0-9_]*", t)

    out, todo = {}, list(ROOTS)
    while todo:
        n = todo.pop()
        if n in out or n in PRIMS:
            continue
        if n in structs:
            out[n] = {"kind": "struct", "fields": structs[n]}
            for t in structs[n].values():
                todo.extend(names_in(t))
        elif n in tagged:
            out[n] = {"kind": "tagged", "variants": tagged[n]}
            todo.extend(tagged[n].values())
        elif n in enums:
            out[n] = {"kind": "enum"}
        elif n in ids or n.endswith("Id"):
            out[n] = {"kind": "id"}
    generic = {"Option", "Vec", "Box", "HashMap", "Expandable", "List",
               "SearchList"}
    for n in list(out):
        if out[n]["kind"] == "struct":
            for t in out[n]["fields"].values():
                for w in names_in(t):
                    if w not in out and w not in PRIMS and w not in generic:
                        sys.stderr.write("unresolved type %s in %s\n" % (w, n))
    doc = ("Derived by stripe_schema_extract.py from async-stripe 1.0.0-rc.10 "
           "sources. Field types are Rust types with module paths removed; "
           "a field is required unless its type is Option<..>.")
    # One type per line: compact, yet diffs stay readable on upgrades.
    sys.stdout.write('{"_doc": %s,\n "version": "1.0.0-rc.10",\n "types": {\n'
                     % json.dumps(doc))
    sys.stdout.write(",\n".join(
        "  %s: %s" % (json.dumps(n), json.dumps(out[n], sort_keys=True,
                                                 separators=(",", ":")))
        for n in sorted(out)))
    sys.stdout.write("\n }\n}\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/crates")

"""What ptxas made of the sm90 kernels, per function: registers, spills, and whether it
serialised the wgmmas (warning C7511), optionally against another checkout.

C7511 ("wgmma.mma_async instructions are serialized due to insufficient register
resources") costs a kernel 20% or more and is easy to trigger by accident: moving a field
of FwdParams made ptxas serialise the D64 causal forward (22% slower on the H200, NOTES.md
session 6). Runs here, no GPU needed.

Usage: python3 scripts/check-ptxas.py [--base /path/to/other/checkout] [--define NAME=VALUE]... [files...]
(default: the kernel instantiations, src/cuda/sm90/*inst*.cu; all of them take ~20 min on
two cores). Exits 1 when a function serialises its wgmmas, or, with --base, when one spills
more than it did there.
"""
import argparse
import glob
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a",
         "-DSTEELATTN_WITH_CUDA", "-Iinclude", "-Isrc", "-Xptxas", "-v", "-c", "-o", os.devnull]


def compile_report(root, path, defines=()):
    """{function: (registers, spill bytes, serialised)} for one source file under root."""
    out = subprocess.run(["nvcc", *FLAGS, *(f"-D{d}" for d in defines), path], cwd=root, capture_output=True,
                         text=True)
    if out.returncode != 0:
        sys.exit(f"{root}/{path}: nvcc failed\n{out.stderr[-2000:]}")
    funcs, cur = {}, None
    for line in out.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line) or re.search(r"Function properties for (\w+)", line)
        if m:
            cur = m.group(1)
            funcs.setdefault(cur, [0, 0, False])
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            funcs[cur][1] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            funcs[cur][0] = int(m.group(1))
        m = re.search(r"C7511.*function '(\w+)'", line)
        if m:
            funcs.setdefault(m.group(1), [0, 0, False])[2] = True
    return {f: tuple(v) for f, v in funcs.items() if "kernel" in f}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", help="another checkout to compare spills with")
    ap.add_argument("--define", action="append", default=[],
                    help="a macro for this checkout's build only (a build-time switch under test)")
    ap.add_argument("files", nargs="*")
    a = ap.parse_args()
    files = a.files or sorted(f for f in glob.glob("src/cuda/sm90/*inst*.cu"))
    jobs = [(".", f, a.define) for f in files] + ([(a.base, f, ()) for f in files] if a.base else [])
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        reports = list(ex.map(lambda j: compile_report(*j), jobs))
    here = {k: v for r in reports[:len(files)] for k, v in r.items()}
    base = {k: v for r in reports[len(files):] for k, v in r.items()}
    bad = 0
    for fn, (regs, spill, serial) in sorted(here.items()):
        b = base.get(fn)
        worse = b is not None and spill > b[1]
        if serial or worse or (b and (regs, spill) != b[:2]):
            note = "SERIALISED wgmma (C7511)" if serial else ""
            if b:
                note += f" base: {b[0]} regs, {b[1]} B spilled{' (serialised)' if b[2] else ''}"
            print(f"{regs:4d} regs {spill:4d} B spilled  {fn[:110]}  {note}")
        bad += serial or worse
    print(f"{len(here)} kernels, {bad} serialised or spilling more than base")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

#!/bin/bash
# Install the bundles that bench/gpu_wheels.sh builds into .site/ (repo root) on the GPU machine, which has no
# package index; run there from the repo root, once per call that carried a bundle:
#   bench/gpu_install.sh .gpu-a          # call 1 (carry [".gpu-a"])
#   bench/gpu_install.sh .gpu-b          # call 2 (carry [".gpu-b"]); .site/ stays on the warm machine
# then: export PYTHONPATH=$PWD/.site PATH=$PWD/.site/bin:$PATH; ray start --head ...
# A bundle (DIR/bundle.tar.xz) holds one top folder per distribution, its unpacked wheel, after _bundle.json.
# ray, transformers, omegaconf, av, decord (and antlr4 were it there) always go into .site/, unless .site/ has that
# version already; any other distribution only if python3 (with .site/ first on its path) lacks it or has it
# outside the range the bundle's distributions ask. A distribution is merged into .site/ with its .dist-info last,
# so an interrupted run is redone; another version that an earlier run put there is removed first (its RECORD).
# One line per distribution: installed / already there (version). Reads the tar once, and only its manifest when
# nothing is to be installed. Writes .site/bin/ray (the ray CLI with this python3; it puts .site/ on PYTHONPATH
# for the processes ray starts). PYTHON=... picks another interpreter than python3.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DIR... (each holding the bundle.tar.xz of bench/gpu_wheels.sh)" >&2; exit 2; }
PY=${PYTHON:-python3}
bundles=()
for d in "$@"; do
  [ -f "$d/bundle.tar.xz" ] || { echo "$0: no $d/bundle.tar.xz" >&2; exit 1; }
  bundles+=("$(cd "$d" && pwd)/bundle.tar.xz")
done
cd "$(dirname "$0")/.."
site=${SITE:-$PWD/.site}  # SITE=/tmp/...: outside the repo, where a warm machine keeps it between calls
mkdir -p "$site/bin"

"$PY" - "$site" "${bundles[@]}" <<'EOF'
import importlib.metadata as md, json, os, re, shutil, sys, tarfile, tempfile

site, bundles = os.path.realpath(sys.argv[1]), sys.argv[2:]
sys.path.insert(0, site)  # as PYTHONPATH=.site: its distributions come first
try:
    from packaging.specifiers import SpecifierSet
except ImportError:  # then presence alone decides
    SpecifierSet = None

def canon(n):
    return re.sub(r"[-_.]+", "-", n).lower()

def visible():  # name -> distribution, the first on sys.path, as imports see them
    found = {}
    for d in md.distributions(path=sys.path):
        found.setdefault(canon(d.metadata["Name"] or ""), d)
    return found

def in_site(name):  # [(version, dist-info dir)] of name in .site
    out = []
    for e in os.listdir(site):
        m = re.fullmatch(r"(.+?)-([^-]+)\.dist-info", e)
        if m and canon(m[1]) == name:
            out.append((m[2], os.path.join(site, e)))
    return out

def fits(version, spec):
    if not spec or SpecifierSet is None:
        return True
    try:
        return SpecifierSet(spec).contains(version, prereleases=True)
    except Exception:  # a version packaging cannot parse: take it
        return True

def remove(info):  # the files an earlier run put in .site for that distribution, by its RECORD
    dirs = set()
    try:
        with open(os.path.join(info, "RECORD")) as f:
            paths = [l.split(",")[0] for l in f if l.strip()]
    except OSError:
        paths = []
    for p in paths:
        f = os.path.realpath(os.path.join(site, p))
        if f.startswith(site + os.sep) and os.path.isfile(f) and not f.startswith(info + os.sep):
            os.remove(f)
            dirs.add(os.path.dirname(f))
    shutil.rmtree(info, ignore_errors=True)
    for d in sorted(dirs, key=len, reverse=True):  # now-empty folders, bottom up
        while d.startswith(site + os.sep) and os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)
            d = os.path.dirname(d)

def merge(src, dst):  # copy src/* over dst/*, folders merged
    for e in os.listdir(src):
        s, t = os.path.join(src, e), os.path.join(dst, e)
        if os.path.isdir(s) and not os.path.islink(s):
            os.makedirs(t, exist_ok=True)
            merge(s, t)
        else:
            if os.path.lexists(t) and (os.path.isdir(t) and not os.path.islink(t)):
                shutil.rmtree(t)
            shutil.copy2(s, t, follow_symlinks=False)

def install(src, name, version):
    for v, info in in_site(name):
        remove(info)
    entries = sorted(os.listdir(src), key=lambda e: e.endswith(".dist-info"))  # .dist-info last
    for e in entries:
        s, t = os.path.join(src, e), os.path.join(site, e)
        if e == "bin":  # wheel scripts: '#!python' is the interpreter that installs them
            for f in os.listdir(s):
                with open(os.path.join(s, f), "rb") as fh:
                    head = fh.read(8)
                if head.startswith(b"#!python"):
                    with open(os.path.join(s, f), "rb") as fh:
                        body = fh.read().split(b"\n", 1)[1]
                    with open(os.path.join(s, f), "wb") as fh:
                        fh.write(b"#!" + sys.executable.encode() + b"\n" + body)
        if os.path.isdir(s):
            os.makedirs(t, exist_ok=True)
            merge(s, t)
        else:
            shutil.copy2(s, t)

extract = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
width = 34
for bundle in bundles:
    print(f"{bundle}:")
    with tarfile.open(bundle, "r|xz") as tf:
        first = tf.next()
        if first is None or first.name != "_bundle.json":
            sys.exit(f"{bundle}: no _bundle.json first: not a bundle of bench/gpu_wheels.sh")
        man = json.load(tf.extractfile(first))
        seen, todo, lines = visible(), {}, {}
        for folder, d in sorted(man["dists"].items()):
            n, v, label = d["name"], d["version"], f"  {d['name']} {d['version']}".ljust(width)
            if d["always"]:
                if any(sv == v for sv, _ in in_site(n)):
                    lines[folder] = f"{label} already there ({v})"
                    continue
                why = ""
            else:
                have = seen.get(n)
                if have is not None and fits(have.version, d["requires"]):
                    lines[folder] = f"{label} already there ({have.version})"
                    continue
                why = f" (python3 has {have.version}; asked: {d['requires']})" if have is not None else ""
            todo[folder] = d
            lines[folder] = f"{label} installed{why}"
        if todo:
            tmp = tempfile.mkdtemp(prefix="gpu-install-", dir="/tmp")
            try:
                for m in tf:  # one pass over the rest of the stream
                    if m.name.split("/", 1)[0] in todo:
                        tf.extract(m, tmp, **extract)
                for folder, d in todo.items():
                    install(os.path.join(tmp, folder), d["name"], d["version"])
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        print("\n".join(lines[f] for f in sorted(lines)), flush=True)
    seen, bad = visible(), 0
    for n, spec in sorted(man.get("expected_on_machine", {}).items()):
        have = seen.get(n)
        if have is None:
            print(f"WARNING: {n} is not on this machine, and no bundle carries it (asked: {spec or 'any'})", file=sys.stderr)
        elif not fits(have.version, spec):
            print(f"WARNING: this machine's {n} {have.version} is outside what the bundle asks ({spec})", file=sys.stderr)
        else:
            continue
        bad += 1
    if not bad:
        print(f"  (on the machine as expected: {', '.join(sorted(man.get('expected_on_machine', {})))})")
EOF

pyexe=$("$PY" -c 'import sys; print(sys.executable)')
cat > "$site/bin/ray.tmp" <<EOF
#!$pyexe
# The ray CLI, with .site/ on the path of this process and of those it starts (written by bench/gpu_install.sh).
import os, sys
site = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
if site not in sys.path:
    sys.path.insert(0, site)
paths = os.environ.get("PYTHONPATH", "")
if site not in paths.split(os.pathsep):
    os.environ["PYTHONPATH"] = site + (os.pathsep + paths if paths else "")
from ray.scripts.scripts import main
sys.exit(main())
EOF
chmod +x "$site/bin/ray.tmp" && mv "$site/bin/ray.tmp" "$site/bin/ray"

PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} "$PY" -c '
import importlib, importlib.util, sys
out, bad = [], 0
for m in ("ray", "omegaconf", "transformers", "decord", "av"):
    if m in ("decord", "av") and importlib.util.find_spec(m) is None:
        continue
    try:
        out.append(f"{m} {importlib.import_module(m).__version__}")
    except Exception as e:
        out.append(f"{m} FAILED ({type(e).__name__}: {e})")
        bad = 1
print("import:", ", ".join(out))
sys.exit(bad)'
echo "use: export PYTHONPATH=$site PATH=$site/bin:\$PATH   (then: ray start --head ...; ray job submit ...)"

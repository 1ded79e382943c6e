#!/bin/bash
# Build two xz bundles of unpacked wheels for the GPU machine (device tool; KINDS.md): x86-64, Python 3.12,
# torch 2.11, transformers 5.17, tokenizers 0.23.2, huggingface_hub 1.33, safetensors, numpy, pyarrow, fsspec,
# accelerate, psutil, (probably) pandas; no ray, decord, av, omegaconf; no package index.
# A call carries 64 MiB (67.1 MB) with the working tree (22 MB), so each bundle must stay under 40 MB:
#   .gpu-a/bundle.tar.xz  ray 2.60.0 (slimmed, below) + the closure of ray[data,default]'s dependencies,
#                         transformers 5.24.0 (the project pins >=5.23) and its missing dependencies, omegaconf 2.4.0
#   .gpu-b/bundle.tar.xz  av 18.1.0, decord 0.6.0, and cryptography (+ cffi, pycparser) moved from A (below)
# (measured: A 35.4 MB, B 38.3 MB)
# Each tar member lies under one top folder per distribution (`<dist>/`, the wheel's contents; `<dist>.data/`
# purelib/platlib merged in, its scripts moved to `<dist>/bin/`), after a first member `_bundle.json` that lists the
# distributions, their versions, whether the installer always puts them in .site/ (ray, transformers, omegaconf, av,
# decord) and the version range the bundle's other distributions ask of each. xz -9 of the unpacked files is far
# smaller than the wheels' zip (ray's 79 MB wheel: 17.6 MB once slimmed).
# Left out (the installer warns if one of these is missing on the machine or out of the range the bundle asks):
#   numpy, pyarrow, pandas (ray[data]), torch (asked by nothing here), huggingface-hub, tokenizers (transformers):
#     big, and the machine has them; with them the dependencies only they need (python-dateutil, tzdata, hf-xet, ...).
#   safetensors, regex, pyyaml, rich, pygments (with markdown-it-py, mdurl): the machine's transformers 5.17 asks
#     the same ranges of safetensors, regex and pyyaml as 5.24 does, and rich (pygments) comes with its typer.
#   virtualenv (with distlib, platformdirs, python-discovery): ray uses it only to build runtime_env pip/uv
#     environments, which need a package index that the machine cannot reach.
#   antlr4-python3-runtime: omegaconf 2.4.0 vendors it (omegaconf/vendor/antlr4); only omegaconf 2.3 needs it.
# Moved from A to B: cryptography (with cffi, pycparser): only google-auth (opencensus -> google-api-core) and ray's
#   TLS certificate helper import it, neither on the path of `ray start` or `ray job submit`; keeps A under 40 MB.
# Every other distribution of the closure is in a bundle; the installer puts it in .site/ only if the machine lacks
# it or has it out of range (tiny ones such as click, packaging, typing-extensions, fsspec cost nothing to carry).
# Ray is slimmed: its Java jars (32 MB), the dashboard's prebuilt web client (9 MB, 2 MB in xz: the dashboard's API,
# the job server and `ray job submit` work without it, but the dashboard will not start without its folder, so a
# one-line index.html and an empty static/ stand in), and the libraries the job never imports (rllib, serve, tune,
# train, llm: the dashboard imports serve/train only inside its handlers of those pages; Dataset.iter_torch_batches
# would need ray.train) are dropped; its native libraries and the gcs_server/raylet binaries lose their symbol
# tables (strip --strip-unneeded).
# Checked on CPython 3.12 with the machine's other packages: `ray start --head` (dashboard on), `ray job submit` of
# a Ray Data job importing omegaconf, av, decord.
#   bench/gpu_wheels.sh                      # here: builds .gpu-a/ and .gpu-b/ (ignored by git)
# Then, on the GPU machine, one call each (the warm machine keeps .site/ between calls):
#   call 1, carry [".gpu-a"]:  bench/gpu_install.sh .gpu-a
#   call 2, carry [".gpu-b"]:  bench/gpu_install.sh .gpu-b
#   then: export PYTHONPATH=$PWD/.site PATH=$PWD/.site/bin:$PATH; ray start --head ...
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for d in /.gpu-a/ /.gpu-b/ /.site/; do grep -qx "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done

LIMIT=40000000  # bytes per bundle: 67.1 MB a call, less the tree and a margin
W=/tmp/lvspec-gpu-wheels  # this build's wheels (fresh each time: pip's cache makes it quick)
S=/tmp/lvspec-gpu-stage
rm -rf "$W" "$S" && mkdir -p "$W" "$S/A" "$S/B"
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux2010_x86_64 -d "$W" \
  "ray[data,default]==2.60.0" transformers==5.24.0 omegaconf==2.4.0 av==18.1.0 decord==0.6.0

# The closure of each bundle's roots over the downloaded wheels' Requires-Dist, for CPython 3.12 on linux x86_64,
# not entering the left-out distributions. Prints "BUNDLE FOLDER WHEEL" lines; writes $S/{A,B}/_bundle.json.
python3 - "$W" "$S" > "$S/plan" <<'EOF'
import json, os, sys, zipfile
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

wdir, stage = sys.argv[1:]
ENV = dict(python_version="3.12", python_full_version="3.12.3", implementation_version="3.12.3",
           implementation_name="cpython", platform_python_implementation="CPython", os_name="posix",
           sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
           platform_release="", platform_version="")
ROOTS = {"A": ["ray[data,default]", "transformers", "omegaconf"], "B": ["av", "decord"]}
ALWAYS = {"ray", "transformers", "omegaconf", "av", "decord", "antlr4-python3-runtime"}
ON_MACHINE = {"numpy", "pyarrow", "pandas", "torch", "huggingface-hub", "tokenizers",
              "safetensors", "regex", "pyyaml", "rich", "pygments"}  # the installer checks they are there
LEFT_OUT = ON_MACHINE | {"virtualenv"}
MOVED = {"A": {"cryptography": "B"}}  # reached from A's roots, carried (with its own closure) in B

wheels = {}
for f in sorted(os.listdir(wdir)):
    if not f.endswith(".whl"):
        sys.exit(f"not a wheel: {f}")
    name, ver, _, _ = parse_wheel_filename(f)
    assert name not in wheels, f"two wheels of {name}"
    with zipfile.ZipFile(os.path.join(wdir, f)) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    head = text.split("\n\n", 1)[0]
    reqs = [l.split(":", 1)[1].strip() for l in head.splitlines() if l.startswith("Requires-Dist:")]
    wheels[name] = dict(wheel=f, version=str(ver), requires=reqs)

def deps(name, extras):
    for r in map(Requirement, wheels[name]["requires"]):
        if r.marker is None or any(r.marker.evaluate(dict(ENV, extra=e)) for e in [""] + sorted(extras)):
            yield r

seen, specs, plan, asked = set(), {}, {}, {}
for b, roots in ROOTS.items():
    todo, extras, asked[b] = [Requirement(r) for r in roots], {}, set()
    while todo:
        r = todo.pop()
        n = canonicalize_name(r.name)
        specs.setdefault(n, SpecifierSet())
        specs[n] &= r.specifier
        if n in LEFT_OUT:
            asked[b] |= {n} & ON_MACHINE
            continue
        if n in MOVED.get(b, {}):
            ROOTS[MOVED[b][n]].append(str(r).split(";")[0])
            continue
        new = set(r.extras) - extras.get(n, set())
        if n in extras and not new:
            continue
        extras[n] = extras.get(n, set()) | set(r.extras)
        assert n in wheels, f"{n} was not downloaded"
        todo += deps(n, extras[n])
    plan[b] = sorted(n for n in extras if n not in seen)
    seen |= set(extras)
for b, names in plan.items():
    dists = {}
    for n in names:
        folder = n.replace("-", "_")
        dists[folder] = dict(name=n, version=wheels[n]["version"], always=n in ALWAYS, requires=str(specs[n]))
        print(b, folder, wheels[n]["wheel"])
    left = {n: str(specs[n]) for n in sorted(asked[b])}
    with open(os.path.join(stage, b, "_bundle.json"), "w") as f:
        json.dump(dict(bundle=b, dists=dists, expected_on_machine=left), f, indent=1)
EOF

while read -r b folder whl; do
  d=$S/$b/$folder
  unzip -q "$W/$whl" -d "$d"
  for data in "$d"/*.data; do  # the wheel's .data/: purelib and platlib into the top, scripts into bin/
    [ -d "$data" ] || continue
    for k in purelib platlib; do [ -d "$data/$k" ] && cp -a "$data/$k/." "$d/"; done
    [ -d "$data/scripts" ] && mkdir -p "$d/bin" && cp -a "$data/scripts/." "$d/bin/"
    for k in "$data"/*; do case ${k##*/} in purelib|platlib|scripts) ;; *) echo "dropped $folder's ${k#$d/}" ;; esac; done
    rm -rf "$data"
  done
done < "$S/plan"
(cd "$S/A/ray/ray" && rm -rf jars dashboard/client/build rllib serve tune train llm)
# The dashboard refuses to start without client/build/ (FrontendNotFoundError): a page and an empty static/ stand in.
mkdir -p "$S/A/ray/ray/dashboard/client/build/static"
echo '<!doctype html><title>Ray</title><p>Ray dashboard: its web client is left out of this install' \
  '(bench/gpu_wheels.sh); the HTTP API and the job server work.</p>' > "$S/A/ray/ray/dashboard/client/build/index.html"
find "$S/A/ray/ray" -type f \( -name '*.so' -o -name gcs_server -o -name raylet \) -exec strip --strip-unneeded {} +

for b in A B; do
  out=$repo/.gpu-${b,,}
  rm -rf "$out" && mkdir -p "$out"
  (cd "$S/$b" && tar --owner=0 --group=0 --numeric-owner --sort=name -cf - _bundle.json \
     $(awk -v b=$b '$1 == b {print $2}' "$S/plan")) | xz -9 -T2 > "$out/bundle.tar.xz"
done

echo "bundle  unpacked  distributions"
for b in A B; do
  echo "$b: $(awk -v b=$b '$1 == b {printf "%s ", $2}' "$S/plan")"
  du -sb "$S/$b"/*/ | sort -rn | head -8 | awk '{printf "  %6.1f MB unpacked  %s\n", $1/1e6, $2}'
done
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
fail=0
for b in a b; do
  n=$(stat -c %s ".gpu-$b/bundle.tar.xz")
  awk -v n=$n -v b=$b -v l=$LIMIT -v t=$tree 'BEGIN {printf "%6.1f MB  .gpu-%s/bundle.tar.xz  (limit %.1f MB: a call carries 67.1 MB = 64 MiB, with the tree'"'"'s %.1f MB)\n", n/1e6, b, l/1e6, t/1e6}'
  if [ "$n" -gt $LIMIT ]; then echo "ERROR: .gpu-$b/bundle.tar.xz is over $LIMIT bytes: it will not fit in a call" >&2; fail=1; fi
done
rm -rf "$S"
exit $fail

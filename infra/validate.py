#!/usr/bin/env python3
"""Offline checks of infra/: the Terraform root module, the Kubernetes manifests, the Ray cluster
launcher config, and checkov over all of it.

    python infra/validate.py                 # everything; exit status 1 on any problem
    python infra/validate.py --no-checkov    # the fast part (a second or two)

Nothing here needs a provider plugin, a cluster or a cloud account (`terraform init` cannot run
offline, so `terraform validate` cannot either). What is checked instead:

  terraform  every .tf parses (python-hcl2); every var.X, local.X, module.X, data.T.N and T.N used
             is declared; every variable and local is used; every file()/templatefile() path
             exists; every templatefile() gets a local map whose keys are exactly the template's
             ${name} placeholders; no credential in a variable default or in the state (a plain
             secret_string, a random_password resource)
  k8s        every manifest under infra/k8s, rendered the way Terraform renders it (variable
             defaults; values known only after apply become "unknown"), has what KubeRay and
             Kubernetes require: RayCluster head/worker groups, replica bounds, in-tree
             autoscaling, GPU limits and taint toleration; RayJob entrypoint and cluster; CronJob
             schedule and container; fixed image tags; names that agree across files. Who may
             submit: every RayCluster (and RayJob) requires the Ray token (authOptions mode token)
             from a Secret an ExternalSecret makes; every `ray job submit` sends it from that
             Secret; no token in plain text; every Ray pod is under NetworkPolicies for ingress
             and egress, and the head's job API (8265) admits named pods only
  launcher   infra/ray/cluster.yaml passes Ray's own schema and launcher checks, has sane worker
             bounds and a GPU worker type, names the instance profiles, cluster name and region
             that infra/terraform creates IAM for, and runs Ray with the token that a boot command
             fetches from the Terraform-made secret (never written in the config)
  checkov    no failed check (terraform, kubernetes, secrets); every skip carries a reason

The functions return lists of problems (strings) so that tests can call them on broken copies.
python-hcl2 and checkov must be installed; a missing one is an error, never a silent pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

INFRA = Path(__file__).resolve().parent
REPO = INFRA.parent
TERRAFORM_DIR = INFRA / "terraform"
K8S_DIR = INFRA / "k8s"
LAUNCHER_CONFIG = INFRA / "ray" / "cluster.yaml"

CHECKOV_VERSION = "3.3.30"
CHECKOV_FRAMEWORKS = ("terraform", "kubernetes", "secrets")
INSTALL_HINT = {
    "hcl2": "python-hcl2 is not installed: pip install python-hcl2==8.1.4",
    "yaml": "PyYAML is not installed: pip install pyyaml",
    "checkov": (
        f"checkov is not installed: uv tool install checkov=={CHECKOV_VERSION} (or pipx install), "
        "or point $CHECKOV at its executable. It cannot share the project's environment: it pins "
        "boto3==1.35.49, packaging<24 and networkx<2.7, which ray and aiobotocore do not accept, "
        "and its bc-python-hcl2 overwrites python-hcl2's `hcl2` package."
    ),
}


class MissingTool(RuntimeError):
    """A tool the checks need is not installed."""


def _import(name: str):
    try:
        return __import__(name)
    except ImportError as e:
        raise MissingTool(INSTALL_HINT[name]) from e


# --- HCL values --------------------------------------------------------------------------------
#
# python-hcl2 (>= 7) returns attribute values as strings: "${expr}" for an expression, '"text"'
# (quotes kept) for a string literal, whose ${...} parts are expressions again. The scanner below
# splits such a value into its expression parts, blanking string literals inside them, so that
# `"arn:aws:s3:::x.y"` or a tag key never looks like a reference.

META_KEYS = ("__is_block__", "__comments__", "__inline_comments__", "__start_line__", "__end_line__")


def _scan_template(s: str, i: int, out: list[str], quoted: bool) -> int:
    """Literal text from i; expressions go to out. Returns the index after the closing quote."""
    while i < len(s):
        if s[i] == "\\":
            i += 2
        elif s.startswith(("$${", "%%{"), i):  # escaped, literal
            i += 3
        elif s.startswith(("${", "%{"), i):
            i = _scan_code(s, i + 2, out)
        elif quoted and s[i] == '"':
            return i + 1
        else:
            i += 1
    return i


def _scan_code(s: str, i: int, out: list[str]) -> int:
    """An expression from i up to its closing brace; appends it (string literals blanked)."""
    code, depth = [], 0
    while i < len(s):
        c = s[i]
        if c == '"':
            code.append('""')
            i = _scan_template(s, i + 1, out, quoted=True)
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            if depth == 0:
                out.append("".join(code))
                return i + 1
            depth -= 1
        code.append(c)
        i += 1
    out.append("".join(code))
    return i


def code_parts(value: str) -> list[str]:
    """The HCL expressions inside one hcl2-serialised value."""
    out: list[str] = []
    s = value
    if s.startswith('"<<'):  # heredoc: its body is a template whose quotes are literal
        s = s.split("\n", 1)[1] if "\n" in s else ""
        _scan_template(s, 0, out, quoted=False)
        return out
    if len(s) >= 2 and s[0] == s[-1] == '"':
        s = s[1:-1]
    _scan_template(s, 0, out, quoted=False)
    return out


def _unquote(label: str) -> str:
    return label[1:-1] if len(label) >= 2 and label[0] == label[-1] == '"' else label


def _walk_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _walk_strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in META_KEYS:
                yield from _walk_strings(v)


# --- the Terraform module ----------------------------------------------------------------------

@dataclass
class Block:
    kind: str  # resource, data, variable, locals, output, module, provider, terraform
    labels: tuple[str, ...]
    file: str
    body: dict

    @property
    def name(self) -> str:
        return " ".join((self.kind, ".".join(self.labels))) if self.labels else self.kind


@dataclass
class Module:
    directory: Path
    blocks: list[Block] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[Block]:
        return [b for b in self.blocks if b.kind == kind]

    @property
    def variables(self) -> dict[str, dict]:
        return {b.labels[0]: b.body for b in self.of("variable")}

    @property
    def locals(self) -> dict[str, Any]:
        out = {}
        for b in self.of("locals"):
            out.update({k: v for k, v in b.body.items() if k not in META_KEYS})
        return out

    @property
    def resources(self) -> set[tuple[str, str]]:
        return {b.labels for b in self.of("resource")}

    @property
    def data_sources(self) -> set[tuple[str, str]]:
        return {b.labels for b in self.of("data")}

    @property
    def providers(self) -> set[str]:
        names = {"terraform"}
        for b in self.of("terraform"):
            for req in b.body.get("required_providers", []):
                names.update(k for k in req if k not in META_KEYS)
        return names

    def line_of(self, file: str, needle: str) -> int | None:
        for n, line in enumerate(self.texts.get(file, "").splitlines(), 1):
            if needle in line.split("#", 1)[0]:
                return n
        return None

    def where(self, block: Block, needle: str) -> str:
        line = self.line_of(block.file, needle)
        return f"{block.file}:{line}" if line else f"{block.file} ({block.name})"


KINDS_WITH_LABELS = {"resource": 2, "data": 2, "ephemeral": 2, "variable": 1, "output": 1, "module": 1,
                     "provider": 1}


def load_module(directory: Path = TERRAFORM_DIR) -> Module:
    """Parses every .tf file of a root module; parse errors become problems."""
    hcl2 = _import("hcl2")
    module = Module(Path(directory))
    files = sorted(Path(directory).glob("*.tf"))
    if not files:
        module.problems.append(f"{directory}: no .tf files")
    for path in files:
        text = path.read_text()
        module.texts[path.name] = text
        try:
            parsed = hcl2.loads(text)
        except Exception as e:  # python-hcl2 raises lark errors of several kinds
            module.problems.append(f"{path.name}: does not parse: {str(e).splitlines()[0]}")
            continue
        for kind, entries in parsed.items():
            if kind in META_KEYS:
                continue
            for entry in entries:
                depth = KINDS_WITH_LABELS.get(kind, 0)
                module.blocks.extend(_blocks(kind, entry, depth, (), path.name))
    return module


def _blocks(kind: str, entry: dict, depth: int, labels: tuple, file: str) -> Iterator[Block]:
    if depth == 0:
        yield Block(kind, labels, file, entry)
        return
    for label, inner in entry.items():
        if label not in META_KEYS:
            yield from _blocks(kind, inner, depth - 1, labels + (_unquote(label),), file)


REF = re.compile(r"(?<![\w.\-])([A-Za-z_][\w-]*)((?:\.[A-Za-z_][\w-]*|\[[^\]]*\])*)")
PATH_CALL = re.compile(r"\b(file|templatefile|filebase64|filesha256|fileexists)\(\s*\"((?:[^\"\\]|\\.)*)\"")
TEMPLATEFILE_CALL = re.compile(r"\btemplatefile\(\s*\"((?:[^\"\\]|\\.)*)\"\s*,\s*([^)]*?)\s*\)")


def references(module: Module) -> Iterator[tuple[Block, str, str, str]]:
    """(block, kind, target, text) for every reference: kind var/local/module/data/resource."""
    resource_prefixes = tuple(f"{p}_" for p in module.providers)
    for block in module.blocks:
        for value in _walk_strings(block.body):
            for code in code_parts(value):
                for m in REF.finditer(code):
                    head = m.group(1)
                    parts = re.findall(r"\.([A-Za-z_][\w-]*)", m.group(2))
                    if head in ("var", "local", "module") and parts:
                        yield block, head, parts[0], f"{head}.{parts[0]}"
                    elif head in ("data", "ephemeral") and len(parts) >= 2:
                        yield block, head, f"{parts[0]}.{parts[1]}", f"{head}.{parts[0]}.{parts[1]}"
                    elif head.startswith(resource_prefixes) and parts and not code[m.end():].lstrip().startswith("("):
                        yield block, "resource", f"{head}.{parts[0]}", f"{head}.{parts[0]}"


def check_terraform(directory: Path = TERRAFORM_DIR) -> list[str]:
    """Parse, reference, path and template-variable checks of one root module."""
    module = load_module(directory)
    problems = list(module.problems)
    variables, local_names = set(module.variables), set(module.locals)
    resources = {f"{t}.{n}" for t, n in module.resources}
    data = {f"{t}.{n}" for t, n in module.data_sources}
    ephemeral = {".".join(b.labels) for b in module.of("ephemeral")}
    modules = {b.labels[0] for b in module.of("module")}
    declared = {"var": variables, "local": local_names, "module": modules, "data": data, "ephemeral": ephemeral,
                "resource": resources}
    used: dict[str, set[str]] = {"var": set(), "local": set()}
    for block, kind, target, text in references(module):
        if kind in used:
            used[kind].add(target)
        if target not in declared[kind]:
            what = {"var": "variable", "local": "local value", "module": "module", "data": "data source",
                    "ephemeral": "ephemeral resource", "resource": "resource"}[kind]
            problems.append(f"{module.where(block, text)}: {text} refers to an undeclared {what}")
    variable_files = {b.labels[0]: b.file for b in module.of("variable")}
    for name in sorted(variables - used["var"]):
        problems.append(f"{variable_files[name]}: variable {name!r} is declared but never used")
    local_files = {k: b.file for b in module.of("locals") for k in b.body if k not in META_KEYS}
    for name in sorted(local_names - used["local"]):
        problems.append(f"{local_files[name]}: local {name!r} is declared but never used")
    problems += _duplicates(module)
    problems += _check_paths(module)
    problems += _credentials_in_terraform(module)
    return problems


CREDENTIAL_WORDS = {"token", "secret", "secrets", "password", "passwd", "credential", "credentials", "apikey"}
# ... unless the name says it holds something about a credential, not the credential itself
NOT_A_CREDENTIAL = {"version", "refresh", "name", "arn", "id", "interval", "days", "path", "uri"}


def _credential_name(name: str) -> bool:
    words = name.lower().split("_")
    return bool(CREDENTIAL_WORDS & set(words)) and words[-1] not in NOT_A_CREDENTIAL
STATEFUL_SECRETS = {  # resource type -> arguments whose value Terraform keeps in its state
    "aws_secretsmanager_secret_version": ("secret_string", "secret_binary"),
    "random_password": ("*",), "random_string": ("*",),
}


def _credentials_in_terraform(module: Module) -> list[str]:
    """No credential in a variable default, and none written where the state keeps it (a secret
    version's plain secret_string, a random_password resource): ephemeral values and write-only
    arguments (*_wo) only."""
    problems = []
    for name, body in module.variables.items():
        default = body.get("default")
        if _credential_name(name) and isinstance(default, str) and default.strip('"') not in ("", "null", "${null}"):
            block = next(b for b in module.of("variable") if b.labels[0] == name)
            problems.append(f"{module.where(block, name)}: variable {name!r} looks like a credential and has a "
                            f"default: a token or password never lives in a variable default")
    for block in module.of("resource"):
        kind = block.labels[0]
        for arg in STATEFUL_SECRETS.get(kind, ()):
            if arg == "*" or arg in block.body:
                what = f"{kind}.{block.labels[1]}" + ("" if arg == "*" else f".{arg}")
                problems.append(f"{module.where(block, arg if arg != '*' else kind)}: {what} keeps a secret in the "
                                f"Terraform state; generate it with an ephemeral resource and write it through a "
                                f"write-only argument (e.g. secret_string_wo)")
    return problems


def _duplicates(module: Module) -> list[str]:
    seen: dict[str, str] = {}
    problems = []
    names = [(b.name, b.file) for b in module.blocks if b.labels and b.kind != "provider"]
    names += [(f"local.{k}", b.file) for b in module.of("locals") for k in b.body if k not in META_KEYS]
    for name, file in names:
        if name in seen:
            problems.append(f"{file}: {name} is declared again (first in {seen[name]})")
        seen.setdefault(name, file)
    return problems


def _static_path(module: Module, raw: str) -> Path | None:
    path = raw.replace("${path.module}", str(module.directory)).replace("${path.root}", str(module.directory))
    if "${" in path:
        return None
    path = Path(path)
    return path if path.is_absolute() else module.directory / path


def _check_paths(module: Module) -> list[str]:
    problems = []
    for block in module.blocks:
        for value in _walk_strings(block.body):
            for func, raw in PATH_CALL.findall(value):
                path = _static_path(module, raw)
                where = module.where(block, raw)
                if path is None:
                    problems.append(f"{where}: {func}({raw!r}): path is not static (only path.module may vary)")
                elif not path.is_file():
                    problems.append(f"{where}: {func}({raw!r}): no such file {path}")
            for raw, args in TEMPLATEFILE_CALL.findall(value):
                path = _static_path(module, raw)
                if path is not None and path.is_file():
                    problems += _check_template_vars(module, block, path, args)
    return problems


PLACEHOLDER = re.compile(r"(?<!\$)\$\{([^}]*)\}")
DIRECTIVE = re.compile(r"(?<!%)%\{")


def template_placeholders(text: str) -> tuple[set[str], list[str]]:
    """Names used as ${name} in a template, and the expressions this checker cannot follow."""
    names, unsupported = set(), []
    for m in PLACEHOLDER.finditer(text):
        inner = m.group(1).strip()
        if re.fullmatch(r"[A-Za-z_][\w]*", inner):
            names.add(inner)
        else:
            unsupported.append("${" + m.group(1) + "}")
    unsupported += ["%{ directive"] * len(DIRECTIVE.findall(text))
    return names, unsupported


def _template_vars_local(module: Module, args: str) -> str | None:
    m = re.fullmatch(r"local\.([A-Za-z_][\w-]*)", args.strip())
    return m.group(1) if m else None


def _check_template_vars(module: Module, block: Block, path: Path, args: str) -> list[str]:
    where = module.where(block, path.name)
    name = _template_vars_local(module, args)
    value = module.locals.get(name) if name else None
    if not isinstance(value, dict):
        return [f"{where}: templatefile({path.name}) must take its variables as a local map (local.NAME) "
                f"so that they can be checked; got {args.strip()!r}"]
    keys = {k for k in value if k not in META_KEYS}
    used, unsupported = template_placeholders(path.read_text())
    path = path.resolve()
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    problems = [f"{rel}: {u}: only ${{name}} placeholders are supported (write $${{...}} for a literal)"
                for u in unsupported]
    problems += [f"{rel}: placeholder ${{{k}}} has no value in local.{name}" for k in sorted(used - keys)]
    problems += [f"{where}: local.{name}.{k} is not used by {rel}" for k in sorted(keys - used)]
    return problems


# --- evaluating what Terraform would render ----------------------------------------------------

class Unknown:
    """A value known only after apply (an ARN, a computed name)."""

    def __init__(self, expr: str):
        self.expr = expr

    def __repr__(self) -> str:
        return f"Unknown({self.expr!r})"


NUMERIC = re.compile(r"[\d\s.+\-*/()]+")


def evaluate(module: Module, raw: Any, _depth: int = 0) -> Any:
    """The value of an hcl2-serialised attribute, with variables at their defaults."""
    if _depth > 20:
        return Unknown("(too deep)")
    if raw is None or isinstance(raw, (bool, int, float)):
        return raw
    if isinstance(raw, list):
        return [evaluate(module, v, _depth + 1) for v in raw]
    if isinstance(raw, dict):
        return {k: evaluate(module, v, _depth + 1) for k, v in raw.items() if k not in META_KEYS}
    s = str(raw)
    if s.startswith("${"):
        end = _scan_code(s, 2, [])
        if end == len(s):
            return _eval_code(module, s[2:end - 1], _depth + 1)
    text = s[1:-1] if len(s) >= 2 and s[0] == s[-1] == '"' else s
    pieces, i = [], 0
    for m in re.finditer(r"\$\{", text):
        if m.start() < i or (m.start() > 0 and text[m.start() - 1] == "$"):
            continue
        end = _scan_code(text, m.end(), [])
        value = _eval_code(module, text[m.end():end - 1], _depth + 1)
        if isinstance(value, Unknown):
            return value
        pieces += [text[i:m.start()], _render_scalar(value)]
        i = end
    pieces.append(text[i:])
    return "".join(pieces)


def _eval_code(module: Module, code: str, depth: int) -> Any:
    code = code.strip()
    ref = re.fullmatch(r"(var|local)\.([A-Za-z_][\w-]*)((?:\.[A-Za-z_][\w-]*)*)", code)
    if ref:
        kind, name, attrs = ref.groups()
        if kind == "var":
            body = module.variables.get(name)
            if body is None or "default" not in body:
                return Unknown(code)
            value = evaluate(module, body["default"], depth)
        else:
            if name not in module.locals:
                return Unknown(code)
            value = evaluate(module, module.locals[name], depth)
        for attr in filter(None, attrs.split(".")):
            value = value.get(attr, Unknown(code)) if isinstance(value, dict) else Unknown(code)
        return value
    if re.fullmatch(r"-?\d+", code):
        return int(code)
    if re.fullmatch(r'"[^"\\$%]*"', code):
        return code[1:-1]
    join = re.fullmatch(r'join\(\s*"([^"\\]*)"\s*,\s*(.+)\)', code, re.S)
    if join:
        value = _eval_code(module, join.group(2), depth)
        if isinstance(value, list) and not any(isinstance(v, Unknown) for v in value):
            return join.group(1).join(map(_render_scalar, value))
        return Unknown(code)
    names = re.findall(r"(?:var|local)\.[A-Za-z_][\w.-]*", code)
    if names:
        arithmetic = code
        for name in names:
            value = _eval_code(module, name, depth)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return Unknown(code)
            arithmetic = arithmetic.replace(name, repr(value), 1)
        if NUMERIC.fullmatch(arithmetic):
            result = eval(arithmetic, {"__builtins__": {}})  # digits and + - * / ( ) only
            return int(result) if float(result).is_integer() else result
    return Unknown(code)


def _render_scalar(value: Any) -> str:
    if value is None:
        return "example"  # a null default (e.g. bulk_job_id): any valid name will do
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Unknown):
        return "unknown"
    return str(value)


def rendered_manifests(directory: Path = TERRAFORM_DIR, module: Module | None = None) -> dict[Path, str]:
    """Every manifest Terraform applies, rendered as Terraform would with the variable defaults."""
    module = module or load_module(directory)
    out: dict[Path, str] = {}
    for block in module.of("resource"):
        for value in _walk_strings(block.body):
            for raw, args in TEMPLATEFILE_CALL.findall(value):
                path = _static_path(module, raw)
                name = _template_vars_local(module, args)
                if path is None or not path.is_file() or name not in module.locals:
                    continue
                env = evaluate(module, module.locals[name])
                if not isinstance(env, dict):
                    continue  # reported by check_terraform
                text = path.read_text()
                out[path.resolve()] = PLACEHOLDER.sub(
                    lambda m: _render_scalar(env.get(m.group(1).strip(), Unknown(m.group(1)))), text
                ).replace("$${", "${").replace("%%{", "%{")
            for func, raw in PATH_CALL.findall(value):
                path = _static_path(module, raw)
                if func == "file" and path is not None and path.is_file() and path.suffix in (".yaml", ".yml"):
                    out.setdefault(path.resolve(), path.read_text())
    return out


# --- Kubernetes manifests -------------------------------------------------------------------------

DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _get(doc: Any, *keys, default=None):
    for k in keys:
        if isinstance(doc, dict) and k in doc:
            doc = doc[k]
        elif isinstance(doc, list) and isinstance(k, int) and -len(doc) <= k < len(doc):
            doc = doc[k]
        else:
            return default
    return doc


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _image_problems(where: str, containers: list) -> list[str]:
    problems = []
    for c in containers or []:
        image = str(_get(c, "image", default=""))
        name = _get(c, "name", default="?")
        last = image.rsplit("/", 1)[-1]
        if not image or image == "unknown":
            problems.append(f"{where}: container {name!r} has no image")
        elif "@sha256:" not in image and (":" not in last or last.endswith(":latest")):
            problems.append(f"{where}: container {name!r} image {image!r} needs a fixed tag (not latest)")
    return problems


def _pod_problems(where: str, spec: Any) -> list[str]:
    containers = _get(spec, "containers")
    if not isinstance(containers, list) or not containers:
        return [f"{where}: template.spec.containers must list at least one container"]
    problems = []
    for c in containers:
        if not _get(c, "name"):
            problems.append(f"{where}: every container needs a name")
    return problems + _image_problems(where, containers + list(_get(spec, "initContainers", default=[]) or []))


def _gpu_limit(container: Any) -> Any:
    return _get(container, "resources", "limits", "nvidia.com/gpu")


def check_raycluster(doc: dict, where: str) -> list[str]:
    problems = []
    name = str(_get(doc, "metadata", "name", default=""))
    if not DNS1035.fullmatch(name) or len(name) > 53:
        problems.append(f"{where}: RayCluster name {name!r} must be a DNS-1035 label of at most 53 characters")
    spec = _get(doc, "spec", default={})
    if _get(spec, "enableInTreeAutoscaling") is not True:
        problems.append(f"{where}: spec.enableInTreeAutoscaling must be true (the pools scale between min and max)")
    if not _get(spec, "rayVersion"):
        problems.append(f"{where}: spec.rayVersion is not set")
    head = _get(spec, "headGroupSpec")
    if not isinstance(head, dict):
        return problems + [f"{where}: spec.headGroupSpec is missing"]
    if not isinstance(_get(head, "rayStartParams"), dict):
        problems.append(f"{where}: spec.headGroupSpec.rayStartParams must be a mapping")
    problems += _pod_problems(f"{where}: headGroupSpec", _get(head, "template", "spec"))
    groups = _get(spec, "workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return problems + [f"{where}: spec.workerGroupSpecs must list at least one worker group"]
    names = [g.get("groupName") for g in groups if isinstance(g, dict)]
    if len(set(names)) != len(names):
        problems.append(f"{where}: worker group names must be unique, got {names}")
    gpu_groups = 0
    for i, g in enumerate(groups):
        gname = _get(g, "groupName") or f"workerGroupSpecs[{i}]"
        at = f"{where}: worker group {gname!r}"
        if not _get(g, "groupName"):
            problems.append(f"{at}: groupName is missing")
        lo, hi, n = _get(g, "minReplicas"), _get(g, "maxReplicas"), _get(g, "replicas", default=_get(g, "minReplicas"))
        if not (_is_int(lo) and _is_int(hi) and _is_int(n)):
            problems.append(f"{at}: minReplicas, maxReplicas and replicas must be integers, got {lo!r}, {hi!r}, {n!r}")
        elif not 0 <= lo <= n <= hi:
            problems.append(f"{at}: needs 0 <= minReplicas ({lo}) <= replicas ({n}) <= maxReplicas ({hi})")
        elif hi == 0:
            problems.append(f"{at}: maxReplicas is 0, so the group can never run")
        if not isinstance(_get(g, "rayStartParams"), dict):
            problems.append(f"{at}: rayStartParams must be a mapping")
        pod = _get(g, "template", "spec")
        problems += _pod_problems(at, pod)
        if any(_gpu_limit(c) not in (None, 0) for c in _get(pod, "containers", default=[]) or []):
            gpu_groups += 1
            limits = [_gpu_limit(c) for c in pod["containers"]]
            if not any(_is_int(v) and v >= 1 for v in limits):
                problems.append(f"{at}: nvidia.com/gpu limit must be a positive integer, got {limits}")
            tolerates = any(_get(t, "key") == "nvidia.com/gpu" and _get(t, "effect") == "NoSchedule"
                            for t in _get(pod, "tolerations", default=[]) or [])
            if not tolerates:
                problems.append(f"{at}: asks for GPUs but does not tolerate the nvidia.com/gpu:NoSchedule taint")
    if gpu_groups == 0:
        problems.append(f"{where}: no worker group asks for nvidia.com/gpu; the caption replicas need one")
    return problems


def check_rayjob(doc: dict, where: str, clusters: dict[str, str]) -> list[str]:
    problems = []
    name = str(_get(doc, "metadata", "name", default=""))
    if not DNS1035.fullmatch(name) or len(name) > 47:
        problems.append(f"{where}: RayJob name {name!r} must be a DNS-1035 label of at most 47 characters")
    spec = _get(doc, "spec", default={})
    if not str(_get(spec, "entrypoint", default="")).strip():
        problems.append(f"{where}: spec.entrypoint is empty")
    selector, cluster_spec = _get(spec, "clusterSelector"), _get(spec, "rayClusterSpec")
    if bool(selector) == bool(cluster_spec):
        problems.append(f"{where}: exactly one of spec.rayClusterSpec and spec.clusterSelector must be set")
    if selector:
        target = _get(selector, "ray.io/cluster")
        namespace = _get(doc, "metadata", "namespace")
        if not target:
            problems.append(f"{where}: clusterSelector must name the cluster with the key ray.io/cluster")
        elif clusters and clusters.get(target) != namespace:
            problems.append(f"{where}: clusterSelector names RayCluster {target!r} in {namespace!r}, "
                            f"which infra/k8s does not define (it has {sorted(clusters)})")
        for key, bad in (("backoffLimit", None), ("shutdownAfterJobFinishes", True)):
            if key in spec and (bad is None or spec[key] == bad):
                problems.append(f"{where}: {key} cannot be used with clusterSelector (the cluster is shared)")
        if _get(spec, "submissionMode") == "SidecarMode":
            problems.append(f"{where}: clusterSelector is not supported in SidecarMode")
    if cluster_spec:
        problems += check_raycluster({"metadata": {"name": "x"}, "spec": cluster_spec}, f"{where}: rayClusterSpec")
    runtime_env = _get(spec, "runtimeEnvYAML")
    if runtime_env is not None:
        yaml = _import("yaml")
        try:
            if not isinstance(yaml.safe_load(runtime_env), dict):
                problems.append(f"{where}: runtimeEnvYAML must be a YAML mapping")
        except yaml.YAMLError as e:
            problems.append(f"{where}: runtimeEnvYAML does not parse: {e}")
    return problems + _entrypoint_problems(where, str(_get(spec, "entrypoint", default="")))


def _entrypoint_problems(where: str, command: str) -> list[str]:
    """`--config PATH` of a job command must name a file of this repo (the working dir)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return [f"{where}: cannot split the job command {command!r}"]
    problems = []
    for flag, value in zip(words, words[1:]):
        if flag == "--config" and not (REPO / value).is_file():
            problems.append(f"{where}: --config {value}: no such file in the repository")
    return problems


def check_cronjob(doc: dict, where: str, clusters: dict[str, str]) -> list[str]:
    problems = []
    spec = _get(doc, "spec", default={})
    schedule = str(_get(spec, "schedule", default=""))
    if len(schedule.split()) != 5 and not schedule.startswith("@"):
        problems.append(f"{where}: spec.schedule {schedule!r} is not a 5-field cron expression")
    pod = _get(spec, "jobTemplate", "spec", "template", "spec")
    problems += _pod_problems(f"{where}: jobTemplate", pod)
    if _get(pod, "restartPolicy") not in ("Never", "OnFailure"):
        problems.append(f"{where}: a Job's pods need restartPolicy Never or OnFailure")
    for c in _get(pod, "containers", default=[]) or []:
        command = " ".join(map(str, (c.get("command") or []) + (c.get("args") or [])))
        for host in re.findall(r"--address\s+\S*?://([^:/\s]+)", command):
            labels = host.split(".")
            cluster = labels[0].removesuffix("-head-svc")
            namespace = labels[1] if len(labels) > 1 else _get(doc, "metadata", "namespace")
            if not labels[0].endswith("-head-svc") or clusters.get(cluster) != namespace:
                problems.append(f"{where}: --address {host} is not the head service of a RayCluster in "
                                f"infra/k8s ({', '.join(f'{n}-head-svc.{ns}' for n, ns in clusters.items())})")
        problems += _entrypoint_problems(where, command)
    return problems


def load_manifests(k8s_dir: Path = K8S_DIR, terraform_dir: Path = TERRAFORM_DIR) -> tuple[list, list[str]]:
    """[(path, doc)] of every YAML document under k8s_dir, rendered like Terraform renders them."""
    yaml = _import("yaml")
    problems: list[str] = []
    try:
        rendered = rendered_manifests(terraform_dir)
    except MissingTool:
        raise
    except Exception as e:  # a broken module is reported by check_terraform; render raw files then
        problems.append(f"cannot render the manifests from {terraform_dir}: {e}")
        rendered = {}
    docs = []
    files = sorted(p for p in Path(k8s_dir).glob("*.y*ml"))
    if not files:
        problems.append(f"{k8s_dir}: no manifests")
    for path in files:
        text = rendered.get(path.resolve())
        if text is None:
            problems.append(f"{path.name}: no Terraform resource applies it (file() or templatefile() in {terraform_dir.name}/)")
            text = path.read_text()
        try:
            for doc in yaml.safe_load_all(text):
                if doc is not None:
                    docs.append((path, doc))
        except yaml.YAMLError as e:
            problems.append(f"{path.name}: does not parse as YAML: {e}")
    return docs, problems


def check_k8s(k8s_dir: Path = K8S_DIR, terraform_dir: Path = TERRAFORM_DIR) -> list[str]:
    docs, problems = load_manifests(k8s_dir, terraform_dir)
    clusters = {str(_get(d, "metadata", "name")): _get(d, "metadata", "namespace")
                for _, d in docs if _get(d, "kind") == "RayCluster"}
    namespaces = {str(_get(d, "metadata", "name")) for _, d in docs if _get(d, "kind") == "Namespace"}
    accounts = {(_get(d, "metadata", "namespace"), _get(d, "metadata", "name"))
                for _, d in docs if _get(d, "kind") == "ServiceAccount"}
    kinds = [_get(d, "kind") for _, d in docs]
    for required in ("RayCluster", "RayJob", "CronJob", "ServiceAccount"):
        if required not in kinds:
            problems.append(f"{k8s_dir.name}/: no {required} manifest")
    for path, doc in docs:
        kind, api = _get(doc, "kind"), _get(doc, "apiVersion")
        where = f"{path.name} ({kind} {_get(doc, 'metadata', 'name')})"
        if not (kind and api and _get(doc, "metadata", "name")):
            problems.append(f"{path.name}: every document needs apiVersion, kind and metadata.name")
            continue
        namespace = _get(doc, "metadata", "namespace")
        if kind != "Namespace" and namespaces and namespace not in namespaces:
            problems.append(f"{where}: namespace {namespace!r} is not one of infra/k8s's namespaces {sorted(namespaces)}")
        if kind in ("RayCluster", "RayJob") and api != "ray.io/v1":
            problems.append(f"{where}: apiVersion must be ray.io/v1, got {api!r}")
        if kind == "RayCluster":
            problems += check_raycluster(doc, where)
            pods = [_get(doc, "spec", "headGroupSpec", "template", "spec")]
            pods += [_get(g, "template", "spec") for g in _get(doc, "spec", "workerGroupSpecs", default=[]) or []]
            for pod in pods:
                account = _get(pod, "serviceAccountName")
                if account and (namespace, account) not in accounts:
                    problems.append(f"{where}: serviceAccountName {account!r} is not defined in infra/k8s")
        elif kind == "RayJob":
            problems += check_rayjob(doc, where, clusters)
        elif kind == "CronJob":
            problems += check_cronjob(doc, where, clusters)
        elif kind == "ServiceAccount":
            arn = _get(doc, "metadata", "annotations", "eks.amazonaws.com/role-arn")
            if not arn:
                problems.append(f"{where}: no eks.amazonaws.com/role-arn annotation (IRSA)")
    return problems + check_auth(docs) + check_network_policies(docs)


# --- who may submit: token authentication and network policy -------------------------------------

AUTH_SECRET_KEY = "auth_token"  # the key KubeRay's authOptions read from their Secret
JOB_API_PORT = 8265


def _containers(doc: dict) -> Iterator[tuple[str, dict]]:
    """(where, container) of every pod template a manifest holds."""
    kind, name = _get(doc, "kind"), _get(doc, "metadata", "name")
    specs = {"RayCluster": lambda d: [("head", _get(d, "spec", "headGroupSpec", "template", "spec"))]
             + [(f"worker group {_get(g, 'groupName')!r}", _get(g, "template", "spec"))
                for g in _get(d, "spec", "workerGroupSpecs", default=[]) or []],
             "RayJob": lambda d: [("submitter", _get(d, "spec", "submitterPodTemplate", "spec"))],
             "CronJob": lambda d: [("job", _get(d, "spec", "jobTemplate", "spec", "template", "spec"))],
             "Job": lambda d: [("job", _get(d, "spec", "template", "spec"))],
             "Deployment": lambda d: [("pod", _get(d, "spec", "template", "spec"))],
             "Pod": lambda d: [("pod", _get(d, "spec"))]}
    for part, pod in specs.get(kind, lambda d: [])(doc):
        for c in (_get(pod, "containers", default=[]) or []) + (_get(pod, "initContainers", default=[]) or []):
            if isinstance(c, dict):
                yield f"{kind} {name}, {part}, container {c.get('name')!r}", c


def _env(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or [] if isinstance(e, dict)}


def check_auth(docs: list) -> list[str]:
    """Every RayCluster requires the token (KubeRay authOptions, mode token, from a Secret that an
    ExternalSecret of infra/k8s makes); every RayJob runs on such a cluster; every `ray job submit`
    in a manifest sends it, read from that Secret. No token value in any manifest."""
    problems = []
    made = {_get(d, "spec", "target", "name", default=_get(d, "metadata", "name")): _get(d, "spec", "data")
            for _, d in docs if _get(d, "kind") == "ExternalSecret"}
    authed: dict[str, str | None] = {}  # RayCluster -> the Secret its token comes from
    for path, doc in docs:
        kind, name = _get(doc, "kind"), _get(doc, "metadata", "name")
        where = f"{path.name} ({kind} {name})"
        if kind == "Secret" and (_get(doc, "data") or _get(doc, "stringData")):
            problems.append(f"{where}: a Secret's value is written in a manifest; credentials come from "
                            f"Secrets Manager (an ExternalSecret)")
        for at, c in _containers(doc):
            if "value" in _env(c).get("RAY_AUTH_TOKEN", {}):
                problems.append(f"{path.name} ({at}): RAY_AUTH_TOKEN is written in plain text; read it "
                                f"from the cluster's Secret (a secret volume or valueFrom.secretKeyRef)")
        if kind == "RayCluster" or (kind == "RayJob" and _get(doc, "spec", "rayClusterSpec")):
            spec = _get(doc, "spec") if kind == "RayCluster" else _get(doc, "spec", "rayClusterSpec")
            auth = _get(spec, "authOptions", default={}) or {}
            secret = _get(auth, "secretName")
            if _get(auth, "mode") != "token":
                problems.append(f"{where}: no token authentication: set spec.authOptions.mode: token (the job "
                                f"API otherwise runs whatever code reaches port {JOB_API_PORT})")
            elif not secret:
                problems.append(f"{where}: spec.authOptions.secretName is not set: the token must come from "
                                f"Secrets Manager through an ExternalSecret of infra/k8s, not one KubeRay makes up")
            elif secret not in made:
                problems.append(f"{where}: spec.authOptions.secretName {secret!r} is made by no ExternalSecret "
                                f"in infra/k8s (they make {sorted(made)})")
            elif not any(_get(d, "secretKey") == AUTH_SECRET_KEY for d in made[secret] or []):
                problems.append(f"{where}: the ExternalSecret that makes {secret!r} has no key {AUTH_SECRET_KEY!r}")
            if kind == "RayCluster" and _get(auth, "mode") == "token":
                authed[str(name)] = secret
    for path, doc in docs:
        kind, name = _get(doc, "kind"), _get(doc, "metadata", "name")
        where = f"{path.name} ({kind} {name})"
        target = _get(doc, "spec", "clusterSelector", "ray.io/cluster")
        if kind == "RayJob" and target and target not in authed:
            problems.append(f"{where}: runs on RayCluster {target!r}, which does not require the auth token")
        for at, c in _containers(doc):
            command = " ".join(map(str, (c.get("command") or []) + (c.get("args") or [])))
            if not re.search(r"\bray\s+job\s+submit\b", command):
                continue
            env = _env(c)
            if _get(env.get("RAY_AUTH_MODE", {}), "value") != "token":
                problems.append(f"{path.name} ({at}): runs `ray job submit` without RAY_AUTH_MODE=token")
            wanted = {(s, AUTH_SECRET_KEY) for s in authed.values()}
            if _token_source(doc, c) not in wanted:
                problems.append(f"{path.name} ({at}): runs `ray job submit` without the cluster's token: a file "
                                f"(RAY_AUTH_TOKEN_PATH) from a secret volume, or RAY_AUTH_TOKEN from secretKeyRef, "
                                f"of {{name: one of {sorted(filter(None, authed.values()))}, key: {AUTH_SECRET_KEY}}}")
    return problems


def _token_source(doc: dict, container: dict) -> tuple | None:
    """(Secret, key) a container's Ray token comes from: RAY_AUTH_TOKEN's secretKeyRef, or the secret
    volume that RAY_AUTH_TOKEN_PATH's file lies in."""
    env = _env(container)
    ref = _get(env.get("RAY_AUTH_TOKEN", {}), "valueFrom", "secretKeyRef")
    if ref:
        return ref.get("name"), ref.get("key")
    path = str(_get(env.get("RAY_AUTH_TOKEN_PATH", {}), "value", default=""))
    pod = next((p for p in (_get(doc, "spec", "jobTemplate", "spec", "template", "spec"),
                            _get(doc, "spec", "template", "spec"), _get(doc, "spec")) if _get(p, "containers")), {})
    for mount in container.get("volumeMounts") or []:
        root = str(mount.get("mountPath", "")).rstrip("/") + "/"
        if not path.startswith(root):
            continue
        volume = next((v for v in _get(pod, "volumes", default=[]) or [] if v.get("name") == mount.get("name")), {})
        secret = _get(volume, "secret", "secretName")
        items = _get(volume, "secret", "items")
        name = path[len(root):]
        key = next((i.get("key") for i in items if i.get("path") == name), None) if items else name
        return (secret, key) if secret else None
    return None


def _selects(selector: Any, labels: dict) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) selects these labels; {} selects all."""
    if not isinstance(selector, dict):
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if not {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}.get(op, False):
            return False
    return True


def _ray_pods(docs: list) -> list[tuple[str, str, dict]]:
    """(what, namespace, labels) of the pods the manifests make, with the labels KubeRay adds."""
    pods = []
    for _, doc in docs:
        kind, name, namespace = _get(doc, "kind"), _get(doc, "metadata", "name"), _get(doc, "metadata", "namespace")
        if kind == "RayCluster":
            head = _get(doc, "spec", "headGroupSpec", "template", "metadata", "labels", default={}) or {}
            pods.append((f"RayCluster {name} head", namespace,
                         {**head, "ray.io/cluster": name, "ray.io/node-type": "head"}))
            for g in _get(doc, "spec", "workerGroupSpecs", default=[]) or []:
                labels = _get(g, "template", "metadata", "labels", default={}) or {}
                pods.append((f"RayCluster {name} worker group {_get(g, 'groupName')!r}", namespace,
                             {**labels, "ray.io/cluster": name, "ray.io/node-type": "worker",
                              "ray.io/group": _get(g, "groupName")}))
    return pods


def _admits_job_api(rule: dict) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") in (JOB_API_PORT, "dashboard") and "endPort" not in p
                            or (p.get("endPort") and p.get("port", 0) <= JOB_API_PORT <= p["endPort"])
                            or "port" not in p for p in ports)


def _too_wide(peer: dict) -> str | None:
    """Why an ingress peer admits more than named pods, or None."""
    if "ipBlock" in peer:
        return f"an ipBlock ({_get(peer, 'ipBlock', 'cidr')})"
    pods, spaces = peer.get("podSelector"), peer.get("namespaceSelector")
    named = lambda sel: isinstance(sel, dict) and (sel.get("matchLabels") or sel.get("matchExpressions"))  # noqa: E731
    if not named(pods):
        return ("every pod of the namespace" if spaces is None else "every pod of the selected namespaces")
    if spaces is not None and not named(spaces):
        return "the named pods of every namespace"
    return None


def check_network_policies(docs: list) -> list[str]:
    """Every Ray pod is selected by NetworkPolicies for ingress and egress; a Ray head's job API
    (8265) admits only named pods (no rule that lets in the whole namespace, another namespace's
    every pod, an address range, or everyone); no rule opens all egress."""
    policies = [(path, d) for path, d in docs if _get(d, "kind") == "NetworkPolicy"]

    def types(d):  # Kubernetes' default: Ingress, and Egress when the policy has egress rules
        return _get(d, "spec", "policyTypes") or (["Ingress"] + (["Egress"] if _get(d, "spec", "egress") else []))

    problems = []
    for what, namespace, labels in _ray_pods(docs):
        mine = [(path, d) for path, d in policies if _get(d, "metadata", "namespace") == namespace
                and _selects(_get(d, "spec", "podSelector"), labels)]
        for direction in ("Ingress", "Egress"):
            if not any(direction in types(d) for _, d in mine):
                problems.append(f"{what}: no NetworkPolicy selects it for {direction.lower()}: any pod "
                                f"{'can reach it' if direction == 'Ingress' else 'it runs can reach anything'} "
                                f"(infra/k8s/networkpolicies.yaml)")
        for path, d in mine:
            where = f"{path.name} (NetworkPolicy {_get(d, 'metadata', 'name')})"
            for rule in _get(d, "spec", "ingress", default=[]) or []:
                if labels.get("ray.io/node-type") != "head" or not _admits_job_api(rule):
                    continue
                peers = rule.get("from")
                reasons = ["everyone (a rule without from)"] if not peers else list(filter(None, map(_too_wide, peers)))
                for reason in reasons:
                    problems.append(f"{where}: admits {reason} to the job API ({JOB_API_PORT}) of {what}")
            for rule in _get(d, "spec", "egress", default=[]) or []:
                if not rule.get("to") and not rule.get("ports"):
                    problems.append(f"{where}: an egress rule without to or ports lets {what} reach anything")
    return problems


# --- Ray cluster launcher config ---------------------------------------------------------------

def check_launcher(path: Path = LAUNCHER_CONFIG, terraform_dir: Path = TERRAFORM_DIR) -> list[str]:
    yaml = _import("yaml")
    name = path.name
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        return [f"{name}: cannot load: {e}"]
    if not isinstance(config, dict):
        return [f"{name}: not a mapping"]
    problems = []
    provider = config.get("provider") or {}
    if provider.get("type") != "aws":
        problems.append(f"{name}: provider.type must be aws, got {provider.get('type')!r}")
    if not provider.get("region"):
        problems.append(f"{name}: provider.region is not set")
    types = config.get("available_node_types")
    if not isinstance(types, dict) or not types:
        return problems + [f"{name}: available_node_types must define the head and worker types"]
    head = config.get("head_node_type")
    if head not in types:
        problems.append(f"{name}: head_node_type {head!r} is not one of available_node_types {sorted(types)}")
    gpu_types, min_total = [], 0
    for tname, t in types.items():
        at = f"{name}: node type {tname!r}"
        lo, hi = t.get("min_workers", 0), t.get("max_workers", config.get("max_workers"))
        if tname != head:
            if not (_is_int(lo) and _is_int(hi)):
                problems.append(f"{at}: min_workers and max_workers must be integers, got {lo!r}, {hi!r}")
            elif not 0 <= lo <= hi:
                problems.append(f"{at}: needs 0 <= min_workers ({lo}) <= max_workers ({hi})")
            else:
                min_total += lo
        resources = t.get("resources")
        if not isinstance(resources, dict):
            problems.append(f"{at}: resources must be set (e.g. {{\"GPU\": 1}})")
        elif resources.get("GPU", 0):
            gpu_types.append(tname)
        if not _get(t, "node_config", "InstanceType"):
            problems.append(f"{at}: node_config.InstanceType is not set")
    if not gpu_types:
        problems.append(f"{name}: no worker type has GPU resources")
    if _is_int(config.get("max_workers")) and min_total > config["max_workers"]:
        problems.append(f"{name}: max_workers ({config['max_workers']}) is below the sum of min_workers ({min_total})")
    idle = config.get("idle_timeout_minutes")
    if idle is not None and not (isinstance(idle, (int, float)) and idle > 0):
        problems.append(f"{name}: idle_timeout_minutes must be positive, got {idle!r}")
    problems += _launcher_against_ray(config, name)
    problems += _launcher_against_terraform(config, name, terraform_dir)
    problems += _launcher_auth(config, name, terraform_dir)
    return problems


def _launcher_auth(config: dict, name: str, terraform_dir: Path) -> list[str]:
    """Every Ray process of the launcher's cluster runs with RAY_AUTH_MODE=token (the container's
    environment or the start commands), the token read from a file that a boot command fetches from
    the Secrets Manager secret infra/terraform makes, never written in the config."""
    texts = [str(t) for t in _walk_strings(config)]
    problems = []
    started = (_get(config, "docker", "run_options", default=[]) or []) + \
        (config.get("head_start_ray_commands") or []) + (config.get("worker_start_ray_commands") or [])
    if not any(re.search(r"\bRAY_AUTH_MODE=token\b", str(t)) for t in started):
        problems.append(f"{name}: Ray starts without token authentication: add `-e RAY_AUTH_MODE=token` to "
                        f"docker.run_options (or RAY_AUTH_MODE=token to the start commands)")
    for t in texts:
        if re.search(r"\bRAY_AUTH_MODE=(?!token\b)", t):
            problems.append(f"{name}: {t.strip()[:80]!r} turns token authentication off")
        if re.search(r"\bRAY_AUTH_TOKEN\s*[=:]", t):  # (the value itself is not repeated here)
            problems.append(f"{name}: RAY_AUTH_TOKEN is written in the config: read it from a file "
                            f"(RAY_AUTH_TOKEN_PATH) that a boot command fetches from Secrets Manager")
    module = load_module(terraform_dir)
    if module.problems:
        return problems
    secrets = {evaluate(module, b.body.get("name")) for b in module.of("resource")
               if b.labels[0] == "aws_secretsmanager_secret"}
    fetched = set(re.findall(r"secretsmanager\s+get-secret-value\b.*?--secret-id[ =](\S+)",
                             " ".join(str(c) for c in config.get("initialization_commands") or [])))
    if not fetched & secrets:
        problems.append(f"{name}: no initialization command fetches the auth token from the Secrets Manager "
                        f"secret infra/terraform makes ({sorted(map(str, secrets))}); fetched: {sorted(fetched)}")
    return problems


def _launcher_against_ray(config: dict, name: str) -> list[str]:
    """Ray's own schema and launcher checks (no cloud calls)."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as e:
        return [f"{name}: cannot import ray's launcher checks ({e}); ray is a project dependency"]
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)
    try:
        validate_config(prepare_config(json.loads(json.dumps(config))))
    except Exception as e:  # jsonschema.ValidationError, ValueError, ...
        return [f"{name}: Ray rejects it: {str(e).splitlines()[0]}"]
    return []


def _launcher_against_terraform(config: dict, name: str, terraform_dir: Path) -> list[str]:
    """The instance profiles, cluster name and region must be the ones IAM was made for."""
    module = load_module(terraform_dir)
    if module.problems:
        return []  # reported by check_terraform
    profiles = {}
    for block in module.of("resource"):
        if block.labels[0] == "aws_iam_instance_profile" and "name" in block.body:
            profiles[block.labels[1]] = evaluate(module, block.body["name"])
    known = {p for p in profiles.values() if isinstance(p, str)}
    problems = []
    for tname, t in (config.get("available_node_types") or {}).items():
        profile = _get(t, "node_config", "IamInstanceProfile", "Name")
        if not profile:
            problems.append(f"{name}: node type {tname!r} names no IamInstanceProfile; `ray up` would "
                            f"create one with EC2 and S3 full access (use one of {sorted(known)})")
        elif profile not in known:
            problems.append(f"{name}: node type {tname!r}: instance profile {profile!r} is not created by "
                            f"infra/terraform (it creates {sorted(known)})")
    variables = module.variables
    for key, var in (("cluster_name", "launcher_cluster_name"), ("provider.region", "region")):
        value = config.get("cluster_name") if key == "cluster_name" else _get(config, "provider", "region")
        default = evaluate(module, variables.get(var, {}).get("default"))
        if var in variables and value != default:
            problems.append(f"{name}: {key} is {value!r} but the launcher's IAM in infra/terraform is made for "
                            f"var.{var} = {default!r}")
    return problems


# --- checkov ---------------------------------------------------------------------------------------

@dataclass
class CheckovReport:
    counts: dict[str, dict[str, int]]  # framework -> passed/failed/skipped/parsing_errors
    failed: list[str]
    skipped: list[tuple[str, str]]  # (check and resource, reason)
    problems: list[str]
    seconds: float

    @property
    def totals(self) -> dict[str, int]:
        keys = ("passed", "failed", "skipped", "parsing_errors")
        return {k: sum(c.get(k, 0) for c in self.counts.values()) for k in keys}


def find_checkov() -> str:
    candidates = [os.environ.get("CHECKOV"), shutil.which("checkov"),
                  str(Path(sys.executable).with_name("checkov")), str(Path.home() / ".local" / "bin" / "checkov")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise MissingTool(INSTALL_HINT["checkov"])


NO_REASON = ("", "no comment provided")


def run_checkov(root: Path = INFRA, timeout: float = 600) -> CheckovReport:
    """checkov over root; every failed check, parsing error and reasonless skip is a problem.

    Skips belong in the code, next to what they excuse (`#checkov:skip=ID:reason` in a .tf block,
    a `checkov.io/skipN: ID=reason` annotation in a manifest); a config file that skips checks
    for the whole tree is refused.
    """
    exe = find_checkov()
    configs = [p for d in (root, REPO) for p in Path(d).glob(".checkov.y*ml")]
    if configs:
        return CheckovReport({}, [], [], [f"{p}: checks must be skipped in the code, not by a checkov config file"
                                          for p in configs], 0.0)
    # Not --quiet: in JSON it drops the skipped checks, whose reasons are checked below.
    cmd = [exe, "-d", str(root), "--framework", *CHECKOV_FRAMEWORKS, "--output", "json", "--compact",
           "--skip-download"]
    env = dict(os.environ, CKV_SKIP_PACKAGE_UPDATE_CHECK="true", LOG_LEVEL="ERROR")
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    seconds = time.monotonic() - start
    try:
        reports = json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return CheckovReport({}, [], [], [f"checkov (exit {proc.returncode}) gave no JSON report: " + " | ".join(tail)], seconds)
    if isinstance(reports, dict):
        reports = [reports]
    counts, failed, skipped, problems = {}, [], [], []
    for report in reports:
        framework = report.get("check_type", "?")
        summary = report.get("summary", {})
        counts[framework] = {k: int(summary.get(k, 0)) for k in ("passed", "failed", "skipped", "parsing_errors")}
        results = report.get("results", {})
        for c in results.get("failed_checks", []):
            failed.append(f"{c['check_id']} {c.get('check_name', '')} -- {c.get('resource')} "
                          f"({c.get('file_path')}:{(c.get('file_line_range') or ['?'])[0]})")
        for c in results.get("skipped_checks", []):
            reason = str((c.get("check_result") or {}).get("suppress_comment", "")).strip()
            label = f"{c['check_id']} {c.get('resource')} ({c.get('file_path')})"
            skipped.append((label, reason))
            if reason.lower() in NO_REASON or len(reason) < 15:
                problems.append(f"checkov skip without a real reason: {label}: {reason!r}")
        for p in results.get("parsing_errors", []):
            problems.append(f"checkov could not parse {p}")
    # an empty directory or a framework that found nothing comes back as a summary-less report
    for framework in ("terraform", "kubernetes"):
        if framework not in counts:
            problems.append(f"checkov ran no {framework} checks (found nothing to scan under {root})")
    problems += [f"checkov failed: {f}" for f in failed]
    if proc.returncode not in (0, 1):
        problems.append(f"checkov exited with {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] }")
    return CheckovReport(counts, failed, skipped, problems, seconds)


# --- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-checkov", action="store_true", help="skip the checkov scan (the slow part)")
    args = parser.parse_args(argv)

    sections: list[tuple[str, list[str], str]] = []
    try:
        module = load_module()
        problems = check_terraform()
        refs = sum(1 for _ in references(module))
        sections.append(("terraform", problems, f"{len(module.texts)} files, {len(module.blocks)} blocks, {refs} references"))
        docs, _ = load_manifests()
        sections.append(("k8s", check_k8s(), f"{len(docs)} manifests rendered with the variable defaults"))
        sections.append(("launcher", check_launcher(), str(LAUNCHER_CONFIG.relative_to(REPO))))
        if not args.no_checkov:
            report = run_checkov()
            t = report.totals
            detail = (f"passed {t['passed']}, failed {t['failed']}, skipped {t['skipped']}, "
                      f"parsing errors {t['parsing_errors']} ({report.seconds:.0f} s)")
            sections.append(("checkov", report.problems, detail))
    except MissingTool as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    status = 0
    for name, problems, detail in sections:
        print(f"{name:9} {'FAIL' if problems else 'ok':4}  {detail}")
        for p in problems:
            print(f"          - {p}")
        status |= bool(problems)
    if not args.no_checkov and not status:
        for label, reason in report.skipped:
            print(f"          skipped {label}: {reason}")
    return status


if __name__ == "__main__":
    sys.exit(main())

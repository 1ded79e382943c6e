#!/usr/bin/env python3
"""Offline checks of infra/: the Terraform root module, the Kubernetes manifests, the Ray cluster
launcher config, and checkov over all of it.

    python infra/validate.py                 # everything; exit status 1 on any problem
    python infra/validate.py --no-checkov    # the fast part (a few seconds)

Nothing here needs a provider plugin, a cluster or a cloud account (`terraform init` cannot run
offline, so `terraform validate` cannot either). Structure is left to the tools that own it; by
hand is only what no tool knows, how the files agree:

  terraform  every .tf parses; on python-hcl2's syntax tree, every var.X, local.X, module.X, data.T.N
             and T.N used is declared, every variable and local is used, every file()/templatefile()
             path exists, every templatefile() gets a local map whose keys are exactly the template's
             ${name} placeholders, no credential is in a variable default or in the state (a plain
             secret_string, a random_password resource); no heredoc (python-hcl2 keeps its body as
             text, so its references could not be checked)
  k8s        every manifest under infra/k8s, rendered as Terraform renders it (variable defaults;
             values known only after apply become "unknown"). RayCluster and RayJob validate against
             KubeRay's CRD schemas, vendored in infra/schemas/ (README.md there: source, refresh), a
             field unknown to them being an error as under kubectl's strict field validation. By hand:
             replica bounds, in-tree autoscaling, GPU limits and the GPU taint's toleration, fixed
             image tags, the RayJob's command and cluster, the CronJob's schedule and address, names
             that agree across files. Who may submit: every RayCluster (and RayJob) requires the Ray
             token (authOptions mode token) from a Secret an ExternalSecret makes; every `ray job
             submit` sends it from that Secret; no token in plain text; every Ray pod is under
             NetworkPolicies for ingress and egress, and the head's job API (8265) admits named pods only
  launcher   infra/ray/cluster.yaml passes Ray's own schema and launcher checks, has sane worker
             bounds and a GPU worker type, names the instance profiles, cluster name and region that
             infra/terraform creates IAM for, and runs Ray with the token that a boot command fetches
             from the Terraform-made secret (never written in the config)
  checkov    no failed check (terraform, kubernetes, secrets); every skip carries a reason

The functions return lists of problems (strings) so that tests can call them on broken copies.
python-hcl2, jsonschema and checkov must be installed; a missing one is an error, never a pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import operator
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Iterator

INFRA = Path(__file__).resolve().parent
REPO = INFRA.parent
TERRAFORM_DIR, K8S_DIR, SCHEMAS_DIR = INFRA / "terraform", INFRA / "k8s", INFRA / "schemas"
LAUNCHER_CONFIG = INFRA / "ray" / "cluster.yaml"

CHECKOV_VERSION = "3.3.30"
CHECKOV_FRAMEWORKS = ("terraform", "kubernetes", "secrets")
COUNTS = ("passed", "failed", "skipped", "parsing_errors")  # of a checkov report
INSTALL_HINT = {
    "hcl2": "python-hcl2 is not installed: pip install python-hcl2==8.1.4",
    "yaml": "PyYAML is not installed: pip install pyyaml",
    "jsonschema": "jsonschema is not installed: pip install jsonschema (ray depends on it too)",
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


# --- Terraform, as python-hcl2's syntax tree ---------------------------------------------------------
#
# hcl2.parses() gives a tree of rules, told apart here by their grammar names (block, attribute,
# expr_term, identifier, get_attr_expr_term, function_call, string, interpolation, object, ...).
# An identifier that heads an expression starts a traversal (var.x, aws_s3_bucket.data["v"].arn);
# string literals, attribute names, object keys and function names are other rules.

STEPS = ("get_attr_expr_term", "index_expr_term")


def _kind(node: Any) -> str:
    return node.lark_name() if node is not None else ""


def _walk(node: Any) -> Iterator[Any]:
    yield node
    for child in getattr(node, "children", None) or []:
        if child is not None:
            yield from _walk(child)


def _line(node: Any) -> int | None:
    return getattr(getattr(node, "_meta", None), "line", None)  # lark's position of the rule


def _source(node: Any) -> str:
    """An expression as HCL, for messages: a string literal without its quotes, another expression
    without the ${...} that python-hcl2 wraps it in."""
    text = str(node.serialize()) if node is not None else ""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text[2:-1] if text.startswith("${") and text.endswith("}") else text


def _names(node: Any) -> list | None:
    """[head, attr, ...] of a traversal (None for an index step); None if node is no traversal."""
    kind = _kind(node)
    if kind == "expr_term":
        return _names(node.expression)
    if kind == "identifier":
        return [node.serialize()]
    base = _names(node.children[0]) if kind in STEPS else None  # what .attr or [index] applies to
    step = node.get_attr.identifier.serialize() if kind == "get_attr_expr_term" else None
    return base + [step] if base else None


def traversals(node: Any) -> Iterator[tuple[list, Any]]:
    """(names, node) of every outermost traversal under node, e.g. (["local", "m", "k"], local.m.k)
    but not its parts local.m and local; a traversal inside an index is one of its own."""
    for n in _walk(node):
        if _kind(n) in ("identifier", *STEPS) and _kind(n.parent) == "expr_term" and \
                _kind(n.parent.parent) not in STEPS and (names := _names(n)):
            yield names, n


def calls(node: Any, *functions: str) -> Iterator[tuple[str, list, Any]]:
    """(function, argument expressions, call) of every call of these functions under node."""
    for n in _walk(node):
        if _kind(n) == "function_call" and (name := "::".join(map(_source, n.identifiers))) in functions:
            yield name, (n.arguments.arguments if n.arguments else []), n


def _attrs(body: Any) -> dict[str, Any]:
    return {c.identifier.serialize(): c.expression for c in body.children if _kind(c) == "attribute"}


@dataclass
class Block:
    kind: str  # resource, data, variable, locals, output, module, provider, terraform
    labels: tuple[str, ...]
    file: str
    node: Any  # python-hcl2's BlockRule

    @property
    def name(self) -> str:
        return " ".join((self.kind, ".".join(self.labels))) if self.labels else self.kind

    @cached_property
    def attrs(self) -> dict[str, Any]:
        return _attrs(self.node.body)

    @cached_property
    def body(self) -> dict:
        """As hcl2.loads gives it: expressions as "${...}" strings."""
        return self.node.body.serialize()


@dataclass
class Module:
    directory: Path
    blocks: list[Block] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[Block]:
        return [b for b in self.blocks if b.kind == kind]

    @property
    def variables(self) -> dict[str, Block]:
        return {b.labels[0]: b for b in self.of("variable")}

    @property
    def locals(self) -> dict[str, Any]:
        return {k: v for b in self.of("locals") for k, v in b.attrs.items()}

    @property
    def resources(self) -> set[tuple[str, ...]]:
        return {b.labels for b in self.of("resource")}

    @property
    def providers(self) -> set[str]:
        return {"terraform"} | {p for b in self.of("terraform") for inner in b.node.body.children
                                if _kind(inner) == "block" and _source(inner.labels[0]) == "required_providers"
                                for p in _attrs(inner.body)}


def load_module(directory: Path = TERRAFORM_DIR) -> Module:
    """Parses every .tf file of a root module; parse errors become problems."""
    hcl2 = _import("hcl2")
    module = Module(Path(directory))
    files = sorted(Path(directory).glob("*.tf"))
    module.problems += [] if files else [f"{directory}: no .tf files"]
    for path in files:
        module.texts[path.name] = text = path.read_text()
        try:
            tree = hcl2.parses(text)
        except Exception as e:  # python-hcl2 raises lark errors of several kinds
            module.problems.append(f"{path.name}: does not parse: {str(e).splitlines()[0]}")
            continue
        for node in (n for n in tree.body.children if _kind(n) == "block"):
            kind, *labels = map(_source, node.labels)
            module.blocks.append(Block(kind, tuple(labels), path.name, node))
    return module


def references(module: Module) -> Iterator[tuple[str, str, str, str]]:
    """(file:line, kind, target, text) of every reference; kind: var, local, module, data,
    ephemeral or resource (a traversal headed by a resource type of a required provider)."""
    resource_prefixes = tuple(f"{p}_" for p in module.providers)
    for block in module.blocks:
        for names, node in traversals(block.node):
            head, parts, at = names[0], [n for n in names[1:] if n], f"{block.file}:{_line(node)}"
            if head in ("var", "local", "module") and parts:
                yield at, head, parts[0], f"{head}.{parts[0]}"
            elif head in ("data", "ephemeral") and len(parts) >= 2:
                yield at, head, ".".join(parts[:2]), ".".join([head, *parts[:2]])
            elif head.startswith(resource_prefixes) and parts:
                yield at, "resource", f"{head}.{parts[0]}", f"{head}.{parts[0]}"


BLOCK_OF = {"var": ("variable", "variable"), "local": ("locals", "local value"), "module": ("module", "module"),
            "data": ("data", "data source"), "ephemeral": ("ephemeral", "ephemeral resource"),
            "resource": ("resource", "resource")}
CREDENTIAL_WORDS = {"token", "secret", "secrets", "password", "passwd", "credential", "credentials", "apikey"}
NOT_A_CREDENTIAL = {"version", "refresh", "name", "arn", "id", "interval", "days", "path", "uri"}  # last word
STATEFUL_SECRETS = {"aws_secretsmanager_secret_version": ("secret_string", "secret_binary"),  # kept in the state
                    "random_password": ("*",), "random_string": ("*",)}


def check_terraform(directory: Path = TERRAFORM_DIR) -> list[str]:
    """Parse, reference, path, template-variable and credential checks of one root module."""
    module = load_module(directory)
    return module.problems + _declarations(module) + [p for b in module.blocks for p in _block_problems(module, b)]


def _declarations(module: Module) -> list[str]:
    """Every reference declared, every variable and local used, nothing declared twice."""
    declared = {ref: {".".join(b.labels) for b in module.of(kind)} for ref, (kind, _) in BLOCK_OF.items()}
    declared["local"] = set(module.locals)
    used: dict[str, set[str]] = {ref: set() for ref in BLOCK_OF}
    problems = []
    for at, kind, target, text in references(module):
        used[kind].add(target)
        if target not in declared[kind]:
            problems.append(f"{at}: {text} refers to an undeclared {BLOCK_OF[kind][1]}")
    problems += [f"{b.file}: variable {b.labels[0]!r} is declared but never used"
                 for b in module.of("variable") if b.labels[0] not in used["var"]]
    problems += [f"{b.file}: local {k!r} is declared but never used"
                 for b in module.of("locals") for k in b.attrs if k not in used["local"]]
    seen: dict[str, str] = {}
    for name, file in [(b.name, b.file) for b in module.blocks if b.labels and b.kind != "provider"] + \
            [(f"local.{k}", b.file) for b in module.of("locals") for k in b.attrs]:
        if name in seen:
            problems.append(f"{file}: {name} is declared again (first in {seen[name]})")
        seen.setdefault(name, file)
    return problems


def _block_problems(module: Module, block: Block) -> list[str]:
    """No heredoc; no credential in a variable default, and none written where the state keeps it
    (ephemeral values and write-only arguments, *_wo, only); file paths and template variables."""
    problems = [f"{block.file}:{_line(n)}: a heredoc, whose references python-hcl2 leaves unparsed: use "
                f"jsonencode(), yamlencode() or templatefile()"
                for n in _walk(block.node) if _kind(n).startswith("heredoc_template")]
    if block.kind == "variable":
        words = block.labels[0].lower().split("_")
        default = evaluate(module, block.attrs.get("default"))
        if CREDENTIAL_WORDS & set(words) and words[-1] not in NOT_A_CREDENTIAL and isinstance(default, str) and default:
            problems.append(f"{block.file}:{_line(block.node)}: variable {block.labels[0]!r} looks like a credential "
                            f"and has a default: a token or password never lives in a variable default")
    for arg in STATEFUL_SECRETS.get(block.labels[0], ()) if block.kind == "resource" else ():
        if arg == "*" or arg in block.attrs:
            what = ".".join(block.labels) + ("" if arg == "*" else f".{arg}")
            problems.append(f"{block.file}:{_line(block.attrs.get(arg, block.node))}: {what} keeps a secret in the "
                            f"Terraform state; generate it with an ephemeral resource and write it through a "
                            f"write-only argument (e.g. secret_string_wo)")
    for func, args, call in calls(block.node, "file", "templatefile", "filebase64", "filesha256", "fileexists"):
        at, raw = f"{block.file}:{_line(call)}", _source(args[0] if args else None)
        path = _static_path(module, args[0] if args else None)
        if path is None:
            problems.append(f"{at}: {func}({raw!r}): path is not static (only path.module may vary)")
        elif not path.is_file():
            problems.append(f"{at}: {func}({raw!r}): no such file {path}")
        elif func == "templatefile":
            problems += _check_template_vars(module, at, path, args)
    return problems


PLACEHOLDER = re.compile(r"(?<!\$)\$\{([^}]*)\}")  # in the manifests that templatefile() renders


def _static_path(module: Module, arg: Any) -> Path | None:
    """The file a path argument names, if nothing but path.module (or path.root) varies in it."""
    value = evaluate(module, arg) if arg is not None else None
    if not isinstance(value, str) or any(names[0] != "path" for names, _ in traversals(arg)):
        return None
    return Path(value) if Path(value).is_absolute() else module.directory / value


def _template_env(module: Module, args: list) -> tuple[str | None, Any]:
    """(NAME, its value) when templatefile()'s variables are local.NAME."""
    names = _names(args[1]) if len(args) == 2 else None
    name = names[1] if names and len(names) == 2 and names[0] == "local" else None
    return name, (evaluate(module, module.locals[name]) if name in module.locals else None)


def _check_template_vars(module: Module, at: str, path: Path, args: list) -> list[str]:
    name, env = _template_env(module, args)
    if not isinstance(env, dict):
        return [f"{at}: templatefile({path.name}) must take its variables as a local map (local.NAME) "
                f"so that they can be checked; got {_source(args[1] if len(args) > 1 else None)!r}"]
    text, path = path.read_text(), path.resolve()
    rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    found = [m.group(1).strip() for m in PLACEHOLDER.finditer(text)]
    used = {f for f in found if re.fullmatch(r"[A-Za-z_]\w*", f)}
    unsupported = [f"${{{f}}}" for f in found if f not in used] + ["%{ directive"] * len(re.findall(r"(?<!%)%\{", text))
    problems = [f"{rel}: {u}: only ${{name}} placeholders are supported (write $${{...}} for a literal)"
                for u in unsupported]
    problems += [f"{rel}: placeholder ${{{k}}} has no value in local.{name}" for k in sorted(used - set(env))]
    return problems + [f"{at}: local.{name}.{k} is not used by {rel}" for k in sorted(set(env) - used)]


# --- evaluating what Terraform would render ----------------------------------------------------

class Unknown:
    """A value known only after apply (an ARN, a computed name), or beyond evaluate()."""

    def __init__(self, expr: str):
        self.expr = expr

    def __repr__(self) -> str:
        return f"Unknown({self.expr!r})"


ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def evaluate(module: Module, node: Any, _depth: int = 0) -> Any:
    """The value of an expression (a python-hcl2 tree node) with every variable at its default:
    literals, strings and their interpolations, tuples, objects, var./local./path. traversals,
    arithmetic and join(); anything else (a resource, most functions, a conditional) is Unknown."""
    kind, ev = _kind(node), (lambda n: evaluate(module, n, _depth + 1))
    if node is None:
        return None
    if _depth > 30:
        return Unknown("(too deep)")
    if kind in ("expr_term", "int_lit", "float_lit", "literal_value"):
        return ev(node.expression) if kind == "expr_term" else node.serialize()
    if kind == "string":
        from hcl2.utils import process_escape_sequences
        pieces = []
        for part in (p.content for p in node.string_parts):
            if _kind(part) == "STRING_CHARS":
                value = process_escape_sequences(part.value)
            elif _kind(part).startswith("ESCAPED_"):
                value = part.value[1:]  # $${ or %%{
            else:  # ${...}, or a %{...} directive
                value = ev(part.expression) if _kind(part) == "interpolation" else Unknown(_source(node))
            if isinstance(value, Unknown):
                return value
            pieces.append(_render_scalar(value))
        return "".join(pieces)
    if kind == "tuple":
        return [ev(e) for e in node.elements]
    if kind == "object":
        keys = [e.key.value for e in node.elements]  # an identifier, a string, or an expression in parentheses
        return {(_source(k) if _kind(k) == "identifier" else ev(k)): ev(e.expression)
                for k, e in zip(keys, node.elements)}
    names = _names(node)
    if names and len(names) >= 2 and None not in names and names[0] in ("var", "local", "path"):
        (head, name, *attrs), unknown = names, Unknown(_source(node))
        if head == "path":
            value = str(module.directory) if name in ("module", "root") else unknown
        elif head == "var":
            block = module.variables.get(name)
            value = ev(block.attrs["default"]) if block and "default" in block.attrs else unknown
        else:
            value = ev(module.locals[name]) if name in module.locals else unknown
        for attr in attrs:
            value = value.get(attr, unknown) if isinstance(value, dict) else unknown
        return value
    args = node.arguments.arguments if kind == "function_call" and node.arguments else []
    if kind == "function_call" and _source(node.identifiers[0]) == "join" and len(args) == 2:
        sep, items = ev(args[0]), ev(args[1])
        if isinstance(sep, str) and isinstance(items, list) and not any(isinstance(v, Unknown) for v in items):
            return sep.join(map(_render_scalar, items))
    if kind in ("binary_op", "unary_op"):
        term = node.binary_term if kind == "binary_op" else None
        op = term.binary_operator.serialize() if term else node.operator
        left, right = (ev(node.expr_term), ev(term.expr_term)) if term else (0, ev(node.expr_term))
        if op in ARITHMETIC and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right)) \
                and (op != "/" or right):
            result = ARITHMETIC[op](left, right)
            return int(result) if float(result).is_integer() else result
    return Unknown(_source(node))


def _render_scalar(value: Any) -> str:
    if value is None:
        return "example"  # a null default (e.g. bulk_job_id): any valid name will do
    if isinstance(value, bool):
        return "true" if value else "false"
    return "unknown" if isinstance(value, Unknown) else str(value)


def rendered_manifests(directory: Path = TERRAFORM_DIR, module: Module | None = None) -> dict[Path, str]:
    """Every manifest a resource applies (file() or templatefile()), rendered with the variable defaults."""
    module = module or load_module(directory)
    out: dict[Path, str] = {}
    for block in module.of("resource"):
        for func, args, _ in calls(block.node, "file", "templatefile"):
            path = _static_path(module, args[0] if args else None)
            if path is None or not path.is_file():
                continue
            if func == "file" and path.suffix in (".yaml", ".yml"):
                out.setdefault(path.resolve(), path.read_text())
            if func == "templatefile" and isinstance(env := _template_env(module, args)[1], dict):
                out[path.resolve()] = PLACEHOLDER.sub(
                    lambda m: _render_scalar(env.get(m.group(1).strip(), Unknown(m.group(1)))), path.read_text()
                ).replace("$${", "${").replace("%%{", "%{")
    return out


# --- Kubernetes manifests -------------------------------------------------------------------------

DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _get(doc: Any, *keys, default=None):
    for k in keys:
        if isinstance(doc, dict) and k in doc or \
                isinstance(doc, list) and isinstance(k, int) and -len(doc) <= k < len(doc):
            doc = doc[k]
        else:
            return default
    return doc


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@lru_cache(maxsize=None)
def crd_validator(kind: str):
    """jsonschema's validator for KubeRay's ray.io/v1 schema of a kind (infra/schemas/), where a key
    that an object's properties do not list is an error (kubectl's strict field validation)."""
    schema = json.loads((SCHEMAS_DIR / f"ray.io_{kind.lower()}s.v1.json").read_text())

    def strict(s: Any) -> None:
        if isinstance(s, dict) and "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s.setdefault("additionalProperties", False)
        for v in (s.values() if isinstance(s, dict) else s if isinstance(s, list) else ()):
            strict(v)
    strict(schema)
    return _import("jsonschema").Draft4Validator(schema)  # a CRD's schema is OpenAPI 3.0's, draft 4 based


def schema_problems(doc: dict, where: str) -> list[str]:
    problems = []
    for e in sorted(crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path).lstrip(".")
        problems.append(f"{where}: {path or '(root)'}: {e.message}")
    return problems


def _pod_problems(where: str, spec: Any) -> list[str]:
    """At least one container (the CRD's schema allows none) and a fixed image tag on each."""
    containers = _get(spec, "containers", default=[]) or []
    problems = [] if containers else [f"{where}: template.spec.containers must list at least one container"]
    for c in containers + (_get(spec, "initContainers", default=[]) or []):
        image, name = str(_get(c, "image", default="")), _get(c, "name", default="?")
        if not image or image == "unknown":
            problems.append(f"{where}: container {name!r} has no image")
        elif "@sha256:" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            problems.append(f"{where}: container {name!r} image {image!r} needs a fixed tag (not latest)")
    return problems


def check_raycluster(doc: dict, where: str) -> list[str]:
    """What KubeRay's schema cannot say about a RayCluster (or a RayJob's rayClusterSpec)."""
    problems, spec = [], _get(doc, "spec", default={})
    name = str(_get(doc, "metadata", "name", default=""))
    if not DNS1035.fullmatch(name) or len(name) > 53:
        problems.append(f"{where}: RayCluster name {name!r} must be a DNS-1035 label of at most 53 characters")
    if _get(spec, "enableInTreeAutoscaling") is not True:
        problems.append(f"{where}: spec.enableInTreeAutoscaling must be true (the pools scale between min and max)")
    if not _get(spec, "rayVersion"):
        problems.append(f"{where}: spec.rayVersion is not set")
    problems += _pod_problems(f"{where}: headGroupSpec", _get(spec, "headGroupSpec", "template", "spec"))
    groups = [g for g in _get(spec, "workerGroupSpecs", default=[]) or [] if isinstance(g, dict)]
    if len({g.get("groupName") for g in groups}) != len(groups):
        problems.append(f"{where}: worker group names must be unique, got {[g.get('groupName') for g in groups]}")
    gpu_groups = 0
    for i, g in enumerate(groups):
        at = f"{where}: worker group {g.get('groupName') or f'workerGroupSpecs[{i}]'!r}"
        lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)  # the CRD's defaults
        n = g.get("replicas", lo)
        if all(map(_is_int, (lo, n, hi))) and not 0 <= lo <= n <= hi:  # (a wrong type: the schema says so)
            problems.append(f"{at}: needs 0 <= minReplicas ({lo}) <= replicas ({n}) <= maxReplicas ({hi})")
        elif hi == 0:
            problems.append(f"{at}: maxReplicas is 0, so the group can never run")
        pod = _get(g, "template", "spec")
        problems += _pod_problems(at, pod)
        limits = [_get(c, "resources", "limits", "nvidia.com/gpu") for c in _get(pod, "containers", default=[]) or []]
        if any(v not in (None, 0) for v in limits):
            gpu_groups += 1
            if not any(_is_int(v) and v >= 1 for v in limits):
                problems.append(f"{at}: nvidia.com/gpu limit must be a positive integer, got {limits}")
            if not any(_get(t, "key") == "nvidia.com/gpu" and _get(t, "effect") == "NoSchedule"
                       for t in _get(pod, "tolerations", default=[]) or []):
                problems.append(f"{at}: asks for GPUs but does not tolerate the nvidia.com/gpu:NoSchedule taint")
    if gpu_groups == 0:
        problems.append(f"{where}: no worker group asks for nvidia.com/gpu; the caption replicas need one")
    return problems


def check_rayjob(doc: dict, where: str, clusters: dict[str, str]) -> list[str]:
    """What KubeRay's schema cannot say about a RayJob: its rules for clusterSelector, and that it
    runs a command of this repository on a RayCluster of infra/k8s."""
    problems, spec = [], _get(doc, "spec", default={})
    name = str(_get(doc, "metadata", "name", default=""))
    if not DNS1035.fullmatch(name) or len(name) > 47:
        problems.append(f"{where}: RayJob name {name!r} must be a DNS-1035 label of at most 47 characters")
    if not str(_get(spec, "entrypoint", default="")).strip():
        problems.append(f"{where}: spec.entrypoint is empty")
    selector, cluster_spec = _get(spec, "clusterSelector"), _get(spec, "rayClusterSpec")
    if bool(selector) == bool(cluster_spec):
        problems.append(f"{where}: exactly one of spec.rayClusterSpec and spec.clusterSelector must be set")
    if selector:
        target, namespace = _get(selector, "ray.io/cluster"), _get(doc, "metadata", "namespace")
        if not target:
            problems.append(f"{where}: clusterSelector must name the cluster with the key ray.io/cluster")
        elif clusters and clusters.get(target) != namespace:
            problems.append(f"{where}: clusterSelector names RayCluster {target!r} in {namespace!r}, "
                            f"which infra/k8s does not define (it has {sorted(clusters)})")
        problems += [f"{where}: {key} cannot be used with clusterSelector (the cluster is shared)"
                     for key in ("backoffLimit", "shutdownAfterJobFinishes")
                     if key in spec and (key == "backoffLimit" or spec[key] is True)]
        if _get(spec, "submissionMode") == "SidecarMode":
            problems.append(f"{where}: clusterSelector is not supported in SidecarMode")
    if cluster_spec:
        problems += check_raycluster({"metadata": {"name": "x"}, "spec": cluster_spec}, f"{where}: rayClusterSpec")
    if isinstance(runtime_env := _get(spec, "runtimeEnvYAML"), str):
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
    return [f"{where}: --config {value}: no such file in the repository"
            for flag, value in zip(words, words[1:]) if flag == "--config" and not (REPO / value).is_file()]


def _command(container: dict) -> str:
    return " ".join(map(str, (container.get("command") or []) + (container.get("args") or [])))


def check_cronjob(doc: dict, where: str, clusters: dict[str, str]) -> list[str]:
    spec = _get(doc, "spec", default={})
    schedule = str(_get(spec, "schedule", default=""))
    problems = [] if len(schedule.split()) == 5 or schedule.startswith("@") else \
        [f"{where}: spec.schedule {schedule!r} is not a 5-field cron expression"]
    problems += _pod_problems(f"{where}: jobTemplate", pod := _get(spec, "jobTemplate", "spec", "template", "spec"))
    if _get(pod, "restartPolicy") not in ("Never", "OnFailure"):
        problems.append(f"{where}: a Job's pods need restartPolicy Never or OnFailure")
    for c in _get(pod, "containers", default=[]) or []:
        for host in re.findall(r"--address\s+\S*?://([^:/\s]+)", _command(c)):
            labels = host.split(".")
            namespace = labels[1] if len(labels) > 1 else _get(doc, "metadata", "namespace")
            if not labels[0].endswith("-head-svc") or clusters.get(labels[0].removesuffix("-head-svc")) != namespace:
                problems.append(f"{where}: --address {host} is not the head service of a RayCluster in "
                                f"infra/k8s ({', '.join(f'{n}-head-svc.{ns}' for n, ns in clusters.items())})")
        problems += _entrypoint_problems(where, _command(c))
    return problems


def load_manifests(k8s_dir: Path = K8S_DIR, terraform_dir: Path = TERRAFORM_DIR) -> tuple[list, list[str]]:
    """[(path, doc)] of every YAML document under k8s_dir, rendered like Terraform renders them."""
    yaml, problems, docs = _import("yaml"), [], []
    try:
        rendered = rendered_manifests(terraform_dir)
    except MissingTool:
        raise
    except Exception as e:  # a broken module is reported by check_terraform; render raw files then
        problems.append(f"cannot render the manifests from {terraform_dir}: {e}")
        rendered = {}
    files = sorted(Path(k8s_dir).glob("*.y*ml"))
    problems += [] if files else [f"{k8s_dir}: no manifests"]
    for path in files:
        if (text := rendered.get(path.resolve())) is None:
            problems.append(f"{path.name}: no Terraform resource applies it (file() or templatefile() in "
                            f"{terraform_dir.name}/)")
            text = path.read_text()
        try:
            docs += [(path, doc) for doc in yaml.safe_load_all(text) if doc is not None]
        except yaml.YAMLError as e:
            problems.append(f"{path.name}: does not parse as YAML: {e}")
    return docs, problems


def check_k8s(k8s_dir: Path = K8S_DIR, terraform_dir: Path = TERRAFORM_DIR) -> list[str]:
    docs, problems = load_manifests(k8s_dir, terraform_dir)
    named: dict[str, set] = {}  # kind -> {(namespace, name)}
    for _, d in docs:
        named.setdefault(_get(d, "kind"), set()).add((_get(d, "metadata", "namespace"), _get(d, "metadata", "name")))
    clusters = {n: ns for ns, n in named.get("RayCluster", ())}
    namespaces, accounts = {n for _, n in named.get("Namespace", ())}, named.get("ServiceAccount", set())
    problems += [f"{k8s_dir.name}/: no {k} manifest" for k in ("RayCluster", "RayJob", "CronJob", "ServiceAccount")
                 if k not in named]
    for path, doc in docs:
        kind, api, namespace = _get(doc, "kind"), _get(doc, "apiVersion"), _get(doc, "metadata", "namespace")
        where = f"{path.name} ({kind} {_get(doc, 'metadata', 'name')})"
        if not (kind and api and _get(doc, "metadata", "name")):
            problems.append(f"{path.name}: every document needs apiVersion, kind and metadata.name")
            continue
        if kind != "Namespace" and namespaces and namespace not in namespaces:
            problems.append(f"{where}: namespace {namespace!r} is not one of infra/k8s's namespaces "
                            f"{sorted(namespaces)}")
        if kind in ("RayCluster", "RayJob"):
            problems += schema_problems(doc, where) if api == "ray.io/v1" else \
                [f"{where}: apiVersion must be ray.io/v1, got {api!r}"]
        if kind == "RayCluster":
            problems += check_raycluster(doc, where)
            accounts_used = {_get(template, "spec", "serviceAccountName") for _, template in _pods(doc)}
            problems += [f"{where}: serviceAccountName {account!r} is not defined in infra/k8s"
                         for account in sorted(filter(None, accounts_used)) if (namespace, account) not in accounts]
        elif kind in ("RayJob", "CronJob"):
            problems += (check_rayjob if kind == "RayJob" else check_cronjob)(doc, where, clusters)
        elif kind == "ServiceAccount" and not _get(doc, "metadata", "annotations", "eks.amazonaws.com/role-arn"):
            problems.append(f"{where}: no eks.amazonaws.com/role-arn annotation (IRSA)")
    return problems + check_auth(docs) + check_network_policies(docs)


# --- who may submit: token authentication and network policy -------------------------------------

AUTH_SECRET_KEY = "auth_token"  # the key KubeRay's authOptions read from their Secret
JOB_API_PORT = 8265
POD_TEMPLATES = {"RayJob": ("submitter", "spec", "submitterPodTemplate"), "Job": ("job", "spec", "template"),
                 "CronJob": ("job", "spec", "jobTemplate", "spec", "template"),
                 "Deployment": ("pod", "spec", "template")}


def _pods(doc: dict) -> list[tuple[str, Any]]:
    """(what, pod template: its metadata and spec) of every pod a manifest describes."""
    kind, groups = _get(doc, "kind"), _get(doc, "spec", "workerGroupSpecs", default=[]) or []
    if kind == "RayCluster":
        return [("head", _get(doc, "spec", "headGroupSpec", "template"))] + \
            [(f"worker group {_get(g, 'groupName')!r}", _get(g, "template")) for g in groups]
    if kind == "Pod":
        return [("pod", doc)]
    return [(POD_TEMPLATES[kind][0], _get(doc, *POD_TEMPLATES[kind][1:]))] if kind in POD_TEMPLATES else []


def _containers(doc: dict) -> Iterator[tuple[str, dict, Any]]:
    """(where, container, pod spec) of every container a manifest holds."""
    for what, template in _pods(doc):
        pod = _get(template, "spec")
        for c in (_get(pod, "containers", default=[]) or []) + (_get(pod, "initContainers", default=[]) or []):
            if isinstance(c, dict):
                yield f"{doc['kind']} {_get(doc, 'metadata', 'name')}, {what}, container {c.get('name')!r}", c, pod


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
        problems += [f"{path.name} ({at}): RAY_AUTH_TOKEN is written in plain text; read it from the cluster's "
                     f"Secret (a secret volume or valueFrom.secretKeyRef)"
                     for at, c, _ in _containers(doc) if "value" in _env(c).get("RAY_AUTH_TOKEN", {})]
        spec = _get(doc, "spec") if kind == "RayCluster" else _get(doc, "spec", "rayClusterSpec")
        if kind not in ("RayCluster", "RayJob") or not spec:
            continue
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
    wanted = {(s, AUTH_SECRET_KEY) for s in authed.values()}
    for path, doc in docs:
        target = _get(doc, "spec", "clusterSelector", "ray.io/cluster")
        if _get(doc, "kind") == "RayJob" and target and target not in authed:
            problems.append(f"{path.name} (RayJob {_get(doc, 'metadata', 'name')}): runs on RayCluster {target!r}, "
                            f"which does not require the auth token")
        for at, c, pod in _containers(doc):
            if not re.search(r"\bray\s+job\s+submit\b", _command(c)):
                continue
            if _get(_env(c).get("RAY_AUTH_MODE", {}), "value") != "token":
                problems.append(f"{path.name} ({at}): runs `ray job submit` without RAY_AUTH_MODE=token")
            if _token_source(doc, c, pod) not in wanted:
                problems.append(f"{path.name} ({at}): runs `ray job submit` without the cluster's token: a file "
                                f"(RAY_AUTH_TOKEN_PATH) from a secret volume, or RAY_AUTH_TOKEN from secretKeyRef, "
                                f"of {{name: one of {sorted(filter(None, authed.values()))}, key: {AUTH_SECRET_KEY}}}")
    return problems


def _token_source(doc: dict, container: dict, pod: Any = None) -> tuple | None:
    """(Secret, key) a container's Ray token comes from: RAY_AUTH_TOKEN's secretKeyRef, or the secret
    volume that RAY_AUTH_TOKEN_PATH's file lies in."""
    env = _env(container)
    if ref := _get(env.get("RAY_AUTH_TOKEN", {}), "valueFrom", "secretKeyRef"):
        return ref.get("name"), ref.get("key")
    path = str(_get(env.get("RAY_AUTH_TOKEN_PATH", {}), "value", default=""))
    pod = pod or next((p for _, c, p in _containers(doc) if c is container), {})
    for mount in container.get("volumeMounts") or []:
        root = str(mount.get("mountPath", "")).rstrip("/") + "/"
        if path.startswith(root):
            volume = next((v for v in _get(pod, "volumes", default=[]) or [] if v.get("name") == mount.get("name")), {})
            secret, items = _get(volume, "secret", "secretName"), _get(volume, "secret", "items")
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
    return all({"In": labels.get(e.get("key")) in (e.get("values") or []), "Exists": e.get("key") in labels,
                "NotIn": labels.get(e.get("key")) not in (e.get("values") or []),
                "DoesNotExist": e.get("key") not in labels}.get(e.get("operator"), False)
               for e in selector.get("matchExpressions") or [])


def _ray_pods(docs: list) -> list[tuple[str, str, dict]]:
    """(what, namespace, labels) of the Ray pods the manifests make, with the labels KubeRay adds."""
    pods = []
    for doc in (d for _, d in docs if _get(d, "kind") == "RayCluster"):
        name, groups = _get(doc, "metadata", "name"), _get(doc, "spec", "workerGroupSpecs", default=[]) or []
        for (what, template), group in zip(_pods(doc), [None, *groups]):
            kuberay = {"ray.io/node-type": "worker", "ray.io/group": _get(group, "groupName")} if group else \
                {"ray.io/node-type": "head"}
            pods.append((f"RayCluster {name} {what}", _get(doc, "metadata", "namespace"),
                         {**(_get(template, "metadata", "labels") or {}), "ray.io/cluster": name, **kuberay}))
    return pods


def _names_some(selector: Any) -> bool:
    return isinstance(selector, dict) and bool(selector.get("matchLabels") or selector.get("matchExpressions"))


def _too_wide(peer: dict) -> str | None:
    """Why an ingress peer admits more than named pods, or None."""
    pods, spaces = peer.get("podSelector"), peer.get("namespaceSelector")
    if "ipBlock" in peer:
        return f"an ipBlock ({_get(peer, 'ipBlock', 'cidr')})"
    if not _names_some(pods):
        return "every pod of the namespace" if spaces is None else "every pod of the selected namespaces"
    return "the named pods of every namespace" if spaces is not None and not _names_some(spaces) else None


def _admits_job_api(rule: dict) -> bool:
    return not rule.get("ports") or any(
        "port" not in p or p["port"] in (JOB_API_PORT, "dashboard") and "endPort" not in p
        or p.get("endPort") and p["port"] <= JOB_API_PORT <= p["endPort"] for p in rule["ports"])


def check_network_policies(docs: list) -> list[str]:
    """Every Ray pod is selected by NetworkPolicies for ingress and egress; a Ray head's job API
    (8265) admits only named pods (no rule that lets in the whole namespace, another namespace's
    every pod, an address range, or everyone); no rule opens all egress."""
    policies, problems = [(path, d) for path, d in docs if _get(d, "kind") == "NetworkPolicy"], []
    for what, namespace, labels in _ray_pods(docs):
        mine = [(path, d) for path, d in policies if _get(d, "metadata", "namespace") == namespace
                and _selects(_get(d, "spec", "podSelector"), labels)]
        # Kubernetes' default policyTypes: Ingress, and Egress when the policy has egress rules
        types = [_get(d, "spec", "policyTypes") or ["Ingress"] + ["Egress"] * bool(_get(d, "spec", "egress"))
                 for _, d in mine]
        problems += [f"{what}: no NetworkPolicy selects it for {direction.lower()}: any pod "
                     f"{'can reach it' if direction == 'Ingress' else 'it runs can reach anything'} "
                     f"(infra/k8s/networkpolicies.yaml)" for direction in ("Ingress", "Egress")
                     if not any(direction in t for t in types)]
        for path, d in mine:
            where = f"{path.name} (NetworkPolicy {_get(d, 'metadata', 'name')})"
            for rule in _get(d, "spec", "ingress", default=[]) or [] if labels["ray.io/node-type"] == "head" else []:
                if _admits_job_api(rule):
                    reasons = list(filter(None, map(_too_wide, rule["from"]))) if rule.get("from") else \
                        ["everyone (a rule without from)"]
                    problems += [f"{where}: admits {r} to the job API ({JOB_API_PORT}) of {what}" for r in reasons]
            problems += [f"{where}: an egress rule without to or ports lets {what} reach anything"
                         for rule in _get(d, "spec", "egress", default=[]) or []
                         if not rule.get("to") and not rule.get("ports")]
    return problems


# --- Ray cluster launcher config ---------------------------------------------------------------

def check_launcher(path: Path = LAUNCHER_CONFIG, terraform_dir: Path = TERRAFORM_DIR) -> list[str]:
    """Ray's own schema and launcher checks (ray-schema.json: types, required keys, the sum of
    min_workers), then what they do not know: the worker bounds, a GPU type, AWS, and agreement
    with infra/terraform's IAM and auth secret."""
    yaml, name = _import("yaml"), path.name
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        return [f"{name}: cannot load: {e}"]
    if not isinstance(config, dict):
        return [f"{name}: not a mapping"]
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
        logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)
        validate_config(prepare_config(json.loads(json.dumps(config))))
        problems = []
    except ImportError as e:
        problems = [f"{name}: cannot import ray's launcher checks ({e}); ray is a project dependency"]
    except Exception as e:  # jsonschema.ValidationError, ValueError, ...
        problems = [f"{name}: Ray rejects it: {str(e).splitlines()[0]}"]
    if _get(config, "provider", "type") != "aws":
        problems.append(f"{name}: provider.type must be aws, got {_get(config, 'provider', 'type')!r}")
    if not _get(config, "provider", "region"):
        problems.append(f"{name}: provider.region is not set")
    types, head = _node_types(config), config.get("head_node_type")
    if head not in types:
        problems.append(f"{name}: head_node_type {head!r} is not one of available_node_types {sorted(types)}")
    for tname, t in types.items():
        lo, hi = _get(t, "min_workers", default=0), _get(t, "max_workers", default=config.get("max_workers"))
        if tname != head and _is_int(lo) and _is_int(hi) and not 0 <= lo <= hi:
            problems.append(f"{name}: node type {tname!r}: needs 0 <= min_workers ({lo}) <= max_workers ({hi})")
        if not _get(t, "node_config", "InstanceType"):
            problems.append(f"{name}: node type {tname!r}: node_config.InstanceType is not set")
    if not any(_get(t, "resources", "GPU") for n, t in types.items() if n != head):
        problems.append(f"{name}: no worker type has GPU resources")
    return problems + _launcher_against_terraform(config, name, terraform_dir)


def _node_types(config: dict) -> dict:
    types = config.get("available_node_types")
    return types if isinstance(types, dict) else {}


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, (dict, list)):
        for v in value.values() if isinstance(value, dict) else value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def _launcher_against_terraform(config: dict, name: str, terraform_dir: Path) -> list[str]:
    """Every Ray process runs with RAY_AUTH_MODE=token, the token read from a file that a boot
    command fetches from the Secrets Manager secret infra/terraform makes (never in the config);
    the instance profiles, cluster name and region are the ones infra/terraform made IAM for."""
    problems, started = [], (_get(config, "docker", "run_options", default=[]) or []) + \
        (config.get("head_start_ray_commands") or []) + (config.get("worker_start_ray_commands") or [])
    if not any(re.search(r"\bRAY_AUTH_MODE=token\b", str(t)) for t in started):
        problems.append(f"{name}: Ray starts without token authentication: add `-e RAY_AUTH_MODE=token` to "
                        f"docker.run_options (or RAY_AUTH_MODE=token to the start commands)")
    for t in _strings(config):
        if re.search(r"\bRAY_AUTH_MODE=(?!token\b)", t):
            problems.append(f"{name}: {t.strip()[:80]!r} turns token authentication off")
        if re.search(r"\bRAY_AUTH_TOKEN\s*[=:]", t):  # (the value itself is not repeated here)
            problems.append(f"{name}: RAY_AUTH_TOKEN is written in the config: read it from a file "
                            f"(RAY_AUTH_TOKEN_PATH) that a boot command fetches from Secrets Manager")
    module = load_module(terraform_dir)
    if module.problems:
        return problems  # reported by check_terraform
    names = {}  # resource type -> the names its resources are given
    for b in module.of("resource"):
        names.setdefault(b.labels[0], set()).add(evaluate(module, b.attrs.get("name")))
    secrets = names.get("aws_secretsmanager_secret", set())
    profiles = {p for p in names.get("aws_iam_instance_profile", ()) if isinstance(p, str)}
    fetched = set(re.findall(r"secretsmanager\s+get-secret-value\b.*?--secret-id[ =](\S+)",
                             " ".join(map(str, config.get("initialization_commands") or []))))
    if not fetched & secrets:
        problems.append(f"{name}: no initialization command fetches the auth token from the Secrets Manager "
                        f"secret infra/terraform makes ({sorted(map(str, secrets))}); fetched: {sorted(fetched)}")
    for tname, t in _node_types(config).items():
        if not (profile := _get(t, "node_config", "IamInstanceProfile", "Name")):
            problems.append(f"{name}: node type {tname!r} names no IamInstanceProfile; `ray up` would "
                            f"create one with EC2 and S3 full access (use one of {sorted(profiles)})")
        elif profile not in profiles:
            problems.append(f"{name}: node type {tname!r}: instance profile {profile!r} is not created by "
                            f"infra/terraform (it creates {sorted(profiles)})")
    for key, var in (("cluster_name", "launcher_cluster_name"), ("provider.region", "region")):
        value, block = _get(config, *key.split(".")), module.variables.get(var)
        if block and value != (default := evaluate(module, block.attrs.get("default"))):
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
        return {k: sum(c.get(k, 0) for c in self.counts.values()) for k in COUNTS}


def find_checkov() -> str:
    for c in (os.environ.get("CHECKOV"), shutil.which("checkov"), str(Path(sys.executable).with_name("checkov")),
              str(Path.home() / ".local" / "bin" / "checkov")):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    raise MissingTool(INSTALL_HINT["checkov"])


def run_checkov(root: Path = INFRA, timeout: float = 600) -> CheckovReport:
    """checkov over root; every failed check, parsing error and reasonless skip is a problem.

    Skips belong in the code, next to what they excuse (`#checkov:skip=ID:reason` in a .tf block,
    a `checkov.io/skipN: ID=reason` annotation in a manifest); a config file that skips checks
    for the whole tree is refused.
    """
    exe = find_checkov()
    if configs := [p for d in (root, REPO) for p in Path(d).glob(".checkov.y*ml")]:
        return CheckovReport({}, [], [], [f"{p}: checks must be skipped in the code, not by a checkov config file"
                                          for p in configs], 0.0)
    # Not --quiet: in JSON it drops the skipped checks, whose reasons are checked below.
    cmd = [exe, "-d", str(root), "--framework", *CHECKOV_FRAMEWORKS, "--output", "json", "--compact", "--skip-download"]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, CKV_SKIP_PACKAGE_UPDATE_CHECK="true", LOG_LEVEL="ERROR"))
    seconds = time.monotonic() - start
    try:
        reports = json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        return CheckovReport({}, [], [], [f"checkov (exit {proc.returncode}) gave no JSON report: {tail}"], seconds)
    counts, failed, skipped, problems = {}, [], [], []
    for report in reports if isinstance(reports, list) else [reports]:
        summary, results = report.get("summary", {}), report.get("results", {})
        counts[report.get("check_type", "?")] = {k: int(summary.get(k, 0)) for k in COUNTS}
        failed += [f"{c['check_id']} {c.get('check_name', '')} -- {c.get('resource')} "
                   f"({c.get('file_path')}:{(c.get('file_line_range') or ['?'])[0]})"
                   for c in results.get("failed_checks", [])]
        for c in results.get("skipped_checks", []):
            reason = str((c.get("check_result") or {}).get("suppress_comment", "")).strip()
            skipped.append((label := f"{c['check_id']} {c.get('resource')} ({c.get('file_path')})", reason))
            if reason.lower() in ("", "no comment provided") or len(reason) < 15:
                problems.append(f"checkov skip without a real reason: {label}: {reason!r}")
        problems += [f"checkov could not parse {p}" for p in results.get("parsing_errors", [])]
    # an empty directory or a framework that found nothing comes back as a summary-less report
    problems += [f"checkov ran no {f} checks (found nothing to scan under {root})" for f in ("terraform", "kubernetes")
                 if f not in counts]
    problems += [f"checkov failed: {f}" for f in failed]
    if proc.returncode not in (0, 1):
        problems.append(f"checkov exited with {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return CheckovReport(counts, failed, skipped, problems, seconds)


# --- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-checkov", action="store_true", help="skip the checkov scan (the slow part)")
    args = parser.parse_args(argv)
    try:
        module, docs = load_module(), load_manifests()[0]
        sections = [("terraform", check_terraform(), f"{len(module.texts)} files, {len(module.blocks)} blocks, "
                                                     f"{sum(1 for _ in references(module))} references"),
                    ("k8s", check_k8s(), f"{len(docs)} manifests rendered with the variable defaults"),
                    ("launcher", check_launcher(), str(LAUNCHER_CONFIG.relative_to(REPO)))]
        if not args.no_checkov:
            report = run_checkov()
            t = report.totals
            sections.append(("checkov", report.problems, f"passed {t['passed']}, failed {t['failed']}, skipped "
                             f"{t['skipped']}, parsing errors {t['parsing_errors']} ({report.seconds:.0f} s)"))
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

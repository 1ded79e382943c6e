"""Offline checks of infra/: the Terraform module, the Kubernetes manifests, the Ray cluster
launcher config and checkov, through infra/validate.py.

They need python-hcl2 and checkov (infra/validate.py says how to install them); a missing tool
fails these tests, it never skips them. The checkov tests take about half a minute.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"


def _load_validate():
    spec = importlib.util.spec_from_file_location("infra_validate", INFRA / "validate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


validate = _load_validate()


def require(tool: str) -> None:
    """Fail (not skip, not error) the calling test when a tool is missing. (Without python-hcl2 the
    validator's own functions raise MissingTool with the same message inside every test.)"""
    try:
        validate.find_checkov() if tool == "checkov" else validate._import(tool)
    except validate.MissingTool as e:
        pytest.fail(str(e), pytrace=False)


def infra_copy(tmp_path: Path) -> Path:
    """A private copy of infra/ to break."""
    copy = tmp_path / "infra"
    shutil.copytree(INFRA, copy, ignore=shutil.ignore_patterns("__pycache__", ".terraform*"))
    return copy


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} is not in {path.name}: the test no longer plants what it means to"
    path.write_text(text.replace(old, new, 1))


def docs_by_kind() -> dict[str, dict]:
    docs, problems = validate.load_manifests()
    assert problems == []
    return {doc["kind"]: doc for _, doc in docs}


# --- (a) Terraform parses and every reference resolves ---------------------------------------------

def test_every_tf_file_parses_and_every_reference_resolves():
    require("hcl2")
    module = validate.load_module()
    assert module.problems == []
    assert {"versions.tf", "variables.tf", "outputs.tf", "s3.tf", "iam.tf", "eks.tf", "kuberay.tf"} <= set(module.texts)
    assert validate.check_terraform() == []
    found = {kind for _, kind, _, _ in validate.references(module)}
    assert {"var", "local", "data", "resource"} <= found  # the check saw references, it did not pass vacuously


def test_the_module_has_the_pieces_the_jobs_rely_on():
    module = validate.load_module()
    resources = module.resources
    for needed in [("aws_eks_cluster", "this"), ("aws_eks_node_group", "this"), ("helm_release", "kuberay_operator"),
                   ("aws_iam_role", "ray"), ("aws_s3_bucket", "data"), ("aws_kms_key", "data"),
                   ("aws_iam_openid_connect_provider", "eks"), ("kubectl_manifest", "raycluster")]:
        assert needed in resources
    node_groups = validate.evaluate(module, module.locals["node_groups"])
    assert set(node_groups) == {"cpu", "gpu"}
    assert node_groups["gpu"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"}]
    assert node_groups["gpu"]["min_size"] == 0
    outputs = {b.labels[0] for b in module.of("output")}
    assert {"source_uri", "model_target_uri", "model_draft_uri", "output_uri", "ray_role_arn", "cluster_name",
            "cluster_endpoint"} <= outputs


def test_the_ray_role_may_delete_only_under_the_captions_prefix():
    module = validate.load_module()
    [policy] = [b for b in module.of("data") if b.labels == ("aws_iam_policy_document", "ray_data")]
    deleting = [s for s in policy.body["statement"] if any("Delete" in a for a in s["actions"])]
    assert deleting and all(r == '"${aws_s3_bucket.data["captions"].arn}/${var.captions_prefix}/*"'
                            for s in deleting for r in s["resources"])
    actions = {a.strip('"') for s in policy.body["statement"] for a in s["actions"]}
    assert actions == {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:DeleteObject",
                       "kms:Decrypt", "kms:GenerateDataKey"}


def test_expressions_are_found_only_outside_string_literals():
    hcl2 = validate._import("hcl2")

    def refs(value: str) -> list[str]:  # value as hcl2.loads gives it: "text ${expr}" or ${expr}
        tree = hcl2.parses("x = " + (value if value.startswith('"') else f'"{value}"') + "\n")
        return [".".join(filter(None, names)) for names, _ in validate.traversals(tree)]  # None: an index

    assert refs('"arn:aws:s3:::my.bucket/${var.prefix}/*"') == ["var.prefix"]
    assert refs('${aws_s3_bucket.data["videos"].arn}') == ["aws_s3_bucket.data.arn"]
    assert refs('${templatefile("${path.module}/x.yaml", local.vars)}') == ["path.module", "local.vars"]
    assert refs('"literal $${not.a_ref} text"') == []


# --- (b) the checker catches what it claims to catch ----------------------------------------------

def test_a_planted_undefined_variable_is_caught(tmp_path):
    copy = infra_copy(tmp_path)
    edit(copy / "terraform" / "s3.tf", 'bucket = "${local.name}-s3-access-logs-${local.account_id}"',
         'bucket = "${local.name}-s3-access-logs-${var.no_such_variable}"')
    problems = validate.check_terraform(copy / "terraform")
    assert any("var.no_such_variable" in p and "undeclared variable" in p and p.startswith("s3.tf:") for p in problems), problems


def test_a_dangling_resource_reference_is_caught(tmp_path):
    copy = infra_copy(tmp_path)
    edit(copy / "terraform" / "iam.tf", "policy_arn = aws_iam_policy.ray_data.arn", "policy_arn = aws_iam_policy.ray_dta.arn")
    problems = validate.check_terraform(copy / "terraform")
    assert any("aws_iam_policy.ray_dta" in p and "undeclared resource" in p for p in problems), problems


def test_dangling_locals_data_sources_and_unused_variables_are_caught(tmp_path):
    copy = infra_copy(tmp_path)
    tf = copy / "terraform"
    edit(tf / "network.tf", "availability_zone       = local.azs[count.index]", "availability_zone       = local.zones[count.index]")
    edit(tf / "locals.tf", "azs        = data.aws_availability_zones.selected.names",
         "azs        = data.aws_availability_zones.chosen.names")
    with open(tf / "variables.tf", "a") as f:
        f.write('\nvariable "forgotten" {\n  type    = string\n  default = "x"\n}\n')
    problems = "\n".join(validate.check_terraform(tf))
    assert "local.zones refers to an undeclared local value" in problems
    assert "data.aws_availability_zones.chosen refers to an undeclared data source" in problems
    assert "variable 'forgotten' is declared but never used" in problems


def test_missing_files_and_template_placeholders_are_caught(tmp_path):
    copy = infra_copy(tmp_path)
    edit(copy / "terraform" / "kuberay.tf", "../k8s/nightly-cronjob.yaml", "../k8s/nightly.yaml")
    edit(copy / "k8s" / "raycluster.yaml", "rayVersion: \"${ray_version}\"", "rayVersion: \"${ray_release}\"")
    problems = "\n".join(validate.check_terraform(copy / "terraform"))
    assert "nightly.yaml'): no such file" in problems
    assert "placeholder ${ray_release} has no value in local.raycluster_vars" in problems
    assert "local.raycluster_vars.ray_version is not used" in problems


def test_a_parse_error_is_reported_not_raised(tmp_path):
    copy = infra_copy(tmp_path)
    with open(copy / "terraform" / "eks.tf", "a") as f:
        f.write('\nresource "aws_s3_bucket" "unterminated" {\n  bucket = "x"\n')
    problems = validate.check_terraform(copy / "terraform")
    assert any(p.startswith("eks.tf: does not parse") for p in problems), problems


# --- (c) the manifests have what KubeRay, Kubernetes and the launcher need --------------------------

def test_the_manifests_pass_the_checks():
    assert validate.check_k8s() == []


def test_the_raycluster_autoscales_a_cpu_and_a_gpu_pool():
    rc = docs_by_kind()["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert isinstance(spec["headGroupSpec"]["rayStartParams"], dict)
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert g["minReplicas"] == 0 <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] > 0
    gpu_pod = groups["gpu"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    assert groups["gpu"]["maxReplicas"] == 16  # gpu_max_nodes (2) x gpus_per_node (8)
    account = docs_by_kind()["ServiceAccount"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert {gpu_pod["serviceAccountName"], spec["headGroupSpec"]["template"]["spec"]["serviceAccountName"]} == {
        account["metadata"]["name"]}


def test_the_bulk_rayjob_and_the_nightly_cronjob_run_the_jobs():
    docs = docs_by_kind()
    job = docs["RayJob"]["spec"]
    assert job["entrypoint"].startswith("python -m jobs.caption --config jobs/configs/cluster.yaml job_id=")
    assert job["clusterSelector"] == {"ray.io/cluster": docs["RayCluster"]["metadata"]["name"]}
    assert "working_dir" in yaml.safe_load(job["runtimeEnvYAML"])
    cron = docs["CronJob"]["spec"]
    assert len(cron["schedule"].split()) == 5 and cron["concurrencyPolicy"] == "Forbid"
    [container] = cron["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    command = " ".join(container["command"] + container["args"])
    assert "ray job submit --address http://lvspec-caption-head-svc." in command
    assert "-- python -m jobs.nightly --config jobs/configs/cluster.yaml" in command


def test_manifest_checks_catch_broken_bounds_and_names(tmp_path):
    copy = infra_copy(tmp_path)
    k8s = copy / "k8s"
    edit(k8s / "raycluster.yaml", "replicas: ${cpu_workers_min}", "replicas: 99")
    edit(k8s / "raycluster.yaml", "enableInTreeAutoscaling: true", "enableInTreeAutoscaling: false")
    edit(k8s / "raycluster.yaml", "              operator: Equal\n              value: present\n              effect: NoSchedule",
         "              operator: Equal\n              value: present\n              effect: NoExecute")
    edit(k8s / "rayjob-bulk.yaml", "ray.io/cluster: lvspec-caption", "ray.io/cluster: another-cluster")
    edit(k8s / "nightly-cronjob.yaml", 'schedule: "${nightly_schedule}"', 'schedule: "nightly"')
    problems = "\n".join(validate.check_k8s(k8s, copy / "terraform"))
    assert "needs 0 <= minReplicas (0) <= replicas (99) <= maxReplicas (8)" in problems
    assert "enableInTreeAutoscaling must be true" in problems
    assert "does not tolerate the nvidia.com/gpu:NoSchedule taint" in problems
    assert "clusterSelector names RayCluster 'another-cluster'" in problems
    assert "is not a 5-field cron expression" in problems


def test_the_launcher_config_passes_ray_and_matches_the_terraform_iam():
    assert validate.check_launcher() == []
    config = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    assert all(t["min_workers"] <= t["max_workers"] for t in workers.values())
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    assert config["idle_timeout_minutes"] > 0 and config["setup_commands"] and config["file_mounts"]


def test_launcher_checks_catch_bad_bounds_and_unknown_profiles(tmp_path):
    copy = infra_copy(tmp_path)
    path = copy / "ray" / "cluster.yaml"
    edit(path, "    min_workers: 0\n    max_workers: 2", "    min_workers: 5\n    max_workers: 2")
    edit(path, "Name: lvspec-caption-ray-worker", "Name: some-admin-profile")
    edit(path, "head_node_type: head", "head_node_type: boss")
    problems = "\n".join(validate.check_launcher(path, copy / "terraform"))
    assert "needs 0 <= min_workers (5) <= max_workers (2)" in problems
    assert "instance profile 'some-admin-profile' is not created by infra/terraform" in problems
    assert "head_node_type 'boss' is not one of available_node_types" in problems
    assert "Ray rejects it" in problems


# --- (d) who may submit: token authentication, network policy, no credential in plain text ---------

def test_every_ray_process_and_submitter_requires_the_token_from_secrets_manager():
    docs = docs_by_kind()
    auth = docs["RayCluster"]["spec"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "lvspec-caption-ray-auth"}
    made = docs["ExternalSecret"]["spec"]
    assert made["target"]["name"] == auth["secretName"] and made["data"][0]["secretKey"] == "auth_token"
    assert made["data"][0]["remoteRef"]["key"] == "lvspec-caption/ray-auth-token"  # auth.tf's secret, by name
    pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" not in env
    assert validate._token_source(docs["CronJob"], container) == ("lvspec-caption-ray-auth", "auth_token")
    module = validate.load_module()
    [version] = [b for b in module.of("resource") if b.labels[0] == "aws_secretsmanager_secret_version"]
    assert "secret_string_wo" in version.body and "secret_string" not in version.body  # never in the state
    assert ("aws_secretsmanager_random_password", "ray_auth") in {b.labels for b in module.of("ephemeral")}


def test_missing_auth_is_caught_on_the_cluster_its_jobs_and_its_submitters(tmp_path):
    copy = infra_copy(tmp_path)
    k8s = copy / "k8s"
    edit(k8s / "raycluster.yaml", "    mode: token\n", "    mode: disabled\n")
    edit(k8s / "nightly-cronjob.yaml", "                - name: RAY_AUTH_MODE\n                  value: token\n", "")
    problems = "\n".join(validate.check_k8s(k8s, copy / "terraform"))
    assert "raycluster.yaml (RayCluster lvspec-caption): no token authentication" in problems
    assert "rayjob-bulk.yaml (RayJob bulk-example): runs on RayCluster 'lvspec-caption', which does not require" in problems
    assert "runs `ray job submit` without RAY_AUTH_MODE=token" in problems
    assert "runs `ray job submit` without the cluster's token" in problems  # no authed cluster, no right Secret

    copy = infra_copy(tmp_path / "b")
    edit(copy / "k8s" / "raycluster.yaml", "    secretName: lvspec-caption-ray-auth\n", "    secretName: made-up\n")
    edit(copy / "k8s" / "nightly-cronjob.yaml", "secretName: lvspec-caption-ray-auth", "secretName: other")
    problems = "\n".join(validate.check_k8s(copy / "k8s", copy / "terraform"))
    assert "spec.authOptions.secretName 'made-up' is made by no ExternalSecret" in problems
    assert "runs `ray job submit` without the cluster's token" in problems


def test_a_token_in_plain_text_is_caught_in_manifests_terraform_and_the_launcher(tmp_path):
    copy = infra_copy(tmp_path)
    k8s, tf = copy / "k8s", copy / "terraform"
    edit(k8s / "nightly-cronjob.yaml", "                - name: RAY_AUTH_TOKEN_PATH\n                  value: /var/run/lvspec/ray-auth/token\n",
         "                - name: RAY_AUTH_TOKEN\n                  value: 3f9a0c7e\n")
    (k8s / "token.yaml").write_text("apiVersion: v1\nkind: Secret\nmetadata:\n  name: lvspec-caption-ray-auth\n"
                                    "  namespace: lvspec-caption\nstringData:\n  auth_token: 3f9a0c7e\n")
    with open(tf / "kuberay.tf", "a") as f:
        f.write('\nresource "kubectl_manifest" "token" {\n  yaml_body = file("${path.module}/../k8s/token.yaml")\n}\n')
    problems = "\n".join(validate.check_k8s(k8s, tf))
    assert "container 'submit'): RAY_AUTH_TOKEN is written in plain text" in problems
    assert "token.yaml (Secret lvspec-caption-ray-auth): a Secret's value is written in a manifest" in problems

    edit(tf / "variables.tf", 'variable "ray_auth_token_version" {',
         'variable "ray_auth_token" {\n  type    = string\n  default = "3f9a0c7e"\n}\n\nvariable "ray_auth_token_version" {')
    edit(tf / "auth.tf", "secret_string_wo         = ephemeral.aws_secretsmanager_random_password.ray_auth.random_password",
         "secret_string            = var.ray_auth_token")
    problems = "\n".join(validate.check_terraform(tf))
    assert "variable 'ray_auth_token' looks like a credential and has a default" in problems
    assert "aws_secretsmanager_secret_version.ray_auth.secret_string keeps a secret in the Terraform state" in problems

    launcher = copy / "ray" / "cluster.yaml"
    edit(launcher, "    - -e RAY_AUTH_TOKEN_PATH=/run/lvspec/ray-auth-token\n", "    - -e RAY_AUTH_TOKEN=3f9a0c7e\n")
    edit(launcher, "    - -e RAY_AUTH_MODE=token\n", "")
    edit(launcher, "--region us-west-2 --secret-id lvspec-caption/ray-auth-token", "--region us-west-2 --secret-id other")
    problems = "\n".join(validate.check_launcher(launcher, tf))
    assert "RAY_AUTH_TOKEN is written in the config" in problems and "3f9a" not in problems
    assert "Ray starts without token authentication" in problems
    assert "no initialization command fetches the auth token from the Secrets Manager secret" in problems


def test_the_job_api_admits_only_named_pods_and_every_ray_pod_is_policed():
    docs, _ = validate.load_manifests()
    policies = {d["metadata"]["name"]: d for _, d in docs if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    [rule] = policies["ray-head-job-api"]["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert len(rule["from"]) == 3 and all(p["podSelector"]["matchLabels"] for p in rule["from"])
    pods = {what: labels for what, _, labels in validate._ray_pods(docs)}
    assert set(pods) == {"RayCluster lvspec-caption head", "RayCluster lvspec-caption worker group 'cpu'",
                         "RayCluster lvspec-caption worker group 'gpu'"}
    head = pods["RayCluster lvspec-caption head"]
    assert validate._selects(policies["ray-head-job-api"]["spec"]["podSelector"], head)
    assert not validate._selects(policies["ray-head-job-api"]["spec"]["podSelector"],
                                 pods["RayCluster lvspec-caption worker group 'gpu'"])
    assert validate.check_network_policies(docs) == []


def test_a_job_api_open_to_the_namespace_or_a_head_without_policy_is_caught(tmp_path):
    copy = infra_copy(tmp_path)
    path = copy / "k8s" / "networkpolicies.yaml"
    edit(path, "        - podSelector:\n            matchLabels:\n              app.kubernetes.io/component: nightly-submitter\n",
         "        - podSelector: {}\n")
    edit(path, "        - namespaceSelector:\n            matchLabels:\n              kubernetes.io/metadata.name: kuberay-system\n"
               "          podSelector:\n            matchLabels:\n              app.kubernetes.io/name: kuberay-operator\n",
         "        - ipBlock:\n            cidr: 10.0.0.0/8\n")
    problems = "\n".join(validate.check_k8s(copy / "k8s", copy / "terraform"))
    assert ("networkpolicies.yaml (NetworkPolicy ray-head-job-api): admits every pod of the namespace to the job API "
            "(8265) of RayCluster lvspec-caption head") in problems
    assert "admits an ipBlock (10.0.0.0/8) to the job API (8265)" in problems

    edit(path, "      ports:\n        - protocol: TCP\n          port: 8265\n---", "---")  # every port, from the same peers
    edit(path, "  ingress:\n    - from:\n        - podSelector:\n            matchLabels:\n              ray.io/cluster: lvspec-caption\n",
         "  ingress:\n    - {}\n")
    problems = "\n".join(validate.check_k8s(copy / "k8s", copy / "terraform"))
    assert "(NetworkPolicy ray-cluster-internal): admits everyone (a rule without from) to the job API" in problems

    copy = infra_copy(tmp_path / "b")  # no policy at all: the head (and every other pod) is open
    (copy / "k8s" / "networkpolicies.yaml").unlink()
    problems = "\n".join(validate.check_k8s(copy / "k8s", copy / "terraform"))
    assert "RayCluster lvspec-caption head: no NetworkPolicy selects it for ingress" in problems
    assert "RayCluster lvspec-caption worker group 'gpu': no NetworkPolicy selects it for egress" in problems


# --- (e) checkov ---------------------------------------------------------------------------------------

def test_checkov_reports_no_failed_checks():
    require("checkov")
    report = validate.run_checkov()
    assert report.problems == []
    totals = report.totals
    assert totals["failed"] == 0 and totals["parsing_errors"] == 0
    assert report.counts["terraform"]["passed"] > 100 and report.counts["kubernetes"]["passed"] > 20
    assert report.skipped and all(len(reason) >= 15 for _, reason in report.skipped)


def test_checkov_failures_and_reasonless_skips_are_problems(tmp_path):
    require("checkov")
    (tmp_path / "terraform").mkdir()
    (tmp_path / "terraform" / "bad.tf").write_text(
        'resource "aws_s3_bucket" "open" {\n'
        '  bucket = "wide-open"\n'
        "}\n\n"
        'resource "aws_s3_bucket_public_access_block" "open" {\n'
        "  #checkov:skip=CKV_AWS_53\n"
        "  bucket              = aws_s3_bucket.open.id\n"
        "  block_public_acls   = false\n"
        "  block_public_policy = false\n"
        "}\n"
    )
    (tmp_path / "k8s").mkdir()
    (tmp_path / "k8s" / "pod.yaml").write_text(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: root\n  namespace: x\n"
        "spec:\n  containers:\n    - name: c\n      image: busybox\n      securityContext:\n        privileged: true\n"
    )
    report = validate.run_checkov(tmp_path)
    assert report.totals["failed"] > 0
    problems = "\n".join(report.problems)
    assert "checkov failed: CKV_K8S_16" in problems  # the privileged container
    assert "checkov failed: CKV_AWS_54" in problems  # block_public_policy = false
    assert "checkov skip without a real reason: CKV_AWS_53" in problems

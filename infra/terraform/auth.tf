# Who may talk to the Ray cluster: one token, required by every Ray process (RAY_AUTH_MODE=token).
#
#   Secrets Manager   holds the token, encrypted with the platform key. Terraform generates it
#                     (an ephemeral value written through a write-only argument: it is in neither
#                     the plan nor the state) and never reads it back.
#   token_reader      the one IAM role that may read it on EKS (IRSA for the service account in
#                     infra/k8s/ray-auth.yaml); the Ray pods' own role cannot.
#   external-secrets  the operator that, acting as token_reader, copies it into the Kubernetes
#                     Secret the RayCluster's authOptions name. KubeRay sets RAY_AUTH_MODE and
#                     RAY_AUTH_TOKEN (from that Secret) on every Ray container and on the RayJob
#                     submitter; the nightly CronJob reads the same Secret.
#   launcher roles    the EC2 cluster of infra/ray/cluster.yaml fetches it at boot (iam.tf's
#                     instance profiles get read access below).
#
# Rotating: raise var.ray_auth_token_version and apply (a new token is written), then restart the
# Ray cluster (Ray reads the token when a process starts; the Secret follows within
# external_secrets_refresh).

locals {
  # Named, not generated: infra/ray/cluster.yaml fetches it by this name.
  ray_auth_secret_name = "${local.name}/ray-auth-token"
}

ephemeral "aws_secretsmanager_random_password" "ray_auth" {
  password_length     = 64
  exclude_punctuation = true
}

resource "aws_secretsmanager_secret" "ray_auth" {
  #checkov:skip=CKV2_AWS_57:Rotation by a Lambda would change the token under a running Ray cluster, which reads it only at process start; rotate with var.ray_auth_token_version and a cluster restart (see the header).
  name                    = local.ray_auth_secret_name
  description             = "Ray token authentication (RAY_AUTH_MODE=token) of ${local.name}"
  kms_key_id              = aws_kms_key.platform.arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "ray_auth" {
  secret_id                = aws_secretsmanager_secret.ray_auth.id
  secret_string_wo         = ephemeral.aws_secretsmanager_random_password.ray_auth.random_password
  secret_string_wo_version = var.ray_auth_token_version
}

# Reading the token: the secret itself and the platform key, only through Secrets Manager.
data "aws_iam_policy_document" "read_ray_auth" {
  statement {
    sid       = "ReadTheRayToken"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = [aws_secretsmanager_secret.ray_auth.arn]
  }

  statement {
    sid       = "DecryptThroughSecretsManager"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.platform.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["secretsmanager.${var.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_policy" "read_ray_auth" {
  name        = "${local.name}-read-ray-auth"
  description = "Read the Ray auth token of ${local.name}"
  policy      = data.aws_iam_policy_document.read_ray_auth.json
}

# --- on EKS: the external-secrets operator, as the token reader --------------------------------

locals {
  token_reader = yamldecode(file("${path.module}/../k8s/ray-auth-reader.yaml")).metadata
}

resource "aws_iam_role" "token_reader" {
  name               = "${local.name}-ray-token-reader"
  description        = "Copies the Ray auth token of ${local.name} into its Kubernetes Secret (external-secrets, IRSA)"
  assume_role_policy = data.aws_iam_policy_document.irsa_assume["token_reader"].json
}

resource "aws_iam_role_policy_attachment" "token_reader" {
  role       = aws_iam_role.token_reader.name
  policy_arn = aws_iam_policy.read_ray_auth.arn
}

resource "helm_release" "external_secrets" {
  name             = "external-secrets"
  repository       = "https://charts.external-secrets.io"
  chart            = "external-secrets"
  version          = var.external_secrets_version
  namespace        = "external-secrets"
  create_namespace = true

  depends_on = [aws_eks_node_group.this]
}

# --- the EC2 cluster launcher's instances read it at boot ---------------------------------------

resource "aws_iam_role_policy_attachment" "launcher_read_ray_auth" {
  for_each = {
    head   = aws_iam_role.launcher_head.name
    worker = aws_iam_role.launcher_worker.name
  }

  role       = each.value
  policy_arn = aws_iam_policy.read_ray_auth.arn
}

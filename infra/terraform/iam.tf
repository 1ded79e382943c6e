# Every IAM role and what it may do.
#
#   ray                  Ray pods on EKS (IRSA): read videos and models, write captions
#   launcher_head/worker EC2 instances of the Ray cluster launcher (infra/ray/cluster.yaml): the
#                        same data access; the head may also start/stop its own workers
#   cluster_autoscaler   grows and shrinks this cluster's node groups (IRSA)
#   token_reader         reads the Ray auth token for the external-secrets operator (IRSA; auth.tf)
#   cluster, node        what EKS itself and the EC2 nodes need (AWS managed policies)
#   flow_logs            VPC flow logs into their log group

# --- data access of the captioning job --------------------------------------------------------

data "aws_iam_policy_document" "ray_data" {
  # Listing is needed to find shards, model files and already-written caption files.
  statement {
    sid       = "ListDataBuckets"
    actions   = ["s3:ListBucket"]
    resources = [for b in aws_s3_bucket.data : b.arn]
  }

  # Models bucket includes code/, where the job's working-dir bundles live.
  statement {
    sid     = "ReadVideosAndModels"
    actions = ["s3:GetObject"]
    resources = [
      "${aws_s3_bucket.data["videos"].arn}/*",
      "${aws_s3_bucket.data["models"].arn}/*",
    ]
  }

  # Reading back is part of resuming: the job reads the video_ids of files it already wrote.
  statement {
    sid       = "ReadWriteCaptions"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.data["captions"].arn}/${var.captions_prefix}/*"]
  }

  # The jobs delete only their own objects under the prefix: the preflight's write probe and
  # unreadable partial Parquet files before a resume (pipeline/job.py), and the nightly job's lease
  # file and the temporary files of its atomic writes (pipeline/nightly.py; a move on S3 is a copy
  # and a delete). Nothing in the other buckets.
  statement {
    sid       = "DeletePartialCaptionFiles"
    actions   = ["s3:DeleteObject"]
    resources = ["${aws_s3_bucket.data["captions"].arn}/${var.captions_prefix}/*"]
  }

  # SSE-KMS: reading needs Decrypt, writing (and multipart uploads) GenerateDataKey; only through
  # S3 in this region, never as a direct KMS call.
  statement {
    sid       = "UseDataKeyThroughS3"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.data.arn]

    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${var.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_policy" "ray_data" {
  name        = "${local.name}-ray-data"
  description = "Read videos and models, write captions under ${var.captions_prefix}/"
  policy      = data.aws_iam_policy_document.ray_data.json
}

# --- Ray pods on EKS (IRSA) -------------------------------------------------------------------

# IRSA: each role may be taken by exactly one service account (namespace:name), through the
# cluster's OIDC provider; the names come from the manifests, so a rename there is enough.
locals {
  oidc_issuer = replace(aws_eks_cluster.this.identity[0].oidc[0].issuer, "https://", "")

  irsa_service_accounts = {
    ray                = "${local.ray_service_account.namespace}:${local.ray_service_account.name}" # serviceaccount.yaml
    cluster_autoscaler = "${local.cluster_autoscaler_namespace}:${local.cluster_autoscaler_service_account}"
    token_reader       = "${local.token_reader.namespace}:${local.token_reader.name}" # ray-auth-reader.yaml (auth.tf)
  }
}

data "aws_iam_policy_document" "irsa_assume" {
  for_each = local.irsa_service_accounts

  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [aws_iam_openid_connect_provider.eks.arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${each.value}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "ray" {
  name               = "${local.name}-ray"
  description        = "Ray head and worker pods of ${local.name} (IRSA)"
  assume_role_policy = data.aws_iam_policy_document.irsa_assume["ray"].json
}

resource "aws_iam_role_policy_attachment" "ray_data" {
  role       = aws_iam_role.ray.name
  policy_arn = aws_iam_policy.ray_data.arn
}

# --- cluster autoscaler (IRSA) ----------------------------------------------------------------

locals {
  cluster_autoscaler_namespace       = "kube-system"
  cluster_autoscaler_service_account = "cluster-autoscaler"
}

data "aws_iam_policy_document" "cluster_autoscaler" {
  # Describe calls take no resource ARNs.
  statement {
    sid = "ReadScalingState"
    actions = [
      "autoscaling:DescribeAutoScalingGroups",
      "autoscaling:DescribeAutoScalingInstances",
      "autoscaling:DescribeLaunchConfigurations",
      "autoscaling:DescribeScalingActivities",
      "autoscaling:DescribeTags",
      "ec2:DescribeImages",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeLaunchTemplateVersions",
      "ec2:GetInstanceTypesFromInstanceRequirements",
    ]
    resources = ["*"]
  }

  # Only groups EKS tagged as this cluster's (managed node groups carry the tag).
  statement {
    sid       = "ScaleThisClustersGroups"
    actions   = ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"]
    resources = ["arn:${local.partition}:autoscaling:${var.region}:${local.account_id}:autoScalingGroup:*:autoScalingGroupName/*"]

    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/k8s.io/cluster-autoscaler/${local.name}"
      values   = ["owned"]
    }
  }

  # Labels and taints of a node group scaled to zero come from EKS, so the GPU group can start
  # from no node at all.
  statement {
    sid       = "ReadNodeGroupTemplates"
    actions   = ["eks:DescribeNodegroup"]
    resources = ["arn:${local.partition}:eks:${var.region}:${local.account_id}:nodegroup/${local.name}/*/*"]
  }
}

resource "aws_iam_role" "cluster_autoscaler" {
  name               = "${local.name}-cluster-autoscaler"
  assume_role_policy = data.aws_iam_policy_document.irsa_assume["cluster_autoscaler"].json
}

resource "aws_iam_role_policy" "cluster_autoscaler" {
  name   = "scale-node-groups"
  role   = aws_iam_role.cluster_autoscaler.id
  policy = data.aws_iam_policy_document.cluster_autoscaler.json
}

# --- EKS control plane and nodes --------------------------------------------------------------

data "aws_iam_policy_document" "eks_assume" {
  statement {
    actions = ["sts:AssumeRole", "sts:TagSession"]

    principals {
      type        = "Service"
      identifiers = ["eks.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "cluster" {
  name               = "${local.name}-eks-cluster"
  assume_role_policy = data.aws_iam_policy_document.eks_assume.json
}

resource "aws_iam_role_policy_attachment" "cluster" {
  role       = aws_iam_role.cluster.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonEKSClusterPolicy"
}

# Envelope encryption of Kubernetes secrets with the platform key.
data "aws_iam_policy_document" "cluster_secrets_key" {
  statement {
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:ListGrants", "kms:DescribeKey"]
    resources = [aws_kms_key.platform.arn]
  }
}

resource "aws_iam_role_policy" "cluster_secrets_key" {
  name   = "encrypt-secrets"
  role   = aws_iam_role.cluster.id
  policy = data.aws_iam_policy_document.cluster_secrets_key.json
}

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

# Nodes get only what kubelet, the VPC CNI and image pulls need; pods cannot borrow it (IMDSv2
# with a hop limit of 1, eks.tf), so the Ray pods' S3 access is the IRSA role above alone.
resource "aws_iam_role" "node" {
  name               = "${local.name}-eks-node"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "node" {
  for_each = toset([
    "AmazonEKSWorkerNodePolicy",
    "AmazonEKS_CNI_Policy",
    "AmazonEC2ContainerRegistryReadOnly",
  ])

  role       = aws_iam_role.node.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/${each.value}"
}

# --- VPC flow logs ----------------------------------------------------------------------------

data "aws_iam_policy_document" "flow_logs_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["vpc-flow-logs.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

data "aws_iam_policy_document" "flow_logs" {
  statement {
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
    resources = [aws_cloudwatch_log_group.flow_logs.arn, "${aws_cloudwatch_log_group.flow_logs.arn}:*"]
  }
}

resource "aws_iam_role" "flow_logs" {
  name               = "${local.name}-flow-logs"
  assume_role_policy = data.aws_iam_policy_document.flow_logs_assume.json
}

resource "aws_iam_role_policy" "flow_logs" {
  name   = "write-flow-logs"
  role   = aws_iam_role.flow_logs.id
  policy = data.aws_iam_policy_document.flow_logs.json
}

# --- Ray cluster launcher on EC2 (infra/ray/cluster.yaml) ---------------------------------------
#
# Without an IamInstanceProfile in cluster.yaml, `ray up` would create its own role with
# AmazonEC2FullAccess and AmazonS3FullAccess. These two profiles, named in cluster.yaml, replace it.

resource "aws_iam_role" "launcher_worker" {
  name               = "${var.launcher_cluster_name}-ray-worker"
  description        = "Worker instances of the Ray cluster launcher's ${var.launcher_cluster_name} cluster"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "launcher_worker_data" {
  role       = aws_iam_role.launcher_worker.name
  policy_arn = aws_iam_policy.ray_data.arn
}

resource "aws_iam_instance_profile" "launcher_worker" {
  name = "${var.launcher_cluster_name}-ray-worker"
  role = aws_iam_role.launcher_worker.name
}

resource "aws_iam_role" "launcher_head" {
  name               = "${var.launcher_cluster_name}-ray-head"
  description        = "Head instance of the Ray cluster launcher's ${var.launcher_cluster_name} cluster (runs the driver and the autoscaler)"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
}

resource "aws_iam_role_policy_attachment" "launcher_head_data" {
  role       = aws_iam_role.launcher_head.name
  policy_arn = aws_iam_policy.ray_data.arn
}

# What Ray's AWS node provider calls from the head: describe, launch workers tagged with this
# cluster's name, retag, stop/start/terminate only instances carrying that tag.
data "aws_iam_policy_document" "launcher_autoscaler" {
  statement {
    sid = "Describe"
    actions = [
      "ec2:DescribeImages",
      "ec2:DescribeInstances",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeKeyPairs",
      "ec2:DescribeSecurityGroups",
      "ec2:DescribeSubnets",
    ]
    resources = ["*"]
  }

  statement {
    sid       = "LaunchOnlyTaggedInstances"
    actions   = ["ec2:RunInstances"]
    resources = ["arn:${local.partition}:ec2:${var.region}:${local.account_id}:instance/*"]

    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/ray-cluster-name"
      values   = [var.launcher_cluster_name]
    }
  }

  statement {
    sid     = "LaunchWithTheseParts"
    actions = ["ec2:RunInstances"]
    resources = [
      "arn:${local.partition}:ec2:${var.region}::image/*",
      "arn:${local.partition}:ec2:${var.region}:${local.account_id}:key-pair/*",
      "arn:${local.partition}:ec2:${var.region}:${local.account_id}:network-interface/*",
      "arn:${local.partition}:ec2:${var.region}:${local.account_id}:security-group/*",
      "arn:${local.partition}:ec2:${var.region}:${local.account_id}:subnet/*",
      "arn:${local.partition}:ec2:${var.region}:${local.account_id}:volume/*",
    ]
  }

  statement {
    sid       = "TagAtLaunch"
    actions   = ["ec2:CreateTags"]
    resources = ["arn:${local.partition}:ec2:${var.region}:${local.account_id}:instance/*"]

    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  statement {
    sid       = "ManageOwnInstances"
    actions   = ["ec2:CreateTags", "ec2:StartInstances", "ec2:StopInstances", "ec2:TerminateInstances"]
    resources = ["arn:${local.partition}:ec2:${var.region}:${local.account_id}:instance/*"]

    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/ray-cluster-name"
      values   = [var.launcher_cluster_name]
    }
  }

  # The workers' ImageId is "resolve:ssm:<AWS's public Deep Learning AMI parameter>"; EC2 resolves
  # it with the caller's permission.
  statement {
    sid       = "ResolveDeepLearningAmi"
    actions   = ["ssm:GetParameters"]
    resources = ["arn:${local.partition}:ssm:${var.region}::parameter/aws/service/deeplearning/ami/*"]
  }

  statement {
    sid       = "GiveWorkersTheirProfile"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.launcher_worker.arn]

    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "launcher_autoscaler" {
  name   = "ray-autoscaler"
  role   = aws_iam_role.launcher_head.id
  policy = data.aws_iam_policy_document.launcher_autoscaler.json
}

resource "aws_iam_instance_profile" "launcher_head" {
  name = "${var.launcher_cluster_name}-ray-head"
  role = aws_iam_role.launcher_head.name
}

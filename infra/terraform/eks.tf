# The EKS cluster and its two node groups.
#
#   cpu: always at least one node (Ray head, KubeRay operator, CoreDNS, cluster autoscaler), more
#        for decode workers
#   gpu: 0..gpu_max_nodes nodes, tainted so that only pods asking for a GPU land there
#
# Neither group is scaled by Terraform after creation: the Ray autoscaler adds and removes worker
# pods, the cluster autoscaler (kuberay.tf) adds and removes the nodes they need.

# Created before the cluster so that EKS writes into an encrypted group with a retention, instead
# of creating an unencrypted one that keeps logs forever.
resource "aws_cloudwatch_log_group" "eks" {
  name              = "/aws/eks/${local.name}/cluster"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.platform.arn
}

resource "aws_eks_cluster" "this" {
  #checkov:skip=CKV_AWS_39:The public endpoint is how Terraform (helm/kubectl providers) and operators reach a cluster with no VPN; it is limited to var.api_allowed_cidrs and can be turned off with var.api_public_access.
  #checkov:skip=CKV_AWS_38:public_access_cidrs is var.api_allowed_cidrs, which has no default and whose validation rejects 0.0.0.0/0; checkov cannot see a value it does not have.
  name     = local.name
  version  = var.kubernetes_version
  role_arn = aws_iam_role.cluster.arn

  enabled_cluster_log_types = ["api", "audit", "authenticator", "controllerManager", "scheduler"]

  vpc_config {
    subnet_ids              = aws_subnet.private[*].id
    endpoint_private_access = true # nodes talk to the API inside the VPC
    endpoint_public_access  = var.api_public_access
    public_access_cidrs     = var.api_public_access ? var.api_allowed_cidrs : null
  }

  kubernetes_network_config {
    service_ipv4_cidr = local.service_cidr
  }

  encryption_config {
    resources = ["secrets"]

    provider {
      key_arn = aws_kms_key.platform.arn
    }
  }

  # Access entries instead of the aws-auth ConfigMap; whoever applies this gets cluster admin
  # (the helm and kubectl providers act as them). Managed node groups get their entries from EKS.
  access_config {
    authentication_mode                         = "API"
    bootstrap_cluster_creator_admin_permissions = true
  }

  depends_on = [
    aws_cloudwatch_log_group.eks,
    aws_iam_role_policy_attachment.cluster,
    aws_iam_role_policy.cluster_secrets_key,
  ]
}

# IRSA: lets pods exchange their service-account token for an IAM role (iam.tf). No
# thumbprint_list: IAM verifies the EKS issuer through its own library of trusted root CAs.
resource "aws_iam_openid_connect_provider" "eks" {
  url            = aws_eks_cluster.this.identity[0].oidc[0].issuer
  client_id_list = ["sts.amazonaws.com"]
}

locals {
  node_groups = {
    cpu = {
      ami_type       = "AL2023_x86_64_STANDARD"
      instance_types = var.cpu_instance_types
      capacity_type  = "ON_DEMAND"
      min_size       = var.cpu_min_nodes
      max_size       = var.cpu_max_nodes
      disk_gib       = var.cpu_disk_gib
      taints         = []
    }
    gpu = {
      ami_type       = "AL2023_x86_64_NVIDIA" # NVIDIA driver and container toolkit preinstalled
      instance_types = var.gpu_instance_types
      capacity_type  = var.gpu_capacity_type
      min_size       = var.gpu_min_nodes
      max_size       = var.gpu_max_nodes
      disk_gib       = var.gpu_disk_gib
      # Only pods that tolerate this (the Ray GPU workers, the device plugin) are scheduled here.
      taints = [{ key = "nvidia.com/gpu", value = "present", effect = "NO_SCHEDULE" }]
    }
  }
}

# Launch templates exist for two settings the node group API lacks: IMDSv2 with a hop limit of 1
# (a pod cannot reach the instance metadata, so it cannot use the node role; its AWS access is
# IRSA only) and an encrypted gp3 root volume of the size each group needs.
resource "aws_launch_template" "node" {
  for_each = local.node_groups

  name_prefix            = "${local.name}-${each.key}-"
  update_default_version = true

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  block_device_mappings {
    device_name = "/dev/xvda" # root device of the AL2023 EKS AMIs

    ebs {
      volume_size           = each.value.disk_gib
      volume_type           = "gp3"
      encrypted             = true # account's EBS key: the autoscaling service role needs no key-policy grant
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = "${local.name}-${each.key}" })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = "${local.name}-${each.key}" })
  }
}

resource "aws_eks_node_group" "this" {
  for_each = local.node_groups

  cluster_name    = aws_eks_cluster.this.name
  node_group_name = each.key
  node_role_arn   = aws_iam_role.node.arn
  subnet_ids      = aws_subnet.private[*].id
  ami_type        = each.value.ami_type
  instance_types  = each.value.instance_types
  capacity_type   = each.value.capacity_type

  scaling_config {
    min_size     = each.value.min_size
    max_size     = each.value.max_size
    desired_size = each.value.min_size
  }

  launch_template {
    id      = aws_launch_template.node[each.key].id
    version = aws_launch_template.node[each.key].latest_version
  }

  # The Ray pods select their pool by this label (infra/k8s/raycluster.yaml).
  labels = {
    "lvspec.io/pool" = each.key
  }

  dynamic "taint" {
    for_each = each.value.taints

    content {
      key    = taint.value.key
      value  = taint.value.value
      effect = taint.value.effect
    }
  }

  update_config {
    max_unavailable = 1
  }

  # The cluster autoscaler owns the desired size once the group exists.
  lifecycle {
    ignore_changes = [scaling_config[0].desired_size]
  }

  depends_on = [aws_iam_role_policy_attachment.node]
}

# The VPC CNI as a managed add-on, with its network policy agent on: without it the cluster would
# accept infra/k8s/networkpolicies.yaml and enforce none of it.
resource "aws_eks_addon" "vpc_cni" {
  cluster_name                = aws_eks_cluster.this.name
  addon_name                  = "vpc-cni"
  resolve_conflicts_on_create = "OVERWRITE"
  resolve_conflicts_on_update = "OVERWRITE"
  configuration_values        = jsonencode({ enableNetworkPolicy = "true" })
}

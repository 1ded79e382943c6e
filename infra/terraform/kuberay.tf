# What runs inside the cluster: three Helm charts and the manifests of infra/k8s.
#
#   kuberay-operator       reconciles RayCluster / RayJob
#   nvidia-device-plugin   advertises nvidia.com/gpu on the GPU nodes
#   cluster-autoscaler     adds nodes for pending pods (the Ray autoscaler's new workers) and
#                          removes empty ones; both node groups scale this way
#   infra/k8s/*.yaml       namespace, service account, RayCluster, nightly CronJob, bulk RayJob,
#                          network policies, and the auth token's store and Secret (auth.tf)
#
# The manifests are templates: templatefile() fills in their ${name} placeholders from the
# *_vars maps below (infra/validate.py checks that the two sides agree).

locals {
  # Name and namespace of the Ray pods' service account, for the IRSA trust policy (iam.tf): read
  # from the manifest so that the two cannot drift apart.
  ray_service_account = yamldecode(file("${path.module}/../k8s/serviceaccount.yaml")).metadata
  ray_cluster         = yamldecode(file("${path.module}/../k8s/raycluster.yaml")).metadata

  # key=value overrides that point a job at this stack's models and captions buckets (the source
  # differs per run: source.uri).
  job_overrides = join(" ", [
    "model.target=${local.model_target_uri}",
    "model.draft=${local.model_draft_uri}",
    "output.uri=${local.output_uri}",
  ])

  serviceaccount_vars = {
    ray_role_arn = aws_iam_role.ray.arn
  }

  raycluster_vars = {
    ray_version          = var.ray_version
    ray_image            = var.ray_image
    region               = var.region
    idle_timeout_seconds = var.ray_idle_timeout_seconds
    head_cpu             = var.head_resources.cpu
    head_memory          = var.head_resources.memory
    cpu_worker_cpu       = var.cpu_worker_resources.cpu
    cpu_worker_memory    = var.cpu_worker_resources.memory
    cpu_workers_min      = 0
    # One CPU node holds the head and the cluster services; every other one fits one worker pod.
    cpu_workers_max   = var.cpu_max_nodes - 1
    gpu_worker_cpu    = var.gpu_worker_resources.cpu
    gpu_worker_memory = var.gpu_worker_resources.memory
    gpu_worker_shm    = var.gpu_worker_resources.shm
    gpu_workers_min   = var.gpu_min_nodes * var.gpus_per_node
    gpu_workers_max   = var.gpu_max_nodes * var.gpus_per_node
  }

  nightly_vars = {
    nightly_schedule         = var.nightly_schedule
    nightly_time_zone        = var.nightly_time_zone
    nightly_deadline_seconds = var.nightly_deadline_hours * 3600
    submitter_image          = var.submitter_image
    code_bundle_uri          = local.code_bundle_uri
    source_uri               = local.source_uri
    job_overrides            = local.job_overrides
    nightly_args             = join(" ", var.nightly_args)
  }

  token_reader_vars = {
    token_reader_role_arn = aws_iam_role.token_reader.arn
  }

  secret_store_vars = {
    region = var.region
  }

  ray_auth_secret_vars = {
    secret_name      = local.ray_auth_secret_name
    refresh_interval = var.external_secrets_refresh
  }

  networkpolicy_vars = {
    vpc_cidr     = var.vpc_cidr
    service_cidr = local.service_cidr
  }

  bulk_vars = {
    job_id          = var.bulk_job_id
    source_uri      = coalesce(var.bulk_source_uri, local.source_uri)
    job_overrides   = local.job_overrides
    code_bundle_uri = local.code_bundle_uri
  }
}

# --- charts ------------------------------------------------------------------------------------

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = var.kuberay_version
  namespace        = "kuberay-system"
  create_namespace = true

  # Its pod needs a node to run on before Helm reports the release ready.
  depends_on = [aws_eks_node_group.this]
}

resource "helm_release" "nvidia_device_plugin" {
  name       = "nvidia-device-plugin"
  repository = "https://nvidia.github.io/k8s-device-plugin"
  chart      = "nvidia-device-plugin"
  version    = var.nvidia_device_plugin_version
  namespace  = "kube-system"

  # Run on this cluster's GPU nodes, found by their node-group label (the chart's default affinity
  # expects Node Feature Discovery labels, which nothing installs here). The chart already
  # tolerates the nvidia.com/gpu taint.
  values = [yamlencode({
    affinity = {
      nodeAffinity = {
        requiredDuringSchedulingIgnoredDuringExecution = {
          nodeSelectorTerms = [{
            matchExpressions = [{ key = "lvspec.io/pool", operator = "In", values = ["gpu"] }]
          }]
        }
      }
    }
  })]

  depends_on = [aws_eks_node_group.this]
}

resource "helm_release" "cluster_autoscaler" {
  name       = "cluster-autoscaler"
  repository = "https://kubernetes.github.io/autoscaler"
  chart      = "cluster-autoscaler"
  version    = var.cluster_autoscaler_chart_version
  namespace  = local.cluster_autoscaler_namespace

  values = [yamlencode({
    cloudProvider = "aws"
    awsRegion     = var.region
    # Finds the node groups' auto scaling groups by the tags EKS puts on them.
    autoDiscovery = { clusterName = aws_eks_cluster.this.name }
    # The autoscaler's minor version must match the cluster's.
    image = { tag = "v${var.kubernetes_version}.0" }
    rbac = {
      serviceAccount = {
        name        = local.cluster_autoscaler_service_account
        annotations = { "eks.amazonaws.com/role-arn" = aws_iam_role.cluster_autoscaler.arn }
      }
    }
    extraArgs = {
      "balance-similar-node-groups" = true
      "expander"                    = "least-waste"
      # Ray pods keep logs and spilled objects in emptyDir volumes; by default such a pod pins its
      # node, which would keep idle GPU nodes alive.
      "skip-nodes-with-local-storage" = false
      "scale-down-unneeded-time"      = "10m"
    }
  })]

  depends_on = [aws_eks_node_group.this]
}

# --- manifests (infra/k8s) ---------------------------------------------------------------------

resource "kubectl_manifest" "namespace" {
  yaml_body = file("${path.module}/../k8s/namespace.yaml")

  depends_on = [aws_eks_node_group.this]
}

resource "kubectl_manifest" "ray_service_account" {
  yaml_body = templatefile("${path.module}/../k8s/serviceaccount.yaml", local.serviceaccount_vars)

  depends_on = [kubectl_manifest.namespace]
}

# The auth token's way in (auth.tf): who reads it, from where, into which Secret.
resource "kubectl_manifest" "token_reader" {
  yaml_body = templatefile("${path.module}/../k8s/ray-auth-reader.yaml", local.token_reader_vars)

  depends_on = [kubectl_manifest.namespace]
}

resource "kubectl_manifest" "secret_store" {
  yaml_body = templatefile("${path.module}/../k8s/ray-auth-store.yaml", local.secret_store_vars)

  depends_on = [helm_release.external_secrets, kubectl_manifest.token_reader] # the chart installs the CRD
}

resource "kubectl_manifest" "ray_auth_secret" {
  yaml_body = templatefile("${path.module}/../k8s/ray-auth-secret.yaml", local.ray_auth_secret_vars)

  depends_on = [
    kubectl_manifest.secret_store,
    aws_secretsmanager_secret_version.ray_auth,
    aws_iam_role_policy_attachment.token_reader,
  ]
}

# One resource per document of the file, by policy name.
resource "kubectl_manifest" "network_policy" {
  for_each = {
    for doc in split("\n---\n", templatefile("${path.module}/../k8s/networkpolicies.yaml", local.networkpolicy_vars)) :
    yamldecode(doc).metadata.name => doc
  }

  yaml_body = each.value

  depends_on = [kubectl_manifest.namespace, aws_eks_addon.vpc_cni]
}

resource "kubectl_manifest" "raycluster" {
  yaml_body = templatefile("${path.module}/../k8s/raycluster.yaml", local.raycluster_vars)

  depends_on = [
    helm_release.kuberay_operator, # installs the RayCluster CRD
    helm_release.nvidia_device_plugin,
    helm_release.cluster_autoscaler,
    kubectl_manifest.ray_service_account,
    kubectl_manifest.ray_auth_secret, # the pods read RAY_AUTH_TOKEN from its Secret
    kubectl_manifest.network_policy,
    aws_iam_role_policy_attachment.ray_data,
  ]
}

resource "kubectl_manifest" "nightly" {
  yaml_body = templatefile("${path.module}/../k8s/nightly-cronjob.yaml", local.nightly_vars)

  depends_on = [kubectl_manifest.raycluster]
}

resource "kubectl_manifest" "bulk" {
  count = var.bulk_job_id == null ? 0 : 1

  yaml_body = templatefile("${path.module}/../k8s/rayjob-bulk.yaml", local.bulk_vars)

  depends_on = [kubectl_manifest.raycluster]
}

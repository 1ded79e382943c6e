# AWS for the captioning job: S3 buckets, IAM, an EKS cluster with a CPU and a GPU node group,
# KubeRay and the job manifests of infra/k8s. Checked offline by `python infra/validate.py`.
#
#   terraform init
#   terraform apply -var 'api_allowed_cidrs=["203.0.113.0/24"]' -var code_version=$(git rev-parse --short HEAD)
#   # then, once: models into s3://<models>/<target_model>/ and <draft_model>/, videos under the
#   # source_uri output; per code version: the bundle to the code_bundle_uri output
#   git archive --format=zip --prefix=lvspec-caption/ HEAD > bundle.zip && aws s3 cp bundle.zip "$(terraform output -raw code_bundle_uri)"
#   terraform apply ... -var bulk_job_id=dataset-2026-11   # a bulk run (a RayJob); the nightly CronJob runs by itself
#
# Providers and how they reach the cluster. Only the AWS provider talks to AWS; helm and kubectl
# talk to the EKS API with a token from `aws eks get-token`, so whoever runs terraform needs the
# AWS CLI and network access to the API endpoint (see var.api_allowed_cidrs).
#
# State: configure a remote backend at init time, e.g.
#   terraform init -backend-config=bucket=... -backend-config=key=lvspec-caption/terraform.tfstate
# after adding `backend "s3" {}` here; the state holds no secrets (not even the Ray auth token it
# generates, see auth.tf), but it is the only record of what was created.

terraform {
  # 1.11: the Ray auth token is an ephemeral value written through a write-only argument (auth.tf)
  required_version = ">= 1.11"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 6.0"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 3.0"
    }
    # kubectl_manifest applies custom resources (RayCluster, RayJob) whose CRDs are installed by the
    # KubeRay chart in the same apply; hashicorp/kubernetes' kubernetes_manifest needs the CRD to
    # exist at plan time and so cannot create both in one run.
    kubectl = {
      source  = "alekc/kubectl"
      version = "~> 2.3"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = local.tags
  }
}

provider "helm" {
  kubernetes = {
    host                   = aws_eks_cluster.this.endpoint
    cluster_ca_certificate = base64decode(aws_eks_cluster.this.certificate_authority[0].data)
    exec = {
      api_version = "client.authentication.k8s.io/v1beta1"
      command     = "aws"
      args        = ["eks", "get-token", "--cluster-name", aws_eks_cluster.this.name, "--region", var.region]
    }
  }
}

provider "kubectl" {
  host                   = aws_eks_cluster.this.endpoint
  cluster_ca_certificate = base64decode(aws_eks_cluster.this.certificate_authority[0].data)
  load_config_file       = false
  # The cluster is created in the same apply, so its endpoint is unknown when providers are
  # configured; build the client on first use instead of failing at configure time.
  lazy_load = true
  exec {
    api_version = "client.authentication.k8s.io/v1beta1"
    command     = "aws"
    args        = ["eks", "get-token", "--cluster-name", aws_eks_cluster.this.name, "--region", var.region]
  }
}

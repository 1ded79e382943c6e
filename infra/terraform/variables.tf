# Inputs. Two have no default and must be given: api_allowed_cidrs (who may reach the EKS API)
# and code_version (which code bundle the Ray jobs run). Everything else has a working default.

# --- where and what --------------------------------------------------------------------------

variable "region" {
  description = "AWS region for every resource (pick one with H200 capacity: p5e/p5en)."
  type        = string
  default     = "us-west-2"
}

variable "cluster_name" {
  description = "Name of the EKS cluster; also prefixes every other resource name."
  type        = string
  default     = "lvspec-caption"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{2,30}$", var.cluster_name))
    error_message = "cluster_name must be 3-31 characters of lower-case letters, digits and '-', starting with a letter (it prefixes bucket and role names)."
  }
}

variable "kubernetes_version" {
  description = "EKS Kubernetes minor version. The cluster autoscaler image is pinned to the same minor version."
  type        = string
  default     = "1.35"
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}

# --- network ---------------------------------------------------------------------------------

variable "vpc_cidr" {
  description = "CIDR of the VPC this module creates; split into one public and one private subnet per zone."
  type        = string
  default     = "10.40.0.0/16"
}

variable "availability_zones" {
  description = "Zones of var.region to put subnets and nodes in. Named rather than taken from the region's list: GPU capacity (and any capacity reservation) is per zone, and a list that grows when AWS adds a zone would move subnets."
  type        = list(string)
  default     = ["us-west-2a", "us-west-2b", "us-west-2c"]

  validation {
    condition     = length(var.availability_zones) >= 2 && length(var.availability_zones) <= 4
    error_message = "EKS needs subnets in at least 2 zones; this module's subnet layout fits at most 4."
  }
}

variable "api_public_access" {
  description = "Expose the EKS API endpoint publicly (restricted to api_allowed_cidrs). Terraform's helm/kubectl providers and kubectl users reach the cluster through it; turn off when working from inside the VPC."
  type        = bool
  default     = true
}

variable "api_allowed_cidrs" {
  description = "CIDRs allowed to reach the public EKS API endpoint (your office / CI egress). No default on purpose."
  type        = list(string)

  validation {
    condition     = length(var.api_allowed_cidrs) > 0 && !contains(var.api_allowed_cidrs, "0.0.0.0/0")
    error_message = "api_allowed_cidrs must list specific networks, not 0.0.0.0/0."
  }
}

variable "log_retention_days" {
  description = "Days to keep VPC flow logs and EKS control-plane logs."
  type        = number
  default     = 365
}

# --- node groups -----------------------------------------------------------------------------

variable "cpu_instance_types" {
  description = "Instance types of the CPU node group (Ray head, decode workers, cluster services)."
  type        = list(string)
  default     = ["m7i.4xlarge"]
}

variable "cpu_min_nodes" {
  description = "Minimum CPU nodes. At least one: it holds the Ray head, the KubeRay operator, CoreDNS and the cluster autoscaler."
  type        = number
  default     = 1

  validation {
    condition     = var.cpu_min_nodes >= 1
    error_message = "cpu_min_nodes must be >= 1: with no CPU node nothing runs the cluster autoscaler, so nothing could scale up."
  }
}

variable "cpu_max_nodes" {
  description = "Maximum CPU nodes. One holds the head; each other one holds one decode worker pod (sized for m7i.4xlarge)."
  type        = number
  default     = 9

  validation {
    condition     = var.cpu_max_nodes >= 2
    error_message = "cpu_max_nodes must be >= 2: one node for the head and cluster services, at least one for decode workers."
  }
}

variable "cpu_disk_gib" {
  description = "Root volume of CPU nodes (container images, Ray object spilling)."
  type        = number
  default     = 200
}

variable "gpu_instance_types" {
  description = "Instance types of the GPU node group. The default 32B target + 7B draft hold 78 GB of bf16 weights, so each replica needs a 141 GB H200 (p5e/p5en); a smaller model pair fits smaller GPUs."
  type        = list(string)
  default     = ["p5e.48xlarge"]
}

variable "gpus_per_node" {
  description = "GPUs per instance of gpu_instance_types; one Ray GPU worker pod (one caption replica) runs per GPU."
  type        = number
  default     = 8
}

variable "gpu_min_nodes" {
  description = "Minimum GPU nodes; 0 lets the cluster scale GPUs away between runs."
  type        = number
  default     = 0

  validation {
    condition     = var.gpu_min_nodes >= 0
    error_message = "gpu_min_nodes must be >= 0."
  }
}

variable "gpu_max_nodes" {
  description = "Maximum GPU nodes."
  type        = number
  default     = 2

  validation {
    condition     = var.gpu_max_nodes >= 1
    error_message = "gpu_max_nodes must be >= 1."
  }
}

variable "gpu_capacity_type" {
  description = "ON_DEMAND or SPOT for the GPU node group. A reclaimed spot node costs at most the rows of its unfinished Parquet files: the job resumes."
  type        = string
  default     = "ON_DEMAND"

  validation {
    condition     = contains(["ON_DEMAND", "SPOT"], var.gpu_capacity_type)
    error_message = "gpu_capacity_type must be ON_DEMAND or SPOT."
  }
}

variable "gpu_disk_gib" {
  description = "Root volume of GPU nodes: the CUDA image, the per-node model cache (78 GB per model version) and Ray spilling."
  type        = number
  default     = 1000
}

# --- Ray pods --------------------------------------------------------------------------------

variable "ray_image" {
  description = "Image of every Ray pod. The stock Ray image has no project dependencies (torch, transformers, decord, ...): build one FROM it with `pip install .` of this repo and set it here. The project's code itself is shipped per job as the working dir (code_version)."
  type        = string
  default     = "rayproject/ray:2.60.0-py311-gpu"
}

variable "ray_version" {
  description = "Ray version inside ray_image (RayCluster.spec.rayVersion; KubeRay uses it to pick compatible settings)."
  type        = string
  default     = "2.60.0"
}

variable "submitter_image" {
  description = "Image of the nightly CronJob, which only runs `ray job submit`; its Ray version must match the cluster's."
  type        = string
  default     = "rayproject/ray:2.60.0-py311"
}

variable "head_resources" {
  description = "CPU and memory of the Ray head pod (the job driver runs there)."
  type        = object({ cpu = string, memory = string })
  default     = { cpu = "4", memory = "16Gi" }
}

variable "cpu_worker_resources" {
  description = "CPU and memory of one decode worker pod (one per CPU node; decode.num_cpus per decode actor)."
  type        = object({ cpu = string, memory = string })
  default     = { cpu = "14", memory = "48Gi" }
}

variable "gpu_worker_resources" {
  description = "CPU and memory of one GPU worker pod (one GPU, one caption replica; caption.num_cpus must fit)."
  type        = object({ cpu = string, memory = string, shm = string })
  default     = { cpu = "20", memory = "200Gi", shm = "64Gi" }
}

variable "ray_idle_timeout_seconds" {
  description = "Seconds a Ray worker pod may sit idle before the Ray autoscaler removes it (its node follows)."
  type        = number
  default     = 300
}

# --- data ------------------------------------------------------------------------------------

variable "videos_bucket_name" {
  description = "Bucket of source videos (source.uri). Default: <cluster_name>-videos-<account id>."
  type        = string
  default     = null
}

variable "models_bucket_name" {
  description = "Bucket of model weights (model.target/draft) and code bundles. Default: <cluster_name>-models-<account id>."
  type        = string
  default     = null
}

variable "captions_bucket_name" {
  description = "Bucket the jobs write captions to (output.uri). Default: <cluster_name>-captions-<account id>."
  type        = string
  default     = null
}

variable "videos_prefix" {
  description = "Prefix of the shards in the videos bucket (source.uri = s3://<videos>/<prefix>)."
  type        = string
  default     = "shards/"
}

variable "captions_prefix" {
  description = "Prefix the jobs write under (output.uri = s3://<captions>/<prefix>); the Ray role may write and delete only there."
  type        = string
  default     = "lvspec"

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$", var.captions_prefix))
    error_message = "captions_prefix must be a non-empty key prefix without leading or trailing '/'."
  }
}

variable "target_model" {
  description = "Directory of the target model under s3://<models>/ (model.target)."
  type        = string
  default     = "Qwen2.5-VL-32B-Instruct"
}

variable "draft_model" {
  description = "Directory of the draft model under s3://<models>/ (model.draft)."
  type        = string
  default     = "Qwen2.5-VL-7B-Instruct"
}

variable "tmp_prefix" {
  description = "Prefix of temporary objects in every bucket; they expire after tmp_expiration_days."
  type        = string
  default     = "tmp/"
}

variable "tmp_expiration_days" {
  description = "Days after which objects under tmp_prefix and incomplete multipart uploads are removed."
  type        = number
  default     = 7
}

variable "noncurrent_version_expiration_days" {
  description = "Days a replaced or deleted object version is kept (versioning is on for every bucket)."
  type        = number
  default     = 30
}

# --- code and jobs ---------------------------------------------------------------------------

variable "code_version" {
  description = "Version of the code bundle the jobs run: s3://<models>/code/lvspec-caption-<code_version>.zip, made with `git archive --format=zip --prefix=lvspec-caption/ -o lvspec-caption-$(git rev-parse --short HEAD).zip HEAD`. Ray caches a working dir by URI, so every change needs a new version."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]+$", var.code_version))
    error_message = "code_version must be a plain name (letters, digits, '.', '_', '-'), e.g. a git short sha."
  }
}

variable "nightly_schedule" {
  description = "Cron schedule of the nightly incremental job."
  type        = string
  default     = "0 2 * * *"
}

variable "nightly_time_zone" {
  description = "Time zone of nightly_schedule."
  type        = string
  default     = "Etc/UTC"
}

variable "nightly_deadline_hours" {
  description = "Hours the nightly submitter waits for its job before giving up (keeps runs from overlapping)."
  type        = number
  default     = 20
}

variable "nightly_args" {
  description = "Extra arguments of `python -m jobs.nightly` after the bucket overrides this stack adds, e.g. [\"nightly.dataset=web-2026\"]."
  type        = list(string)
  default     = []
}

variable "bulk_job_id" {
  description = "Set to submit a bulk run (a RayJob) with this job_id; change it to submit another, unset it to remove the finished RayJob. Re-applying the same id does nothing."
  type        = string
  default     = null

  validation {
    condition     = var.bulk_job_id == null || can(regex("^[a-z0-9]([a-z0-9-]{0,39}[a-z0-9])?$", var.bulk_job_id))
    error_message = "bulk_job_id must be 1-41 lower-case letters, digits and inner '-' (it also names the RayJob bulk-<id>, at most 47 characters)."
  }
}

variable "bulk_source_uri" {
  description = "source.uri of the bulk run; default: the videos bucket's videos_prefix."
  type        = string
  default     = null
}

# --- who may submit: Ray token authentication (auth.tf) ---------------------------------------

variable "ray_auth_token_version" {
  description = "Raise to write a new Ray auth token into Secrets Manager (then restart the Ray cluster, which reads it at start). Terraform never stores the token itself."
  type        = number
  default     = 1
}

variable "external_secrets_refresh" {
  description = "How often the Kubernetes Secret is brought in step with Secrets Manager (a duration, e.g. 1h)."
  type        = string
  default     = "1h"
}

# --- charts ----------------------------------------------------------------------------------

variable "kuberay_version" {
  description = "Version of the kuberay-operator Helm chart (https://ray-project.github.io/kuberay-helm/)."
  type        = string
  default     = "1.7.0"
}

variable "external_secrets_version" {
  description = "Version of the external-secrets Helm chart (https://charts.external-secrets.io), which copies the Ray auth token from Secrets Manager into the Secret the RayCluster reads."
  type        = string
  default     = "2.9.0"
}

variable "nvidia_device_plugin_version" {
  description = "Version of the nvidia-device-plugin Helm chart, which advertises nvidia.com/gpu on GPU nodes."
  type        = string
  default     = "0.20.0"
}

variable "cluster_autoscaler_chart_version" {
  description = "Version of the cluster-autoscaler Helm chart, which grows and shrinks the node groups."
  type        = string
  default     = "9.59.0"
}

# --- Ray cluster launcher (infra/ray/cluster.yaml) -------------------------------------------

variable "launcher_cluster_name" {
  description = "cluster_name in infra/ray/cluster.yaml: the launcher head may only start, stop and terminate instances tagged with it."
  type        = string
  default     = "lvspec-caption"
}

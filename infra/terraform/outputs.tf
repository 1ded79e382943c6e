# What the job configs and operators need. The *_uri outputs are the values of the config keys
# named in their descriptions (jobs/configs/cluster.yaml).

output "source_uri" {
  description = "source.uri: the shards in the videos bucket."
  value       = local.source_uri
}

output "model_target_uri" {
  description = "model.target: synced to each node's cache once."
  value       = local.model_target_uri
}

output "model_draft_uri" {
  description = "model.draft."
  value       = local.model_draft_uri
}

output "output_uri" {
  description = "output.uri: jobs write <output_uri>/<job_id>/ (nightly: <output_uri>/<dataset>/)."
  value       = local.output_uri
}

output "job_config_overrides" {
  description = "Append to `python -m jobs.caption --config jobs/configs/cluster.yaml job_id=...` to read and write this stack's buckets."
  value       = "source.uri=${local.source_uri} ${local.job_overrides}"
}

output "code_bundle_uri" {
  description = "Where the jobs' working dir must be uploaded for code_version (a zip with one top-level directory)."
  value       = local.code_bundle_uri
}

output "buckets" {
  description = "Bucket names by role."
  value       = { for role, bucket in aws_s3_bucket.data : role => bucket.bucket }
}

output "data_kms_key_arn" {
  description = "KMS key of the buckets' objects (uploaders need kms:GenerateDataKey on it)."
  value       = aws_kms_key.data.arn
}

output "ray_role_arn" {
  description = "IAM role of the Ray pods (IRSA), annotated on infra/k8s/serviceaccount.yaml."
  value       = aws_iam_role.ray.arn
}

output "launcher_instance_profiles" {
  description = "Instance profiles named in infra/ray/cluster.yaml (Ray cluster launcher on EC2)."
  value = {
    head   = aws_iam_instance_profile.launcher_head.name
    worker = aws_iam_instance_profile.launcher_worker.name
  }
}

output "cluster_name" {
  description = "EKS cluster name."
  value       = aws_eks_cluster.this.name
}

output "cluster_endpoint" {
  description = "EKS API endpoint."
  value       = aws_eks_cluster.this.endpoint
}

output "kubeconfig_command" {
  description = "Adds the cluster to ~/.kube/config."
  value       = "aws eks update-kubeconfig --region ${var.region} --name ${aws_eks_cluster.this.name}"
}

output "ray_dashboard_command" {
  description = "Forwards the Ray dashboard and job API to localhost:8265 (then `ray job submit --address http://localhost:8265 ...`)."
  value       = "kubectl -n ${local.ray_cluster.namespace} port-forward svc/${local.ray_cluster.name}-head-svc 8265:8265"
}

output "read_ray_auth_policy_arn" {
  description = "IAM policy that may read the Ray auth token (Secrets Manager, and its key through it): attach it to the people and CI that submit jobs, and to no one else."
  value       = aws_iam_policy.read_ray_auth.arn
}

output "ray_auth_token_command" {
  description = "Writes the Ray auth token to ~/.ray/auth_token (mode 600), where `RAY_AUTH_MODE=token ray job submit` finds it; needs read_ray_auth_policy_arn. Run it with eval; it prints nothing."
  value       = "(umask 077 && mkdir -p ~/.ray && aws secretsmanager get-secret-value --region ${var.region} --secret-id ${local.ray_auth_secret_name} --query SecretString --output text > ~/.ray/auth_token)"
}

# Names and facts shared by every file.

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

# Checks at plan time that every named zone exists in the region and is available.
data "aws_availability_zones" "selected" {
  state = "available"

  filter {
    name   = "zone-name"
    values = var.availability_zones
  }

  lifecycle {
    postcondition {
      condition     = length(self.names) == length(var.availability_zones)
      error_message = "Every entry of availability_zones must be an available zone of var.region."
    }
  }
}

locals {
  name       = var.cluster_name
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  azs        = data.aws_availability_zones.selected.names
  # Kubernetes service addresses (set on the cluster in eks.tf; the head's network policy admits
  # the kubernetes service's address from it).
  service_cidr = "172.20.0.0/16"

  tags = merge(
    {
      Project   = "lvspec-caption"
      Cluster   = var.cluster_name
      ManagedBy = "terraform"
    },
    var.tags,
  )
}

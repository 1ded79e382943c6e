# Two customer-managed keys, so that what may read the data and what may read the platform stay
# apart: the Ray role can use the data key (through S3 only) and nothing else.
#   data:     S3 objects in the videos, models and captions buckets
#   platform: EKS secrets (envelope encryption) and the CloudWatch log groups

resource "aws_kms_key" "data" {
  description             = "${local.name}: S3 objects (videos, models, captions)"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.data_key.json
}

resource "aws_kms_alias" "data" {
  name          = "alias/${local.name}-data"
  target_key_id = aws_kms_key.data.key_id
}

resource "aws_kms_key" "platform" {
  description             = "${local.name}: EKS secrets and CloudWatch logs"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.platform_key.json
}

resource "aws_kms_alias" "platform" {
  name          = "alias/${local.name}-platform"
  target_key_id = aws_kms_key.platform.key_id
}

# In a key policy, "*" as resource means "this key". The account statement hands the key's
# administration and use to IAM policies of this account (the default key policy); each role then
# gets only the actions its own policy names (iam.tf).
data "aws_iam_policy_document" "data_key" {
  #checkov:skip=CKV_AWS_109:Key policy: resource "*" is this key only, and the account principal delegates to IAM policies (AWS's default key policy); without it the key becomes unmanageable.
  #checkov:skip=CKV_AWS_111:Key policy: resource "*" is this key only; write access is granted per role in iam.tf.
  #checkov:skip=CKV_AWS_356:Key policy: resource "*" is the only allowed value and means this key.
  statement {
    sid       = "AccountManagesKeyThroughIAM"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }
}

data "aws_iam_policy_document" "platform_key" {
  #checkov:skip=CKV_AWS_109:Key policy: resource "*" is this key only, and the account principal delegates to IAM policies (AWS's default key policy); without it the key becomes unmanageable.
  #checkov:skip=CKV_AWS_111:Key policy: resource "*" is this key only; the log service may use it only for this cluster's two log groups.
  #checkov:skip=CKV_AWS_356:Key policy: resource "*" is the only allowed value and means this key.
  statement {
    sid       = "AccountManagesKeyThroughIAM"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  # CloudWatch Logs encrypts with the key itself, so it needs a key-policy grant; the condition
  # limits it to this cluster's log groups.
  statement {
    sid       = "CloudWatchLogsForThisClusterOnly"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]

    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }

    condition {
      test     = "ArnEquals"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values = [
        "arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:/aws/eks/${local.name}/cluster",
        "arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:/aws/vpc/${local.name}/flow-logs",
      ]
    }
  }
}

# Vault/OpenBao ACL policy for the agentjobs tickets connector (`agentjobs tickets`).
#
# Written by `agentjobs vault bootstrap` as sys/policies/acl/agentjobs-tickets.
# The connector reads its ticketing backend's secret — the Redmine API key
# (redmine_api_key) or the webhook's signing secret (webhook_secret) — from one
# kv-v2 secret, and nothing else: no tokens, no database or broker credentials.
# Write the secret as an operator, e.g.
#   bao kv put -mount=agentjobs-kv tickets redmine_api_key=...

path "agentjobs-kv/data/tickets" {
  capabilities = ["read"]
}

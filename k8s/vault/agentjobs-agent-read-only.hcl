# Vault/OpenBao ACL policy for agentjobs agents in the "read-only" phase.
#
# Written by `agentjobs vault bootstrap` as sys/policies/acl/agentjobs-agent-read-only and
# attached, as the only policy, to tokens from the token role and the kubernetes
# auth role of the same name (token_no_default_policy = true, so not even the
# `default` policy's cubbyhole or sys/tools paths come along).
#
# Read-only by construction: no create/update/delete on any secrets path, no
# other kv paths, no sys/* beyond renewing its own leases. Every request is made
# with a per-investigation token whose metadata (investigation_id, incident_key,
# phase) lands in the audit log.
#
# Read-only assist: identical grants to shadow. The phase changes who sees the
# findings, not what the agent can read.

# Dynamic PostgreSQL user for diagnostics (pg_read_all_stats, read-only by default). This
# phase may act on nothing, so it reads this role only — never database/creds/agentjobs-remediation,
# whose users may terminate backends.
path "database/creds/agentjobs-diagnostics" {
  capabilities = ["read"]
}

# The same kind of user on each named PostgreSQL target (postgres.targets.<name>: role
# agentjobs-diagnostics-<name>, picked by the alert's labels). The glob reaches only roles of this
# kind: "agentjobs-diagnostics-*" can never name the other kind's.
path "database/creds/agentjobs-diagnostics-*" {
  capabilities = ["read"]
}

# Dynamic RabbitMQ user that may only publish to the agentjobs.results exchange.
path "rabbitmq/creds/agentjobs-results" {
  capabilities = ["read"]
}

# Only in `agentjobs up`'s reduced mode (a broker without the management API, so no rabbitmq
# engine): the one shared broker user. A normal bootstrap deletes this secret.
path "agentjobs-kv/data/rabbitmq-shared" {
  capabilities = ["read"]
}

# Static keys for the LLM reasoner (kv-v2). Only this one secret, never the mount.
path "agentjobs-kv/data/llm" {
  capabilities = ["read"]
}

# The global kill switch (`agentjobs actions disable|enable`, {"enabled", "by", "reason", "at"}):
# read right before every action; disabled or unreadable (this grant missing included), nothing
# runs. Read only, in every phase: no agent can switch it back on, or off for others.
path "agentjobs-kv/data/actions" {
  capabilities = ["read"]
}

# Keep its own leases alive within the token's max TTL (lease ids are only known
# to their holder). No sys/leases/revoke: revoke-self below revokes every lease.
path "sys/leases/renew" {
  capabilities = ["update"]
}

# Its own token: look up (remaining TTL), renew within the explicit max TTL, and
# revoke at the end of the investigation.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "auth/token/revoke-self" {
  capabilities = ["update"]
}

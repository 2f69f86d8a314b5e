# Vault/OpenBao ACL policy for agentjobs agents in the "autonomous" phase.
#
# Written by `agentjobs vault bootstrap` as sys/policies/acl/agentjobs-agent-autonomous and
# attached, as the only policy, to tokens from the token role and the kubernetes
# auth role of the same name (token_no_default_policy = true, so not even the
# `default` policy's cubbyhole or sys/tools paths come along).
#
# Read-only by construction: no create/update/delete on any secrets path (the one
# exception: creating its own action claims, below — never updating or deleting them), no
# other kv paths, no sys/* beyond renewing its own leases. Every request is made
# with a per-investigation token whose metadata (investigation_id, incident_key,
# phase) lands in the audit log.
#
# Autonomous: identical Vault grants to limited-remediation on purpose; more
# autonomy means fewer human approvals and more action classes (RBAC and the
# Job spec), not broader secret access. Add a creds path only together with
# the action that needs it.

# Dynamic PostgreSQL user of the phases that act: the diagnostics grants (pg_read_all_stats,
# read-only by default) plus membership in pg_signal_backend, for the terminate_backend and
# terminate_idle_backends actions — a second limit besides the action gate. This phase reads
# this role only; the diagnostics role is for shadow and read-only.
path "database/creds/agentjobs-remediation" {
  capabilities = ["read"]
}

# The same kind of user on each named PostgreSQL target (postgres.targets.<name>: role
# agentjobs-remediation-<name>, picked by the alert's labels). The glob reaches only roles of this
# kind: "agentjobs-remediation-*" can never name the other kind's.
path "database/creds/agentjobs-remediation-*" {
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

# Action claims (agent.remediation.claims): right before acting, the agent creates
# agentjobs-kv/data/claims/<investigation>/<digest of the idempotency key> (create-only, cas=0), and
# <that>/outcome once it knows how the action ended. Every pod and Job of the investigation reads them,
# so a retried pod (a new emptyDir) or a relaunched Job answers already_executed instead of acting
# twice. create and read only — no update, no delete: a claim cannot be rewritten or undone by an
# agent. Not scoped per investigation (token metadata cannot template an ACL path), so an agent of
# another investigation could pre-claim a key; that only stops an action (it ends already_executed,
# nothing runs): it fails safe. Shadow and read-only act on nothing and get no grant here.
path "agentjobs-kv/data/claims/*" {
  capabilities = ["create", "read"]
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

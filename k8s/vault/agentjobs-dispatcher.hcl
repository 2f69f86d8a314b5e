# Vault/OpenBao ACL policy for the agentjobs dispatcher.
#
# Written by `agentjobs vault bootstrap` as sys/policies/acl/agentjobs-dispatcher.
# The dispatcher mints one token per investigation and revokes it when the Job
# ends; it never reads a credential itself and cannot create a token with any
# other policy: the token roles fix the policies (allowed_policies = the phase's
# policy), the TTL ceiling (token_explicit_max_ttl) and the token type.
#
# min/max_wrapping_ttl make response wrapping mandatory: an unwrapped create is
# denied, so the plain agent token never passes through the dispatcher's
# memory, logs or the Kubernetes API — only the single-use wrapping token does.
# The roles are listed one by one (not agentjobs-agent-*) so that a token role
# added later does not silently become mintable.
#
# Looking up and renewing the dispatcher's own token comes from the `default`
# policy; nothing else is granted here. Revoking is the one grant Vault cannot scope
# to our own tokens: see the last path below.
#
# Listing token accessors (below) is the one broad grant: the sweeper finds
# agent tokens that no Job holds (a mint Vault executed after the dispatcher
# gave up waiting, a dispatcher killed between mint and Job) and revokes them
# instead of letting them live out their TTL. It reveals accessors and, through
# lookup-accessor, their metadata — never a token. Remove it and set
# vault.sweep_interval = 0 to trade that for TTL-bounded leftovers.

path "auth/token/create/agentjobs-agent-shadow" {
  capabilities = ["update"]
  min_wrapping_ttl = "1s"
  max_wrapping_ttl = "300s"
}

path "auth/token/create/agentjobs-agent-read-only" {
  capabilities = ["update"]
  min_wrapping_ttl = "1s"
  max_wrapping_ttl = "300s"
}

path "auth/token/create/agentjobs-agent-limited-remediation" {
  capabilities = ["update"]
  min_wrapping_ttl = "1s"
  max_wrapping_ttl = "300s"
}

path "auth/token/create/agentjobs-agent-autonomous" {
  capabilities = ["update"]
  min_wrapping_ttl = "1s"
  max_wrapping_ttl = "300s"
}

# The sweeper: every token accessor (Vault makes this endpoint sudo-only)
path "auth/token/accessors" {
  capabilities = ["list", "sudo"]
}

# Look a token up by accessor: is the agent token still alive, what is a listed token
# (the sweeper), and — before every revocation — is it ours (metadata jobs_in/
# investigation_id/job_name, its token role or kubernetes role, its policies; see
# dispatcher/credentials/tokens.py revocable). Reveals metadata, never a token.
path "auth/token/lookup-accessor" {
  capabilities = ["update"]
  allowed_parameters = {
    "accessor" = []
  }
}

# Revoke the agent token (and with it every lease issued under it) by the
# wrapped_accessor recorded on the Job; also the kubernetes-auth login token
# whose accessor the agent published.
#
# This is the grant that cannot be narrowed: Vault/OpenBao ACLs match request paths
# and parameters, and a token's accessor is a random string — there is no path per
# token role (auth/token/create/<role> exists, auth/token/revoke-accessor/<role> does
# not), no "only my child tokens" capability (the agent tokens are children of ours,
# orphan = false, but revoke-accessor ignores parentage), and the kubernetes-auth
# login tokens are no one's children at all. So this grant alone would let the
# dispatcher revoke any token in Vault, root's included. What keeps it to our own
# tokens is the dispatcher itself: it looks each accessor up first (above) and revokes
# only an agent token of this installation — and, where it knows them, of that
# investigation, Job, phase and ServiceAccount — and logs and counts every refusal
# (agentjobs_token_revocations_refused_total). Parameters are limited to the accessor.
path "auth/token/revoke-accessor" {
  capabilities = ["update"]
  allowed_parameters = {
    "accessor" = []
  }
}

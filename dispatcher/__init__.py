"""The agentjobs control plane: intake, admission, Job launch, credentials, trust, CLI."""

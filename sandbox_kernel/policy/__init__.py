"""The egress policy: model, administrator's ceiling, and pure compilers to each enforcer."""

"""Backends start sandboxes, enforce their egress policy and open a transport to the agent."""

"""Fault suite (issue 8): each fault injected into a running daemon, measured, nothing lost silently."""

"""Helpers the integration tests share: a real HTTP server, polling, fixtures' plumbing."""

"""Token issuance: orgs, API keys, signing keys and authenticated contact tokens."""

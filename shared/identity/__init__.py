"""The identity read side every service verifies with: API keys, contact tokens and their revocation, widget tokens, org policy, and the contact rows more than one service locks."""

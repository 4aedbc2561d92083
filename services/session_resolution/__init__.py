"""Session resolution: who a widget visitor is (anonymous, unverified, verified)."""

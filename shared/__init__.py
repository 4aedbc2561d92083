"""The library every widget-identity service uses: config, database, event bus, errors, HTTP."""

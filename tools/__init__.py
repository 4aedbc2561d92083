"""Developer tools that run inside the server repository (e.g. the client code generator)."""

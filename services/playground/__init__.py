"""The Playground: a page and a demo backend to try the widget options against this server."""

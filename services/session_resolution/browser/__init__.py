"""The browser half of session resolution: the identity SDK pages load, served as files."""

from services.session_resolution.browser.routes import add_browser_routes

__all__ = ["add_browser_routes"]

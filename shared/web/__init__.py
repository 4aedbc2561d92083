"""The HTTP layer: the base aiohttp app and its middlewares, probes, problem+json responses, the OpenAPI contract and its docs page, pagination and rate limits at the edge."""

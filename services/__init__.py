"""The three widget-identity services, each runnable alone, and the all-in-one composition.

Services never import each other; they share only ``shared`` and talk through Postgres
tables they own and Redis Streams events.
"""

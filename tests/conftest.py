"""Fixtures every test directory shares."""

from tests.storage import db_url  # noqa: F401  (every test module may ask for the two storage back ends)

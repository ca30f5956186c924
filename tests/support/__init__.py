"""Helpers shared by the suite's directories: real servers, fakes, records and numbers.

Import them as `from tests.support.servers import ...`; the fixtures of the databases and the
writer are a pytest plugin (writer_fixtures) that tests/conftest.py loads for every directory.
"""

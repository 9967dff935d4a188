"""The test suite (a package, so tests can share helpers: ``from tests.test_x import helper``)."""

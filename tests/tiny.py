"""Names shared by the test packages (fixtures themselves live in conftest.py files)."""

TINY_MODEL_ID = "tiny-test-model"

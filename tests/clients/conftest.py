"""Real clients against the real server: the same tiny-model server fixtures as tests/serve."""

from tests.serve.conftest import model_server, reference, varied_model_dir  # noqa: F401 (fixtures)

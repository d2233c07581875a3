"""refact_lab: fine-tune a code-completion model on your own repositories and serve it to IDEs.

Importing the package is cheap on purpose (no torch, no jupyter_server): the CLI and the notebook start fast.
"""

__version__ = "0.1.0"


def _jupyter_server_extension_points():
    """Tell jupyter_server where our extension lives (imported only when the server loads it)."""
    from refact_lab.serve.extension import RefactLabExtension

    return [{"module": "refact_lab.serve.extension", "app": RefactLabExtension}]

"""Repository context: an index of a project's accepted files, and retrieval of the snippets a completion shows
the model from other files of the project (see index.py)."""

"""ipywidgets panels over the services, and the Workbench app that puts them in tabs."""

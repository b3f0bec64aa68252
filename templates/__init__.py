"""Jinja templates of moegen (shipped as the package data ``moegen.templates``)."""

"""Recipes, run directories and manifests: the whole pipeline from one command."""

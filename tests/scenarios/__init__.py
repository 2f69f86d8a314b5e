"""Induced, real problems with alerts written as an SRE would (issue 19): see catalogue.py."""

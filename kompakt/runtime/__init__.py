"""Runtimes for exported models; imports neither torch nor ``kompakt.compress``."""

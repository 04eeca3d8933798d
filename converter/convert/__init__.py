"""Applying a plan: choose the kept channels (subcloning), build every target tensor, write and verify."""

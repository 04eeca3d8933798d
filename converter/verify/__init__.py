"""Checking models: numerical verification of a conversion, accuracy on labelled images."""

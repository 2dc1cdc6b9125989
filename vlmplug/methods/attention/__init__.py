"""Attention redistribution: methods that change how much the model attends to the image."""

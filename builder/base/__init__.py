"""Existing images as a recipe's base: formats, opening, inspection."""

"""Scores: the official ToTTo BLEU and PARENT."""

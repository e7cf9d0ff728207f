"""Experiment code built on the library (toy runs, theory checks); experiments/ holds their launchers."""

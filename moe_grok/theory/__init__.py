"""Theory: routing kernel, NTKs, effective dimension and the generalization bound."""

"""fedshift command-line front end (the `fedshift` console script)."""

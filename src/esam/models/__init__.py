"""Reference model and its parts."""

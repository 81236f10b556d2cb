"""Reports: what people read about runs (console tables now; HTML and the review server later)."""

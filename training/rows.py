"""The rows of an evaluation: what a test image goes through before the classifier sees it (one definition, read by
the evaluation, the report and the results page)."""

ROWS = ("none", "min-aux", "oracle")
ROW_TITLES = {"none": "no purification (ε_pfy = 0)", "min-aux": "SOAP min-aux", "oracle": "oracle ε_pfy (upper bound)"}

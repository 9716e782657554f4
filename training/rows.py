"""The rows of an evaluation: what a test image goes through before the classifier sees it (one definition, read by
the evaluation, the report, the results page and the result records)."""

from typing import Literal, get_args

Row = Literal["none", "min-aux", "oracle"]
ROWS: tuple[Row, ...] = get_args(Row)
ROW_TITLES: dict[Row, str] = {
    "none": "no purification (ε_pfy = 0)",
    "min-aux": "SOAP min-aux",
    "oracle": "oracle ε_pfy (upper bound)",
}

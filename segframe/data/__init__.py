"""Dataset converters to the nnU-Net v2 raw format: CHASE_DB1, DRIVE, and a generated vessel set."""

from segframe.data.chase import chase_fov, convert_chase
from segframe.data.common import Case, DataError, write_dataset
from segframe.data.drive import convert_drive
from segframe.data.synthetic import make_synthetic

__all__ = [
    "Case", "DataError", "chase_fov", "convert_chase", "convert_drive", "make_synthetic", "write_dataset",
]

"""Dataset converters to the nnU-Net v2 raw format: CHASE_DB1, DRIVE, LES-AV, a generated vessel set,
and any folder of images and masks."""

from segframe.data.chase import chase_fov, convert_chase
from segframe.data.common import Case, DataError, write_dataset
from segframe.data.drive import convert_drive
from segframe.data.folder import ClassTable, convert_folder
from segframe.data.lesav import convert_lesav
from segframe.data.synthetic import make_synthetic

__all__ = [
    "Case", "ClassTable", "DataError", "chase_fov", "convert_chase", "convert_drive", "convert_folder",
    "convert_lesav", "make_synthetic", "write_dataset",
]

"""Settings of how a run reads and prepares its images: decided at the centre and sent to every site, so every
hospital prepares its scans the same way (`medfed.data.images.Preprocess` carries them out)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from medfed.config.base import Part, setting
from medfed.constants import ImageFit, Modality, OnBadCase
from medfed.exceptions import ConfigError

SIZE_2D = (28, 224)
SIZE_3D = (28, 128)
TABLE_DEFAULT_SIZE = 64
"""Pixels (voxels) per side a labels table's cases are prepared to when image-size is 0."""


@dataclass(frozen=True)
class ImageSettings(Part):
    """How each case is read and prepared: its size, intensity policy and resampling; unreadable cases."""

    TITLE: ClassVar[str] = "images"

    image_size: int = setting(0, "Pixels (voxels) per side every case is prepared to: 2D 28-224, 3D 28-128; 0: a "
                              f"MedMNIST file's own size, {TABLE_DEFAULT_SIZE} for a labels table.", key="image-size")
    image_fit: ImageFit = setting(ImageFit.RESIZE, "resize (the whole field of view to the size) or crop-pad (keep "
                                  "the pixel scale, centre crop or pad).", key="image-fit")
    modality: Modality = setting(Modality.AUTO, "Intensity policy: auto (DICOM's modality; photographs for PNG/JPEG/"
                                 "TIFF; percentiles otherwise), ct (HU window), mr (percentiles) or photo (/255).",
                                 key="modality")
    ct_window_low: float = setting(-1000.0, "CT window: the HU mapped to 0.", key="ct-window-low")
    ct_window_high: float = setting(1000.0, "CT window: the HU mapped to 1.", key="ct-window-high")
    mr_percentile_low: float = setting(1.0, "MR (percentile) scaling: the percentile mapped to 0.",
                                       key="mr-percentile-low")
    mr_percentile_high: float = setting(99.0, "MR (percentile) scaling: the percentile mapped to 1.",
                                        key="mr-percentile-high")
    voxel_spacing: float = setting(0.0, "Volumes: isotropic spacing in mm they are resampled to after orientation "
                                   "to RAS (0: keep their own).", key="voxel-spacing")
    on_bad_case: OnBadCase = setting(OnBadCase.FAIL, "fail: an unreadable case stops the run, naming every bad case; "
                                     "skip: bad cases are left out and reported.", key="on-bad-case")
    loader_workers: int = setting(2, "Worker processes that read and prepare cases (0: in the main process).",
                                  key="loader-workers")
    cache_dir: str = setting("", "Where prepared cases are cached on this machine's disk (default $MEDFED_CACHE_DIR "
                             "or ~/.cache/medfed/cases); a deployed site uses its own.", key="cache-dir", site=False)

    def check(self) -> None:
        if self.image_size and not SIZE_2D[0] <= self.image_size <= SIZE_2D[1]:
            raise ConfigError(f"image-size must be 0 (the data's own) or {SIZE_2D[0]}-{SIZE_2D[1]} (2D; 3D up to "
                              f"{SIZE_3D[1]}); got {self.image_size}")
        if not self.ct_window_low < self.ct_window_high:
            raise ConfigError(f"ct-window-low ({self.ct_window_low}) must be below ct-window-high "
                              f"({self.ct_window_high})")
        if not 0 <= self.mr_percentile_low < self.mr_percentile_high <= 100:
            raise ConfigError("mr-percentile-low and mr-percentile-high must satisfy 0 <= low < high <= 100; got "
                              f"{self.mr_percentile_low} and {self.mr_percentile_high}")
        if self.voxel_spacing < 0:
            raise ConfigError(f"voxel-spacing must be >= 0 mm (0: keep the volume's own); got {self.voxel_spacing}")
        if not 0 <= self.loader_workers <= 64:
            raise ConfigError(f"loader-workers must be 0..64; got {self.loader_workers}")

    def size_for(self, spatial_dims: int, own: int = 0) -> int:
        """The side length cases are prepared to: image-size, else ``own`` (a file's), else the table default.

        Raises:
            ConfigError: a 3D run above the 3D limit.
        """
        size = self.image_size or own or TABLE_DEFAULT_SIZE
        if spatial_dims == 3 and not SIZE_3D[0] <= size <= SIZE_3D[1]:
            raise ConfigError(f"image-size for 3D volumes must be {SIZE_3D[0]}-{SIZE_3D[1]}; got {size}")
        return size

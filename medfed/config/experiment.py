"""Settings parts for what a run is about: its data and sites, its arms, its model, where it writes, and a
deployment's registry. Each part checks its own values; `medfed.config.run.RunConfig` checks across parts."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from medfed.config.base import Part, setting
from medfed.constants import Baselines, EncoderKind, Mode, PartitionScheme, SiteData
from medfed.exceptions import ConfigError


@dataclass(frozen=True)
class DatasetSettings(Part):
    """The data file and how it is cut into sites (simulation), or where the sites' data come from."""

    TITLE: ClassVar[str] = "dataset"

    source: str = setting("pneumoniamnist", "MedMNIST flag (looked up in $MEDFED_DATA_PATH, then "
                          "~/.medmnist/FLAG.npz), a MedMNIST-style .npz, a labels table (.csv), a MONAI datalist "
                          "(.json) or a folder of class folders.", key="data", site=False)
    num_classes: int = setting(0, "Classes (labels, for multi-label) of a labels table; 0: from its labels, which must "
                               "then be 0..K-1 with every class present.", key="num-classes", site=False)
    val_fraction: float = setting(0.15, "A labels table's rows without a split: the share of patients (rows) put in "
                                  "val, at each site.", key="val-fraction")
    test_fraction: float = setting(0.15, "A labels table's rows without a split: the share of patients (rows) put in "
                                   "test, at each site.", key="test-fraction")
    num_sites: int = setting(5, "Number of simulated hospital sites.", key="num-sites")
    partition: PartitionScheme = setting(PartitionScheme.DIRICHLET, "How the train split is divided: iid, dirichlet "
                                         "(label skew), quantity (size skew) or natural (a labels table's own site "
                                         "column: one simulated site per hospital).", key="partition", site=False)
    alpha: float = setting(0.5, "Dirichlet concentration for dirichlet/quantity skew (smaller = more skewed).",
                           key="alpha", site=False)
    label_fraction: float = setting(0.1, "Fraction of each site's train images whose labels it may use, in (0, 1].",
                                    key="label-fraction")
    min_site_size: int = setting(0, "Smallest number of train images a site may get; 0: 10, or as many as the train "
                                 "split allows when it is too small for that (train images // num-sites; the "
                                 "partition says how many each site got).", key="min-site-size", site=False)
    site_data: SiteData = setting(SiteData.PARTITION, "partition: the server splits --data among simulated sites; own: "
                                  "every site reads its own file (node config data-path), --data is only the server's "
                                  "evaluation file (deployment).", key="site-data")

    def check(self) -> None:
        if not self.source:
            raise ConfigError("data must name a MedMNIST flag (e.g. pneumoniamnist) or a .npz path")
        if self.num_classes < 0 or self.num_classes == 1:
            raise ConfigError(f"num-classes must be 0 (from the labels) or >= 2; got {self.num_classes}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise ConfigError("val-fraction and test-fraction must each be in [0, 1) and leave rows for train; got "
                              f"{self.val_fraction} and {self.test_fraction}")
        if self.num_sites < 1:
            raise ConfigError(f"num-sites must be >= 1; got {self.num_sites}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha (Dirichlet concentration) must be > 0; got {self.alpha}")
        if not 0 < self.label_fraction <= 1:
            raise ConfigError(f"label-fraction must be in (0, 1]; got {self.label_fraction}")
        if self.min_site_size < 0:
            raise ConfigError(f"min-site-size must be >= 1, or 0 for automatic; got {self.min_site_size}")

    @property
    def stem(self) -> str:
        """The data's short name: the flag, a file's stem, or a folder's name."""
        return Path(self.source.rstrip("/\\")).stem if ("/" in self.source or "." in self.source) else self.source


@dataclass(frozen=True)
class ExperimentSettings(Part):
    """The run's seed, where its main arm trains and which baselines run beside it."""

    TITLE: ClassVar[str] = "experiment"

    seed: int = setting(0, "Seed for the partition, initial weights, augmentations and sampling.", key="seed")
    mode: Mode = setting(Mode.FEDERATED, "federated, centralized (all sites' data pooled) or local-only (each site "
                         "alone).", key="mode")
    baselines: Baselines = setting(Baselines.DEFAULT, "Comparison arms run beside the main one: none, default "
                                   "(local-only and federated supervised from scratch) or all (also centralized and "
                                   "local-only with the same pretraining).", key="baselines", site=False)

    def check(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0; got {self.seed}")


@dataclass(frozen=True)
class ModelSettings(Part):
    """The encoder every arm trains."""

    TITLE: ClassVar[str] = "model"

    encoder: EncoderKind = setting(EncoderKind.AUTO, "auto (ViT for MAE, CNN otherwise), cnn or vit.", key="encoder")
    width: int = setting(16, "Channels of the CNN's first stage (doubles per stage).", key="width")
    encoder_init: str = setting("", "A pretrained encoder (e.g. arms/ARM/pretrained_encoder.safetensors of an earlier "
                                "run) to fine-tune instead of pretraining again; --pretrain then only names how it was "
                                "made.", key="encoder-init")

    def check(self) -> None:
        if self.width < 4 or self.width % 4:
            raise ConfigError(f"width must be a multiple of 4 and >= 4 (GroupNorm groups); got {self.width}")


@dataclass(frozen=True)
class OutputSettings(Part):
    """Where the centre writes the run directory."""

    TITLE: ClassVar[str] = "output"

    out_dir: str = setting("runs", "Folder that receives the run directory.", key="out-dir", site=False)
    run_name: str = setting("", "Name of the run directory (default: DATA-MODE-PRETRAIN-sSEED).", key="run-name",
                            site=False)

    def check(self) -> None:
        if self.run_name and (Path(self.run_name).name != self.run_name or self.run_name.startswith(".")):
            raise ConfigError(f"run-name must be a plain folder name; got {self.run_name!r}")


_SITE_KEY = re.compile(r"^([a-z0-9][a-z0-9_-]{0,31})=([0-9a-f]{64})$")


def parse_site_keys(text: str) -> list[tuple[str, str]]:
    """``"h1=<sha256 hex>,h2=..."`` -> [(site, fingerprint), ...]; a clear error for anything else."""
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        match = _SITE_KEY.match(item.strip())
        if not match:
            raise ConfigError(f"site-keys entry {item!r} must be SITE=SHA256 (64 lowercase hex digits)")
        pairs.append((match.group(1), match.group(2)))
    names = [n for n, _ in pairs]
    keys = [k for _, k in pairs]
    if len(set(names)) != len(names) or len(set(keys)) != len(keys):
        raise ConfigError("site-keys names a site or a key twice")
    return pairs


@dataclass(frozen=True)
class DeploymentSettings(Part):
    """A deployment run's registry of sites, and the run it continues."""

    TITLE: ClassVar[str] = "deployment"

    resume_from: str = setting("", "Deployment: a run directory whose last completed round the run continues from "
                               "(`medfed run --resume`).", key="resume-from", site=False)
    site_keys: str = setting("", "Deployment only (set by `medfed run` from the server kit): SITE=SHA256 of each "
                             "site's SuperNode key.", key="site-keys", site=False)

    def check(self) -> None:
        parse_site_keys(self.site_keys)

    @property
    def registered_sites(self) -> list[tuple[str, str]]:
        """The registry: (site name, SHA-256 of its SuperNode public key as Flower sends it), in site-id order."""
        return parse_site_keys(self.site_keys)

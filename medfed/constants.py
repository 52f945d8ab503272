"""Names shared by the server, the sites and the run directory, as StrEnums (no loose strings)."""

import re
from enum import StrEnum


class Phase(StrEnum):
    """The two phases of a medfed run."""

    PRETRAIN = "pretrain"
    FINETUNE = "finetune"


class Mode(StrEnum):
    """Where training happens."""

    FEDERATED = "federated"
    CENTRALIZED = "centralized"
    LOCAL_ONLY = "local-only"


class PartitionScheme(StrEnum):
    """How the official training split is divided into hospital sites."""

    IID = "iid"
    DIRICHLET = "dirichlet"
    QUANTITY = "quantity"
    NATURAL = "natural"  # a labels table's own hospitals (its site column), as FLamby's natural centres


class Modality(StrEnum):
    """How an image's intensities are mapped to [0, 1] (`medfed.data.images`)."""

    AUTO = "auto"  # DICOM's Modality tag (CT, MR); photographs for PNG/JPEG/TIFF; percentiles otherwise
    CT = "ct"  # a window in Hounsfield units
    MR = "mr"  # percentile scaling (also X-ray and ultrasound DICOM, NIfTI of unknown modality)
    PHOTO = "photo"  # 8-bit (or 16-bit) pixel values divided by their type's maximum


class ImageFit(StrEnum):
    """How an image is brought to the run's input size."""

    RESIZE = "resize"  # interpolate the whole field of view to the size
    CROP_PAD = "crop-pad"  # keep the pixel scale: centre crop or pad


class OnBadCase(StrEnum):
    """What an unreadable case does to a run."""

    FAIL = "fail"  # the run (or inspection) stops, naming every bad case
    SKIP = "skip"  # bad cases are left out and reported


class FinetuneMode(StrEnum):
    """Linear probe trains only the head; full fine-tuning trains encoder and head."""

    LINEAR = "linear"
    FULL = "full"
    LORA = "lora"  # low-rank adapters on the encoder's conv/linear layers + head (Hu et al., ICLR 2022)


class DPScope(StrEnum):
    """Which phases train under DP-SGD at the sites."""

    NONE = "none"
    FINETUNE = "finetune"
    PRETRAIN = "pretrain"
    ALL = "all"

    def covers(self, phase: Phase) -> bool:
        return self == DPScope.ALL or self.value == phase.value

    @property
    def covers_finetune(self) -> bool:
        return self.covers(Phase.FINETUNE)


class GradSampleMode(StrEnum):
    """How per-example gradients are computed under DP-SGD: Opacus' hooks, its functorch fall-back,
    PyTorch's expanded weights (``ew``) or Opacus' ghost clipping (``ghost``: per-example gradient norms and a
    second backward pass; augmentation multiplicity 1). ew and ghost serve fine-tuning only: the loss must go
    through the model's forward. All give the same clipped step (tests/test_dp_sgd.py); they differ in speed."""

    AUTO = "auto"  # ew for fine-tuning a CNN (faster on CPU: RESULTS.md dp_cost_cpu), else hooks
    HOOKS = "hooks"
    FUNCTORCH = "functorch"
    EW = "ew"
    GHOST = "ghost"

    def for_phase(self, finetuning: bool, encoder: str) -> "GradSampleMode":
        """The mode a phase runs with: ``auto`` resolved, any other mode as chosen. ``auto`` takes expanded
        weights only where they work and were measured faster: fine-tuning a CNN encoder. (On the ViT,
        PyTorch 2.13's expanded-weights convolution fails on the patch embedding's non-contiguous gradient.)"""
        if self is GradSampleMode.AUTO:
            return GradSampleMode.EW if finetuning and encoder == "cnn" else GradSampleMode.HOOKS
        return self


class Precision(StrEnum):
    """Floating-point precision of the training and evaluation forward passes (`medfed.devices`)."""

    AUTO = "auto"  # bf16 autocast on a GPU for phases without DP-SGD, fp32 otherwise
    FP32 = "fp32"
    BF16 = "bf16"  # bf16 autocast (the weights, optimizer and DP-SGD stay fp32) for phases without DP-SGD


class StrategyName(StrEnum):
    """Server aggregation rule."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"


class AggregationRule(StrEnum):
    """How the server combines the accepted updates of a round (see `medfed.strategies.robust`)."""

    MEAN = "mean"  # the strategy's own example-weighted average (FedAvg / FedProx)
    TRIMMED_MEAN = "trimmed-mean"  # coordinate-wise trimmed mean (Yin et al., ICML 2018)
    MEDIAN = "median"  # coordinate-wise median (Yin et al., ICML 2018)
    KRUM = "krum"  # Krum / Multi-Krum (Blanchard et al., NeurIPS 2017)


class SecureAggregation(StrEnum):
    """How sites' updates are combined so the server cannot read them one by one."""

    NONE = "none"  # the server sees every site's update (and checks each against the reply contract)
    SECAGG_PLUS = "secagg+"  # Flower's SecAgg+ (Bell et al., CCS 2020): the server learns only the sum


SECAGG_SENT_KEYS = "secagg-sent-keys"  # names of the arrays sent, newline-joined (legacy Parameters carry none)
SECAGG_SHARED_KEYS = "secagg-shared-keys"  # names of the arrays each site returns into the secure sum, in order
SECAGG_REFUSAL_METRIC = "refusal-reason"  # a refusing site's reason, in its plaintext fit metrics


class CentralDP(StrEnum):
    """Central (site-level) DP on the aggregate: each site's update clipped, Gaussian noise on the mean."""

    NONE = "none"
    SERVER_CLIP = "server-clip"  # the server clips every update (it must see them: not with secagg+)
    CLIENT_CLIP = "client-clip"  # each site clips its own update before sending (works under secagg+)


class EncoderKind(StrEnum):
    """Encoder family; AUTO picks ViT for MAE and the CNN otherwise."""

    AUTO = "auto"
    CNN = "cnn"
    VIT = "vit"


class SSLMethodName(StrEnum):
    """Self-supervised methods `--pretrain` accepts (joined with '+'); `medfed.selfsup.registry` builds them."""

    BYOL = "byol"
    MAE = "mae"
    RESTORE = "restore"
    SIMCLR = "simclr"


class TaskType(StrEnum):
    """Label layout of a MedMNIST-style file (MedMNIST's own names, ordinal treated as multi-class)."""

    BINARY = "binary-class"
    MULTICLASS = "multi-class"
    MULTILABEL = "multi-label"


class FinetuneLoss(StrEnum):
    """The fine-tuning loss."""

    CE = "ce"  # cross-entropy (binary cross-entropy for multi-label tasks)
    LOGIT_ADJUSTED = "logit-adjusted"  # plus the log of the site's label prior (Menon et al., ICLR 2021)


class FinetuneSelect(StrEnum):
    """Which fine-tuning round's global model a run keeps."""

    LAST = "last"  # the last round's
    BEST_VALIDATION = "best-validation"  # the round with the highest validation AUC (early stopping on held-out data)


class SSLAggregation(StrEnum):
    """How a site takes the global encoder into its next pretraining round (site-side; the server averages as usual)."""

    FEDAVG = "fedavg"  # replace the local encoder by the global one (FedAvg)
    FEDEMA = "fedema"  # EMA of the local and global encoders, divergence-scaled (Zhuang et al., ICLR 2022)
    FEDU = "fedu"  # BYOL's predictor shared too, taken only when the site has not diverged (Zhuang et al., ICCV 2021)


class PersonalParts(StrEnum):
    """Parts each site keeps its own of: trained from its own copy, never loaded back from the global model."""

    NONE = "none"
    NORM = "norm"  # the affine parameters of GroupNorm/LayerNorm (FedBN's idea, Li et al., ICLR 2021)
    HEAD = "head"  # the task head (FedPer, Arivazhagan et al. 2019; FedRep's split, Collins et al., ICML 2021)
    NORM_HEAD = "norm+head"

    @property
    def norm(self) -> bool:
        return self in (PersonalParts.NORM, PersonalParts.NORM_HEAD)

    @property
    def head(self) -> bool:
        return self in (PersonalParts.HEAD, PersonalParts.NORM_HEAD)


class SiteData(StrEnum):
    """Where the sites' data come from."""

    PARTITION = "partition"  # the centre cuts --data into the simulated sites' shares
    OWN = "own"  # each site reads its own file (a deployment's node config data-path)


class Baselines(StrEnum):
    """Which comparison arms `medfed simulate` runs beside the main one."""

    NONE = "none"
    DEFAULT = "default"  # local-only supervised + federated supervised from scratch
    ALL = "all"  # default + centralized with the same pretraining


class RecordKey(StrEnum):
    """Keys of the records inside Flower messages and the site's persistent state."""

    ARRAYS = "arrays"
    CONFIG = "config"
    METRICS = "metrics"
    SITE_LOCAL = "site-local"  # heads, predictors, decoders, momentum targets: never sent
    SITE_PERSONAL = "site-personal"  # fine-tuning: the site's own copy of its personal parts (never sent back to it)
    REFUSAL = "refusal"  # ConfigRecord of a site that refuses a round (its privacy budget)


class MessageKey(StrEnum):
    """Keys the server adds to the run settings in every message's ConfigRecord."""

    PHASE = "phase"
    RUN_DIR = "run-dir"  # simulation: the run directory holding the partition (split.json)
    DATA_FILE = "data-file"  # simulation: the file the partition was cut from
    ROUND = "server-round"  # set by Flower's strategies
    RUN_ID = "run-id"  # names the run in the sites' ledgers
    LEDGER_DIR = "sim-ledger-dir"  # simulation only: where the virtual sites keep ledgers and keys
    CACHE_DIR = "sim-cache-dir"  # simulation only: the centre's cache of a table's prepared cases
    DEVICE = "sim-device"  # simulation only: the run's device setting for the virtual sites
    CLIPPING_NORM = "clipping_norm"  # Flower's client-side DP wrapper (`flwr.supercore.differential_privacy`)


class MetricKey(StrEnum):
    """Metric names that travel in MetricRecords and land in metrics.jsonl."""

    NUM_EXAMPLES = "num-examples"
    SITE_ID = "site-id"
    LOSS = "train-loss"
    STEPS = "steps"
    SECONDS = "train-seconds"
    PROCESS_SECONDS = "process-seconds"  # deployment: age of the ClientApp process at its reply (start-up included)
    AUC = "auc"
    ACCURACY = "accuracy"
    SENSITIVITY = "sensitivity"
    SPECIFICITY = "specificity"
    FPR = "fpr"
    EVAL_LOSS = "eval-loss"
    # privacy (a site's cumulative spending, reported with every train reply under DP)
    EPSILON = "epsilon"
    DELTA = "delta"
    EPSILON_BUDGET = "epsilon-budget"
    EPSILON_PROJECTED = "epsilon-projected"
    NOISE_MULTIPLIER = "noise-multiplier"
    SAMPLE_RATE = "sample-rate"
    DP_STEPS = "dp-steps"
    DP_GRAD_MODE = "dp-grad-sample-mode"  # the per-example gradient mode a DP round ran with (privacy.grad_modes)
    REFUSED = "refused"
    CENTRAL_EPSILON = "central-epsilon"  # the server's site-level epsilon after a central-DP release
    CLIPPING_NORM = "clipping-norm"
    NOISE_STD = "noise-std"
    REPLAYED = "replayed"  # 1: the site re-sent its earlier release of this round (server resumed); no new spending
    EVALUATED_ON_TEST = "evaluated-on-test"  # 1: a site without val data evaluated on its share of the test split
    SSL_DIVERGENCE = "ssl-divergence"  # FedEMA/FedU: ||global - site's last encoder|| / ||global|| at a round's start
    EMA_DECAY = "ema-decay"  # FedEMA: the weight mu of the site's own encoder in its EMA with the global one
    PREDICTOR_TAKEN = "predictor-taken"  # FedU: 1 when the site took the global predictor this round


PERSONAL_PREFIX = "personal-"  # a site's personalised model on its evaluation data: personal-auc, ...
PERSONAL_TEST_PREFIX = "personal-test-"  # ... and on its share of the test split (simulation only)


class NodeConfigKey(StrEnum):
    """Keys of a SuperNode's node config (set per site in simulation or deployment)."""

    PARTITION_ID = "partition-id"
    NUM_PARTITIONS = "num-partitions"
    DATA_PATH = "data-path"  # deployment: the site's own data (a MedMNIST-style file or a labels table)
    CACHE_DIR = "cache-dir"  # deployment: where the site caches its prepared cases (its own disk)
    SITE_ID = "site-id"  # deployment: the site's number in the federation (from its kit)
    SITE_NAME = "site-name"  # deployment: the site's name (kit folder; names its ledger rows)
    LEDGER_PATH = "ledger-path"  # the site's privacy ledger (SQLite) on its own disk
    SIGNING_KEY = "signing-key"  # the site's Ed25519 private key (PEM) that signs its ledger rows
    DP_EPSILON = "dp-epsilon"  # the site's own lifetime budget: the server can lower it, never raise it
    DP_DELTA = "dp-delta"
    DP_REQUIRE = "dp-require"  # none | finetune | pretrain | all: phases this site only trains under DP
    DEVICE = "device"  # deployment: where this site trains (auto | cpu | cuda | cuda:N); the server cannot set it


NO_PRETRAIN = "none"
DEFAULT_ROUND_TIMEOUT = 3600.0  # seconds a round waits for the sites' replies (Flower's default)


SITE_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
"""A deployment site's name (kit folder, SuperNode, ledger): 1-32 of a-z 0-9 - _, not starting with - or _."""


def check_site_names(sites: list[str], reserved: frozenset[str] = frozenset()) -> None:
    """At least one site, each named by `SITE_NAME_PATTERN` and not ``reserved``, none twice; else ConfigError."""
    from medfed.exceptions import ConfigError

    if not sites:
        raise ConfigError("--sites must name at least one site (e.g. h1,h2,h3)")
    for s in sites:
        if not SITE_NAME_PATTERN.match(s) or s in reserved:
            raise ConfigError(f"site name {s!r} must be 1-32 lower-case letters, digits, '-' or '_', starting "
                              f"with a letter or digit" + (f", and not one of {sorted(reserved)}" if reserved else ""))
    if len(set(sites)) != len(sites):
        raise ConfigError(f"--sites names a site twice: {','.join(sites)}")

RESUME_KEY = "resume-from"
"""Run-config key of a resumed deployment run; never part of what a site is asked to train."""

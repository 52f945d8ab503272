"""Names shared by the server, the sites and the run directory, as StrEnums (no loose strings)."""

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


class FinetuneMode(StrEnum):
    """Linear probe trains only the head; full fine-tuning trains encoder and head."""

    LINEAR = "linear"
    FULL = "full"


class StrategyName(StrEnum):
    """Server aggregation rule."""

    FEDAVG = "fedavg"
    FEDPROX = "fedprox"


class EncoderKind(StrEnum):
    """Encoder family; AUTO picks ViT for MAE and the CNN otherwise."""

    AUTO = "auto"
    CNN = "cnn"
    VIT = "vit"


class TaskType(StrEnum):
    """Label layout of a MedMNIST-style file (MedMNIST's own names, ordinal treated as multi-class)."""

    BINARY = "binary-class"
    MULTICLASS = "multi-class"
    MULTILABEL = "multi-label"


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


class MetricKey(StrEnum):
    """Metric names that travel in MetricRecords and land in metrics.jsonl."""

    NUM_EXAMPLES = "num-examples"
    SITE_ID = "site-id"
    LOSS = "train-loss"
    STEPS = "steps"
    SECONDS = "train-seconds"
    AUC = "auc"
    ACCURACY = "accuracy"
    SENSITIVITY = "sensitivity"
    SPECIFICITY = "specificity"
    FPR = "fpr"
    EVAL_LOSS = "eval-loss"


class NodeConfigKey(StrEnum):
    """Keys of a SuperNode's node config (set per site in simulation or deployment)."""

    PARTITION_ID = "partition-id"
    NUM_PARTITIONS = "num-partitions"
    DATA_PATH = "data-path"  # deployment: the site's own MedMNIST-style file


NO_PRETRAIN = "none"

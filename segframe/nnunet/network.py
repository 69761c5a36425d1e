"""The network a segframe plans configuration builds: `build_network` (what nnU-Net's
`build_network_architecture` calls; no weights are loaded) and `dataset_network` (the same for a dataset's
channels and labels: results folders and checkpoint checks), `unwrap` (the model inside
DDP and torch.compile), and the check that nnU-Net's intensity normalisation fits `model.normalize`."""

from __future__ import annotations

from typing import Any

from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from torch import nn
from torch._dynamo import OptimizedModule

from segframe.config import SegframeConfig
from segframe.model import ViTSegModel
from segframe.nnunet.plans import config_from_configuration

# nnU-Net's per-channel normalisation that leaves RGB in [0, 1], as the backbones were pretrained
RGB_01 = "RGBTo01Normalization"


def build_network(plans_manager: Any, configuration_manager: Any, num_input_channels: int,
                  num_output_channels: int, config: SegframeConfig | None = None) -> ViTSegModel:
    """ViTSegModel from the config in the plans' configuration (or `config`, that config already
    validated); no weights are loaded."""
    if config is None:
        config = config_from_configuration(configuration_manager.configuration,
                                           f"plans {plans_manager.plans_name!r}")
    return ViTSegModel(config, in_channels=num_input_channels, num_classes=num_output_channels)


def dataset_network(plans_manager: Any, configuration_manager: Any, dataset_json: dict[str, Any],
                    config: SegframeConfig | None = None) -> ViTSegModel:
    """`build_network` with the input channels and outputs nnU-Net derives from the plans and dataset.json."""
    channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return build_network(plans_manager, configuration_manager, channels, outputs, config)


def unwrap(network: nn.Module) -> nn.Module:
    """The model inside DDP and torch.compile wrappers."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def intensity_warning(normalization_schemes: list[str], normalize: str) -> str | None:
    """A warning when nnU-Net's channel normalisation and `model.normalize` do not fit together."""
    all_rgb = all(s == RGB_01 for s in normalization_schemes)
    if normalize == "backbone" and not all_rgb:
        return (
            f"nnU-Net normalises the channels with {', '.join(normalization_schemes)} (not 0-1 RGB), but "
            "model.normalize: backbone applies the backbone's ImageNet-style mean/std on top. For RGB "
            'images name the channels {"0": "rgb_to_0_1"} in dataset.json; for z-scored data (CT, MRI, '
            "R/G/B channel names) set model.normalize: none"
        )
    if normalize == "none" and all_rgb:
        return (
            "nnU-Net gives RGB in [0, 1] but model.normalize: none skips the backbone's pretraining "
            "mean/std; set model.normalize: backbone to feed the backbone what it was pretrained on"
        )
    return None

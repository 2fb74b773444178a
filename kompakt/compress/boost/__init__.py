"""GBNN: sequential training of final layers by gradient boosting, and switching units off.

``GBNN(task=..., units_per_step=J, steps=T).fit(features, y)`` boosts a one-hidden-layer
network; ``to_module()`` merges it into a :class:`BoostedHead` (Linear -> activation ->
Linear) that saves and loads with ``kompakt.save`` / ``kompakt.load`` once
:func:`replace_head` has put it into a network. ``truncate(units)`` keeps the first units.
"""

from kompakt.compress.boost.backbone import (
    BoostHeadConfig,
    boost_classifier_head,
    describe,
    head_features,
    replace_head,
)
from kompakt.compress.boost.gbnn import GBNN, GBNNConfig
from kompakt.compress.boost.head import BoostedHead

__all__ = [
    "GBNN",
    "BoostHeadConfig",
    "BoostedHead",
    "GBNNConfig",
    "boost_classifier_head",
    "describe",
    "head_features",
    "replace_head",
]

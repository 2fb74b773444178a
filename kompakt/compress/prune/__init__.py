"""OTOv3 structured pruning: automatic zero-invariant groups, DHSPG / H2SPG, subnet construction."""

from kompakt.compress.prune.oto import OTO, count_flops, count_params

__all__ = ["OTO", "count_flops", "count_params"]

"""The compressors: ``prune`` (OTOv3), ``quantize`` (JLCM) and ``boost`` (GBNN)."""

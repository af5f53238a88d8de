"""Video anomaly models; the registry imports them as ``oddeye.models.image`` explains."""

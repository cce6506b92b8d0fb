"""fedrelay's site side: data, models, training."""

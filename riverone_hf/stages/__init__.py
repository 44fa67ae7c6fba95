"""The compression stages: one file per stage, plus the targeting and calibration they share."""

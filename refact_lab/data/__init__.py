"""Sources in, dataset out: fetching sources, stage 1 rules, stage 2 loss filter, split, the scan pipeline."""

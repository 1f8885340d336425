"""The worklist simulation: how long the sickest patients wait under each ordering."""

"""The model at run time: weights metadata, the network and its CAM, runtimes, inference, the registry."""

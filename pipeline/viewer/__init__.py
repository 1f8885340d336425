"""The OHIF viewer build the dashboard serves: install, checksum, precompression."""

# One image for every role (migrate, worker, dashboard, reconciler). PyPI's torch 2.14.1 for
# x86_64 is a CUDA build, so the same image runs on a GPU node or on CPU.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
RUN apt-get update \
 && apt-get install -y --no-install-recommends libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 cxr

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY worker ./worker
COPY dashboard ./dashboard
COPY migrations ./migrations
COPY weights ./weights
RUN pip install .
# The OHIF viewer at /ohif/ (the pinned @ohif/app build, checksum checked) in the image, not on
# the data volume.
ENV CXR_OHIF_DIR=/app/ohif
RUN cxr-triage ohif install

USER cxr
ENV CXR_DATA_DIR=/home/cxr/data
EXPOSE 8000
CMD ["cxr-triage", "serve"]

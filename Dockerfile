# refact_lab for GPU hosts: the workbench, JupyterLab and the inference API on port 8008.
#   docker build -t refact-lab .
#   docker run --gpus all -p 8008:8008 -v refact-lab:/data refact-lab
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    REFACT_LAB_HOME=/data

# Versions come from the pinned CUDA base image's Ubuntu release; pinning each apt package would break
# on every Ubuntu security update. tini is PID 1 (see ENTRYPOINT).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip git openssh-client tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/refact_lab
COPY . /opt/refact_lab

# The default index serves CUDA builds of torch, which is what a GPU host wants.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir /opt/refact_lab

ENV PATH="/opt/venv/bin:${PATH}"

RUN useradd --create-home --uid 1000 lab \
    && mkdir -p /data \
    && chown lab:lab /data
USER 1000

VOLUME ["/data"]
EXPOSE 8008

# PID 1 gets no default signal handling from the kernel and must reap orphans (kernels, training runs):
# tini does both and passes docker stop's SIGTERM to the server, which ends within its 10 s grace period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["refact-lab", "serve", "--host", "0.0.0.0", "--port", "8008"]

# oddeye: slim Python, CPU torch by default, runs as a non-root user.
#   docker build -t oddeye .                                                    # CPU
#   docker build -t oddeye:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    RAY_worker_niceness=0 \
    HF_HOME=/data/cache/huggingface \
    TORCH_HOME=/data/cache/torch

# libglib for OpenCV's video I/O; ffmpeg's libraries ship inside the opencv wheel.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch first, from the index that matches the hardware, so `pip install .` keeps it.
RUN pip install --index-url "${TORCH_INDEX}" torch torchvision
COPY pyproject.toml README.md ./
COPY oddeye ./oddeye
RUN pip install . && python -c "import oddeye.cli"
COPY configs ./configs

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin oddeye \
    && mkdir -p /data \
    && chown oddeye:oddeye /data
USER oddeye
VOLUME ["/data"]
EXPOSE 9108

ENTRYPOINT ["oddeye"]
CMD ["demo", "--forever", "--out", "/data", "--set", "metrics.port=9108"]

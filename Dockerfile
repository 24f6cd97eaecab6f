# padrec-vllm recommendation server for NVIDIA GPU nodes (docs/DEPLOY.md).
#
#   docker build -t padrec-vllm:0.1.0 .
#   docker run --gpus all --shm-size 8g -p 8000:8000 \
#     -v "$PWD/artifacts/demo-Beauty:/artifacts:ro" padrec-vllm:0.1.0
#
# The artifacts directory (`padrec build --out DIR`) is not in the image: mount it at /artifacts.
# Every server setting is an environment variable PADREC_<FIELD> (server/settings.py).

# The official vLLM image at the version pyproject.toml pins for the `gpu` extra (vllm==0.32.0):
# CUDA, PyTorch and vLLM come from it, so `pip install .[gpu]` adds only this project.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/padrec \
    HF_HOME=/home/padrec/.cache/huggingface \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Non-root user, numeric so that Kubernetes' runAsNonRoot can verify it; its home holds the caches
# that vLLM and torch.compile write at start-up.
RUN useradd --no-log-init --create-home --home-dir /home/padrec --uid 10001 \
        --shell /usr/sbin/nologin padrec \
    && mkdir -p /artifacts && chown padrec:padrec /artifacts

WORKDIR /opt/padrec
COPY pyproject.toml README.md ./
COPY padrec_vllm ./padrec_vllm
COPY server ./server

# The image's python may carry a PEP 668 marker; this is the image's own environment, on purpose.
# The import check fails the build when the image's vLLM is not the pinned one.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir "./[gpu]" \
    && python3 -c "from importlib.metadata import version as v; \
assert v('vllm').split('+')[0] == '0.32.0', v('vllm'); import server.main, padrec_vllm.vllm_plugin"

# Server configuration (override any PADREC_* with `docker run -e` / compose / the ConfigMap).
# VLLM_USE_V2_MODEL_RUNNER=0: the V1 model runner, the one the PAD-Rec draft hooks are tested on.
ENV PADREC_ARTIFACTS=/artifacts \
    PADREC_ENGINE=vllm \
    PADREC_HOST=0.0.0.0 \
    PADREC_PORT=8000 \
    PADREC_DEVICE=cuda \
    VLLM_USE_V2_MODEL_RUNNER=0

VOLUME ["/artifacts"]
EXPOSE 8000
USER 10001:10001

# /healthz answers while the model loads and turns 503 once the engine has failed;
# readiness (/readyz) is for load balancers and Kubernetes, not for restarts.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PADREC_PORT', '8000') + '/healthz', timeout=4)"]

# Replaces the vLLM image's `vllm serve` entrypoint. Settings come from PADREC_* only.
ENTRYPOINT ["python3", "-m", "server.main"]
